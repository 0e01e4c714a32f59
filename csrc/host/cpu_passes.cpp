// fusedclip._host's CPU passes: the torch backend's scale and row norms over all long CPU tensors of a call in ONE
// parallel region (python/fusedclip/backends/torch_backend.py says when they are used).
//
// torch opens an OpenMP region per op over more than 32768 elements: an equal share per thread, and every thread
// waits for the last at the region's end. When other processes want the cores (data-loading workers, a second job),
// each region waits for a descheduled thread to be run again, milliseconds each: a scale of GPT-2's 148 tensors took
// 400 ms instead of 21 with two busy processes on 2 cores. Here one region covers every tensor, cut into pieces that
// the threads take from a shared counter as they come, so a thread that is late only leaves its pieces to the
// others. Each piece is a torch op (in the region, torch runs it on the calling thread): the same arithmetic as the
// op on the whole tensor, elementwise for the scale, row by row for the norms.
//
// Built with -fopenmp (on Linux): the region is torch's at::parallel_for, in the OpenMP runtime torch loaded
// (libgomp.so.1). Without OpenMP it would run on one thread: CPU_PASSES_PARALLEL says so, and Python does not use it.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <cstdint>
#include <vector>

namespace {

struct Piece {
  int64_t tensor;  // index into the call's lists
  int64_t start;   // first element (scale) or first row (norms)
  int64_t length;  // elements (scale) or rows (norms); 0 rows: the tensor's tail, shorter than a row
};

// Every piece once, on torch's intra-op threads, each taking the next piece when it is free.
template <class F>
void run_pieces(const std::vector<Piece>& pieces, const F& work) {
  std::atomic<size_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(pieces.size()));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::NoGradGuard no_grad;  // the calling thread's grad mode is not the workers': none is needed
    for (size_t i = next.fetch_add(1); i < pieces.size(); i = next.fetch_add(1)) work(pieces[i]);
  });
}

void check_tensors(const std::vector<at::Tensor>& tensors, const char* what) {
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided && t.is_contiguous(), what,
                ": every tensor must be a contiguous CPU tensor");
  }
}

// tensors[i] *= coef, in pieces of `piece` elements. The tensors must not overlap (the caller checks).
void scale_(const std::vector<at::Tensor>& tensors, const at::Tensor& coef, int64_t piece) {
  check_tensors(tensors, "scale_");
  TORCH_CHECK(piece > 0, "scale_: piece must be positive");
  std::vector<at::Tensor> flat;
  std::vector<Piece> pieces;
  for (size_t i = 0; i < tensors.size(); ++i) {
    flat.push_back(tensors[i].view(-1));
    const int64_t n = tensors[i].numel();
    for (int64_t s = 0; s < n; s += piece) pieces.push_back({static_cast<int64_t>(i), s, std::min(piece, n - s)});
  }
  pybind11::gil_scoped_release no_gil;
  run_pieces(pieces, [&](const Piece& p) {
    const at::Tensor& t = flat[p.tensor];
    (p.length == t.numel() ? t : t.narrow(0, p.start, p.length)).mul_(coef);
  });
}

// outs[i][r] = the p-norm of row r of tensors[i] (rows of `row` elements; a last, shorter row for the tail), in
// pieces of `piece_rows` rows; each norm in outs[i]'s dtype (float32 for bf16/fp16 values).
void row_norms(const std::vector<at::Tensor>& tensors, const std::vector<at::Tensor>& outs, double p, int64_t row,
               int64_t piece_rows) {
  check_tensors(tensors, "row_norms");
  TORCH_CHECK(tensors.size() == outs.size() && row > 0 && piece_rows > 0, "row_norms: bad arguments");
  std::vector<at::Tensor> flat;
  std::vector<Piece> pieces;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t n = tensors[i].numel(), rows = n / row, count = rows + (rows * row < n);
    TORCH_CHECK(outs[i].dim() == 1 && outs[i].numel() == count && outs[i].is_contiguous(),
                "row_norms: outs[", i, "] must be a contiguous vector of ", count, " elements");
    flat.push_back(tensors[i].view(-1));
    for (int64_t r = 0; r < rows; r += piece_rows)
      pieces.push_back({static_cast<int64_t>(i), r, std::min(piece_rows, rows - r)});
    if (rows * row < n) pieces.push_back({static_cast<int64_t>(i), rows, 0});
  }
  pybind11::gil_scoped_release no_gil;
  run_pieces(pieces, [&](const Piece& q) {
    const at::Tensor& x = flat[q.tensor];
    at::Tensor out = outs[q.tensor];
    const auto dtype = out.scalar_type() == x.scalar_type() ? std::nullopt : std::optional(out.scalar_type());
    if (q.length == 0) {  // the tail
      const int64_t start = q.start * row;
      at::Tensor one = out.select(0, q.start);
      at::linalg_vector_norm_out(one, x.narrow(0, start, x.numel() - start), p, std::nullopt, false, dtype);
      return;
    }
    at::Tensor o = out.narrow(0, q.start, q.length);
    at::linalg_vector_norm_out(o, x.narrow(0, q.start * row, q.length * row).view({q.length, row}), p, 1, false,
                               dtype);
  });
}

}  // namespace

void add_cpu_passes(pybind11::module_& m) {
  m.def("scale_", &scale_, pybind11::arg("tensors"), pybind11::arg("coef"), pybind11::arg("piece"),
        "each tensor *= coef (a 0-dim tensor), in pieces of `piece` elements, all in one parallel region");
  m.def("row_norms", &row_norms, pybind11::arg("tensors"), pybind11::arg("outs"), pybind11::arg("p"),
        pybind11::arg("row"), pybind11::arg("piece_rows"),
        "the p-norms of each tensor's rows (and of its tail) into outs, all in one parallel region");
#ifdef _OPENMP
  m.attr("CPU_PASSES_PARALLEL") = true;
#else
  m.attr("CPU_PASSES_PARALLEL") = false;  // built without OpenMP: the region would run on one thread
#endif
}
