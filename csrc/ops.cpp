// Torch ops over the pure-CUDA kernels in kernels/. Registered as torch.ops.fusedclip.*; the gradients are
// passed as a tensor list (so the dispatcher and torch.compile see what is read and mutated) and the kernels
// reach them through the device table built by python/fusedclip/backends/plan.py.
//
// Only c10's CUDA headers and the CUDA runtime API: ATen/cuda/CUDAContext.h would pull in cuBLAS, cuSPARSE and
// cuSOLVER headers, which a plain CUDA toolkit (nvcc + runtime) does not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>

#include "fusedclip_kernels.h"

namespace fusedclip {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fusedclip: ", what, " failed: ", cudaGetErrorString(err));
}

// units: the table lists units of the grads (AGC: contiguous rows, at least one per grad), not the grads.
// (meta was checked by table_of)
void check_grads(at::TensorList grads, const at::Tensor& meta, bool units) {
  TORCH_CHECK(!grads.empty(), "fusedclip: grads must not be empty");
  if (units) {
    TORCH_CHECK(static_cast<int64_t>(grads.size()) <= meta.size(1), "fusedclip: ", grads.size(),
                " tensors for a table of only ", meta.size(1), " units");
  } else {
    TORCH_CHECK(static_cast<int64_t>(grads.size()) == meta.size(1), "fusedclip: ", grads.size(),
                " grads for a table of ", meta.size(1), " tensors");
  }
  for (const auto& g : grads) {
    TORCH_CHECK(g.device() == meta.device(), "fusedclip: every grad must be on ", meta.device(), ", got ",
                g.device());
    const auto st = g.scalar_type();
    TORCH_CHECK(g.layout() == at::kStrided && g.is_contiguous() &&
                    (st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble),
                "fusedclip: every grad must be a dense contiguous float32, float16, bfloat16 or float64 tensor, got ",
                st, " ", g.layout(), g.is_contiguous() ? "" : " (not contiguous)");
  }
}

// The tables alone (the planned_* ops have no tensor list to check them against).
TensorTable table_of(const at::Tensor& meta, const at::Tensor& chunk_tensor, const at::Tensor& chunk_start,
                     const at::Tensor* tensor_chunks, int64_t chunk_size) {
  TORCH_CHECK(meta.is_cuda() && meta.scalar_type() == at::kLong && meta.dim() == 2 && meta.size(0) == 3 &&
                  meta.is_contiguous(),
              "fusedclip: meta must be a contiguous int64 [3, T] CUDA tensor");
  TORCH_CHECK(chunk_tensor.device() == meta.device() && chunk_tensor.scalar_type() == at::kInt &&
                  chunk_tensor.dim() == 1 && chunk_tensor.is_contiguous(),
              "fusedclip: chunk_tensor must be a contiguous int32 [C] tensor on ", meta.device());
  TORCH_CHECK(chunk_start.device() == meta.device() && chunk_start.scalar_type() == at::kLong &&
                  chunk_start.dim() == 1 && chunk_start.numel() == chunk_tensor.numel() && chunk_start.is_contiguous(),
              "fusedclip: chunk_start must be a contiguous int64 [C] tensor on ", meta.device());
  TORCH_CHECK(chunk_tensor.numel() > 0, "fusedclip: the chunk table is empty");
  TORCH_CHECK(chunk_size > 0 && chunk_size % kChunkAlign == 0, "fusedclip: chunk_size must be a positive multiple of ",
              kChunkAlign, ", got ", chunk_size);
  TensorTable t;
  t.meta = meta.data_ptr<int64_t>();
  t.chunk_tensor = chunk_tensor.data_ptr<int32_t>();
  t.chunk_start = chunk_start.data_ptr<int64_t>();
  if (tensor_chunks != nullptr) {
    TORCH_CHECK(tensor_chunks->device() == meta.device() && tensor_chunks->scalar_type() == at::kInt &&
                    tensor_chunks->dim() == 1 && tensor_chunks->numel() == meta.size(1) + 1 &&
                    tensor_chunks->is_contiguous(),
                "fusedclip: tensor_chunks must be a contiguous int32 [T + 1] tensor on ", meta.device());
    t.tensor_chunks = tensor_chunks->data_ptr<int32_t>();
  }
  t.num_tensors = meta.size(1);
  t.num_chunks = chunk_tensor.numel();
  t.chunk_size = chunk_size;
  return t;
}

