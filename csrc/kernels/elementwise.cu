// In-place scale (one coefficient or one per tensor) and value clamp over the tensor table, one launch each.
// Elements are computed in float (double for float64), as torch does, and rounded back once.
#include <cstring>

#include "common.cuh"

namespace fusedclip {
namespace detail {
namespace {

struct MulBy {
  float cf;
  double cd;
  __device__ __forceinline__ float operator()(float x) const { return x * cf; }
  __device__ __forceinline__ double operator()(double x) const { return x * cd; }
};

struct ClampTo {
  float lof, hif;
  double lod, hid;
  // NaN fails both comparisons and is kept, as in torch.clamp.
  __device__ __forceinline__ float operator()(float x) const { return x < lof ? lof : (x > hif ? hif : x); }
  __device__ __forceinline__ double operator()(double x) const { return x < lod ? lod : (x > hid ? hid : x); }
};

template <typename T, typename F> __device__ __forceinline__ void apply_pack(Pack<T>& pk, const F& f) {
  using M = typename OpMath<T>::type;
#pragma unroll
  for (int j = 0; j < Pack<T>::kN; ++j) pk.v[j] = from_op<T>(f(static_cast<M>(to_float(pk.v[j]))));
}

// This thread's share of one chunk, rewritten in place: the scalar head up to the first 16-byte boundary, the
// 16-byte packs, the scalar tail.
template <typename T, typename F> __device__ void apply_chunk(const ChunkView& v, const F& f) {
  using M = typename OpMath<T>::type;
  T* base = static_cast<T*>(v.base) + v.start;
  const PackSpan span = pack_span(base, v.count);
  if (threadIdx.x < span.head) base[threadIdx.x] = from_op<T>(f(static_cast<M>(to_float(base[threadIdx.x]))));
  constexpr int N = Pack<T>::kN;
  const int64_t nvec = span.packs;
  Pack<T>* vp = reinterpret_cast<Pack<T>*>(base + span.head);
  int64_t i = threadIdx.x;
  // Two loads in flight before the stores; not unrolled further, which keeps these kernels at 32 registers (four
  // blocks of 512 threads fit an SM; the compiler's own unroll took 64).
#pragma unroll 1
  for (; i + kThreads < nvec; i += 2 * kThreads) {
    Pack<T> a = vp[i];
    Pack<T> b = vp[i + kThreads];
    apply_pack(a, f);
    apply_pack(b, f);
    vp[i] = a;
    vp[i + kThreads] = b;
  }
#pragma unroll 1
  for (; i < nvec; i += kThreads) {
    Pack<T> a = vp[i];
    apply_pack(a, f);
    vp[i] = a;
  }
  for (i = span.head + nvec * N + threadIdx.x; i < v.count; i += kThreads) {
    base[i] = from_op<T>(f(static_cast<M>(to_float(base[i]))));
  }
}

template <typename F> __device__ __forceinline__ void apply_any(const ChunkView& v, const F& f) {
  visit_dtype(v.dtype, [&](auto zero) { apply_chunk<decltype(zero)>(v, f); });
}

template <typename C>
__global__ void __launch_bounds__(kThreads) scale_kernel(TensorTable tt, const C* coef, bool per_tensor) {
  if (!per_tensor) {
    const C c = coef[0];
    if (c == static_cast<C>(1)) return;  // nothing to clip: touch no gradient (NaN != 1 goes on)
    const MulBy f{static_cast<float>(c), static_cast<double>(c)};
    for (int64_t k = blockIdx.x; k < tt.num_chunks; k += gridDim.x) apply_any(chunk_view(tt, k), f);
    return;
  }
  for (int64_t k = blockIdx.x; k < tt.num_chunks; k += gridDim.x) {
    const ChunkView v = chunk_view(tt, k);
    const C c = coef[v.tensor];
    if (c == static_cast<C>(1)) continue;
    apply_any(v, MulBy{static_cast<float>(c), static_cast<double>(c)});
  }
}

__global__ void __launch_bounds__(kThreads) clamp_kernel(TensorTable tt, ClampTo f) {
  for (int64_t k = blockIdx.x; k < tt.num_chunks; k += gridDim.x) apply_any(chunk_view(tt, k), f);
}

bool table_ok(const TensorTable& t) {
  return t.meta != nullptr && t.chunk_tensor != nullptr && t.chunk_start != nullptr && t.num_tensors > 0 &&
         t.num_chunks > 0 && t.chunk_size > 0 && t.chunk_size % kChunkAlign == 0;
}

}  // namespace
}  // namespace detail

cudaError_t launch_scale(const TensorTable& table, const void* coef, bool coef_f64, bool per_tensor, int sm_count,
                         cudaStream_t stream) {
  if (!detail::table_ok(table) || coef == nullptr) return cudaErrorInvalidValue;
  const dim3 blocks(static_cast<unsigned int>(grid_size(table.num_chunks, sm_count)));
  if (coef_f64) {
    detail::scale_kernel<double><<<blocks, kThreads, 0, stream>>>(table, static_cast<const double*>(coef), per_tensor);
  } else {
    detail::scale_kernel<float><<<blocks, kThreads, 0, stream>>>(table, static_cast<const float*>(coef), per_tensor);
  }
  return cudaGetLastError();
}

cudaError_t launch_clamp(const TensorTable& table, double clip_value, int sm_count, cudaStream_t stream) {
  if (!detail::table_ok(table) || !(clip_value >= 0.0)) return cudaErrorInvalidValue;
  const dim3 blocks(static_cast<unsigned int>(grid_size(table.num_chunks, sm_count)));
  const detail::ClampTo f{static_cast<float>(-clip_value), static_cast<float>(clip_value), -clip_value, clip_value};
  detail::clamp_kernel<<<blocks, kThreads, 0, stream>>>(table, f);
  return cudaGetLastError();
}

}  // namespace fusedclip
