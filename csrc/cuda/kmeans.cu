// CUDA kernels of batched k-means (METHODS.md section 4): the whole ragged batch of groups in one
// launch per kernel, no float atomics, nothing read back to the host. The Lloyd loop, k-means++
// and reseeding are in fastdg/reference/kmeans.py (shared by every backend).
//
// Layout: x (N, D) rows sorted by group, group g = rows off[g]..off[g+1] (offsets on the device).
// Distances d = ||x||^2 - 2 x.c + ||c||^2 (clamped at 0) in fp32 (fp64 for fp64 x): one warp per
// row, lanes stride over D (coalesced), up to kTile centroids per sweep held in registers, so a
// row is read once for k <= kTile; warp sums by xor-shuffle (every lane gets the same value).
//
// Fused step: a block owns an item = up to kItemRows rows of one group. In sub-tiles of 8 rows,
// each warp assigns one row, then every thread adds the 8 rows (just read, so served by L1/L2)
// to the columns it owns of the item's per-cluster partial sums (in shared memory when they
// fit, else in the item's slice of global memory): one read of x from DRAM per iteration.
// A second kernel sums the items of each group in index order: deterministic.
//
// The item table (first item of each group) is an exclusive scan of ceil(n_g / kItemRows),
// computed on the device; the grid is sized by the bound ceil(N / kItemRows) + G so the host
// never reads the offsets. Extra blocks exit at once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace fastdg {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kTile = 8;
constexpr int64_t kItemRows = 128;
constexpr int kScanThreads = 1024;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Largest i in [0, n) with first[i] <= v (first non-decreasing, first[0] <= v): the group
// that owns row v (first = offsets) or item v (first = item table); skips empty groups.
__device__ __forceinline__ int64_t owner(const int64_t* __restrict__ first, int64_t n, int64_t v) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (first[mid] <= v)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// emit(j, d(x, C[j])) for j < kg, called with the same values on every lane of the warp.
template <typename scalar_t, typename T, typename Emit>
__device__ __forceinline__ void row_distances(const scalar_t* __restrict__ xr, const T* __restrict__ C,
                                              const T* __restrict__ cc, int64_t D, int64_t kg, int lane, Emit emit) {
  T xx = 0;
  for (int64_t j0 = 0; j0 < kg; j0 += kTile) {
    T acc[kTile];
#pragma unroll
    for (int t = 0; t < kTile; ++t) acc[t] = 0;
    const bool first = j0 == 0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const T v = static_cast<T>(xr[d]);
      if (first) xx += v * v;
#pragma unroll
      for (int t = 0; t < kTile; ++t)
        if (j0 + t < kg) acc[t] += v * C[(j0 + t) * D + d];
    }
    if (first) xx = warp_sum(xx);
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      if (j0 + t < kg) {  // uniform across the warp: the shuffle inside is safe
        const T dist = xx - T(2) * warp_sum(acc[t]) + cc[j0 + t];
        emit(j0 + t, dist > T(0) ? dist : T(0));
      }
    }
  }
}

// out[r] = ||C[r]||^2, one warp per row of C (rows x D).
template <typename T>
__global__ void sqnorm_kernel(const T* __restrict__ C, int64_t rows, int64_t D, T* __restrict__ out) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= rows) return;
  T s = 0;
  for (int64_t d = lane; d < D; d += kWarp) s += C[r * D + d] * C[r * D + d];
  s = warp_sum(s);
  if (lane == 0) out[r] = s;
}

// One warp per row: label = argmin_j d (ties to the lowest j), min_dist = that distance.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) assign_kernel(
    const scalar_t* __restrict__ x,   // (N, D)
    int64_t N, int64_t D,
    const T* __restrict__ C,          // (G, Kmax, D)
    const T* __restrict__ cc,         // (G, Kmax)
    int64_t Kmax,
    const int64_t* __restrict__ off,  // (G + 1)
    int64_t G,
    const int64_t* __restrict__ k,    // (G)
    int64_t* __restrict__ labels,     // (N)
    T* __restrict__ min_dist) {       // (N)
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const int64_t g = owner(off, G, row);
  const int64_t kg = k[g];
  T best = std::numeric_limits<T>::infinity();
  int64_t bj = kg > 0 ? 0 : -1;
  if (kg > 0)
    row_distances<scalar_t, T>(x + row * D, C + g * Kmax * D, cc + g * Kmax, D, kg, lane, [&](int64_t j, T dj) {
      if (dj < best) {
        best = dj;
        bj = j;
      }
    });
  if (lane == 0) {
    labels[row] = bj;
    min_dist[row] = kg > 0 ? best : T(0);
  }
}

