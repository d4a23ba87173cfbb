// C++ CPU kernels of Batch-Instance Normalization (METHODS.md section 1).
// Four streaming kernels; the per-(n, c) coefficient algebra between them is done on (N, C)
// tensors in fastdg/ops/bin_norm.py. Forward = bin_stats (1 read) + bin_apply (1 read, 1 write);
// backward = bin_bwd_reduce (2 reads) + bin_bwd_apply (2 reads, 1 write): the 3 + 5 passes
// of BatchNorm. Both NCHW and channels_last are read in place; every reduction runs in a
// fixed order, so results are bitwise reproducible for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fastdg {
namespace {

// Elements per cache-resident chunk: the mean and the squared deviations of a chunk are
// computed in two sweeps over data that is already in L1/L2, then chunks are merged
// with Chan's formula. One pass over memory, and no E[x^2] - E[x]^2 cancellation.
constexpr int64_t kChunk = 2048;

struct Moments {
  double count = 0;
  double mean = 0;
  double m2 = 0;
  // Chan et al. parallel merge of two (count, mean, M2) triples.
  void merge(double n_b, double mean_b, double m2_b) {
    if (n_b == 0) return;
    const double n = count + n_b;
    const double delta = mean_b - mean;
    mean += delta * (n_b / n);
    m2 += m2_b + delta * delta * (count * n_b / n);
    count = n;
  }
};

// Sums along a contiguous plane run in kLanes independent accumulators (element i goes to
// lane i % kLanes: a fixed order, so results stay deterministic), combined pairwise at the
// end. Without -ffast-math a single accumulator must stay sequential: the lanes let the
// compiler vectorise, and they cut the rounding error of long sums by about sqrt(kLanes).
constexpr int kLanes = 16;

template <typename acc_t>
inline acc_t combine_lanes(acc_t* lanes) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) lanes[j] += lanes[j + w];
  return lanes[0];
}

// sum_i f(i) for i in [0, n), f returning acc_t, in lanes.
template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t n, F f) {
  acc_t l[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) l[j] += f(i + j);
  for (; i < n; ++i) l[i % kLanes] += f(i);
  return combine_lanes(l);
}

enum class Layout { NCHW, NHWC };

Layout layout_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "fastdg: expected a 4-d (N, C, H, W) tensor, got ", x.dim(), " dims");
  if (x.is_contiguous()) return Layout::NCHW;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::NHWC;
  TORCH_CHECK(false, "fastdg: x must be contiguous NCHW or channels_last (callers make it so)");
}

// dy must have x's memory format, not its exact strides: where both layouts are contiguous
// (H = W = 1, or C = 1) the strides of size-1 dimensions differ with no change to the memory.
void check_dy(const at::Tensor& dy, const at::Tensor& x, Layout layout) {
  const auto fmt = layout == Layout::NCHW ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_contiguous(fmt),
              "fastdg: dy must match x in shape, dtype and memory format");
}

at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_nc(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1) && t.is_contiguous(),
              "fastdg: ", name, " must be a contiguous (N, C) tensor");
  TORCH_CHECK(t.scalar_type() == stat_dtype(x), "fastdg: ", name, " must be ",
              c10::toString(stat_dtype(x)));
}

