// C++ CPU kernels of the per-group loss with exponential weights (METHODS.md section 2).
// Forward: one pass over the logits computes each row's log-sum-exp and (label-smoothed)
// cross-entropy and adds it to its group's partial sum; partial sums are kept per fixed
// block of rows and reduced in block order, so the result does not depend on the thread
// count or scheduling (no float atomics). Backward: one pass writing
// grad[i] = group_scale[g_i] * (softmax(z_i) - smoothed_onehot(y_i)).
//
// Float rows (fp32, and fp16/bf16 widened row by row) go through 8-wide loops with a
// polynomial exp, compiled for the baseline ISA and for AVX2+FMA and picked at run time (the
// extension is built without -march flags); std::exp alone is scalar and costs ~3 ns an element,
// which made the fused loss slower than the vectorised PyTorch code it replaces. fp64 rows keep
// std::exp (they are the accuracy oracle path). Lane sums are combined in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if !(defined(__GNUC__) || defined(__clang__))
#error "csrc/cpu/group_loss.cpp uses GCC/Clang vector extensions: build with GCC or Clang"
#endif
#if defined(__x86_64__)
#define FASTDG_GL_X86 1
#define FASTDG_GL_AVX2 __attribute__((target("avx2,fma")))
#endif
#define FASTDG_GL_INLINE inline __attribute__((always_inline))
// The 8-float vectors are passed by value only between inlined helpers: no ABI crosses a call.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastdg {
namespace {

// ---- float row loops ---------------------------------------------------------------------

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
constexpr int kW = 8;

FASTDG_GL_INLINE v8 splat(float v) { return v8{v, v, v, v, v, v, v, v}; }

FASTDG_GL_INLINE v8 loadu(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

FASTDG_GL_INLINE void storeu(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) for x <= 0 (softmax arguments: z - max, z - lse), 8 lanes. x = n ln2 + r with
// |r| <= ln2 / 2 (Cody-Waite split of ln2), exp(r) by its degree-7 Taylor polynomial (truncation
// < 1e-8 relative), 2^n from the exponent bits. Below ln(FLT_MIN) the result is 0 (a term that
// small cannot change a softmax sum); NaN stays NaN, since every clamp is a select that a NaN
// fails; x > 0 is clamped to 0 (callers never pass it).
FASTDG_GL_INLINE v8 exp_neg(v8 x) {
  const v8 lo = splat(-87.33654475f);
  x = x > splat(0.0f) ? splat(0.0f) : x;
  const v8 under = x < lo ? splat(1.0f) : splat(0.0f);
  x = x < lo ? lo : x;
  const v8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v8 n = (x * splat(1.44269504089f) + magic) - magic;
  v8 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8 p = splat(1.0f / 5040);
  p = p * r + splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const vi8 bits = (__builtin_convertvector(n, vi8) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const v8 out = p * scale;
  return under > splat(0.5f) ? splat(0.0f) : out;
}

FASTDG_GL_INLINE float exp_neg1(float x) { return exp_neg(splat(x))[0]; }

FASTDG_GL_INLINE float hsum(v8 v) {  // fixed pairwise order
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

FASTDG_GL_INLINE float hmax(v8 v) {
  float m = v[0];
  for (int j = 1; j < kW; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

// max_k z, sum_k z, sum_k exp(z - max) of one row.
FASTDG_GL_INLINE void row_stats_impl(const float* z, int64_t K, float* m_out, float* zsum_out, float* s_out) {
  const float ninf = -std::numeric_limits<float>::infinity();
  v8 vm = splat(ninf), vs = splat(0.0f);
  int64_t k = 0;
  for (; k + kW <= K; k += kW) {
    const v8 v = loadu(z + k);
    vm = v > vm ? v : vm;
    vs += v;
  }
  float m = hmax(vm), zsum = hsum(vs);
  for (; k < K; ++k) {
    m = z[k] > m ? z[k] : m;
    zsum += z[k];
  }
  v8 ve = splat(0.0f);
  const v8 vmax = splat(m);
  for (k = 0; k + kW <= K; k += kW) ve += exp_neg(loadu(z + k) - vmax);
  float se = hsum(ve);
  for (; k < K; ++k) se += exp_neg1(z[k] - m);
  *m_out = m;
  *zsum_out = zsum;
  *s_out = se;
}

// out_k = scale * (exp(z_k - lse) - off) for every k (the caller fixes the target column).
FASTDG_GL_INLINE void row_grad_impl(const float* z, int64_t K, float lse, float scale, float off, float* out) {
  const v8 vl = splat(lse), vs = splat(scale), vo = splat(off);
  int64_t k = 0;
  for (; k + kW <= K; k += kW) storeu(out + k, vs * (exp_neg(loadu(z + k) - vl) - vo));
  for (; k < K; ++k) out[k] = scale * (exp_neg1(z[k] - lse) - off);
}

void row_stats_base(const float* z, int64_t K, float* m, float* zs, float* s) { row_stats_impl(z, K, m, zs, s); }
void row_grad_base(const float* z, int64_t K, float l, float sc, float off, float* out) {
  row_grad_impl(z, K, l, sc, off, out);
}
#ifdef FASTDG_GL_X86
FASTDG_GL_AVX2 void row_stats_avx2(const float* z, int64_t K, float* m, float* zs, float* s) {
  row_stats_impl(z, K, m, zs, s);
}
FASTDG_GL_AVX2 void row_grad_avx2(const float* z, int64_t K, float l, float sc, float off, float* out) {
  row_grad_impl(z, K, l, sc, off, out);
}
#endif

struct RowLoops {
  void (*stats)(const float*, int64_t, float*, float*, float*) = &row_stats_base;
  void (*grad)(const float*, int64_t, float, float, float, float*) = &row_grad_base;
  RowLoops() {
#ifdef FASTDG_GL_X86
    // FASTDG_CPU_BASELINE=1 keeps the baseline loops (so tests can exercise them on AVX2 hosts).
    const char* baseline = std::getenv("FASTDG_CPU_BASELINE");
    if (!(baseline && baseline[0] == '1') && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      stats = &row_stats_avx2;
      grad = &row_grad_avx2;
    }
#endif
  }
  static const RowLoops& get() {
    static const RowLoops loops;
    return loops;
  }
};

// A row of logits as floats: the row itself for fp32, else widened into `buf`.
template <typename scalar_t>
const float* float_row(const scalar_t* z, int64_t K, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return z;
  } else {
    buf.resize(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) buf[k] = static_cast<float>(z[k]);
    return buf.data();
  }
}

// One row of the forward: m = max_k z, zsum = sum_k z, s = sum_k exp(z - m).
// Float accumulation (fp32, fp16, bf16 rows) takes the vector loops; fp64 stays scalar.
template <typename scalar_t>
void row_stats(const scalar_t* z, int64_t K, std::vector<float>& buf, float* m, float* zsum, float* s) {
  RowLoops::get().stats(float_row(z, K, buf), K, m, zsum, s);
}

inline void row_stats(const double* z, int64_t K, std::vector<float>&, double* m_out, double* zsum_out,
                      double* s_out) {
  double m = -std::numeric_limits<double>::infinity(), zsum = 0, s = 0;
  for (int64_t k = 0; k < K; ++k) {
    m = std::max(m, z[k]);
    zsum += z[k];
  }
  for (int64_t k = 0; k < K; ++k) s += std::exp(z[k] - m);
  *m_out = m;
  *zsum_out = zsum;
  *s_out = s;
}

// One row of the backward: o_k = scale * (exp(z_k - lse) - target_k), target_k = off (+ hit at y).
template <typename scalar_t>
void row_grad(const scalar_t* z, int64_t K, int64_t y, float lse, float scale, float off, float hit, scalar_t* o,
              std::vector<float>& buf, std::vector<float>& row) {
  const float* zf = float_row(z, K, buf);
  float* of;  // fp32 output is written in place, half output through a float row
  if constexpr (std::is_same_v<scalar_t, float>) {
    of = o;
  } else {
    row.resize(static_cast<size_t>(K));
    of = row.data();
  }
  RowLoops::get().grad(zf, K, lse, scale, off, of);
  of[y] -= scale * hit;  // the target column: scale (p_y - off - hit), no second exp
  if constexpr (!std::is_same_v<scalar_t, float>) {
    for (int64_t k = 0; k < K; ++k) o[k] = static_cast<scalar_t>(of[k]);
  }
}

inline void row_grad(const double* z, int64_t K, int64_t y, double lse, double scale, double off, double hit,
                     double* o, std::vector<float>&, std::vector<float>&) {
  for (int64_t k = 0; k < K; ++k) {
    const double target_k = k == y ? off + hit : off;
    o[k] = scale * (std::exp(z[k] - lse) - target_k);
  }
}

constexpr int64_t kRowsPerBlock = 256;  // fixed: the reduction order depends on it, not on threads

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_rows(const at::Tensor& group, int64_t n, int64_t num_groups) {
  TORCH_CHECK(group.dim() == 1 && group.size(0) == n && group.scalar_type() == at::kLong,
              "fastdg: group must be an int64 (N,) tensor");
  TORCH_CHECK(num_groups >= 1, "fastdg: num_groups must be >= 1");
}

// Block partial sums (blocks x G) of `value(i)` and counts, reduced in block order.
template <typename acc_t, typename F>
std::tuple<at::Tensor, at::Tensor> segmented_sums(int64_t n, const int64_t* gp, int64_t G, at::TensorOptions opt,
                                                  F value) {
  const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<acc_t> part(static_cast<size_t>(std::max<int64_t>(blocks, 1) * G), acc_t(0));
  std::vector<acc_t> cnt(part.size(), acc_t(0));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* ps = part.data() + b * G;
      acc_t* pc = cnt.data() + b * G;
      const int64_t end = std::min(n, (b + 1) * kRowsPerBlock);
      for (int64_t i = b * kRowsPerBlock; i < end; ++i) {
        const int64_t g = gp[i];
        TORCH_CHECK(g >= 0 && g < G, "fastdg: group id ", g, " out of range [0, ", G, ")");
        ps[g] += value(i);
        pc[g] += acc_t(1);
      }
    }
  });
  auto sums = at::zeros({G}, opt);
  auto counts = at::zeros({G}, opt);
  acc_t* s = sums.mutable_data_ptr<acc_t>();
  acc_t* c = counts.mutable_data_ptr<acc_t>();
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t g = 0; g < G; ++g) {
      s[g] += part[b * G + g];
      c[g] += cnt[b * G + g];
    }
  return {sums, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_loss_stats_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& group_in, int64_t num_groups,
    double label_smoothing) {
  TORCH_CHECK(logits_in.dim() == 2, "fastdg: logits must be (N, K)");
  const auto logits = logits_in.contiguous();
  const auto target = target_in.contiguous();
  const auto group = group_in.contiguous();
  const int64_t n = logits.size(0), K = logits.size(1);
  check_rows(group, n, num_groups);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n && target.scalar_type() == at::kLong,
              "fastdg: target must be an int64 (N,) tensor");
  auto opt = logits.options().dtype(acc_type(logits));
  auto losses = at::empty({n}, opt);
  auto lse = at::empty({n}, opt);
  at::Tensor sums, counts;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "group_loss_stats_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* zp = logits.const_data_ptr<scalar_t>();
    const int64_t* yp = target.const_data_ptr<int64_t>();
    acc_t* lp = losses.mutable_data_ptr<acc_t>();
    acc_t* ep = lse.mutable_data_ptr<acc_t>();
    const acc_t ls = static_cast<acc_t>(label_smoothing);
    at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
      std::vector<float> buf;
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* z = zp + i * K;
        const int64_t y = yp[i];
        TORCH_CHECK(y >= 0 && y < K, "fastdg: target ", y, " out of range [0, ", K, ")");
        acc_t m, zsum, s;
        row_stats(z, K, buf, &m, &zsum, &s);
        const acc_t l = m + std::log(s);
        ep[i] = l;
        // CE with smoothing: (1-ls) (lse - z_y) + ls (lse - mean_k z_k). Without smoothing the
        // mean term is left out, not multiplied by 0: a masked (-inf) logit would make it NaN.
        const acc_t smooth = ls > 0 ? ls * zsum / static_cast<acc_t>(K) : acc_t(0);
        lp[i] = l - (acc_t(1) - ls) * static_cast<acc_t>(z[y]) - smooth;
      }
    });
    std::tie(sums, counts) = segmented_sums<acc_t>(n, group.const_data_ptr<int64_t>(), num_groups, opt,
                                                   [&](int64_t i) { return lp[i]; });
  });
  return {losses, lse, sums, counts};
}