// One warp per row: out[row, l] = d(x_row, centers[g, l]) for every l < L.
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kThreads) dist_kernel(
    const scalar_t* __restrict__ x, int64_t N, int64_t D,
    const T* __restrict__ centers,   // (G, L, D)
    const T* __restrict__ cc,        // (G, L)
    int64_t L, const int64_t* __restrict__ off, int64_t G,
    T* __restrict__ out) {           // (N, L)
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const int64_t g = owner(off, G, row);
  row_distances<scalar_t, T>(x + row * D, centers + g * L * D, cc + g * L, D, L, lane, [&](int64_t j, T dj) {
    if (lane == 0) out[row * L + j] = dj;
  });
}

// first[g] = sum_{h < g} ceil(n_h / rows), first[G] = number of items. One block: each thread
// scans a contiguous run of groups, then a block-wide scan of the run totals.
__global__ void item_table_kernel(const int64_t* __restrict__ off, int64_t G, int64_t rows,
                                  int64_t* __restrict__ first) {
  __shared__ int64_t part[kScanThreads];
  const int t = threadIdx.x;
  const int64_t per = (G + kScanThreads - 1) / kScanThreads;
  const int64_t g0 = std::min<int64_t>(G, t * per), g1 = std::min<int64_t>(G, g0 + per);
  int64_t s = 0;
  for (int64_t g = g0; g < g1; ++g) s += (off[g + 1] - off[g] + rows - 1) / rows;
  part[t] = s;
  __syncthreads();
  for (int o = 1; o < kScanThreads; o <<= 1) {
    const int64_t v = t >= o ? part[t - o] : 0;
    __syncthreads();
    part[t] += v;
    __syncthreads();
  }
  int64_t base = part[t] - s;
  for (int64_t g = g0; g < g1; ++g) {
    first[g] = base;
    base += (off[g + 1] - off[g] + rows - 1) / rows;
  }
  if (t == kScanThreads - 1) first[G] = part[t];
}

// Per item: (kAssign) labels + min_dist of its rows, or (!kAssign) the given labels; then the
// item's per-cluster partial sums (Kmax, D), counts (Kmax) and inertia (sum of min_dist).
template <typename scalar_t, typename T, bool kAssign>
__global__ void __launch_bounds__(kThreads) step_kernel(
    const scalar_t* __restrict__ x, int64_t D,
    const T* __restrict__ C, const T* __restrict__ cc, int64_t Kmax,  // (G, Kmax, D), (G, Kmax); kAssign
    const int64_t* __restrict__ off, int64_t G,
    const int64_t* __restrict__ k,           // (G); kAssign
    const int64_t* __restrict__ first,       // (G + 1) item table
    const int64_t* __restrict__ labels_in,   // (N); !kAssign
    int64_t* __restrict__ labels_out,        // (N); kAssign
    T* __restrict__ min_dist,                // (N); kAssign
    T* __restrict__ partial,                 // (items, Kmax, D)
    int64_t* __restrict__ item_counts,       // (items, Kmax)
    double* __restrict__ item_inertia,       // (items)
    bool smem_acc) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int64_t labs[kWarps];
  __shared__ T dists[kWarps];
  const int64_t b = blockIdx.x;
  if (b >= first[G]) return;  // uniform across the block
  const int64_t g = owner(first, G, b);
  const int64_t r0 = off[g] + (b - first[g]) * kItemRows;
  const int64_t r1 = std::min<int64_t>(r0 + kItemRows, off[g + 1]);
  const int64_t kg = kAssign ? k[g] : Kmax;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  T* acc = smem_acc ? reinterpret_cast<T*>(smem_raw) : partial + b * Kmax * D;
  int64_t* cnt = item_counts + b * Kmax;
  for (int64_t e = tid; e < std::max<int64_t>(kg, 0) * D; e += kThreads) acc[e] = T(0);
  for (int64_t j = tid; j < Kmax; j += kThreads) cnt[j] = 0;
  double inertia = 0;  // thread 0, rows in order
  __syncthreads();
  for (int64_t base = r0; base < r1; base += kWarps) {
    const int64_t row = base + warp;
    if (row < r1) {
      int64_t lab = -1;
      T md = T(0);
      if (kAssign) {
        if (kg > 0) {
          T best = std::numeric_limits<T>::infinity();
          int64_t bj = 0;
          row_distances<scalar_t, T>(x + row * D, C + g * Kmax * D, cc + g * Kmax, D, kg, lane,
                                     [&](int64_t j, T dj) {
                                       if (dj < best) {
                                         best = dj;
                                         bj = j;
                                       }
                                     });
          lab = bj;
          md = best;
        }
        if (lane == 0) {
          labels_out[row] = lab;
          min_dist[row] = md;
        }
      } else {
        lab = labels_in[row];
        if (lab >= Kmax) lab = -1;  // out-of-range labels are ignored (the op checks them first)
      }
      if (lane == 0) {
        labs[warp] = lab;
        dists[warp] = md;
      }
    }
    __syncthreads();
    const int nrows = static_cast<int>(std::min<int64_t>(kWarps, r1 - base));
    for (int64_t d = tid; d < D; d += kThreads) {
      for (int q = 0; q < nrows; ++q) {
        const int64_t lab = labs[q];
        if (lab >= 0) acc[lab * D + d] += static_cast<T>(x[(base + q) * D + d]);
      }
    }
    if (tid == 0) {
      for (int q = 0; q < nrows; ++q) {
        if (labs[q] < 0) continue;
        ++cnt[labs[q]];
        inertia += static_cast<double>(dists[q]);
      }
    }
    __syncthreads();
  }
  if (smem_acc) {
    T* out = partial + b * Kmax * D;
    for (int64_t e = tid; e < std::max<int64_t>(kg, 0) * D; e += kThreads) out[e] = acc[e];
  }
  if (tid == 0) item_inertia[b] = inertia;
}

