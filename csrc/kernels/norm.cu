// Multi-tensor norm: one launch over the whole tensor table, finalized on the device by the last block.
//
// Without per-tensor results each block folds all of its chunks into one partial; with them (or for p = 0,
// whose total counts tensors) each chunk gets its own partial and the last block folds every tensor's chunks
// with one warp per tensor. Partials are reduced in a fixed order, so equal inputs give equal bits; no float
// atomics. NaN propagates through every fold (plain fmax/fmin would drop it).
#include <cmath>
#include <cstring>

#include "common.cuh"

namespace fusedclip {
namespace detail {
namespace {

__device__ __forceinline__ float m_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double m_abs(double x) { return fabs(x); }
__device__ __forceinline__ float m_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double m_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float m_pow_abs(float x, float p) { return exp2f(p * log2f(fabsf(x))); }
__device__ __forceinline__ double m_pow_abs(double x, double p) { return exp2(p * log2(fabs(x))); }
__device__ __forceinline__ float m_pow(float x, float e) { return powf(x, e); }
__device__ __forceinline__ double m_pow(double x, double e) { return pow(x, e); }

// max/min that keep a NaN from either side.
template <typename A> __device__ __forceinline__ A nan_max(A a, A b) { return (a > b || a != a) ? a : b; }
template <typename A> __device__ __forceinline__ A nan_min(A a, A b) { return (a < b || a != a) ? a : b; }

// The per-element fold of one norm kind in accumulation type A.
template <typename A, int K> struct Fold {
  A p;
  __device__ __forceinline__ A identity() const {
    return K == kNormNegInf ? static_cast<A>(INFINITY) : static_cast<A>(0);
  }
  __device__ __forceinline__ A step(A acc, A x) const {
    if (K == kNormL1) return acc + m_abs(x);
    if (K == kNormL2) return acc + x * x;
    if (K == kNormInf) return nan_max(acc, m_abs(x));
    if (K == kNormNegInf) return nan_min(acc, m_abs(x));
    if (K == kNormZero) return acc + (x != static_cast<A>(0) ? static_cast<A>(1) : static_cast<A>(0));
    return acc + m_pow_abs(x, p);
  }
  __device__ __forceinline__ A combine(A a, A b) const {
    if (K == kNormInf) return nan_max(a, b);
    if (K == kNormNegInf) return nan_min(a, b);
    return a + b;
  }
  // From the folded value to the norm.
  __device__ __forceinline__ A root(A v) const {
    if (K == kNormL2) return m_sqrt(v);
    if (K == kNormP) return m_pow(v, static_cast<A>(1) / p);
    return v;
  }
};

template <typename T> __device__ __forceinline__ Pack<T> load_pack_ro(const Pack<T>* ptr) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(ptr));
  Pack<T> out;
  memcpy(&out, &raw, sizeof(out));
  return out;
}

template <typename T, typename A, typename F> __device__ __forceinline__ A fold_pack(const F& f, A acc, const Pack<T>& pk) {
#pragma unroll
  for (int j = 0; j < Pack<T>::kN; ++j) acc = f.step(acc, static_cast<A>(to_float(pk.v[j])));
  return acc;
}

// This thread's share of one chunk, folded into acc.
template <typename T, typename A, typename F> __device__ A fold_chunk(const ChunkView& v, const F& f, A acc) {
  const T* base = static_cast<const T*>(v.base) + v.start;
  int64_t tail = 0;
  if (aligned16(base)) {
    constexpr int N = Pack<T>::kN;
    const int64_t nvec = v.count / N;
    const Pack<T>* vp = reinterpret_cast<const Pack<T>*>(base);
    int64_t i = threadIdx.x;
    // Four independent 16-byte loads in flight per thread.
    for (; i + 3 * kThreads < nvec; i += 4 * kThreads) {
      const Pack<T> a = load_pack_ro(vp + i);
      const Pack<T> b = load_pack_ro(vp + i + kThreads);
      const Pack<T> c = load_pack_ro(vp + i + 2 * kThreads);
      const Pack<T> d = load_pack_ro(vp + i + 3 * kThreads);
      acc = fold_pack<T>(f, acc, a);
      acc = fold_pack<T>(f, acc, b);
      acc = fold_pack<T>(f, acc, c);
      acc = fold_pack<T>(f, acc, d);
    }
    for (; i < nvec; i += kThreads) acc = fold_pack<T>(f, acc, load_pack_ro(vp + i));
    tail = nvec * N;
  }
  for (int64_t i = tail + threadIdx.x; i < v.count; i += kThreads) acc = f.step(acc, static_cast<A>(to_float(base[i])));
  return acc;
}

template <typename A, typename F> __device__ __forceinline__ A warp_reduce(A v, const F& f) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = f.combine(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Fixed-order block reduction; the result is valid in thread 0. smem holds kThreads / 32 values.
template <typename A, typename F> __device__ A block_reduce(A v, const F& f, A* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_reduce(v, f);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? smem[lane] : f.identity();
    v = warp_reduce(v, f);
  }
  __syncthreads();  // smem is reused by the next call
  return v;
}

template <typename A, int K>
__global__ void __launch_bounds__(kThreads)
norm_kernel(TensorTable tt, A p, bool per_chunk, A* partials, unsigned int* ticket, A* total_out, A* norms_out,
            A* coef_out, A max_norm) {
  __shared__ A smem[kThreads / 32];
  __shared__ bool is_last;
  const Fold<A, K> f{p};

  A acc = f.identity();
  for (int64_t c = blockIdx.x; c < tt.num_chunks; c += gridDim.x) {
    const ChunkView v = chunk_view(tt, c);
    A part = per_chunk ? f.identity() : acc;
    switch (v.dtype) {
      case kFloat32: part = fold_chunk<float>(v, f, part); break;
      case kFloat16: part = fold_chunk<__half>(v, f, part); break;
      case kBFloat16: part = fold_chunk<__nv_bfloat16>(v, f, part); break;
      case kFloat64: part = fold_chunk<double>(v, f, part); break;
      default: break;
    }
    if (per_chunk) {
      part = block_reduce(part, f, smem);
      if (threadIdx.x == 0) partials[c] = part;
    } else {
      acc = part;
    }
  }
  if (!per_chunk) {
    acc = block_reduce(acc, f, smem);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
  }

  // The last block to take a ticket sees every partial (each block fenced before taking its ticket).
  if (threadIdx.x == 0) {
    __threadfence();
    is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  A total;
  if (!per_chunk) {
    A v = f.identity();
    for (int64_t i = threadIdx.x; i < gridDim.x; i += kThreads) v = f.combine(v, __ldcg(partials + i));
    total = block_reduce(v, f, smem);
  } else {
    // One warp per tensor; lane 0 keeps this warp's share of the total (for p = 0: tensors with a non-zero).
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    A share = f.identity();
    for (int64_t t = warp; t < tt.num_tensors; t += kThreads / 32) {
      A v = f.identity();
      for (int64_t c = tt.tensor_chunks[t] + lane; c < tt.tensor_chunks[t + 1]; c += 32) v = f.combine(v, __ldcg(partials + c));
      v = warp_reduce(v, f);
      if (lane == 0) {
        if (norms_out != nullptr) norms_out[t] = f.root(v);
        share = f.combine(share, K == kNormZero ? (v != static_cast<A>(0) ? static_cast<A>(1) : static_cast<A>(0)) : v);
      }
    }
    total = block_reduce(share, f, smem);
  }
  if (threadIdx.x == 0) {
    total = f.root(total);
    *total_out = total;
    if (coef_out != nullptr) {
      // torch's clip_coef: reciprocal(total + 1e-6) * max_norm, clamped to 1, NaN kept.
      const A c = (static_cast<A>(1) / (total + static_cast<A>(1e-6))) * max_norm;
      *coef_out = (c < static_cast<A>(1) || c != c) ? c : static_cast<A>(1);
    }
  }
}

constexpr size_t kTicketBytes = 16;  // keeps the partials 16-byte aligned

template <typename A>
cudaError_t launch_norm_typed(const TensorTable& tt, double p, NormKind kind, bool per_chunk, void* total_out,
                              void* norms_out, void* coef_out, double max_norm, void* workspace, int64_t grid,
                              cudaStream_t stream) {
  unsigned int* ticket = static_cast<unsigned int*>(workspace);
  A* partials = reinterpret_cast<A*>(static_cast<char*>(workspace) + kTicketBytes);
  cudaError_t err = cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream);
  if (err != cudaSuccess) return err;
  const dim3 blocks(static_cast<unsigned int>(grid));
  A* total = static_cast<A*>(total_out);
  A* norms = static_cast<A*>(norms_out);
  A* coef = static_cast<A*>(coef_out);
  const A pa = static_cast<A>(p);
  const A mn = static_cast<A>(max_norm);
  switch (kind) {
#define FUSEDCLIP_NORM_CASE(K)                                                                         \
  case K:                                                                                               \
    norm_kernel<A, K><<<blocks, kThreads, 0, stream>>>(tt, pa, per_chunk, partials, ticket, total, norms, \
                                                       coef, mn);                                       \
    break;
    FUSEDCLIP_NORM_CASE(kNormL1)
    FUSEDCLIP_NORM_CASE(kNormL2)
    FUSEDCLIP_NORM_CASE(kNormInf)
    FUSEDCLIP_NORM_CASE(kNormNegInf)
    FUSEDCLIP_NORM_CASE(kNormZero)
    FUSEDCLIP_NORM_CASE(kNormP)
#undef FUSEDCLIP_NORM_CASE
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace detail

NormKind norm_kind(double p) {
  if (std::isinf(p)) return p > 0 ? kNormInf : kNormNegInf;
  if (p == 0.0) return kNormZero;
  if (p == 1.0) return kNormL1;
  if (p == 2.0) return kNormL2;
  return kNormP;
}

int64_t grid_size(int64_t num_chunks, int sm_count) {
  const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * kBlocksPerSM;
  return num_chunks < cap ? (num_chunks > 0 ? num_chunks : 1) : cap;
}

size_t norm_workspace_bytes(int64_t num_chunks, int sm_count, bool acc_f64) {
  // Per-chunk partials cover both modes (grid_size <= num_chunks).
  (void)sm_count;
  const int64_t n = num_chunks > 0 ? num_chunks : 1;
  return detail::kTicketBytes + static_cast<size_t>(n) * (acc_f64 ? sizeof(double) : sizeof(float));
}

cudaError_t launch_norm(const TensorTable& table, double p, bool acc_f64, void* total_out, void* norms_out,
                        void* coef_out, double max_norm, void* workspace, size_t workspace_bytes, int sm_count,
                        cudaStream_t stream) {
  if (table.meta == nullptr || table.chunk_tensor == nullptr || table.chunk_start == nullptr ||
      table.tensor_chunks == nullptr || table.num_tensors <= 0 || table.num_chunks <= 0 ||
      table.chunk_size <= 0 || table.chunk_size % kChunkAlign != 0 || total_out == nullptr ||
      workspace == nullptr || std::isnan(p) ||
      workspace_bytes < norm_workspace_bytes(table.num_chunks, sm_count, acc_f64)) {
    return cudaErrorInvalidValue;
  }
  const NormKind kind = norm_kind(p);
  // p = 0's total counts tensors, so it always needs the per-tensor fold.
  const bool per_chunk = norms_out != nullptr || kind == kNormZero;
  const int64_t grid = grid_size(table.num_chunks, sm_count);
  if (acc_f64) {
    return detail::launch_norm_typed<double>(table, p, kind, per_chunk, total_out, norms_out, coef_out, max_norm,
                                             workspace, grid, stream);
  }
  return detail::launch_norm_typed<float>(table, p, kind, per_chunk, total_out, norms_out, coef_out, max_norm,
                                          workspace, grid, stream);
}

int compiled_cuda_version() { return CUDART_VERSION; }

cudaError_t loaded_kernel_arch(int* binary_version, int* ptx_version) {
  if (binary_version == nullptr || ptx_version == nullptr) return cudaErrorInvalidValue;
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, detail::norm_kernel<float, kNormL2>);
  if (err != cudaSuccess) return err;
  *binary_version = attr.binaryVersion;
  *ptx_version = attr.ptxVersion;
  return cudaSuccess;
}

}  // namespace fusedclip
