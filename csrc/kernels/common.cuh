// Shared device helpers: element types, 16-byte packs, chunk lookup, the dtype switch. Internal to csrc/kernels.
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

// A table address is device (global) memory. Saying so lets the compiler use global loads and stores
// (LDG/STG) instead of generic ones (LD/ST), which must first find out which memory an address is in.
__device__ __forceinline__ void* global_address(int64_t address) {
  void* p = reinterpret_cast<void*>(static_cast<uintptr_t>(address));
  __builtin_assume(__isGlobal(p));
  return p;
}

__device__ __forceinline__ ChunkView chunk_view(const TensorTable& tt, int64_t c) {
  ChunkView v;
  v.tensor = tt.chunk_tensor[c];
  v.base = global_address(tt.meta[v.tensor]);
  const int64_t numel = tt.meta[tt.num_tensors + v.tensor];
  v.dtype = static_cast<int>(tt.meta[2 * tt.num_tensors + v.tensor]);
  v.start = tt.chunk_start[c];
  const int64_t end = v.start + tt.chunk_size < numel ? v.start + tt.chunk_size : numel;
  v.count = end - v.start;
  return v;
}

// Where a chunk's 16-byte packs are: `head` scalar elements up to the first 16-byte boundary (fewer than one pack,
// so at most one per thread), then `packs` packs, then the scalar tail. So a view at an odd offset (an AGC row of odd
// length, a slice) is still read 16 bytes at a time. An address not aligned to its element (torch never makes one)
// has no packs: all tail.
struct PackSpan {
  int64_t head;
  int64_t packs;
};
template <typename T> __device__ __forceinline__ PackSpan pack_span(const T* p, int64_t count) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(T) != 0) return {0, 0};
  const int64_t to_boundary = static_cast<int64_t>((kVectorBytes - a % kVectorBytes) % kVectorBytes / sizeof(T));
  const int64_t head = to_boundary < count ? to_boundary : count;
  return {head, (count - head) / Pack<T>::kN};
}

// FUSEDCLIP_SASS_PROBE_DTYPE=<dtype code> compiles only that dtype's path, so that tests/test_cuda_build.py can
// tell each dtype's hot loop apart in the SASS. Never set in a real build.
#ifdef FUSEDCLIP_SASS_PROBE_DTYPE
constexpr int kProbeDtype = FUSEDCLIP_SASS_PROBE_DTYPE;
#else
constexpr int kProbeDtype = -1;
#endif
template <int Code> __host__ __device__ constexpr bool dtype_compiled() {
  return kProbeDtype < 0 || kProbeDtype == Code;
}

// fn(T{}) for the element type T of a dtype code (unknown codes do nothing).
template <typename Fn> __device__ __forceinline__ void visit_dtype(int code, Fn&& fn) {
  switch (code) {
    case kFloat32: if constexpr (dtype_compiled<kFloat32>()) fn(float{}); break;
    case kFloat16: if constexpr (dtype_compiled<kFloat16>()) fn(__half{}); break;
    case kBFloat16: if constexpr (dtype_compiled<kBFloat16>()) fn(__nv_bfloat16{}); break;
    case kFloat64: if constexpr (dtype_compiled<kFloat64>()) fn(double{}); break;
    default: break;
  }
}

}  // namespace detail
}  // namespace fusedclip
