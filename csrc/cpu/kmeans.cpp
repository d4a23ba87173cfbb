// C++ CPU kernels of batched k-means (METHODS.md section 4); the Lloyd loop, k-means++ and the
// reseeding of empty clusters are in fastdg/reference/kmeans.py, shared by every backend.
//
// Layout: x (N, D) with the rows of group g at offsets[g]..offsets[g+1]. Work is split into
// items = (group, block of consecutive rows: kItemRows, or 4 * Kmax when the per-item partial
// sums would otherwise outweigh the rows); the split depends only on the
// shapes, never on the thread count, and every reduction runs over items in index order, so
// the results are bitwise reproducible whatever the number of threads.
//
// Distances: d(x, c) = ||x||^2 - 2 x.c + ||c||^2 (clamped at 0), accumulated in fp32 (fp64 for
// fp64 x); fp16/bf16 rows are widened once into a per-thread fp32 buffer. The fused step reads
// each row once: the row is still in L1 when it is added to its cluster's partial sum.
// The inner loops are compiled twice, for the baseline ISA and for AVX2+FMA, and picked at run
// time, because the extension is built without -march flags. Rows are processed in pairs so
// that every centroid element loaded feeds two products.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <vector>

#if !(defined(__GNUC__) || defined(__clang__))
#error "csrc/cpu/kmeans.cpp uses GCC/Clang vector extensions: build with GCC or Clang"
#endif
#if defined(__x86_64__)
#define FASTDG_KM_X86 1
#define FASTDG_KM_AVX2 __attribute__((target("avx2,fma")))
#endif
#define FASTDG_KM_INLINE inline __attribute__((always_inline))