std::tuple<at::Tensor, at::Tensor> group_loss_sums_cpu(const at::Tensor& losses_in, const at::Tensor& group_in,
                                                       int64_t num_groups) {
  TORCH_CHECK(losses_in.dim() == 1, "fastdg: losses must be (N,)");
  const auto losses = losses_in.contiguous();
  const auto group = group_in.contiguous();
  const int64_t n = losses.size(0);
  check_rows(group, n, num_groups);
  auto opt = losses.options().dtype(acc_type(losses));
  at::Tensor sums, counts;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, losses.scalar_type(), "group_loss_sums_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* lp = losses.const_data_ptr<scalar_t>();
    std::tie(sums, counts) = segmented_sums<acc_t>(n, group.const_data_ptr<int64_t>(), num_groups, opt,
                                                   [&](int64_t i) { return static_cast<acc_t>(lp[i]); });
  });
  return {sums, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_q_update_cpu(const at::Tensor& q_in, const at::Tensor& sums,
                                                                  const at::Tensor& counts, double eta,
                                                                  const std::optional<at::Tensor>& adjustment) {
  const int64_t G = sums.size(0);
  TORCH_CHECK(q_in.dim() == 1 && q_in.size(0) == G && counts.size(0) == G, "fastdg: q, sums, counts must be (G,)");
  auto q_new = at::empty({G}, sums.options());
  auto mean = at::empty({G}, sums.options());
  auto robust = at::empty({}, sums.options());
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "group_q_update_cpu", [&] {
    using acc_t = scalar_t;
    const auto q = q_in.to(sums.scalar_type()).contiguous();
    const at::Tensor adj = adjustment.has_value() ? adjustment->to(sums.scalar_type()).contiguous() : at::Tensor();
    const acc_t* qp = q.const_data_ptr<acc_t>();
    const acc_t* sp = sums.const_data_ptr<acc_t>();
    const acc_t* cp = counts.const_data_ptr<acc_t>();
    const acc_t* ap = adj.defined() ? adj.const_data_ptr<acc_t>() : nullptr;
    acc_t* out = q_new.mutable_data_ptr<acc_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    bool finite = true;
    acc_t hi = -std::numeric_limits<acc_t>::infinity();
    for (int64_t g = 0; g < G; ++g) {
      mp[g] = sp[g] / std::max(cp[g], acc_t(1));
      finite = finite && std::isfinite(mp[g]);
      // Empty groups keep their weight: their exponent is 0 (adjustment included).
      const acc_t step = cp[g] > 0 ? mp[g] + (ap ? ap[g] : acc_t(0)) : acc_t(0);
      out[g] = std::log(qp[g]) + static_cast<acc_t>(eta) * step;  // log space: no overflow
      hi = std::max(hi, out[g]);
    }
    acc_t total = 0;
    for (int64_t g = 0; g < G; ++g) {
      out[g] = std::exp(out[g] - hi);
      total += out[g];
    }
    acc_t r = 0;
    for (int64_t g = 0; g < G; ++g) {
      out[g] = finite ? out[g] / total : qp[g];  // a non-finite loss never poisons q
      r += out[g] * mp[g];
    }
    *robust.mutable_data_ptr<acc_t>() = r;
  });
  return {q_new, mean, robust};
}