// sums[g, e] = sum over the items of g, in index order, of partial[item, e] for e < k[g] * D
// (else 0); counts and inertia likewise. 1-D grid over (group, tile of Kmax * D).
template <typename T>
__global__ void reduce_kernel(const T* __restrict__ partial, const int64_t* __restrict__ item_counts,
                              const double* __restrict__ item_inertia, const int64_t* __restrict__ first,
                              const int64_t* __restrict__ k, int64_t G, int64_t Kmax, int64_t D, int64_t tiles,
                              T* __restrict__ sums, int64_t* __restrict__ counts, T* __restrict__ inertia) {
  const int64_t g = blockIdx.x / tiles;
  const int64_t e = (blockIdx.x % tiles) * kThreads + threadIdx.x;
  const int64_t per = Kmax * D;
  const int64_t kg = k ? k[g] : Kmax;
  const int64_t i0 = first[g], i1 = first[g + 1];
  if (e < per) {
    T s = 0;
    if (e < kg * D)
      for (int64_t it = i0; it < i1; ++it) s += partial[it * per + e];
    sums[g * per + e] = s;
  }
  if (blockIdx.x % tiles == 0) {
    for (int64_t j = threadIdx.x; j < Kmax; j += kThreads) {
      int64_t c = 0;
      for (int64_t it = i0; it < i1; ++it) c += item_counts[it * Kmax + j];
      counts[g * Kmax + j] = c;
    }
    if (inertia != nullptr && threadIdx.x == 0) {
      double s = 0;
      for (int64_t it = i0; it < i1; ++it) s += item_inertia[it];
      inertia[g] = static_cast<T>(s);
    }
  }
}

// ---- host side ---------------------------------------------------------------------------

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_common(const at::Tensor& x, const at::Tensor& offsets) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "fastdg kmeans: x must be a contiguous (N, D) CUDA tensor");
  TORCH_CHECK(offsets.device() == x.device() && offsets.dim() == 1 && offsets.numel() >= 2 &&
                  offsets.scalar_type() == at::kLong && offsets.is_contiguous(),
              "fastdg kmeans: offsets must be a contiguous (G+1,) int64 tensor on x's device");
}