namespace fastdg {
namespace {

constexpr int64_t kItemRows = 1024;

// ---- inner loops (T = accumulation type: float or double) --------------------------------

// 32-byte GCC/Clang vectors: 8 floats or 4 doubles (AVX registers in the AVX2 build, pairs of
// SSE registers in the baseline build).
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename T>
using vec_t = typename VecOf<T>::type;

template <typename T>
FASTDG_KM_INLINE vec_t<T> loadu(const T* p) {
  vec_t<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
FASTDG_KM_INLINE T hsum(vec_t<T> v) {
  constexpr int W = sizeof(vec_t<T>) / sizeof(T);
  T s = 0;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// dot[r][c] = x_r . C_c for NR rows and NC centroids (rows of C, stride D) in one sweep over d,
// plus xx[r] = ||x_r||^2 when XX: NR * NC independent accumulator chains hide the FMA latency
// and each loaded element feeds several products.
template <typename T, int NR, int NC, bool XX>
FASTDG_KM_INLINE void dot_tile(const T* const* x, const T* C, int64_t D, T (*dot)[4], T* xx) {
  constexpr int W = sizeof(vec_t<T>) / sizeof(T);
  vec_t<T> acc[NR][NC], accx[NR];
  for (int r = 0; r < NR; ++r) {
    accx[r] = vec_t<T>{};
    for (int c = 0; c < NC; ++c) acc[r][c] = vec_t<T>{};
  }
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    vec_t<T> xv[NR];
    for (int r = 0; r < NR; ++r) {
      xv[r] = loadu<T>(x[r] + d);
      if (XX) accx[r] += xv[r] * xv[r];
    }
    for (int c = 0; c < NC; ++c) {
      const vec_t<T> cv = loadu<T>(C + c * D + d);
      for (int r = 0; r < NR; ++r) acc[r][c] += xv[r] * cv;
    }
  }
  for (int r = 0; r < NR; ++r) {
    T tx = hsum<T>(accx[r]);
    T t[NC];
    for (int c = 0; c < NC; ++c) t[c] = hsum<T>(acc[r][c]);
    for (int64_t e = d; e < D; ++e) {
      const T v = x[r][e];
      if (XX) tx += v * v;
      for (int c = 0; c < NC; ++c) t[c] += v * C[c * D + e];
    }
    for (int c = 0; c < NC; ++c) dot[r][c] = t[c];
    if (XX) xx[r] = tx;
  }
}

template <typename T, int NR, int NC>
FASTDG_KM_INLINE void dot_tile_any(bool with_xx, const T* const* x, const T* C, int64_t D, T (*dot)[4], T* xx) {
  if (with_xx)
    dot_tile<T, NR, NC, true>(x, C, D, dot, xx);
  else
    dot_tile<T, NR, NC, false>(x, C, D, dot, xx);
}

// out[r][j] = max(||x_r||^2 - 2 x_r.c_j + cc[j], 0) for j < k and NR (1 or 2) rows.
template <typename T, int NR>
FASTDG_KM_INLINE void dist_rows_body(const T* const* x, const T* C, const T* cc, int64_t D, int64_t k,
                                     T* const* out) {
  T xx[NR] = {};
  T dot[NR][4];
  for (int64_t j = 0; j < k; j += 4) {
    const int64_t nc = std::min<int64_t>(4, k - j);
    const bool first = j == 0;
    const T* Cj = C + j * D;
    switch (nc) {
      case 4: dot_tile_any<T, NR, 4>(first, x, Cj, D, dot, xx); break;
      case 3: dot_tile_any<T, NR, 3>(first, x, Cj, D, dot, xx); break;
      case 2: dot_tile_any<T, NR, 2>(first, x, Cj, D, dot, xx); break;
      default: dot_tile_any<T, NR, 1>(first, x, Cj, D, dot, xx); break;
    }
    for (int r = 0; r < NR; ++r)
      for (int64_t c = 0; c < nc; ++c) out[r][j + c] = std::max<T>(xx[r] - 2 * dot[r][c] + cc[j + c], 0);
  }
}

template <typename T>
FASTDG_KM_INLINE void dist_body(const T* x0, const T* x1, const T* C, const T* cc, int64_t D, int64_t k, T* out0,
                                T* out1) {
  if (x1) {
    const T* x[2] = {x0, x1};
    T* out[2] = {out0, out1};
    dist_rows_body<T, 2>(x, C, cc, D, k, out);
  } else {
    dist_rows_body<T, 1>(&x0, C, cc, D, k, &out0);
  }
}

template <typename T>
FASTDG_KM_INLINE void add_row_body(T* acc, const T* x, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += x[d];
}

template <typename T>
void dist_base(const T* x0, const T* x1, const T* C, const T* cc, int64_t D, int64_t k, T* out0, T* out1) {
  dist_body<T>(x0, x1, C, cc, D, k, out0, out1);
}
template <typename T>
void add_row_base(T* acc, const T* x, int64_t D) {
  add_row_body<T>(acc, x, D);
}
#ifdef FASTDG_KM_X86
template <typename T>
FASTDG_KM_AVX2 void dist_avx2(const T* x0, const T* x1, const T* C, const T* cc, int64_t D, int64_t k, T* out0,
                              T* out1) {
  dist_body<T>(x0, x1, C, cc, D, k, out0, out1);
}
template <typename T>
FASTDG_KM_AVX2 void add_row_avx2(T* acc, const T* x, int64_t D) {
  add_row_body<T>(acc, x, D);
}
#endif

// The inner loops for this machine: distances of one or two rows (x1 = nullptr: one) to k
// centroids, and acc += row.
template <typename T>
struct Loops {
  using Dist = void (*)(const T*, const T*, const T*, const T*, int64_t, int64_t, T*, T*);
  using Add = void (*)(T*, const T*, int64_t);
  Dist dist = &dist_base<T>;
  Add add = &add_row_base<T>;
  Loops() {
#ifdef FASTDG_KM_X86
    // FASTDG_CPU_BASELINE=1 keeps the baseline loops (so tests can exercise them on AVX2 hosts).
    const char* baseline = std::getenv("FASTDG_CPU_BASELINE");
    if (!(baseline && baseline[0] == '1') && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      dist = &dist_avx2<T>;
      add = &add_row_avx2<T>;
    }
#endif
  }
  static const Loops& get() {
    static const Loops loops;
    return loops;
  }
};

// ---- work plan and argument checks -------------------------------------------------------

struct Plan {
  std::vector<int64_t> group, begin, end;  // per item
  std::vector<int64_t> first;              // (G + 1): items of group g are first[g]..first[g+1]
  int64_t size() const { return static_cast<int64_t>(group.size()); }
};

Plan make_plan(const int64_t* off, int64_t G, int64_t rows) {
  Plan p;
  p.first.resize(G + 1);
  for (int64_t g = 0; g < G; ++g) {
    p.first[g] = p.size();
    for (int64_t a = off[g]; a < off[g + 1]; a += rows) {
      p.group.push_back(g);
      p.begin.push_back(a);
      p.end.push_back(std::min(a + rows, off[g + 1]));
    }
  }
  p.first[G] = p.size();
  return p;
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_x_offsets(const at::Tensor& x, const at::Tensor& offsets) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "fastdg kmeans: x must be a contiguous (N, D) tensor");
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 2 && offsets.scalar_type() == at::kLong &&
                  offsets.is_contiguous() && offsets.device().is_cpu(),
              "fastdg kmeans: offsets must be a contiguous (G+1,) int64 CPU tensor with G >= 1");
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t G = offsets.numel() - 1;
  TORCH_CHECK(off[0] == 0 && off[G] == x.size(0), "fastdg kmeans: offsets must start at 0 and end at N");
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(off[g] <= off[g + 1], "fastdg kmeans: offsets must be non-decreasing (rows sorted by group)");
}

void check_centroids(const at::Tensor& x, const at::Tensor& C, const at::Tensor& offsets, const char* name) {
  TORCH_CHECK(C.dim() == 3 && C.is_contiguous() && C.size(0) == offsets.numel() - 1 && C.size(2) == x.size(1),
              "fastdg kmeans: ", name, " must be a contiguous (G, K, D) tensor");
  TORCH_CHECK(C.scalar_type() == acc_type(x), "fastdg kmeans: ", name, " must be ", c10::toString(acc_type(x)),
              " for ", c10::toString(x.scalar_type()), " x");
}

void check_k(const at::Tensor& k, int64_t G, int64_t kmax) {
  TORCH_CHECK(k.dim() == 1 && k.numel() == G && k.scalar_type() == at::kLong && k.is_contiguous(),
              "fastdg kmeans: k must be a contiguous (G,) int64 tensor");
  const int64_t* kp = k.const_data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(kp[g] >= 0 && kp[g] <= kmax, "fastdg kmeans: k[", g, "] = ", kp[g], " is outside [0, ", kmax, "]");
}

template <typename T>
std::vector<T> squared_norms(const T* C, int64_t rows, int64_t D) {
  std::vector<T> cc(rows);
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += double(C[r * D + d]) * double(C[r * D + d]);
    cc[r] = static_cast<T>(s);
  }
  return cc;
}