at::Tensor group_loss_bwd_cpu(const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& group_in,
                              const at::Tensor& lse_in, const at::Tensor& scale_in, double label_smoothing) {
  const auto logits = logits_in.contiguous();
  const auto target = target_in.contiguous();
  const auto group = group_in.contiguous();
  const auto lse = lse_in.contiguous();
  const int64_t n = logits.size(0), K = logits.size(1);
  const auto scale = scale_in.to(lse.scalar_type()).contiguous();
  auto grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "group_loss_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* zp = logits.const_data_ptr<scalar_t>();
    const int64_t* yp = target.const_data_ptr<int64_t>();
    const int64_t* gp = group.const_data_ptr<int64_t>();
    const acc_t* ep = lse.const_data_ptr<acc_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    const acc_t off = static_cast<acc_t>(label_smoothing) / static_cast<acc_t>(K);
    const acc_t hit = acc_t(1) - static_cast<acc_t>(label_smoothing);
    at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
      std::vector<float> buf, row;
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t s = sp[gp[i]], l = ep[i];
        const scalar_t* z = zp + i * K;
        scalar_t* o = out + i * K;
        const int64_t y = yp[i];
        row_grad(z, K, y, l, s, off, hit, o, buf, row);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdg, CPU, m) {
  m.impl("group_loss_stats", &group_loss_stats_cpu);
  m.impl("group_loss_sums", &group_loss_sums_cpu);
  m.impl("group_q_update", &group_q_update_cpu);
  m.impl("group_loss_bwd", &group_loss_bwd_cpu);
}

}  // namespace fastdg
