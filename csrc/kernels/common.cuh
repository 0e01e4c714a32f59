// Shared device helpers: element types, 16-byte packs, chunk lookup. Internal to csrc/kernels.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fusedclip_kernels.h"

namespace fusedclip {
namespace detail {

// Arithmetic type of an element: what torch computes in (float for the 16-bit types).
template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_float(double x) { return x; }

template <typename T> __device__ __forceinline__ T from_op(typename OpMath<T>::type x);
template <> __device__ __forceinline__ float from_op<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_op<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_op<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_op<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// One 16-byte vector of elements.
template <typename T> struct alignas(16) Pack {
  static constexpr int kN = kVectorBytes / static_cast<int>(sizeof(T));
  T v[kN];
};

// Where chunk c lives: base pointer, first element, element count, dtype code.
struct ChunkView {
  int64_t tensor;
  void* base;
  int64_t start;
  int64_t count;
  int dtype;
};

__device__ __forceinline__ ChunkView chunk_view(const TensorTable& tt, int64_t c) {
  ChunkView v;
  v.tensor = tt.chunk_tensor[c];
  v.base = reinterpret_cast<void*>(static_cast<uintptr_t>(tt.meta[v.tensor]));
  const int64_t numel = tt.meta[tt.num_tensors + v.tensor];
  v.dtype = static_cast<int>(tt.meta[2 * tt.num_tensors + v.tensor]);
  v.start = tt.chunk_start[c];
  const int64_t end = v.start + tt.chunk_size < numel ? v.start + tt.chunk_size : numel;
  v.count = end - v.start;
  return v;
}

// Vector path only when the chunk's first element is 16-byte aligned (its tensor's base is; chunk_size is a
// multiple of kChunkAlign elements so every chunk start is too). Views at odd offsets take the scalar path.
__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace detail
}  // namespace fusedclip
