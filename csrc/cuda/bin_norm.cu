// CUDA kernels of Batch-Instance Normalization (METHODS.md section 1): the four streaming
// kernels of csrc/fastdg.cpp, with the argument checks and output dtypes/layouts of
// csrc/cpu/bin_norm.cpp. The (N, C)-sized algebra between them is in fastdg/ops/bin_norm.py.
//
//   forward : bin_stats      read x            -> mean, var (N, C)       1 pass
//             bin_apply      read x, write y   y = scale x + shift       2 passes
//   backward: bin_bwd_reduce read dy, x        -> sum dy, sum dy (x - mu) 2 passes
//             bin_bwd_apply  read dy, x, write dx = p dy + q x + r        3 passes
// = the 3 + 5 passes of BatchNorm. Statistics and sums are fp32 (fp64 for fp64 x).
//
// NCHW: a (n, c) plane is a contiguous row of L = H*W elements. T threads (a power of two,
// 32..256, picked from L) own a row; a 256-thread block holds 256 / T rows. A row is read
// as a scalar head up to the first 16-byte boundary, 16-byte vectors, and a scalar tail, so
// any L and any element offset vectorise; every other tensor of the kernel must sit at the
// same address modulo 16 (checked on the host, else the kernel runs with scalar accesses).
// When there are too few rows to fill the GPU, a row is split into S chunks, one block each.
//
// channels_last: memory is (n, hw, c). A block owns (n, a tile of channels, a chunk of hw):
// TX threads across the tile, each holding V adjacent channels (one 16-byte vector), and
// TY = 256 / TX threads striding over hw, so a warp reads whole rows (coalesced). Vectors
// need C % V == 0 and 16-byte aligned pointers, else V = 1. The TY partial results of a
// channel are merged by a fixed shared-memory tree.
//
// Determinism: no atomics. Within a block, warp shuffles (shfl_down trees) and shared-memory
// trees combine values in an order fixed by thread index; when a row is split, each block
// writes its partial result to a workspace and a second small kernel merges the S partials
// of a row in split order. Reruns give the same bits; the launch shape depends only on the
// shape, dtype and pointer alignment, not on the GPU model (no SM-count-dependent splits).
//
// Variances are Welford/Chan merges of (count, mean, M2) triples: per 16-byte vector a local
// mean and M2, merged into the thread's running triple (NCHW) or per-element Welford updates
// (channels_last, one reciprocal shared by the V channels), then Chan merges across threads,
// warps and splits. E[x^2] - E[x]^2 is never formed.
//
// Indexing: element offsets are int64 (N*C*L can pass 2^31, e.g. (256, 256, 112, 112));
// offsets inside one row or split are int, so L and C must be below 2^30 (checked).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>

#include "common.cuh"

