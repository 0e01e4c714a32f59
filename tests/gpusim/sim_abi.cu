// A C ABI over csrc/kernels' launchers, for tests/gpusim/sim.py to drive with ctypes inside GPGPU-Sim.
// Built with the kernels into one shared library by nvcc 11.8 for sm_70 (.ci/gpusim-stage.sh); the simulator
// reads the PTX of that library (PYTORCH_BIN). Every launch is on the default stream, synchronizes, and returns
// the first CUDA error (cudaSuccess = 0), so each launch is checked where it happened. Device memory is not here:
// sim.py takes it from the simulator's libcudart directly (the Triton kernels' run needs no library of ours).
#include <cstdint>

#include <cuda_runtime.h>

#include "fusedclip_kernels.h"

namespace {
int finish(cudaError_t err) {
  if (err != cudaSuccess) return static_cast<int>(err);
  return static_cast<int>(cudaDeviceSynchronize());
}
}  // namespace

extern "C" {

size_t fcsim_norm_workspace_bytes(int64_t num_tensors, int64_t num_chunks, int acc_f64) {
  return fusedclip::norm_workspace_bytes(num_tensors, num_chunks, acc_f64 != 0);
}

int64_t fcsim_grid_size(int64_t num_chunks, int sm_count) { return fusedclip::grid_size(num_chunks, sm_count); }

int fcsim_launch_norm(const fusedclip::TensorTable* table, double p, int acc_f64, void* total_out, void* norms_out,
                      void* coef_out, double max_norm, void* workspace, size_t workspace_bytes, int sm_count) {
  return finish(fusedclip::launch_norm(*table, p, acc_f64 != 0, total_out, norms_out, coef_out, max_norm, workspace,
                                       workspace_bytes, sm_count, nullptr));
}

int fcsim_launch_scale(const fusedclip::TensorTable* table, const void* coef, int coef_f64, int per_tensor,
                       int sm_count) {
  return finish(fusedclip::launch_scale(*table, coef, coef_f64 != 0, per_tensor != 0, sm_count, nullptr));
}

int fcsim_launch_clamp(const fusedclip::TensorTable* table, double clip_value, int sm_count) {
  return finish(fusedclip::launch_clamp(*table, clip_value, sm_count, nullptr));
}

}  // extern "C"