void check_centers(const at::Tensor& x, const at::Tensor& C, const at::Tensor& offsets, const char* name) {
  TORCH_CHECK(C.device() == x.device() && C.dim() == 3 && C.is_contiguous() && C.size(0) == offsets.numel() - 1 &&
                  C.size(2) == x.size(1),
              "fastdg kmeans: ", name, " must be a contiguous (G, K, D) tensor on x's device");
  TORCH_CHECK(C.scalar_type() == acc_type(x), "fastdg kmeans: ", name, " must be ", c10::toString(acc_type(x)));
}

void check_k(const at::Tensor& x, const at::Tensor& k, int64_t G) {
  TORCH_CHECK(k.device() == x.device() && k.dim() == 1 && k.numel() == G && k.scalar_type() == at::kLong &&
                  k.is_contiguous(),
              "fastdg kmeans: k must be a contiguous (G,) int64 tensor on x's device (values in [0, Kmax])");
}

// Largest dynamic shared memory a block may opt in to on the current device. (Read directly:
// ATen/cuda/CUDAContext.h would pull in the cuSPARSE/cuBLAS headers, which a bare nvcc lacks.)
int64_t smem_optin() {
  int dev = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
}

int64_t blocks_for(int64_t rows_of_warps) { return (rows_of_warps + kWarps - 1) / kWarps; }