namespace fastdg {
namespace {

using cuda::load_vec;
using cuda::store_vec;
using cuda::Vec;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / cuda::kWarpSize;
// Items a thread loads before using the first: 4 x 16 bytes in flight per thread for one input,
// 2 x 2 x 16 for two (which also keeps the bf16/fp16 two-input kernels near 64 registers).
constexpr int kUnroll1 = 4;
constexpr int kUnroll2 = 2;
// Rows or channel tiles are split along hw until about this many blocks exist: a few waves of
// 132 SMs x 8 blocks. A fixed number (not the device's SM count) keeps results device-independent.
constexpr int64_t kTargetBlocks = 4096;
// A split keeps at least this many vectors (NCHW) or rows (channels_last) per thread, and
// channels_last splits at least kMinRowsPerSplit rows, so partial results stay a few % of
// the traffic of the pass.
constexpr int kMinItemsPerThread = 4;
constexpr int64_t kMinRowsPerSplit = 64;
constexpr int64_t kMaxExtent = int64_t(1) << 30;

template <typename scalar_t>
constexpr int vec_width() {
  return cuda::kVecBytes / static_cast<int>(sizeof(scalar_t));
}

// ---- device-side iteration ------------------------------------------------------------

// Visits items i = first, first + stride, ... < count, U at a time: the loads of a group are
// all issued before the first value is used.
template <int U, typename Load, typename Use>
__device__ __forceinline__ void sweep(int count, int first, int stride, Load load, Use use) {
  using R = decltype(load(0));
  for (int i = first; i < count; i += stride * U) {
    R r[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (i + u * stride < count) r[u] = load(i + u * stride);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (i + u * stride < count) use(i + u * stride, r[u]);
  }
}

// The n elements of an NCHW row segment starting at p, over the T threads of the row (lane in
// [0, T), T >= 32 > V): elements before the first V-aligned address (head) and after the last
// whole vector (tail) go one per thread to elem(e); whole aligned vectors go to load(e) /
// use(e, loaded) with e the offset of their first element. The other tensors of the kernel
// are at the same address modulo 16, so the same e is aligned for them too.
template <int V, int U, typename scalar_t, typename Elem, typename Load, typename Use>
__device__ __forceinline__ void segment(const scalar_t* p, int n, int lane, int T, Elem elem, Load load, Use use) {
  int head = 0;
  if (V > 1) {
    const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(p) % (V * sizeof(scalar_t))) / sizeof(scalar_t));
    head = mis == 0 ? 0 : min(V - mis, n);
  }
  const int nv = (n - head) / V;
  const int tail = head + nv * V;
  if (lane < head) elem(lane);
  sweep<U>(
      nv, lane, T, [&](int j) { return load(head + j * V); }, [&](int j, const auto& r) { use(head + j * V, r); });
  if (lane < n - tail) elem(tail + lane);
}

// Block index -> (row of this thread, split s, lane in the row) for the NCHW kernels.
struct RowCoord {
  int64_t row;
  int s;
  int lane;
};

__device__ __forceinline__ RowCoord row_coord(int T, int S) {
  const int64_t b = blockIdx.x;
  return {(b / S) * (kThreads / T) + threadIdx.x / T, static_cast<int>(b % S), static_cast<int>(threadIdx.x) % T};
}

// Block index -> (n, first channel of this thread, split s) for the channels_last kernels.
struct TileCoord {
  int64_t n;
  int c0;
  int s;
};

template <int V>
__device__ __forceinline__ TileCoord tile_coord(int TX, int ctiles, int S) {
  const int64_t b = blockIdx.x;
  const int64_t nt = b / S;
  const int tile = static_cast<int>(nt % ctiles);
  return {nt / ctiles, (tile * TX + static_cast<int>(threadIdx.x) % TX) * V, static_cast<int>(b % S)};
}

// ---- bin_stats ----------------------------------------------------------------------------

// One (row, split) per group of T threads. Writes mean and, for S == 1, the biased variance,
// else the split's M2 (merged by stats_finalize_kernel).
template <typename scalar_t, int V, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads) stats_nchw_kernel(
    const scalar_t* __restrict__ x,  // (rows, L), rows = N * C
    int64_t rows, int L, int T, int chunk, int S,
    acc_t* __restrict__ out_mean,    // (rows, S)
    acc_t* __restrict__ out_m2) {    // (rows, S): variance if S == 1, else M2
  const RowCoord rc = row_coord(T, S);
  int n = 0;
  acc_t mean = 0, m2 = 0;
  if (rc.row < rows) {
    const int start = rc.s * chunk;
    const scalar_t* p = x + rc.row * L + start;
    segment<V, kUnroll1>(
        p, min(chunk, L - start), rc.lane, T,
        [&](int e) { cuda::welford_push(n, mean, m2, static_cast<acc_t>(p[e])); },
        [&](int e) { return load_vec<scalar_t, V>(p + e); },
        [&](int, const Vec<scalar_t, V>& v) {
          acc_t a[V];
#pragma unroll
          for (int k = 0; k < V; ++k) a[k] = static_cast<acc_t>(v.v[k]);
          cuda::welford_push_vec<V>(n, mean, m2, a);
        });
  }
  cuda::welford_warp_reduce(n, mean, m2);
  __shared__ int sh_n[kWarps];
  __shared__ acc_t sh_mean[kWarps], sh_m2[kWarps];
  const int warp = threadIdx.x / cuda::kWarpSize;
  if (threadIdx.x % cuda::kWarpSize == 0) {
    sh_n[warp] = n;
    sh_mean[warp] = mean;
    sh_m2[warp] = m2;
  }
  __syncthreads();
  if (rc.lane == 0 && rc.row < rows) {  // lane 0 of the row's first warp: merge its other warps in order
    for (int w = 1; w < T / cuda::kWarpSize; ++w)
      cuda::welford_merge(n, mean, m2, sh_n[warp + w], sh_mean[warp + w], sh_m2[warp + w]);
    const int64_t o = rc.row * S + rc.s;
    out_mean[o] = mean;
    out_m2[o] = S == 1 ? m2 / static_cast<acc_t>(n) : m2;
  }
}