std::tuple<at::Tensor, at::Tensor> bin_stats_cpu(const at::Tensor& x) {
  const Layout layout = layout_of(x);
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3);
  TORCH_CHECK(L > 0, "fastdg: bin_stats needs H * W > 0");
  auto mean = at::empty({N, C}, x.options().dtype(stat_dtype(x)));
  auto var = at::empty({N, C}, x.options().dtype(stat_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bin_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    stat_t* mp = mean.mutable_data_ptr<stat_t>();
    stat_t* vp = var.mutable_data_ptr<stat_t>();
    if (layout == Layout::NCHW) {
      at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const scalar_t* plane = xp + p * L;
          Moments mo;
          for (int64_t s = 0; s < L; s += kChunk) {
            const int64_t n = std::min(kChunk, L - s);
            const scalar_t* chunk = plane + s;
            const acc_t mu = lane_sum<acc_t>(n, [&](int64_t i) { return static_cast<acc_t>(chunk[i]); }) /
                             static_cast<acc_t>(n);
            const acc_t m2 = lane_sum<acc_t>(n, [&](int64_t i) {
              const acc_t d = static_cast<acc_t>(chunk[i]) - mu;
              return d * d;
            });
            mo.merge(double(n), double(mu), double(m2));
          }
          mp[p] = static_cast<stat_t>(mo.mean);
          vp[p] = static_cast<stat_t>(mo.m2 / mo.count);
        }
      });
    } else {
      // channels_last: memory is (n, hw, c). Work item = (n, block of channels); rows of
      // a chunk of positions are swept twice while they sit in cache.
      constexpr int64_t kCB = 64;
      const int64_t cblocks = (C + kCB - 1) / kCB;
      const int64_t rows = std::max<int64_t>(1, kChunk / kCB);
      at::parallel_for(0, N * cblocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> sum(kCB), m2(kCB);
        std::vector<Moments> mo(kCB);
        for (int64_t w = begin; w < end; ++w) {
          const int64_t n = w / cblocks, c0 = (w % cblocks) * kCB, cn = std::min(kCB, C - c0);
          const scalar_t* base = xp + n * L * C + c0;
          for (int64_t c = 0; c < cn; ++c) mo[c] = Moments();
          for (int64_t s = 0; s < L; s += rows) {
            const int64_t r = std::min(rows, L - s);
            std::fill(sum.begin(), sum.begin() + cn, acc_t(0));
            std::fill(m2.begin(), m2.begin() + cn, acc_t(0));
            for (int64_t i = 0; i < r; ++i) {
              const scalar_t* row = base + (s + i) * C;
              for (int64_t c = 0; c < cn; ++c) sum[c] += static_cast<acc_t>(row[c]);
            }
            for (int64_t c = 0; c < cn; ++c) sum[c] /= static_cast<acc_t>(r);
            for (int64_t i = 0; i < r; ++i) {
              const scalar_t* row = base + (s + i) * C;
              for (int64_t c = 0; c < cn; ++c) {
                const acc_t d = static_cast<acc_t>(row[c]) - sum[c];
                m2[c] += d * d;
              }
            }
            for (int64_t c = 0; c < cn; ++c) mo[c].merge(double(r), double(sum[c]), double(m2[c]));
          }
          for (int64_t c = 0; c < cn; ++c) {
            mp[n * C + c0 + c] = static_cast<stat_t>(mo[c].mean);
            vp[n * C + c0 + c] = static_cast<stat_t>(mo[c].m2 / mo[c].count);
          }
        }
      });
    }
  });
  return {mean, var};
}

// out = a[n,c] * u + b[n,c] * v + d[n,c] elementwise, with v optional (the apply kernels
// of forward and backward are the same shape of loop).
template <typename scalar_t, typename stat_t>
void affine_nc(const scalar_t* u, const scalar_t* v, const stat_t* a, const stat_t* b,
               const stat_t* d, scalar_t* out, int64_t N, int64_t C, int64_t L, Layout layout) {
  using acc_t = at::opmath_type<scalar_t>;
  if (layout == Layout::NCHW) {
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const acc_t ap = a[p], bp = v ? acc_t(b[p]) : acc_t(0), dp = d[p];
        const scalar_t* up = u + p * L;
        scalar_t* op = out + p * L;
        if (v) {
          const scalar_t* vp = v + p * L;
          for (int64_t i = 0; i < L; ++i)
            op[i] = static_cast<scalar_t>(ap * static_cast<acc_t>(up[i]) + bp * static_cast<acc_t>(vp[i]) + dp);
        } else {
          for (int64_t i = 0; i < L; ++i) op[i] = static_cast<scalar_t>(ap * static_cast<acc_t>(up[i]) + dp);
        }
      }
    });
  } else {
    at::parallel_for(0, N * L, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / L;
        const stat_t* an = a + n * C;
        const stat_t* bn = b ? b + n * C : nullptr;
        const stat_t* dn = d + n * C;
        const scalar_t* up = u + row * C;
        scalar_t* op = out + row * C;
        if (v) {
          const scalar_t* vp = v + row * C;
          for (int64_t c = 0; c < C; ++c)
            op[c] = static_cast<scalar_t>(acc_t(an[c]) * static_cast<acc_t>(up[c]) +
                                          acc_t(bn[c]) * static_cast<acc_t>(vp[c]) + acc_t(dn[c]));
        } else {
          for (int64_t c = 0; c < C; ++c)
            op[c] = static_cast<scalar_t>(acc_t(an[c]) * static_cast<acc_t>(up[c]) + acc_t(dn[c]));
        }
      }
    });
  }
}