TensorTable make_table(at::TensorList grads, const at::Tensor& meta, const at::Tensor& chunk_tensor,
                       const at::Tensor& chunk_start, const at::Tensor* tensor_chunks, int64_t chunk_size,
                       bool units = false) {
  const TensorTable table = table_of(meta, chunk_tensor, chunk_start, tensor_chunks, chunk_size);
  check_grads(grads, meta, units);
  return table;
}

// SMs of a device, asked of the runtime once per device (the launch grid depends on it).
int sm_count(const at::Device& device) {
  static std::array<std::atomic<int>, 64> cache{};  // 0: not asked yet
  const int index = device.index();
  std::atomic<int>* slot = index >= 0 && index < static_cast<int>(cache.size()) ? &cache[index] : nullptr;
  int count = slot != nullptr ? slot->load(std::memory_order_relaxed) : 0;
  if (count == 0) {
    check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, index), "reading the SM count");
    if (slot != nullptr) slot->store(count, std::memory_order_relaxed);
  }
  return count;
}

bool any_float64(at::TensorList grads) {
  for (const auto& g : grads) {
    if (g.scalar_type() == at::kDouble) return true;
  }
  return false;
}

// (total, per-tensor norms or an empty tensor, coef or an undefined tensor) of a checked table; f64: accumulate in
// float64 (any tensor of the table is float64); max_norm is read (and checked) only when want_coef.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_of_table(const TensorTable& table, const at::Tensor& meta,
                                                             bool f64, double norm_type, bool per_tensor,
                                                             bool want_coef, double max_norm) {
  TORCH_CHECK(!std::isnan(norm_type), "fusedclip: norm_type is NaN");
  TORCH_CHECK(!want_coef || max_norm >= 0.0, "fusedclip: max_norm must be >= 0, got ", max_norm);
  const c10::cuda::CUDAGuard guard(meta.device());
  const auto opts = meta.options().dtype(f64 ? at::kDouble : at::kFloat);
  at::Tensor total = at::empty({}, opts);
  at::Tensor norms = at::empty({per_tensor ? table.num_tensors : 0}, opts);
  at::Tensor coef = want_coef ? at::empty({}, opts) : at::Tensor();
  const int sms = sm_count(meta.device());
  const size_t ws_bytes = norm_workspace_bytes(table.num_tensors, table.num_chunks, f64);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, meta.options().dtype(at::kByte));
  check_cuda(launch_norm(table, norm_type, f64, total.data_ptr(), per_tensor ? norms.data_ptr() : nullptr,
                         want_coef ? coef.data_ptr() : nullptr, max_norm, workspace.data_ptr(), ws_bytes, sms,
                         c10::cuda::getCurrentCUDAStream()),
             "norm launch");
  return {total, norms, coef};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_norm(at::TensorList grads, const at::Tensor& meta,
                                                        const at::Tensor& chunk_tensor, const at::Tensor& chunk_start,
                                                        const at::Tensor& tensor_chunks, int64_t chunk_size,
                                                        double norm_type, bool per_tensor, bool want_coef,
                                                        double max_norm, bool units = false) {
  const TensorTable table = make_table(grads, meta, chunk_tensor, chunk_start, &tensor_chunks, chunk_size, units);
  return norm_of_table(table, meta, any_float64(grads), norm_type, per_tensor, want_coef, max_norm);
}