// Per-thread V-channel states, merged over the TY threads of a tile column by a fixed tree in
// shared memory (slot of thread t, channel k: k * kThreads + t, conflict-free).
template <typename scalar_t, int V, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads) stats_nhwc_kernel(
    const scalar_t* __restrict__ x,  // (N, L, C) in memory
    int C, int L, int TX, int ctiles, int chunk, int S,
    acc_t* __restrict__ out_mean,    // (N * C, S)
    acc_t* __restrict__ out_m2) {    // (N * C, S): variance if S == 1, else M2
  const int TY = kThreads / TX;
  const int t = threadIdx.x, ty = t / TX;
  const TileCoord tc = tile_coord<V>(TX, ctiles, S);
  const int h0 = tc.s * chunk, len = min(chunk, L - h0);
  const bool active = tc.c0 < C;  // V > 1 implies C % V == 0, so the whole vector is in range
  acc_t mean[V], m2[V];
#pragma unroll
  for (int k = 0; k < V; ++k) mean[k] = m2[k] = 0;
  if (active) {
    const scalar_t* p = x + (tc.n * L + h0) * C + tc.c0;
    int seen = 0;
    sweep<kUnroll1>(
        len, ty, TY, [&](int h) { return load_vec<scalar_t, V>(p + static_cast<int64_t>(h) * C); },
        [&](int, const Vec<scalar_t, V>& v) {
          const acc_t inv = acc_t(1) / static_cast<acc_t>(++seen);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const acc_t a = static_cast<acc_t>(v.v[k]);
            const acc_t d = a - mean[k];
            mean[k] += d * inv;
            m2[k] += d * (a - mean[k]);
          }
        });
  }
  // Rows this thread visited: the same for every thread of the row ty, active or not.
  int cnt = ty < len ? (len - 1 - ty) / TY + 1 : 0;
  __shared__ acc_t sh_mean[V * kThreads], sh_m2[V * kThreads];
  __shared__ int sh_n[kThreads];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    sh_mean[k * kThreads + t] = mean[k];
    sh_m2[k * kThreads + t] = m2[k];
  }
  if (t % TX == 0) sh_n[ty] = cnt;
  __syncthreads();
  // Level `half`: slot ty < half takes slot ty + half (reads [half, 2 half), writes [0, half)).
  for (int half = TY / 2; half > 0; half >>= 1) {
    if (ty < half) {
      const int nb = sh_n[ty + half];
      const int partner = t + half * TX;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        int na = cnt;
        cuda::welford_merge(na, mean[k], m2[k], nb, sh_mean[k * kThreads + partner], sh_m2[k * kThreads + partner]);
        sh_mean[k * kThreads + t] = mean[k];
        sh_m2[k * kThreads + t] = m2[k];
      }
      cnt += nb;
      if (t % TX == 0) sh_n[ty] = cnt;
    }
    __syncthreads();
  }
  if (ty == 0 && active) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t o = (tc.n * C + tc.c0 + k) * S + tc.s;
      out_mean[o] = mean[k];
      out_m2[o] = S == 1 ? m2[k] / static_cast<acc_t>(cnt) : m2[k];
    }
  }
}

// Merges the S split moments of each row in split order. Split s holds
// min(chunk, L - s * chunk) elements (NCHW) or hw positions (channels_last).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) stats_finalize_kernel(
    const acc_t* __restrict__ ws_mean,  // (rows, S)
    const acc_t* __restrict__ ws_m2,    // (rows, S)
    int64_t rows, int S, int L, int chunk,
    acc_t* __restrict__ mean,           // (rows)
    acc_t* __restrict__ var) {          // (rows)
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= rows) return;
  int n = 0;
  acc_t mu = 0, m2 = 0;
  for (int s = 0; s < S; ++s)
    cuda::welford_merge(n, mu, m2, min(chunk, L - s * chunk), ws_mean[row * S + s], ws_m2[row * S + s]);
  mean[row] = mu;
  var[row] = m2 / static_cast<acc_t>(n);
}

// ---- bin_bwd_reduce -------------------------------------------------------------------------