// Row `r` of x as T: a pointer into x when no conversion is needed, else widened into buf.
template <typename scalar_t, typename T>
FASTDG_KM_INLINE const T* row_as(const scalar_t* x, int64_t r, int64_t D, T* buf) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return x + r * D;
  } else {
    const scalar_t* xr = x + r * D;
    for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<T>(xr[d]);
    return buf;
  }
}

// ---- the item loop: assign and/or accumulate ----------------------------------------------

// One pass over the rows of every item. With C: assign each row (labels, min_dist); else the
// labels are read from labels_in. With partial: add each row to its cluster's partial sum.
template <typename scalar_t, typename T>
void run_items(const Plan& plan, const scalar_t* x, int64_t D, int64_t Kmax, const T* C, const T* cc,
               const int64_t* k, const int64_t* labels_in, int64_t* labels_out, T* min_dist, T* partial,
               int64_t* item_counts, double* item_inertia) {
  const Loops<T>& loops = Loops<T>::get();
  at::parallel_for(0, plan.size(), 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> buf(2 * D), dist(2 * std::max<int64_t>(Kmax, 1));
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t g = plan.group[it];
      const int64_t kg = C ? k[g] : Kmax;
      T* part = partial ? partial + it * Kmax * D : nullptr;
      int64_t* cnt = item_counts ? item_counts + it * Kmax : nullptr;
      if (part) std::fill(part, part + std::max<int64_t>(kg, 0) * D, T(0));
      if (cnt) std::fill(cnt, cnt + Kmax, int64_t(0));
      double inertia = 0;
      if (!C) {  // update only: the labels are given
        for (int64_t r = plan.begin[it]; r < plan.end[it]; ++r) {
          const int64_t lab = labels_in[r];
          if (lab < 0) continue;
          loops.add(part + lab * D, row_as<scalar_t, T>(x, r, D, buf.data()), D);
          ++cnt[lab];
        }
        continue;
      }
      for (int64_t r = plan.begin[it]; r < plan.end[it]; r += 2) {
        const int64_t nr = std::min<int64_t>(2, plan.end[it] - r);
        if (kg <= 0) {
          for (int64_t q = 0; q < nr; ++q) {
            labels_out[r + q] = -1;
            min_dist[r + q] = 0;
          }
          continue;
        }
        // Two rows per call: every centroid element loaded feeds two products.
        const T* x0 = row_as<scalar_t, T>(x, r, D, buf.data());
        const T* x1 = nr > 1 ? row_as<scalar_t, T>(x, r + 1, D, buf.data() + D) : nullptr;
        loops.dist(x0, x1, C + g * Kmax * D, cc + g * Kmax, D, kg, dist.data(), dist.data() + Kmax);
        for (int64_t q = 0; q < nr; ++q) {
          const T* dq = dist.data() + q * Kmax;
          int64_t best = 0;
          for (int64_t j = 1; j < kg; ++j)
            if (dq[j] < dq[best]) best = j;  // strict: ties keep the lowest index
          labels_out[r + q] = best;
          min_dist[r + q] = dq[best];
          inertia += double(dq[best]);
          if (part) loops.add(part + best * D, q ? x1 : x0, D);  // the row is still in L1
          if (cnt) ++cnt[best];
        }
      }
      if (item_inertia) item_inertia[it] = inertia;
    }
  });
}

