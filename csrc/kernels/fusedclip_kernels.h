// fusedclip's pure-CUDA kernels: multi-tensor norm with an on-device finalize, in-place scale and clamp.
//
// No torch headers: raw pointers, dtype codes and a cudaStream_t, so the CPU-only CI can compile these with
// nvcc alone. The tensor table is the one python/fusedclip/backends/plan.py builds (all device pointers):
//   meta          int64 [3, T]: address, numel, dtype code of each tensor (row-major: meta[T + t] is numel)
//   chunk_tensor  int32 [C]: tensor of each chunk (chunks in tensor order)
//   chunk_start   int64 [C]: first element of the chunk within its tensor
//   tensor_chunks int32 [T + 1]: tensor t owns chunks tensor_chunks[t] .. tensor_chunks[t + 1] - 1
// Every launcher returns cudaSuccess, cudaErrorInvalidValue for bad arguments, or the launch error.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace fusedclip {

// dtype codes shared with plan.DTYPE_CODES
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// How |x| is folded. kNormP covers every other p > 0 via exp2(p * log2|x|).
enum NormKind : int { kNormL1 = 0, kNormL2 = 1, kNormInf = 2, kNormNegInf = 3, kNormZero = 4, kNormP = 5 };

constexpr int kThreads = 512;          // threads per block, every kernel
constexpr int kBlocksPerSM = 4;        // grid = min(chunks, SMs * kBlocksPerSM)
constexpr int kVectorBytes = 16;       // width of one vector load/store
constexpr int kChunkAlign = 16;        // chunk_size must be a multiple: keeps every chunk start 16-byte aligned
constexpr int64_t kDefaultChunkSize = 65536;
constexpr int kTileTensors = 2048;     // per-tensor norms are finalized a tile of this many tensors at a time

struct TensorTable {
  const int64_t* meta = nullptr;
  const int32_t* chunk_tensor = nullptr;
  const int64_t* chunk_start = nullptr;
  const int32_t* tensor_chunks = nullptr;  // needed by the norm only
  int64_t num_tensors = 0;
  int64_t num_chunks = 0;
  int64_t chunk_size = 0;
};

// The kind for a norm order (p = +-inf, 0, 1, 2 get their own fold).
NormKind norm_kind(double p);

// Blocks a launch over `num_chunks` uses on a device with `sm_count` SMs.
int64_t grid_size(int64_t num_chunks, int sm_count);

// Bytes of scratch launch_norm needs for a table of num_tensors tensors in num_chunks chunks: counters (a ticket,
// one per tile of kTileTensors tensors), one partial per chunk, one share of the total per tile.
size_t norm_workspace_bytes(int64_t num_tensors, int64_t num_chunks, bool acc_f64);

// Norm of all tensors of the table, in one launch, plus one memset of its counters (4 bytes for a total alone;
// 16 + 4 bytes per tile of kTileTensors tensors with per-tensor norms or p = 0).
// Accumulates in float32, or float64 when acc_f64. Outputs are device pointers of the accumulation dtype:
//   total_out  [1]   the total, torch's definition for every p (p = 0: tensors with a non-zero entry)
//   norms_out  [T]   per-tensor norms, or nullptr
//   coef_out   [1]   min(max_norm / (total + 1e-6), 1) (NaN stays NaN), or nullptr
// The result is deterministic: every reduction runs in an order fixed by the tables (see norm.cu), whichever
// block happens to do it.
cudaError_t launch_norm(const TensorTable& table, double p, bool acc_f64, void* total_out, void* norms_out,
                        void* coef_out, double max_norm, void* workspace, size_t workspace_bytes, int sm_count,
                        cudaStream_t stream);

// g *= coef in place. coef is a device pointer of float32 (or float64 when coef_f64): one value, or one per
// tensor when per_tensor. A coefficient of exactly 1 skips its tensors (every block returns at once for the
// global one), so the common no-clip step touches no gradient memory.
cudaError_t launch_scale(const TensorTable& table, const void* coef, bool coef_f64, bool per_tensor, int sm_count,
                         cudaStream_t stream);

// g = clamp(g, -clip_value, clip_value) in place; NaN stays NaN.
cudaError_t launch_clamp(const TensorTable& table, double clip_value, int sm_count, cudaStream_t stream);

// CUDA runtime version these kernels were compiled against (CUDART_VERSION).
int compiled_cuda_version();

// Which binary the current device runs for the norm kernel: SASS arch (e.g. 90) and PTX arch (0 if none),
// as cudaFuncGetAttributes reports them.
cudaError_t loaded_kernel_arch(int* binary_version, int* ptx_version);

}  // namespace fusedclip