template <typename scalar_t, int V, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads) bwd_reduce_nchw_kernel(
    const scalar_t* __restrict__ dy,   // (rows, L)
    const scalar_t* __restrict__ x,    // (rows, L)
    const acc_t* __restrict__ mean,    // (rows)
    int64_t rows, int L, int T, int chunk, int S,
    acc_t* __restrict__ out_s1,        // (rows, S): sum dy
    acc_t* __restrict__ out_s2) {      // (rows, S): sum dy * (x - mean)
  using V2 = Vec<scalar_t, V>;
  struct Pair {
    V2 g, x;
  };
  const RowCoord rc = row_coord(T, S);
  acc_t s1 = 0, s2 = 0;
  if (rc.row < rows) {
    const acc_t mu = mean[rc.row];
    const int start = rc.s * chunk;
    const int64_t off = rc.row * L + start;
    const scalar_t* pg = dy + off;
    const scalar_t* px = x + off;
    segment<V, kUnroll2>(
        pg, min(chunk, L - start), rc.lane, T,
        [&](int e) {
          const acc_t g = static_cast<acc_t>(pg[e]);
          s1 += g;
          s2 += g * (static_cast<acc_t>(px[e]) - mu);
        },
        [&](int e) { return Pair{load_vec<scalar_t, V>(pg + e), load_vec<scalar_t, V>(px + e)}; },
        [&](int, const Pair& r) {
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const acc_t g = static_cast<acc_t>(r.g.v[k]);
            s1 += g;
            s2 += g * (static_cast<acc_t>(r.x.v[k]) - mu);
          }
        });
  }
  s1 = cuda::warp_sum_down(s1);
  s2 = cuda::warp_sum_down(s2);
  __shared__ acc_t sh1[kWarps], sh2[kWarps];
  const int warp = threadIdx.x / cuda::kWarpSize;
  if (threadIdx.x % cuda::kWarpSize == 0) {
    sh1[warp] = s1;
    sh2[warp] = s2;
  }
  __syncthreads();
  if (rc.lane == 0 && rc.row < rows) {
    for (int w = 1; w < T / cuda::kWarpSize; ++w) {
      s1 += sh1[warp + w];
      s2 += sh2[warp + w];
    }
    out_s1[rc.row * S + rc.s] = s1;
    out_s2[rc.row * S + rc.s] = s2;
  }
}

template <typename scalar_t, int V, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads) bwd_reduce_nhwc_kernel(
    const scalar_t* __restrict__ dy,  // (N, L, C) in memory
    const scalar_t* __restrict__ x,   // (N, L, C) in memory
    const acc_t* __restrict__ mean,   // (N, C)
    int C, int L, int TX, int ctiles, int chunk, int S,
    acc_t* __restrict__ out_s1,       // (N * C, S)
    acc_t* __restrict__ out_s2) {     // (N * C, S)
  using V2 = Vec<scalar_t, V>;
  struct Pair {
    V2 g, x;
  };
  const int TY = kThreads / TX;
  const int t = threadIdx.x, ty = t / TX;
  const TileCoord tc = tile_coord<V>(TX, ctiles, S);
  const int h0 = tc.s * chunk, len = min(chunk, L - h0);
  const bool active = tc.c0 < C;
  acc_t s1[V], s2[V];
#pragma unroll
  for (int k = 0; k < V; ++k) s1[k] = s2[k] = 0;
  if (active) {
    acc_t mu[V];
#pragma unroll
    for (int k = 0; k < V; ++k) mu[k] = mean[tc.n * C + tc.c0 + k];
    const int64_t off = (tc.n * L + h0) * C + tc.c0;
    const scalar_t* pg = dy + off;
    const scalar_t* px = x + off;
    sweep<kUnroll2>(
        len, ty, TY,
        [&](int h) {
          const int64_t o = static_cast<int64_t>(h) * C;
          return Pair{load_vec<scalar_t, V>(pg + o), load_vec<scalar_t, V>(px + o)};
        },
        [&](int, const Pair& r) {
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const acc_t g = static_cast<acc_t>(r.g.v[k]);
            s1[k] += g;
            s2[k] += g * (static_cast<acc_t>(r.x.v[k]) - mu[k]);
          }
        });
  }
  __shared__ acc_t sh1[V * kThreads], sh2[V * kThreads];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    sh1[k * kThreads + t] = s1[k];
    sh2[k * kThreads + t] = s2[k];
  }
  __syncthreads();
  for (int half = TY / 2; half > 0; half >>= 1) {
    if (ty < half) {
      const int partner = t + half * TX;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        s1[k] += sh1[k * kThreads + partner];
        s2[k] += sh2[k * kThreads + partner];
        sh1[k * kThreads + t] = s1[k];
        sh2[k * kThreads + t] = s2[k];
      }
    }
    __syncthreads();
  }
  if (ty == 0 && active) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t o = (tc.n * C + tc.c0 + k) * S + tc.s;
      out_s1[o] = s1[k];
      out_s2[o] = s2[k];
    }
  }
}

// Sums the S split partials of each row in split order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_finalize_kernel(
    const acc_t* __restrict__ ws1, const acc_t* __restrict__ ws2,  // (rows, S)
    int64_t rows, int S,
    acc_t* __restrict__ s1, acc_t* __restrict__ s2) {              // (rows)
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= rows) return;
  acc_t a = 0, b = 0;
  for (int s = 0; s < S; ++s) {
    a += ws1[row * S + s];
    b += ws2[row * S + s];
  }
  s1[row] = a;
  s2[row] = b;
}

// ---- bin_apply / bin_bwd_apply --------------------------------------------------------------