// sums[g, j, :] = sum over the items of g, in order, of partial[item, j, :] (j < k[g], else 0).
template <typename T>
void reduce_items(const Plan& plan, int64_t G, int64_t Kmax, int64_t D, const int64_t* k, const T* partial,
                  const int64_t* item_counts, T* sums, int64_t* counts) {
  constexpr int64_t kSlice = 4096;
  const int64_t per_group = Kmax * D, slices = (per_group + kSlice - 1) / kSlice;
  at::parallel_for(0, G * slices, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t g = w / slices, e0 = (w % slices) * kSlice, e1 = std::min(e0 + kSlice, per_group);
      const int64_t valid = (k ? std::max<int64_t>(k[g], 0) : Kmax) * D;
      T* out = sums + g * per_group;
      std::fill(out + e0, out + e1, T(0));
      for (int64_t it = plan.first[g]; it < plan.first[g + 1]; ++it) {
        const T* p = partial + it * per_group;
        for (int64_t e = e0; e < std::min(e1, valid); ++e) out[e] += p[e];
      }
    }
  });
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < Kmax; ++j) {
      int64_t c = 0;
      for (int64_t it = plan.first[g]; it < plan.first[g + 1]; ++it) c += item_counts[it * Kmax + j];
      counts[g * Kmax + j] = c;
    }
}

int64_t rows_per_item(int64_t Kmax) { return std::max<int64_t>(kItemRows, 4 * Kmax); }

// ---- ops ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cpu(const at::Tensor& x, const at::Tensor& centroids,
                                                     const at::Tensor& offsets, const at::Tensor& k) {
  check_x_offsets(x, offsets);
  check_centroids(x, centroids, offsets, "centroids");
  const int64_t N = x.size(0), D = x.size(1), G = centroids.size(0), Kmax = centroids.size(1);
  check_k(k, G, Kmax);
  auto labels = at::empty({N}, x.options().dtype(at::kLong));
  auto min_dist = at::empty({N}, centroids.options());
  const Plan plan = make_plan(offsets.const_data_ptr<int64_t>(), G, kItemRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kmeans_assign_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const T* C = centroids.const_data_ptr<T>();
    const auto cc = squared_norms(C, G * Kmax, D);
    run_items<scalar_t, T>(plan, x.const_data_ptr<scalar_t>(), D, Kmax, C, cc.data(), k.const_data_ptr<int64_t>(),
                           nullptr, labels.mutable_data_ptr<int64_t>(), min_dist.mutable_data_ptr<T>(), nullptr,
                           nullptr, nullptr);
  });
  return {labels, min_dist};
}