at::Tensor sqnorms(const at::Tensor& C) {
  const int64_t rows = C.size(0) * C.size(1), D = C.size(2);
  auto out = at::empty({C.size(0), C.size(1)}, C.options());
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "kmeans_sqnorm_cuda", [&] {
    sqnorm_kernel<scalar_t><<<blocks_for(rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        C.const_data_ptr<scalar_t>(), rows, D, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor item_table(const at::Tensor& offsets) {
  const int64_t G = offsets.numel() - 1;
  auto first = at::empty({G + 1}, offsets.options());
  item_table_kernel<<<1, kScanThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      offsets.const_data_ptr<int64_t>(), G, kItemRows, first.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return first;
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cuda(const at::Tensor& x, const at::Tensor& centroids,
                                                      const at::Tensor& offsets, const at::Tensor& k) {
  check_common(x, offsets);
  check_centers(x, centroids, offsets, "centroids");
  const int64_t N = x.size(0), D = x.size(1), G = centroids.size(0), Kmax = centroids.size(1);
  check_k(x, k, G);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto labels = at::empty({N}, x.options().dtype(at::kLong));
  auto min_dist = at::empty({N}, centroids.options());
  if (N == 0) return {labels, min_dist};
  const auto cc = sqnorms(centroids);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kmeans_assign_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    assign_kernel<scalar_t, T><<<blocks_for(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), N, D, centroids.const_data_ptr<T>(), cc.const_data_ptr<T>(), Kmax,
        offsets.const_data_ptr<int64_t>(), G, k.const_data_ptr<int64_t>(), labels.mutable_data_ptr<int64_t>(),
        min_dist.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {labels, min_dist};
}

at::Tensor kmeans_dist_cuda(const at::Tensor& x, const at::Tensor& centers, const at::Tensor& offsets) {
  check_common(x, offsets);
  check_centers(x, centers, offsets, "centers");
  const int64_t N = x.size(0), D = x.size(1), G = centers.size(0), L = centers.size(1);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto out = at::empty({N, L}, centers.options());
  if (N == 0 || L == 0) return out;
  const auto cc = sqnorms(centers);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kmeans_dist_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    dist_kernel<scalar_t, T><<<blocks_for(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), N, D, centers.const_data_ptr<T>(), cc.const_data_ptr<T>(), L,
        offsets.const_data_ptr<int64_t>(), G, out.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Shared by step (kAssign) and update (!kAssign): returns sums, counts, and fills the rest.
template <bool kAssign>
std::tuple<at::Tensor, at::Tensor> sums_pass(const at::Tensor& x, const at::Tensor& offsets, int64_t Kmax,
                                             const at::Tensor* centroids, const at::Tensor* k,
                                             const at::Tensor* labels_in, at::Tensor* labels_out,
                                             at::Tensor* min_dist, at::Tensor* inertia) {
  const int64_t N = x.size(0), D = x.size(1), G = offsets.numel() - 1;
  const auto acc = acc_type(x);
  auto sums = at::empty({G, Kmax, D}, x.options().dtype(acc));
  auto counts = at::empty({G, Kmax}, x.options().dtype(at::kLong));
  const int64_t items = (N + kItemRows - 1) / kItemRows + G;  // bound on sum_g ceil(n_g / kItemRows)
  auto first = item_table(offsets);
  auto partial = at::empty({items, Kmax, D}, x.options().dtype(acc));
  auto item_counts = at::empty({items, Kmax}, x.options().dtype(at::kLong));
  auto item_inertia = at::empty({items}, x.options().dtype(at::kDouble));
  const at::Tensor cc = kAssign ? sqnorms(*centroids) : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kmeans_step_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const size_t bytes = static_cast<size_t>(Kmax) * D * sizeof(T);
    // Shared-memory partial sums when they fit in 96 KB (two blocks per SM still fit); above
    // 48 KB the kernel must opt in. Otherwise each block accumulates in its global slice.
    const bool smem = bytes <= 96 * 1024 && static_cast<int64_t>(bytes) + 1024 <= smem_optin();
    auto kernel = step_kernel<scalar_t, T, kAssign>;
    if (smem && bytes > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    if (items > 0) {
      kernel<<<items, kThreads, smem ? bytes : 0, stream>>>(
          x.const_data_ptr<scalar_t>(), D, kAssign ? centroids->const_data_ptr<T>() : nullptr,
          kAssign ? cc.const_data_ptr<T>() : nullptr, Kmax, offsets.const_data_ptr<int64_t>(), G,
          kAssign ? k->const_data_ptr<int64_t>() : nullptr, first.const_data_ptr<int64_t>(),
          kAssign ? nullptr : labels_in->const_data_ptr<int64_t>(),
          kAssign ? labels_out->mutable_data_ptr<int64_t>() : nullptr,
          kAssign ? min_dist->mutable_data_ptr<T>() : nullptr, partial.mutable_data_ptr<T>(),
          item_counts.mutable_data_ptr<int64_t>(), item_inertia.mutable_data_ptr<double>(), smem);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t tiles = std::max<int64_t>(1, (Kmax * D + kThreads - 1) / kThreads);
    reduce_kernel<T><<<G * tiles, kThreads, 0, stream>>>(
        partial.const_data_ptr<T>(), item_counts.const_data_ptr<int64_t>(), item_inertia.const_data_ptr<double>(),
        first.const_data_ptr<int64_t>(), kAssign ? k->const_data_ptr<int64_t>() : nullptr, G, Kmax, D, tiles,
        sums.mutable_data_ptr<T>(), counts.mutable_data_ptr<int64_t>(),
        inertia ? inertia->mutable_data_ptr<T>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_step_cuda(
    const at::Tensor& x, const at::Tensor& centroids, const at::Tensor& offsets, const at::Tensor& k) {
  check_common(x, offsets);
  check_centers(x, centroids, offsets, "centroids");
  const int64_t N = x.size(0), G = centroids.size(0), Kmax = centroids.size(1);
  check_k(x, k, G);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto labels = at::empty({N}, x.options().dtype(at::kLong));
  auto min_dist = at::empty({N}, centroids.options());
  auto inertia = at::empty({G}, centroids.options());
  auto [sums, counts] = sums_pass<true>(x, offsets, Kmax, &centroids, &k, nullptr, &labels, &min_dist, &inertia);
  return {labels, min_dist, sums, counts, inertia};
}

std::tuple<at::Tensor, at::Tensor> kmeans_update_cuda(const at::Tensor& x, const at::Tensor& labels,
                                                      const at::Tensor& offsets, int64_t kmax) {
  check_common(x, offsets);
  TORCH_CHECK(kmax >= 1, "fastdg kmeans_update: kmax must be >= 1");
  TORCH_CHECK(labels.device() == x.device() && labels.dim() == 1 && labels.numel() == x.size(0) &&
                  labels.scalar_type() == at::kLong && labels.is_contiguous(),
              "fastdg kmeans_update: labels must be a contiguous (N,) int64 tensor on x's device");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  return sums_pass<false>(x, offsets, kmax, nullptr, nullptr, &labels, nullptr, nullptr, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdg, CUDA, m) {
  m.impl("kmeans_assign", &kmeans_assign_cuda);
  m.impl("kmeans_update", &kmeans_update_cuda);
  m.impl("kmeans_step", &kmeans_step_cuda);
  m.impl("kmeans_dist", &kmeans_dist_cuda);
}

}  // namespace fastdg