// out = a[n,c] * u + b[n,c] * v + d[n,c] (v and b only when kTwo): bin_apply is (x; scale, -, shift),
// bin_bwd_apply is (dy, x; p, q, r). Computed in acc_t, rounded once to scalar_t.
template <typename scalar_t, int V, bool kTwo, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads) affine_nchw_kernel(
    const scalar_t* __restrict__ u,  // (rows, L)
    const scalar_t* __restrict__ v,  // (rows, L), kTwo only
    const acc_t* __restrict__ a,     // (rows)
    const acc_t* __restrict__ b,     // (rows), kTwo only
    const acc_t* __restrict__ d,     // (rows)
    int64_t rows, int L, int T, int chunk, int S,
    scalar_t* __restrict__ out) {    // (rows, L)
  using V2 = Vec<scalar_t, V>;
  struct Pair {
    V2 u, v;
  };
  const RowCoord rc = row_coord(T, S);
  if (rc.row >= rows) return;  // no block-wide synchronisation below
  const acc_t ar = a[rc.row], br = kTwo ? b[rc.row] : acc_t(0), dr = d[rc.row];
  const int start = rc.s * chunk;
  const int64_t off = rc.row * L + start;
  const scalar_t* pu = u + off;
  const scalar_t* pv = kTwo ? v + off : nullptr;
  scalar_t* po = out + off;
  auto f = [&](scalar_t uu, scalar_t vv) {
    acc_t y = ar * static_cast<acc_t>(uu) + dr;
    if (kTwo) y += br * static_cast<acc_t>(vv);
    return static_cast<scalar_t>(y);
  };
  segment<V, kTwo ? kUnroll2 : kUnroll1>(
      pu, min(chunk, L - start), rc.lane, T,
      [&](int e) { po[e] = f(pu[e], kTwo ? pv[e] : pu[e]); },
      [&](int e) {
        Pair r;
        r.u = load_vec<scalar_t, V>(pu + e);
        if (kTwo) r.v = load_vec<scalar_t, V>(pv + e);
        return r;
      },
      [&](int e, const Pair& r) {
        V2 o;
#pragma unroll
        for (int k = 0; k < V; ++k) o.v[k] = f(r.u.v[k], kTwo ? r.v.v[k] : r.u.v[k]);
        store_vec<scalar_t, V>(po + e, o);
      });
}

template <typename scalar_t, int V, bool kTwo, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads) affine_nhwc_kernel(
    const scalar_t* __restrict__ u,  // (N, L, C) in memory
    const scalar_t* __restrict__ v,  // (N, L, C) in memory, kTwo only
    const acc_t* __restrict__ a,     // (N, C)
    const acc_t* __restrict__ b,     // (N, C), kTwo only
    const acc_t* __restrict__ d,     // (N, C)
    int C, int L, int TX, int ctiles, int chunk, int S,
    scalar_t* __restrict__ out) {    // (N, L, C) in memory
  using V2 = Vec<scalar_t, V>;
  struct Pair {
    V2 u, v;
  };
  const int TY = kThreads / TX;
  const int ty = threadIdx.x / TX;
  const TileCoord tc = tile_coord<V>(TX, ctiles, S);
  if (tc.c0 >= C) return;  // no block-wide synchronisation below
  acc_t ak[V], bk[V], dk[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t nc = tc.n * C + tc.c0 + k;
    ak[k] = a[nc];
    bk[k] = kTwo ? b[nc] : acc_t(0);
    dk[k] = d[nc];
  }
  const int h0 = tc.s * chunk;
  const int64_t off = (tc.n * L + h0) * C + tc.c0;
  const scalar_t* pu = u + off;
  const scalar_t* pv = kTwo ? v + off : nullptr;
  scalar_t* po = out + off;
  sweep<kTwo ? kUnroll2 : kUnroll1>(
      min(chunk, L - h0), ty, TY,
      [&](int h) {
        const int64_t o = static_cast<int64_t>(h) * C;
        Pair r;
        r.u = load_vec<scalar_t, V>(pu + o);
        if (kTwo) r.v = load_vec<scalar_t, V>(pv + o);
        return r;
      },
      [&](int h, const Pair& r) {
        V2 o;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          acc_t y = ak[k] * static_cast<acc_t>(r.u.v[k]) + dk[k];
          if (kTwo) y += bk[k] * static_cast<acc_t>(r.v.v[k]);
          o.v[k] = static_cast<scalar_t>(y);
        }
        store_vec<scalar_t, V>(po + static_cast<int64_t>(h) * C, o);
      });
}

// ---- launch shapes ----------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct NchwPlan {
  int T;       // threads per row (power of two, 32..kThreads)
  int S;       // splits per row
  int chunk;   // elements per split (a multiple of V; the last split may be shorter)
  int64_t blocks;
};