at::Tensor bin_apply_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  const Layout layout = layout_of(x);
  check_nc(scale, x, "scale");
  check_nc(shift, x, "shift");
  auto y = at::empty_like(x, layout == Layout::NCHW ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bin_apply_cpu", [&] {
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    affine_nc<scalar_t, stat_t>(x.const_data_ptr<scalar_t>(), nullptr, scale.const_data_ptr<stat_t>(), nullptr,
                                shift.const_data_ptr<stat_t>(), y.mutable_data_ptr<scalar_t>(), N, C, L, layout);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bin_bwd_reduce_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean) {
  const Layout layout = layout_of(x);
  check_dy(dy, x, layout);
  check_nc(mean, x, "mean");
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3);
  auto s1 = at::empty({N, C}, mean.options());
  auto s2 = at::empty({N, C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bin_bwd_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const stat_t* mp = mean.const_data_ptr<stat_t>();
    stat_t* s1p = s1.mutable_data_ptr<stat_t>();
    stat_t* s2p = s2.mutable_data_ptr<stat_t>();
    if (layout == Layout::NCHW) {
      at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const acc_t mu = mp[p];
          // Per-chunk partial sums in acc_t, then double across chunks: long planes stay accurate.
          double t1 = 0, t2 = 0;
          for (int64_t s = 0; s < L; s += kChunk) {
            const int64_t n = std::min(kChunk, L - s);
            const scalar_t* g = gp + p * L + s;
            const scalar_t* xc = xp + p * L + s;
            t1 += lane_sum<acc_t>(n, [&](int64_t i) { return static_cast<acc_t>(g[i]); });
            t2 += lane_sum<acc_t>(n, [&](int64_t i) {
              return static_cast<acc_t>(g[i]) * (static_cast<acc_t>(xc[i]) - mu);
            });
          }
          s1p[p] = static_cast<stat_t>(t1);
          s2p[p] = static_cast<stat_t>(t2);
        }
      });
    } else {
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        std::vector<double> t1(C), t2(C);
        std::vector<acc_t> a1(C), a2(C);
        const int64_t rows = std::max<int64_t>(1, kChunk / std::max<int64_t>(C, 1));
        for (int64_t n = begin; n < end; ++n) {
          std::fill(t1.begin(), t1.end(), 0.0);
          std::fill(t2.begin(), t2.end(), 0.0);
          const stat_t* mu = mp + n * C;
          for (int64_t s = 0; s < L; s += rows) {
            const int64_t r = std::min(rows, L - s);
            std::fill(a1.begin(), a1.end(), acc_t(0));
            std::fill(a2.begin(), a2.end(), acc_t(0));
            for (int64_t i = 0; i < r; ++i) {
              const int64_t off = (n * L + s + i) * C;
              for (int64_t c = 0; c < C; ++c) {
                const acc_t g = static_cast<acc_t>(gp[off + c]);
                a1[c] += g;
                a2[c] += g * (static_cast<acc_t>(xp[off + c]) - acc_t(mu[c]));
              }
            }
            for (int64_t c = 0; c < C; ++c) {
              t1[c] += a1[c];
              t2[c] += a2[c];
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            s1p[n * C + c] = static_cast<stat_t>(t1[c]);
            s2p[n * C + c] = static_cast<stat_t>(t2[c]);
          }
        }
      });
    }
  });
  return {s1, s2};
}

at::Tensor bin_bwd_apply_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& p, const at::Tensor& q,
                             const at::Tensor& r) {
  const Layout layout = layout_of(x);
  check_dy(dy, x, layout);
  check_nc(p, x, "p");
  check_nc(q, x, "q");
  check_nc(r, x, "r");
  auto dx = at::empty_like(x, layout == Layout::NCHW ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bin_bwd_apply_cpu", [&] {
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    affine_nc<scalar_t, stat_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), p.const_data_ptr<stat_t>(),
                                q.const_data_ptr<stat_t>(), r.const_data_ptr<stat_t>(), dx.mutable_data_ptr<scalar_t>(),
                                N, C, L, layout);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdg, CPU, m) {
  m.impl("bin_stats", &bin_stats_cpu);
  m.impl("bin_apply", &bin_apply_cpu);
  m.impl("bin_bwd_reduce", &bin_bwd_reduce_cpu);
  m.impl("bin_bwd_apply", &bin_bwd_apply_cpu);
}

}  // namespace fastdg