std::tuple<at::Tensor, at::Tensor> kmeans_update_cpu(const at::Tensor& x, const at::Tensor& labels,
                                                     const at::Tensor& offsets, int64_t kmax) {
  check_x_offsets(x, offsets);
  TORCH_CHECK(kmax >= 1, "fastdg kmeans_update: kmax must be >= 1");
  TORCH_CHECK(labels.dim() == 1 && labels.numel() == x.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              "fastdg kmeans_update: labels must be a contiguous (N,) int64 tensor");
  const int64_t N = x.size(0), D = x.size(1), G = offsets.numel() - 1;
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(lab[i] < kmax, "fastdg kmeans_update: label ", lab[i], " of row ", i, " is >= kmax = ", kmax);
  const auto acc = acc_type(x);
  auto sums = at::empty({G, kmax, D}, x.options().dtype(acc));
  auto counts = at::empty({G, kmax}, x.options().dtype(at::kLong));
  const Plan plan = make_plan(offsets.const_data_ptr<int64_t>(), G, rows_per_item(kmax));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kmeans_update_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    std::vector<T> partial(plan.size() * kmax * D);
    std::vector<int64_t> item_counts(plan.size() * kmax);
    run_items<scalar_t, T>(plan, x.const_data_ptr<scalar_t>(), D, kmax, nullptr, nullptr, nullptr, lab, nullptr,
                           nullptr, partial.data(), item_counts.data(), nullptr);
    reduce_items<T>(plan, G, kmax, D, nullptr, partial.data(), item_counts.data(), sums.mutable_data_ptr<T>(),
                    counts.mutable_data_ptr<int64_t>());
  });
  return {sums, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_step_cpu(
    const at::Tensor& x, const at::Tensor& centroids, const at::Tensor& offsets, const at::Tensor& k) {
  check_x_offsets(x, offsets);
  check_centroids(x, centroids, offsets, "centroids");
  const int64_t N = x.size(0), D = x.size(1), G = centroids.size(0), Kmax = centroids.size(1);
  check_k(k, G, Kmax);
  const int64_t* kp = k.const_data_ptr<int64_t>();
  auto labels = at::empty({N}, x.options().dtype(at::kLong));
  auto min_dist = at::empty({N}, centroids.options());
  auto sums = at::empty({G, Kmax, D}, centroids.options());
  auto counts = at::empty({G, Kmax}, x.options().dtype(at::kLong));
  auto inertia = at::empty({G}, centroids.options());
  const Plan plan = make_plan(offsets.const_data_ptr<int64_t>(), G, rows_per_item(Kmax));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kmeans_step_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const T* C = centroids.const_data_ptr<T>();
    const auto cc = squared_norms(C, G * Kmax, D);
    std::vector<T> partial(plan.size() * Kmax * D);
    std::vector<int64_t> item_counts(plan.size() * Kmax);
    std::vector<double> item_inertia(plan.size());
    run_items<scalar_t, T>(plan, x.const_data_ptr<scalar_t>(), D, Kmax, C, cc.data(), kp, nullptr,
                           labels.mutable_data_ptr<int64_t>(), min_dist.mutable_data_ptr<T>(), partial.data(),
                           item_counts.data(), item_inertia.data());
    reduce_items<T>(plan, G, Kmax, D, kp, partial.data(), item_counts.data(), sums.mutable_data_ptr<T>(),
                    counts.mutable_data_ptr<int64_t>());
    T* ip = inertia.mutable_data_ptr<T>();
    for (int64_t g = 0; g < G; ++g) {
      double s = 0;
      for (int64_t it = plan.first[g]; it < plan.first[g + 1]; ++it) s += item_inertia[it];
      ip[g] = static_cast<T>(s);
    }
  });
  return {labels, min_dist, sums, counts, inertia};
}

at::Tensor kmeans_dist_cpu(const at::Tensor& x, const at::Tensor& centers, const at::Tensor& offsets) {
  check_x_offsets(x, offsets);
  check_centroids(x, centers, offsets, "centers");
  const int64_t N = x.size(0), D = x.size(1), G = centers.size(0), L = centers.size(1);
  auto out = at::empty({N, L}, centers.options());
  const Plan plan = make_plan(offsets.const_data_ptr<int64_t>(), G, kItemRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kmeans_dist_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const T* C = centers.const_data_ptr<T>();
    const auto cc = squared_norms(C, G * L, D);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    T* op = out.mutable_data_ptr<T>();
    const Loops<T>& loops = Loops<T>::get();
    at::parallel_for(0, plan.size(), 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> buf(2 * D);
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t g = plan.group[it];
        for (int64_t r = plan.begin[it]; r < plan.end[it]; r += 2) {
          const bool two = r + 1 < plan.end[it];
          const T* x0 = row_as<scalar_t, T>(xp, r, D, buf.data());
          const T* x1 = two ? row_as<scalar_t, T>(xp, r + 1, D, buf.data() + D) : nullptr;
          loops.dist(x0, x1, C + g * L * D, cc.data() + g * L, D, L, op + r * L, two ? op + (r + 1) * L : nullptr);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdg, CPU, m) {
  m.impl("kmeans_assign", &kmeans_assign_cpu);
  m.impl("kmeans_update", &kmeans_update_cpu);
  m.impl("kmeans_step", &kmeans_step_cpu);
  m.impl("kmeans_dist", &kmeans_dist_cpu);
}

}  // namespace fastdg