// T: the smallest power of two >= 32 giving each thread <= kMinItemsPerThread vectors, capped
// at kThreads. Rows are split only when whole-block rows leave fewer than kTargetBlocks blocks.
NchwPlan plan_nchw(int64_t rows, int64_t L, int V) {
  const int64_t nvec = ceil_div(L, V);
  int T = cuda::kWarpSize;
  while (T < kThreads && int64_t(T) * kMinItemsPerThread < nvec) T *= 2;
  const int64_t groups = ceil_div(rows, kThreads / T);
  int64_t S = 1;
  if (T == kThreads && groups < kTargetBlocks) {
    const int64_t most = std::max<int64_t>(1, L / (int64_t(T) * V * kMinItemsPerThread));
    S = std::min(ceil_div(kTargetBlocks, groups), most);
  }
  const int64_t chunk = ceil_div(ceil_div(L, S), V) * V;  // same alignment at every split start
  S = ceil_div(L, chunk);                                 // no empty split
  return {T, static_cast<int>(S), static_cast<int>(chunk), groups * S};
}

struct NhwcPlan {
  int TX;      // threads across a channel tile (power of two, 1..32), V channels each
  int ctiles;  // channel tiles of TX * V channels
  int S;       // splits of the hw positions
  int chunk;   // hw positions per split (the last split may be shorter)
  int64_t blocks;
};

NhwcPlan plan_nhwc(int64_t N, int64_t C, int64_t L, int V) {
  const int64_t cv = ceil_div(C, V);
  int TX = 1;
  while (TX < cuda::kWarpSize && TX < cv) TX *= 2;
  const int TY = kThreads / TX;
  const int64_t ctiles = ceil_div(C, int64_t(TX) * V);
  const int64_t base = N * ctiles;
  int64_t S = 1;
  if (base < kTargetBlocks) {
    const int64_t min_rows = std::max<int64_t>(kMinRowsPerSplit, int64_t(TY) * kMinItemsPerThread);
    S = std::min(ceil_div(kTargetBlocks, base), std::max<int64_t>(1, L / min_rows));
  }
  const int64_t chunk = ceil_div(L, S);
  S = ceil_div(L, chunk);
  return {TX, static_cast<int>(ctiles), static_cast<int>(S), static_cast<int>(chunk), base * S};
}

unsigned grid_of(int64_t blocks) {
  TORCH_CHECK(blocks > 0 && blocks <= std::numeric_limits<int32_t>::max(), "fastdg: grid of ", blocks,
              " blocks is out of range");
  return static_cast<unsigned>(blocks);
}

// ---- argument checks (those of csrc/cpu/bin_norm.cpp, plus devices) --------------------------

enum class Layout { NCHW, NHWC };

Layout layout_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "fastdg: expected a 4-d (N, C, H, W) tensor, got ", x.dim(), " dims");
  TORCH_CHECK(x.is_cuda(), "fastdg: x must be a CUDA tensor");
  if (x.is_contiguous()) return Layout::NCHW;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::NHWC;
  TORCH_CHECK(false, "fastdg: x must be contiguous NCHW or channels_last (callers make it so)");
}

at::MemoryFormat format_of(Layout layout) {
  return layout == Layout::NCHW ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

at::ScalarType stat_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_extent(const at::Tensor& x) {
  TORCH_CHECK(x.size(1) < kMaxExtent && x.size(2) * x.size(3) < kMaxExtent,
              "fastdg: the CUDA BIN kernels need C and H * W below 2^30, got shape ", x.sizes());
}

void check_nc(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1) && t.is_contiguous(),
              "fastdg: ", name, " must be a contiguous (N, C) tensor");
  TORCH_CHECK(t.scalar_type() == stat_dtype(x), "fastdg: ", name, " must be ", c10::toString(stat_dtype(x)));
  TORCH_CHECK(t.device() == x.device(), "fastdg: ", name, " must be on ", x.device(), ", got ", t.device());
}

// dy must have x's memory layout. Checked as "contiguous in x's format" rather than by equal
// strides: the strides of size-1 dims are arbitrary and say nothing about where elements lie.
void check_dy(const at::Tensor& dy, const at::Tensor& x, Layout layout) {
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_contiguous(format_of(layout)),
              "fastdg: dy must match x in shape, dtype and memory format");
  TORCH_CHECK(dy.device() == x.device(), "fastdg: dy must be on ", x.device(), ", got ", dy.device());
}

uintptr_t address(const void* p) { return reinterpret_cast<uintptr_t>(p); }

