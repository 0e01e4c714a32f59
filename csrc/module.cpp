// The Python module fusedclip._C. Importing it loads this library, whose static initializers register the
// torch.ops.fusedclip.* ops (ops.cpp); pybind11 adds the non-op extra, build_info().
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <string>

#include "fusedclip_kernels.h"

// The build passes the arch list as one bare token (setup.py: '8.0;9.0+PTX' -> 8.0_9.0+PTX).
#ifndef FUSEDCLIP_CUDA_ARCHS
#define FUSEDCLIP_CUDA_ARCHS unknown
#endif
#define FUSEDCLIP_STR2(x) #x
#define FUSEDCLIP_STR(x) FUSEDCLIP_STR2(x)

namespace py = pybind11;

namespace {

std::string arch_list() {
  std::string s = FUSEDCLIP_STR(FUSEDCLIP_CUDA_ARCHS);
  for (char& c : s) {
    if (c == '_') c = ';';
  }
  return s;
}

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); }

py::dict build_info() {
  py::dict d;
  d["cuda_version"] = version_string(fusedclip::compiled_cuda_version());
  d["cuda_archs"] = arch_list();
  py::dict params;
  params["threads_per_block"] = fusedclip::kThreads;
  params["blocks_per_sm"] = fusedclip::kBlocksPerSM;
  params["vector_bytes"] = fusedclip::kVectorBytes;
  params["chunk_align"] = fusedclip::kChunkAlign;
  params["default_chunk_size"] = fusedclip::kDefaultChunkSize;
  params["tile_tensors"] = fusedclip::kTileTensors;
  d["kernel_params"] = params;
  int runtime = 0;
  d["cuda_runtime_version"] = cudaRuntimeGetVersion(&runtime) == cudaSuccess ? py::object(py::str(version_string(runtime)))
                                                                             : py::object(py::none());
  // Which of the compiled binaries the current device loads (needs a device; None without one).
  int count = 0;
  int binary = 0;
  int ptx = 0;
  if (cudaGetDeviceCount(&count) == cudaSuccess && count > 0 &&
      fusedclip::loaded_kernel_arch(&binary, &ptx) == cudaSuccess) {
    d["loaded_binary_arch"] = binary;
    d["loaded_ptx_arch"] = ptx;
  } else {
    cudaGetLastError();  // clear the error a GPU-less query leaves behind
    d["loaded_binary_arch"] = py::none();
    d["loaded_ptx_arch"] = py::none();
  }
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedclip's CUDA extension: torch.ops.fusedclip.* and build information";
  m.def("build_info", &build_info, "CUDA version, compiled archs and kernel parameters of this build");
}