std::tuple<at::Tensor, at::Tensor> norm_cuda(at::TensorList grads, const at::Tensor& meta,
                                             const at::Tensor& chunk_tensor, const at::Tensor& chunk_start,
                                             const at::Tensor& tensor_chunks, int64_t chunk_size, double norm_type,
                                             bool per_tensor) {
  auto r = run_norm(grads, meta, chunk_tensor, chunk_start, tensor_chunks, chunk_size, norm_type, per_tensor, false, 0.0);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor> norm_and_coef_cuda(at::TensorList grads, const at::Tensor& meta,
                                                      const at::Tensor& chunk_tensor, const at::Tensor& chunk_start,
                                                      const at::Tensor& tensor_chunks, int64_t chunk_size,
                                                      double norm_type, double max_norm) {
  auto r = run_norm(grads, meta, chunk_tensor, chunk_start, tensor_chunks, chunk_size, norm_type, false, true, max_norm);
  return {std::get<0>(r), std::get<2>(r)};
}

void scale_table(const TensorTable& table, const at::Tensor& meta, const at::Tensor& coef, bool per_tensor) {
  TORCH_CHECK(coef.device() == meta.device(), "fusedclip: the clip coefficient must be on ", meta.device(), ", got ",
              coef.device());
  TORCH_CHECK(coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble,
              "fusedclip: the clip coefficient must be float32 or float64, got ", coef.scalar_type());
  TORCH_CHECK(coef.numel() == (per_tensor ? table.num_tensors : 1), "fusedclip: expected ",
              (per_tensor ? table.num_tensors : 1), " clip coefficient(s), got ", coef.numel());
  const c10::cuda::CUDAGuard guard(meta.device());
  const at::Tensor c = coef.contiguous();
  check_cuda(launch_scale(table, c.data_ptr(), c.scalar_type() == at::kDouble, per_tensor, sm_count(meta.device()),
                          c10::cuda::getCurrentCUDAStream()),
             "scale launch");
}

void run_scale(at::TensorList grads, const at::Tensor& meta, const at::Tensor& chunk_tensor,
               const at::Tensor& chunk_start, int64_t chunk_size, const at::Tensor& coef, bool per_tensor,
               bool units = false) {
  scale_table(make_table(grads, meta, chunk_tensor, chunk_start, nullptr, chunk_size, units), meta, coef, per_tensor);
}

void scale_cuda(at::TensorList grads, const at::Tensor& meta, const at::Tensor& chunk_tensor,
                const at::Tensor& chunk_start, int64_t chunk_size, const at::Tensor& coef) {
  run_scale(grads, meta, chunk_tensor, chunk_start, chunk_size, coef, false);
}

void scale_per_tensor_cuda(at::TensorList grads, const at::Tensor& meta, const at::Tensor& chunk_tensor,
                           const at::Tensor& chunk_start, int64_t chunk_size, const at::Tensor& coefs) {
  run_scale(grads, meta, chunk_tensor, chunk_start, chunk_size, coefs, true);
}

// AGC: the norm of every unit of a unit table (one entry per unit), and unit u *= coefs[u].
at::Tensor unit_norms_cuda(at::TensorList tensors, const at::Tensor& meta, const at::Tensor& chunk_tensor,
                           const at::Tensor& chunk_start, const at::Tensor& tensor_chunks, int64_t chunk_size,
                           double norm_type) {
  auto r = run_norm(tensors, meta, chunk_tensor, chunk_start, tensor_chunks, chunk_size, norm_type, true, false, 0.0,
                    true);
  return std::get<1>(r);
}

void scale_units_cuda(at::TensorList tensors, const at::Tensor& meta, const at::Tensor& chunk_tensor,
                      const at::Tensor& chunk_start, int64_t chunk_size, const at::Tensor& coefs) {
  run_scale(tensors, meta, chunk_tensor, chunk_start, chunk_size, coefs, true, true);
}

void clamp_table(const TensorTable& table, const at::Tensor& meta, double clip_value) {
  TORCH_CHECK(clip_value >= 0.0, "fusedclip: clip_value must be >= 0, got ", clip_value);
  const c10::cuda::CUDAGuard guard(meta.device());
  check_cuda(launch_clamp(table, clip_value, sm_count(meta.device()), c10::cuda::getCurrentCUDAStream()),
             "clamp launch");
}

void clamp_cuda(at::TensorList grads, const at::Tensor& meta, const at::Tensor& chunk_tensor,
                const at::Tensor& chunk_start, int64_t chunk_size, double clip_value) {
  clamp_table(make_table(grads, meta, chunk_tensor, chunk_start, nullptr, chunk_size), meta, clip_value);
}

// The planned_* ops: a kept plan's calls (see the schemas below). Each launches what the op of the same job does,
// on the table alone; the per-call scratch (counters, partials) is allocated here, on the current stream, as there.
std::tuple<at::Tensor, at::Tensor, at::Tensor> planned_norm_cuda(const at::Tensor& meta,
                                                                 const at::Tensor& chunk_tensor,
                                                                 const at::Tensor& chunk_start,
                                                                 const at::Tensor& tensor_chunks, int64_t chunk_size,
                                                                 bool acc_f64, double norm_type, bool per_tensor,
                                                                 std::optional<double> max_norm) {
  const TensorTable table = table_of(meta, chunk_tensor, chunk_start, &tensor_chunks, chunk_size);
  auto r = norm_of_table(table, meta, acc_f64, norm_type, per_tensor, max_norm.has_value(), max_norm.value_or(0.0));
  at::Tensor coef = std::get<2>(r);
  return {std::get<0>(r), std::get<1>(r), coef.defined() ? coef : std::get<0>(r).new_empty({0})};
}

void planned_scale_cuda(const at::Tensor& meta, const at::Tensor& chunk_tensor, const at::Tensor& chunk_start,
                        int64_t chunk_size, const at::Tensor& coef, bool per_tensor) {
  scale_table(table_of(meta, chunk_tensor, chunk_start, nullptr, chunk_size), meta, coef, per_tensor);
}

void planned_clamp_cuda(const at::Tensor& meta, const at::Tensor& chunk_tensor, const at::Tensor& chunk_start,
                        int64_t chunk_size, double clip_value) {
  clamp_table(table_of(meta, chunk_tensor, chunk_start, nullptr, chunk_size), meta, clip_value);
}

}  // namespace
}  // namespace fusedclip