// NCHW vectors: every pointer at the same address modulo 16 (rows then split identically).
bool congruent(std::initializer_list<const void*> ptrs) {
  const uintptr_t m = address(*ptrs.begin()) % cuda::kVecBytes;
  for (const void* p : ptrs)
    if (address(p) % cuda::kVecBytes != m) return false;
  return true;
}

// channels_last vectors: C a multiple of the vector width and every pointer 16-byte aligned.
bool nhwc_vectorisable(int64_t C, int V, std::initializer_list<const void*> ptrs) {
  if (C % V != 0) return false;
  for (const void* p : ptrs)
    if (address(p) % cuda::kVecBytes != 0) return false;
  return true;
}

// ---- launchers ------------------------------------------------------------------------------

template <typename scalar_t, int V>
void launch_stats(const at::Tensor& x, Layout layout, const at::Tensor& mean, const at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3), rows = N * C;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* vp = var.mutable_data_ptr<acc_t>();
  int S, chunk;
  at::Tensor ws;
  auto outputs = [&](int splits) -> std::pair<acc_t*, acc_t*> {
    if (splits == 1) return {mp, vp};
    ws = at::empty({2, rows * splits}, mean.options());
    acc_t* w = ws.mutable_data_ptr<acc_t>();
    return {w, w + rows * splits};
  };
  if (layout == Layout::NCHW) {
    const NchwPlan pl = plan_nchw(rows, L, V);
    S = pl.S;
    chunk = pl.chunk;
    const auto out = outputs(S);
    stats_nchw_kernel<scalar_t, V><<<grid_of(pl.blocks), kThreads, 0, stream>>>(
        xp, rows, static_cast<int>(L), pl.T, chunk, S, out.first, out.second);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const NhwcPlan pl = plan_nhwc(N, C, L, V);
    S = pl.S;
    chunk = pl.chunk;
    const auto out = outputs(S);
    stats_nhwc_kernel<scalar_t, V><<<grid_of(pl.blocks), kThreads, 0, stream>>>(
        xp, static_cast<int>(C), static_cast<int>(L), pl.TX, pl.ctiles, chunk, S, out.first, out.second);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (S > 1) {
    const acc_t* w = ws.const_data_ptr<acc_t>();
    stats_finalize_kernel<acc_t><<<grid_of(ceil_div(rows, kThreads)), kThreads, 0, stream>>>(
        w, w + rows * S, rows, S, static_cast<int>(L), chunk, mp, vp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, int V>
void launch_bwd_reduce(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, Layout layout,
                       const at::Tensor& s1, const at::Tensor& s2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3), rows = N * C;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* gp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* mp = mean.const_data_ptr<acc_t>();
  acc_t* s1p = s1.mutable_data_ptr<acc_t>();
  acc_t* s2p = s2.mutable_data_ptr<acc_t>();
  int S;
  at::Tensor ws;
  auto outputs = [&](int splits) -> std::pair<acc_t*, acc_t*> {
    if (splits == 1) return {s1p, s2p};
    ws = at::empty({2, rows * splits}, mean.options());
    acc_t* w = ws.mutable_data_ptr<acc_t>();
    return {w, w + rows * splits};
  };
  if (layout == Layout::NCHW) {
    const NchwPlan pl = plan_nchw(rows, L, V);
    S = pl.S;
    const auto out = outputs(S);
    bwd_reduce_nchw_kernel<scalar_t, V><<<grid_of(pl.blocks), kThreads, 0, stream>>>(
        gp, xp, mp, rows, static_cast<int>(L), pl.T, pl.chunk, S, out.first, out.second);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const NhwcPlan pl = plan_nhwc(N, C, L, V);
    S = pl.S;
    const auto out = outputs(S);
    bwd_reduce_nhwc_kernel<scalar_t, V><<<grid_of(pl.blocks), kThreads, 0, stream>>>(
        gp, xp, mp, static_cast<int>(C), static_cast<int>(L), pl.TX, pl.ctiles, pl.chunk, S, out.first, out.second);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (S > 1) {
    const acc_t* w = ws.const_data_ptr<acc_t>();
    sum_finalize_kernel<acc_t><<<grid_of(ceil_div(rows, kThreads)), kThreads, 0, stream>>>(w, w + rows * S, rows, S,
                                                                                            s1p, s2p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// out = a u + b v + d with v = b = nullptr for bin_apply.
template <typename scalar_t, int V, bool kTwo>
void launch_affine(const scalar_t* u, const scalar_t* v, const at::Tensor& a, const at::Tensor* b,
                   const at::Tensor& d, scalar_t* out, const at::Tensor& x, Layout layout) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const acc_t* ap = a.const_data_ptr<acc_t>();
  const acc_t* bp = b ? b->const_data_ptr<acc_t>() : nullptr;
  const acc_t* dp = d.const_data_ptr<acc_t>();
  if (layout == Layout::NCHW) {
    const NchwPlan pl = plan_nchw(N * C, L, V);
    affine_nchw_kernel<scalar_t, V, kTwo><<<grid_of(pl.blocks), kThreads, 0, stream>>>(
        u, v, ap, bp, dp, N * C, static_cast<int>(L), pl.T, pl.chunk, pl.S, out);
  } else {
    const NhwcPlan pl = plan_nhwc(N, C, L, V);
    affine_nhwc_kernel<scalar_t, V, kTwo><<<grid_of(pl.blocks), kThreads, 0, stream>>>(
        u, v, ap, bp, dp, static_cast<int>(C), static_cast<int>(L), pl.TX, pl.ctiles, pl.chunk, pl.S, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- ops ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> bin_stats_cuda(const at::Tensor& x) {
  const Layout layout = layout_of(x);
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3);
  TORCH_CHECK(L > 0, "fastdg: bin_stats needs H * W > 0");
  check_extent(x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto mean = at::empty({N, C}, x.options().dtype(stat_dtype(x)));
  auto var = at::empty({N, C}, x.options().dtype(stat_dtype(x)));
  if (N * C == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bin_stats_cuda", [&] {
    constexpr int V = vec_width<scalar_t>();
    // NCHW needs no alignment: rows are read as head + vectors + tail.
    if (layout == Layout::NCHW || nhwc_vectorisable(C, V, {x.const_data_ptr()}))
      launch_stats<scalar_t, V>(x, layout, mean, var);
    else
      launch_stats<scalar_t, 1>(x, layout, mean, var);
  });
  return {mean, var};
}

at::Tensor bin_apply_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  const Layout layout = layout_of(x);
  check_nc(scale, x, "scale");
  check_nc(shift, x, "shift");
  check_extent(x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto y = at::empty_like(x, format_of(layout));
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bin_apply_cuda", [&] {
    constexpr int V = vec_width<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool vec = layout == Layout::NCHW ? congruent({xp, yp}) : nhwc_vectorisable(x.size(1), V, {xp, yp});
    if (vec)
      launch_affine<scalar_t, V, false>(xp, nullptr, scale, nullptr, shift, yp, x, layout);
    else
      launch_affine<scalar_t, 1, false>(xp, nullptr, scale, nullptr, shift, yp, x, layout);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bin_bwd_reduce_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                       const at::Tensor& mean) {
  const Layout layout = layout_of(x);
  check_dy(dy, x, layout);
  check_nc(mean, x, "mean");
  check_extent(x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3);
  auto s1 = at::empty({N, C}, mean.options());
  auto s2 = at::empty({N, C}, mean.options());
  if (N * C == 0) return {s1, s2};
  if (L == 0) {  // empty sums, as on the CPU
    s1.zero_();
    s2.zero_();
    return {s1, s2};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bin_bwd_reduce_cuda", [&] {
    constexpr int V = vec_width<scalar_t>();
    const void* gp = dy.const_data_ptr();
    const void* xp = x.const_data_ptr();
    const bool vec = layout == Layout::NCHW ? congruent({gp, xp}) : nhwc_vectorisable(C, V, {gp, xp});
    if (vec)
      launch_bwd_reduce<scalar_t, V>(dy, x, mean, layout, s1, s2);
    else
      launch_bwd_reduce<scalar_t, 1>(dy, x, mean, layout, s1, s2);
  });
  return {s1, s2};
}

at::Tensor bin_bwd_apply_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& p, const at::Tensor& q,
                              const at::Tensor& r) {
  const Layout layout = layout_of(x);
  check_dy(dy, x, layout);
  check_nc(p, x, "p");
  check_nc(q, x, "q");
  check_nc(r, x, "r");
  check_extent(x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto dx = at::empty_like(x, format_of(layout));
  if (x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bin_bwd_apply_cuda", [&] {
    constexpr int V = vec_width<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = dx.mutable_data_ptr<scalar_t>();
    const bool vec =
        layout == Layout::NCHW ? congruent({gp, xp, op}) : nhwc_vectorisable(x.size(1), V, {gp, xp, op});
    if (vec)
      launch_affine<scalar_t, V, true>(gp, xp, p, &q, r, op, x, layout);
    else
      launch_affine<scalar_t, 1, true>(gp, xp, p, &q, r, op, x, layout);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdg, CUDA, m) {
  m.impl("bin_stats", &bin_stats_cuda);
  m.impl("bin_apply", &bin_apply_cuda);
  m.impl("bin_bwd_reduce", &bin_bwd_reduce_cuda);
  m.impl("bin_bwd_apply", &bin_bwd_apply_cuda);
}

}  // namespace fastdg
