// Multi-tensor norm: one launch over the whole tensor table, finalized on the device.
//
// The total alone: each block folds all of its chunks into one partial; the last block to finish (an atomic
// ticket) reduces the partials and writes the total and the clip coefficient.
// Per-tensor norms (and p = 0, whose total counts tensors): each chunk gets its own partial. The tensors are cut
// into tiles of kTileTensors; a counter per tile counts its finished chunks, and the block that finishes a tile's
// last chunk finalizes that tile at once (every tensor's norm, the tile's share of the total). So the work that
// grows with the number of tensors (AGC: millions of row units) is spread over the grid while the data pass runs;
// the last block only reduces one share per tile.
// Every reduction runs in an order fixed by the tables alone, never by which block does it or when: equal inputs
// give equal bits, with no float atomics. NaN propagates through every fold (plain fmax/fmin would drop it).
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
  // A tensor's part of the total, from its folded value (p = 0 counts the tensors with a non-zero entry).
  __device__ __forceinline__ A tensor_share(A v) const {
    if (K == kNormZero) return v != static_cast<A>(0) ? static_cast<A>(1) : static_cast<A>(0);
    return v;
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

// This thread's share of one chunk, folded into acc: the scalar head up to the first 16-byte boundary, the
// 16-byte packs, the scalar tail.
template <typename T, typename A, typename F> __device__ A fold_chunk(const ChunkView& v, const F& f, A acc) {
  const T* base = static_cast<const T*>(v.base) + v.start;
  const PackSpan span = pack_span(base, v.count);
  if (threadIdx.x < span.head) acc = f.step(acc, static_cast<A>(to_float(base[threadIdx.x])));
  constexpr int N = Pack<T>::kN;
  const int64_t nvec = span.packs;
  const Pack<T>* vp = reinterpret_cast<const Pack<T>*>(base + span.head);
  int64_t i = threadIdx.x;
  // Four independent 16-byte loads in flight per thread; not unrolled further (more would spill registers).
#pragma unroll 1
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
#pragma unroll 1
  for (; i < nvec; i += kThreads) acc = fold_pack<T>(f, acc, load_pack_ro(vp + i));
  for (i = span.head + nvec * N + threadIdx.x; i < v.count; i += kThreads) {
    acc = f.step(acc, static_cast<A>(to_float(base[i])));
  }
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

// Scratch of one launch (see norm_workspace_bytes): counters first (zeroed by the launcher), then values.
template <typename A> struct Workspace {
  unsigned int* ticket;     // blocks done
  unsigned int* tile_done;  // [tiles] chunks done per tile (per-chunk mode)
  A* partials;              // [grid] one per block, or [C] one per chunk (per-chunk mode)
  A* tile_shares;           // [tiles] each tile's share of the total (per-chunk mode)
};

__host__ __device__ __forceinline__ int64_t num_tiles(int64_t num_tensors) {
  return (num_tensors + kTileTensors - 1) / kTileTensors;
}

// Tensors [first, end) of a tile.
__device__ __forceinline__ int64_t tile_end(const TensorTable& tt, int64_t tile) {
  const int64_t end = (tile + 1) * kTileTensors;
  return end < tt.num_tensors ? end : tt.num_tensors;
}

// The fold of chunk partials [c0, c1) by one warp: lane l takes c0 + l, c0 + l + 32, ... in turn (four loads in
// flight), then a butterfly. Every lane ends with the same value.
template <typename A, typename F> __device__ A warp_fold(const F& f, const A* partials, int64_t c0, int64_t c1) {
  A v = f.identity();
  int64_t c = c0 + (threadIdx.x & 31);
  for (; c + 96 < c1; c += 128) {
    const A a = __ldcg(partials + c);
    const A b = __ldcg(partials + c + 32);
    const A d = __ldcg(partials + c + 64);
    const A e = __ldcg(partials + c + 96);
    v = f.combine(f.combine(f.combine(f.combine(v, a), b), d), e);
  }
  for (; c < c1; c += 32) v = f.combine(v, __ldcg(partials + c));
  return warp_reduce(v, f);
}

// Finalize one tile, with the whole block, once every chunk of its tensors has its partial: each tensor's norm and
// the tile's share of the total. The order is fixed by the tables alone: lane l of warp w takes tensors
// first + 32 w + l + kThreads r (r = 0, 1, ...); a tensor of one chunk is that chunk's partial, a tensor of several
// is folded by the whole warp (warp_fold); each thread folds its tensors' shares in turn, then block_reduce.
template <typename A, int K>
__device__ void finalize_tile(const TensorTable& tt, const Fold<A, K>& f, const Workspace<A>& ws, int64_t tile,
                              A* norms_out, A* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t end = tile_end(tt, tile);
  A share = f.identity();
  for (int64_t first = tile * kTileTensors + warp * 32; first < end; first += kThreads) {  // warp-uniform
    const int64_t t = first + lane;
    const bool mine = t < end;
    const int64_t c0 = mine ? tt.tensor_chunks[t] : 0;
    const int64_t c1 = mine ? tt.tensor_chunks[t + 1] : 0;
    A v = c1 - c0 == 1 ? __ldcg(ws.partials + c0) : f.identity();  // no chunk (empty tensor): the identity
    for (unsigned int multi = __ballot_sync(0xffffffffu, c1 - c0 > 1); multi != 0; multi &= multi - 1) {
      const int src = __ffs(multi) - 1;
      const A w = warp_fold(f, ws.partials, __shfl_sync(0xffffffffu, c0, src), __shfl_sync(0xffffffffu, c1, src));
      if (lane == src) v = w;
    }
    if (mine) {
      if (norms_out != nullptr) norms_out[t] = f.root(v);
      share = f.combine(share, f.tensor_share(v));
    }
  }
  share = block_reduce(share, f, smem);
  if (threadIdx.x == 0) ws.tile_shares[tile] = share;
}

// This block has written the partials of `done` more chunks of `tile`: count them, and if they were the tile's last,
// finalize the tile. Called by the whole block.
template <typename A, int K>
__device__ void finish_chunks(const TensorTable& tt, const Fold<A, K>& f, const Workspace<A>& ws, int64_t tile,
                              unsigned int done, A* norms_out, A* smem, bool* s_flag) {
  if (threadIdx.x == 0) {
    const unsigned int chunks =
        static_cast<unsigned int>(tt.tensor_chunks[tile_end(tt, tile)] - tt.tensor_chunks[tile * kTileTensors]);
    __threadfence();  // this block's partials are visible before its count is
    *s_flag = atomicAdd(ws.tile_done + tile, done) + done == chunks;
  }
  __syncthreads();
  const bool completed = *s_flag;
  __syncthreads();  // *s_flag is written again by the next call
  if (!completed) return;
  __threadfence();  // and the other blocks' partials of this tile are visible here
  finalize_tile(tt, f, ws, tile, norms_out, smem);
}

// Blocks per SM the compiler must fit (0: its own choice, which caps 512-thread blocks at 64 registers). |x|^p in
// double (exp2/log2 of doubles) needs more: one block per SM rather than spills to local memory.
template <typename A, int K> constexpr int kMinBlocks = (sizeof(A) == 8 && K == kNormP) ? 1 : 0;

template <typename A, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks<A, K>)
norm_kernel(TensorTable tt, A p, bool per_chunk, Workspace<A> ws, A* total_out, A* norms_out, A* coef_out,
            A max_norm) {
  __shared__ A smem[kThreads / 32];
  __shared__ bool s_flag;
  const Fold<A, K> f{p};

  if (!per_chunk) {
    // The total alone: one partial per block.
    A acc = f.identity();
    for (int64_t c = blockIdx.x; c < tt.num_chunks; c += gridDim.x) {
      const ChunkView v = chunk_view(tt, c);
      visit_dtype(v.dtype, [&](auto zero) { acc = fold_chunk<decltype(zero)>(v, f, acc); });
    }
    acc = block_reduce(acc, f, smem);
    if (threadIdx.x == 0) ws.partials[blockIdx.x] = acc;
  } else {
    // One partial per chunk. A tile's chunks are consecutive in this block's grid-stride sequence (chunks are in
    // tensor order), so its counter is bumped once per run of them, not once per chunk.
    int64_t tile = -1;
    unsigned int done = 0;
    for (int64_t c = blockIdx.x; c < tt.num_chunks; c += gridDim.x) {
      const ChunkView v = chunk_view(tt, c);
      if (v.tensor / kTileTensors != tile) {
        if (done != 0) finish_chunks(tt, f, ws, tile, done, norms_out, smem, &s_flag);
        tile = v.tensor / kTileTensors;
        done = 0;
      }
      A part = f.identity();
      visit_dtype(v.dtype, [&](auto zero) { part = fold_chunk<decltype(zero)>(v, f, part); });
      part = block_reduce(part, f, smem);
      if (threadIdx.x == 0) ws.partials[c] = part;
      ++done;
    }
    if (done != 0) finish_chunks(tt, f, ws, tile, done, norms_out, smem, &s_flag);
  }

  // The last block to take a ticket sees every block's partial and every tile's share (each block fenced its
  // writes before taking its ticket, and finalized the tiles it completed before that).
  if (threadIdx.x == 0) {
    __threadfence();
    s_flag = atomicAdd(ws.ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_flag) return;
  __threadfence();

  A v = f.identity();
  if (!per_chunk) {
    for (int64_t i = threadIdx.x; i < gridDim.x; i += kThreads) v = f.combine(v, __ldcg(ws.partials + i));
  } else {
    const int64_t tiles = num_tiles(tt.num_tensors);
    for (int64_t i = threadIdx.x; i < tiles; i += kThreads) {
      const int64_t end = tile_end(tt, i);
      if (tt.tensor_chunks[i * kTileTensors] != tt.tensor_chunks[end]) {
        v = f.combine(v, __ldcg(ws.tile_shares + i));
      } else if (norms_out != nullptr) {
        // A tile of empty tensors has no chunk to complete it: their norms are the fold's identity's, and the
        // tile adds nothing to the total.
        for (int64_t t = i * kTileTensors; t < end; ++t) norms_out[t] = f.root(f.identity());
      }
    }
  }
  const A total = f.root(block_reduce(v, f, smem));
  if (threadIdx.x == 0) {
    *total_out = total;
    if (coef_out != nullptr) {
      // torch's clip_coef: reciprocal(total + 1e-6) * max_norm, clamped to 1, NaN kept.
      const A c = (static_cast<A>(1) / (total + static_cast<A>(1e-6))) * max_norm;
      *coef_out = (c < static_cast<A>(1) || c != c) ? c : static_cast<A>(1);
    }
  }
}

constexpr size_t kTicketBytes = 16;  // the ticket, padded so that what follows stays 16-byte aligned

size_t round16(size_t n) { return (n + 15) / 16 * 16; }

// Bytes of the counters (zeroed before each launch): the ticket, and per-chunk mode's tile counters.
size_t counter_bytes(int64_t num_tensors) {
  return kTicketBytes + round16(static_cast<size_t>(num_tiles(num_tensors)) * sizeof(unsigned int));
}

template <typename A>
cudaError_t launch_norm_typed(const TensorTable& tt, double p, NormKind kind, bool per_chunk, void* total_out,
                              void* norms_out, void* coef_out, double max_norm, void* workspace, int64_t grid,
                              cudaStream_t stream) {
  char* base = static_cast<char*>(workspace);
  const size_t counters = counter_bytes(tt.num_tensors);
  Workspace<A> ws;
  ws.ticket = reinterpret_cast<unsigned int*>(base);
  ws.tile_done = reinterpret_cast<unsigned int*>(base + kTicketBytes);
  ws.partials = reinterpret_cast<A*>(base + counters);
  ws.tile_shares = ws.partials + tt.num_chunks;
  // One memset either way: the total alone needs only the ticket zeroed.
  cudaError_t err = cudaMemsetAsync(base, 0, per_chunk ? counters : sizeof(unsigned int), stream);
  if (err != cudaSuccess) return err;
  const dim3 blocks(static_cast<unsigned int>(grid));
  A* total = static_cast<A*>(total_out);
  A* norms = static_cast<A*>(norms_out);
  A* coef = static_cast<A*>(coef_out);
  const A pa = static_cast<A>(p);
  const A mn = static_cast<A>(max_norm);
  switch (kind) {
#define FUSEDCLIP_NORM_CASE(K)                                                                                  \
  case K:                                                                                                        \
    norm_kernel<A, K><<<blocks, kThreads, 0, stream>>>(tt, pa, per_chunk, ws, total, norms, coef, mn);           \
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

size_t norm_workspace_bytes(int64_t num_tensors, int64_t num_chunks, bool acc_f64) {
  // Per-chunk partials cover both modes (grid_size <= num_chunks).
  const int64_t tensors = num_tensors > 0 ? num_tensors : 1;
  const int64_t chunks = num_chunks > 0 ? num_chunks : 1;
  const size_t values = static_cast<size_t>(chunks + detail::num_tiles(tensors));
  return detail::counter_bytes(tensors) + values * (acc_f64 ? sizeof(double) : sizeof(float));
}

cudaError_t launch_norm(const TensorTable& table, double p, bool acc_f64, void* total_out, void* norms_out,
                        void* coef_out, double max_norm, void* workspace, size_t workspace_bytes, int sm_count,
                        cudaStream_t stream) {
  if (table.meta == nullptr || table.chunk_tensor == nullptr || table.chunk_start == nullptr ||
      table.tensor_chunks == nullptr || table.num_tensors <= 0 || table.num_chunks <= 0 ||
      table.chunk_size <= 0 || table.chunk_size % kChunkAlign != 0 || total_out == nullptr ||
      workspace == nullptr || std::isnan(p) ||
      workspace_bytes < norm_workspace_bytes(table.num_tensors, table.num_chunks, acc_f64)) {
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