// Tables: meta int64 [3, T], chunk_tensor int32 [C], chunk_start int64 [C], tensor_chunks int32 [T + 1].
// Results are float32, float64 when any grad is float64.
TORCH_LIBRARY(fusedclip, m) {
  // The fake (meta) kernels for torch.compile are registered in Python, in this module.
  m.set_python_module("fusedclip.backends.cuda_backend");
  m.def(
      "norm(Tensor[] grads, Tensor meta, Tensor chunk_tensor, Tensor chunk_start, Tensor tensor_chunks, "
      "int chunk_size, float norm_type, bool per_tensor) -> (Tensor, Tensor)");
  m.def(
      "norm_and_coef(Tensor[] grads, Tensor meta, Tensor chunk_tensor, Tensor chunk_start, Tensor tensor_chunks, "
      "int chunk_size, float norm_type, float max_norm) -> (Tensor, Tensor)");
  m.def(
      "scale(Tensor(a!)[] grads, Tensor meta, Tensor chunk_tensor, Tensor chunk_start, int chunk_size, "
      "Tensor coef) -> ()");
  m.def(
      "scale_per_tensor(Tensor(a!)[] grads, Tensor meta, Tensor chunk_tensor, Tensor chunk_start, int chunk_size, "
      "Tensor coefs) -> ()");
  m.def(
      "clamp(Tensor(a!)[] grads, Tensor meta, Tensor chunk_tensor, Tensor chunk_start, int chunk_size, "
      "float clip_value) -> ()");
  // AGC over a unit table (meta lists units of `tensors`, which are passed so the mutation is declared).
  m.def(
      "unit_norms(Tensor[] tensors, Tensor meta, Tensor chunk_tensor, Tensor chunk_start, Tensor tensor_chunks, "
      "int chunk_size, float norm_type) -> Tensor");
  m.def(
      "scale_units(Tensor(a!)[] tensors, Tensor meta, Tensor chunk_tensor, Tensor chunk_start, int chunk_size, "
      "Tensor coefs) -> ()");
  // A kept plan's calls (python/fusedclip/fastpath.py, through the cuda backend's prepared calls): the table alone,
  // no tensor list, for the host cost of the steady state. The caller has just proved that the tensors at the
  // table's addresses are the ones it describes (address, size, dtype, device of each), which no op could check:
  // so they are called only there, eagerly, and never traced (what scale and clamp write through the table is not
  // declared to the dispatcher). planned_norm returns (total, per-tensor norms or an empty tensor, the clip
  // coefficient or an empty tensor), accumulating in float64 when acc_f64.
  m.def(
      "planned_norm(Tensor meta, Tensor chunk_tensor, Tensor chunk_start, Tensor tensor_chunks, int chunk_size, "
      "bool acc_f64, float norm_type, bool per_tensor, float? max_norm) -> (Tensor, Tensor, Tensor)");
  m.def(
      "planned_scale(Tensor meta, Tensor chunk_tensor, Tensor chunk_start, int chunk_size, Tensor coef, "
      "bool per_tensor) -> ()");
  m.def("planned_clamp(Tensor meta, Tensor chunk_tensor, Tensor chunk_start, int chunk_size, float clip_value) -> ()");
}

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("norm", &fusedclip::norm_cuda);
  m.impl("norm_and_coef", &fusedclip::norm_and_coef_cuda);
  m.impl("scale", &fusedclip::scale_cuda);
  m.impl("scale_per_tensor", &fusedclip::scale_per_tensor_cuda);
  m.impl("clamp", &fusedclip::clamp_cuda);
  m.impl("unit_norms", &fusedclip::unit_norms_cuda);
  m.impl("scale_units", &fusedclip::scale_units_cuda);
  m.impl("planned_norm", &fusedclip::planned_norm_cuda);
  m.impl("planned_scale", &fusedclip::planned_scale_cuda);
  m.impl("planned_clamp", &fusedclip::planned_clamp_cuda);
}
