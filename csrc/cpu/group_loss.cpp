// C++ CPU kernels of the per-group loss with exponential weights (METHODS.md section 2).
// Forward: one pass over the logits computes each row's log-sum-exp and (label-smoothed)
// cross-entropy and adds it to its group's partial sum; partial sums are kept per fixed
// block of rows and reduced in block order, so the result does not depend on the thread
// count or scheduling (no float atomics). Backward: one pass writing
// grad[i] = group_scale[g_i] * (softmax(z_i) - smoothed_onehot(y_i)). The fused eager op
// (group_loss_fused, with a C++ autograd backward) saves the softmax in the forward, so its
// backward streams over it with no second exp.
//
// Float rows (fp32, and fp16/bf16 widened row by row) go through 8-wide loops with a
// polynomial exp (group_loss_rows.h), compiled for the baseline ISA and for AVX2+FMA and picked
// at run time (the extension is built without -march flags); std::exp alone is scalar and costs
// ~3 ns an element, which made the fused loss slower than the vectorised PyTorch code it
// replaces. fp64 rows keep std::exp (they are the accuracy oracle path). Lane sums are combined
// in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
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
#include <immintrin.h>
#endif
#define FASTDG_GL_INLINE inline __attribute__((always_inline))
// The 8-float vectors are passed by value only between inlined helpers: no ABI crosses a call.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastdg {
namespace {

// ---- float row loops ---------------------------------------------------------------------
// group_loss_rows.h is compiled twice: for the baseline ISA, and for AVX2+FMA with FMA
// intrinsics in exp (GCC's vector extensions alone made that exp ~4x slower). Picked at run time.

namespace base {
#define FASTDG_GL_FMA 0
#include "group_loss_rows.h"
#undef FASTDG_GL_FMA
}  // namespace base

#ifdef FASTDG_GL_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define FASTDG_GL_FMA 1
#include "group_loss_rows.h"
#undef FASTDG_GL_FMA
}  // namespace avx2
#pragma GCC pop_options
#endif

struct RowLoops {
  void (*stats)(const float*, int64_t, float*, float*, float*, bool) = &base::row_stats;
  void (*grad)(const float*, int64_t, float, float, float, float*, bool) = &base::row_grad;
  void (*probs)(const float*, int64_t, float*, float*, float*, float*, bool) = &base::row_probs;
  void (*probs_grad)(const float*, int64_t, float, float, float*) = &base::row_probs_grad;
  void (*log_rows)(const float*, const float*, int64_t, float*) = &base::log_rows;
  RowLoops() {
#ifdef FASTDG_GL_X86
    // FASTDG_CPU_BASELINE=1 keeps the baseline loops (so tests can exercise them on AVX2 hosts).
    const char* baseline = std::getenv("FASTDG_CPU_BASELINE");
    if (!(baseline && baseline[0] == '1') && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      stats = &avx2::row_stats;
      grad = &avx2::row_grad;
      probs = &avx2::row_probs;
      probs_grad = &avx2::row_probs_grad;
      log_rows = &avx2::log_rows;
    }
#endif
  }
  static const RowLoops& get() {
    static const RowLoops loops;
    return loops;
  }
};

// A row of logits as floats: the row itself for fp32, else widened into `buf` (8 floats longer,
// so that its tail vector may be read whole).
template <typename scalar_t>
const float* float_row(const scalar_t* z, int64_t K, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return z;
  } else {
    buf.resize(static_cast<size_t>(K + 8));
    for (int64_t k = 0; k < K; ++k) buf[k] = static_cast<float>(z[k]);
    return buf.data();
  }
}

// May the row loops read a whole vector at the row's tail? Yes inside a padded widened row, and
// when another row of the same (contiguous) tensor follows.
template <typename scalar_t>
bool overread_ok(bool more_rows) {
  return more_rows || !std::is_same_v<scalar_t, float>;
}

// One row of the forward: m = max_k z, zsum = sum_k z, s = sum_k exp(z - m).
// Float accumulation (fp32, fp16, bf16 rows) takes the vector loops; fp64 stays scalar.
template <typename scalar_t>
void row_stats(const scalar_t* z, int64_t K, std::vector<float>& buf, float* m, float* zsum, float* s,
               bool more_rows) {
  RowLoops::get().stats(float_row(z, K, buf), K, m, zsum, s, overread_ok<scalar_t>(more_rows));
}

inline void row_stats(const double* z, int64_t K, std::vector<float>&, double* m_out, double* zsum_out,
                      double* s_out, bool = false) {
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

// row_stats that also writes the row's softmax to p (fp32 for float rows, fp64 for fp64 rows).
template <typename scalar_t>
void row_probs(const scalar_t* z, int64_t K, std::vector<float>& buf, float* m, float* zsum, float* s, float* p,
               bool more_rows) {
  RowLoops::get().probs(float_row(z, K, buf), K, m, zsum, s, p, overread_ok<scalar_t>(more_rows));
}

inline void row_probs(const double* z, int64_t K, std::vector<float>& buf, double* m, double* zsum, double* s,
                      double* p, bool = false) {
  row_stats(z, K, buf, m, zsum, s);
  for (int64_t k = 0; k < K; ++k) p[k] = std::exp(z[k] - *m) / *s;
}

// lse[i] = m[i] + log(s[i]) for n rows: vector logs for float rows, std::log for fp64.
inline void log_rows(const float* m, const float* s, int64_t n, float* lse) { RowLoops::get().log_rows(m, s, n, lse); }

inline void log_rows(const double* m, const double* s, int64_t n, double* lse) {
  for (int64_t i = 0; i < n; ++i) lse[i] = m[i] + std::log(s[i]);
}

// One row of the backward: o_k = scale * (exp(z_k - lse) - target_k), target_k = off (+ hit at y).
template <typename scalar_t>
void row_grad(const scalar_t* z, int64_t K, int64_t y, float lse, float scale, float off, float hit, scalar_t* o,
              std::vector<float>& buf, std::vector<float>& row, bool more_rows) {
  const float* zf = float_row(z, K, buf);
  float* of;  // fp32 output is written in place, half output through a float row
  if constexpr (std::is_same_v<scalar_t, float>) {
    of = o;
  } else {
    row.resize(static_cast<size_t>(K));
    of = row.data();
  }
  RowLoops::get().grad(zf, K, lse, scale, off, of, overread_ok<scalar_t>(more_rows));
  of[y] -= scale * hit;  // the target column: scale (p_y - off - hit), no second exp
  if constexpr (!std::is_same_v<scalar_t, float>) {
    for (int64_t k = 0; k < K; ++k) o[k] = static_cast<scalar_t>(of[k]);
  }
}

inline void row_grad(const double* z, int64_t K, int64_t y, double lse, double scale, double off, double hit,
                     double* o, std::vector<float>&, std::vector<float>&, bool = false) {
  for (int64_t k = 0; k < K; ++k) {
    const double target_k = k == y ? off + hit : off;
    o[k] = scale * (std::exp(z[k] - lse) - target_k);
  }
}

// Ids read by every kernel on a direct call (the public op validates them once, up front).
inline void check_target(int64_t y, int64_t K) {
  TORCH_CHECK(y >= 0 && y < K, "fastdg: target ", y, " out of range [0, ", K, ")");
}

inline void check_group(int64_t g, int64_t G) {
  TORCH_CHECK(g >= 0 && g < G, "fastdg: group id ", g, " out of range [0, ", G, ")");
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
  // Serial below 64 blocks (16k rows): waking the thread pool costs more than those additions.
  at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* ps = part.data() + b * G;
      acc_t* pc = cnt.data() + b * G;
      const int64_t end = std::min(n, (b + 1) * kRowsPerBlock);
      for (int64_t i = b * kRowsPerBlock; i < end; ++i) {
        const int64_t g = gp[i];
        check_group(g, G);
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

// The forward pass over the logits; when `probs` is defined ((N, K) in the accumulation dtype) it
// also receives each row's softmax.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stats_impl(
    const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& group_in, int64_t num_groups,
    double label_smoothing, const at::Tensor& probs) {
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
    acc_t* pp = probs.defined() ? probs.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
      std::vector<float> buf;
      std::vector<acc_t> mx(static_cast<size_t>(i1 - i0)), se(mx.size());
      for (int64_t i = i0; i < i1; ++i) {  // row statistics; the row sum of z waits in lp
        const scalar_t* z = zp + i * K;
        const int64_t y = yp[i];
        check_target(y, K);
        if (pp != nullptr) {
          row_probs(z, K, buf, &mx[i - i0], &lp[i], &se[i - i0], pp + i * K, i + 1 < n);
        } else {
          row_stats(z, K, buf, &mx[i - i0], &lp[i], &se[i - i0], i + 1 < n);
        }
      }
      log_rows(mx.data(), se.data(), i1 - i0, ep + i0);  // lse = m + log s, 8 rows a step
      for (int64_t i = i0; i < i1; ++i) {
        // CE with smoothing: (1-ls) (lse - z_y) + ls (lse - mean_k z_k). Without smoothing the
        // mean term is left out, not multiplied by 0: a masked (-inf) logit would make it NaN.
        const acc_t zsum = lp[i];
        const acc_t smooth = ls > 0 ? ls * zsum / static_cast<acc_t>(K) : acc_t(0);
        lp[i] = ep[i] - (acc_t(1) - ls) * static_cast<acc_t>(zp[i * K + yp[i]]) - smooth;
      }
    });
    std::tie(sums, counts) = segmented_sums<acc_t>(n, group.const_data_ptr<int64_t>(), num_groups, opt,
                                                   [&](int64_t i) { return lp[i]; });
  });
  return {losses, lse, sums, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_loss_stats_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& group, int64_t num_groups,
    double label_smoothing) {
  return stats_impl(logits, target, group, num_groups, label_smoothing, at::Tensor());
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
      // -inf is a zero weight (it stays 0); NaN or +inf would poison every weight.
      finite = finite && out[g] < std::numeric_limits<acc_t>::infinity();
      hi = std::max(hi, out[g]);
    }
    finite = finite && hi > -std::numeric_limits<acc_t>::infinity();  // not every weight zero
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
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n && lse.dim() == 1 && lse.size(0) == n,
              "fastdg: target and lse must be (N,)");
  const int64_t G = scale.numel();
  check_rows(group, n, G);
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
        const int64_t y = yp[i], g = gp[i];
        check_target(y, K);
        check_group(g, G);
        const acc_t s = sp[g], l = ep[i];
        const scalar_t* z = zp + i * K;
        scalar_t* o = out + i * K;
        row_grad(z, K, y, l, s, off, hit, o, buf, row, i + 1 < n);
      }
    });
  });
  return grad;
}

// ---- the fused eager op: one call forward (CE + sums + q update), the backward in C++ ----------
// Python's autograd.Function and the small ops around three kernels cost more than the kernels
// at DomainBed sizes (1024 x 65: ~40 us of ~90), so eager CPU calls go through this op: one
// dispatch forward, one backward that reads the saved softmax (no second exp).

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_loss_fused_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& group, const at::Tensor& q, double eta,
    double label_smoothing, const std::optional<at::Tensor>& adjustment, bool save_probs) {
  TORCH_CHECK(logits.dim() == 2, "fastdg: logits must be (N, K)");
  TORCH_CHECK(q.dim() == 1 && q.numel() >= 1, "fastdg: q must be (G,) with G >= 1");
  const auto acc = logits.options().dtype(acc_type(logits));
  at::Tensor probs = save_probs ? at::empty(logits.sizes(), acc) : at::empty({0}, acc);
  auto [losses, lse, sums, counts] =
      stats_impl(logits, target, group, q.numel(), label_smoothing, save_probs ? probs : at::Tensor());
  auto [q_new, mean, robust] = group_q_update_cpu(q, sums, counts, eta, adjustment);
  return {robust, q_new, mean, counts, probs};
}

// Rows of out = scale[g_i] * (p_i - off) - scale[g_i] * hit at the target column.
template <typename acc_t, typename out_t>
void probs_grad_rows(const acc_t* pp, const int64_t* yp, const int64_t* gp, const acc_t* scale, int64_t n, int64_t K,
                     int64_t G, acc_t off, acc_t hit, out_t* op) {
  at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> row;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t y = yp[i], g = gp[i];
      check_target(y, K);
      check_group(g, G);
      const acc_t sc = scale[g];
      const acc_t* p = pp + i * K;
      acc_t* o;  // the output row itself when it has the accumulation dtype
      if constexpr (std::is_same_v<out_t, acc_t>) {
        o = op + i * K;
      } else {
        row.resize(static_cast<size_t>(K));
        o = row.data();
      }
      if constexpr (std::is_same_v<acc_t, float>) {
        RowLoops::get().probs_grad(p, K, sc, off, o);
      } else {
        for (int64_t k = 0; k < K; ++k) o[k] = sc * (p[k] - off);
      }
      o[y] -= sc * hit;
      if constexpr (!std::is_same_v<out_t, acc_t>) {
        for (int64_t k = 0; k < K; ++k) op[i * K + k] = static_cast<out_t>(o[k]);
      }
    }
  });
}

// grad_logits[i] = s[g_i] * (probs[i] - smoothed_onehot(target[i])), s = grad * q_new / max(counts, 1).
at::Tensor group_loss_probs_bwd_cpu(const at::Tensor& probs_in, const at::Tensor& target_in,
                                    const at::Tensor& group_in, const at::Tensor& grad, const at::Tensor& q_new,
                                    const at::Tensor& counts, double label_smoothing, at::ScalarType dtype) {
  TORCH_CHECK(probs_in.dim() == 2, "fastdg: probs must be (N, K)");
  const auto probs = probs_in.contiguous();
  const auto target = target_in.contiguous();
  const auto group = group_in.contiguous();
  const int64_t n = probs.size(0), K = probs.size(1), G = q_new.numel();
  check_rows(group, n, G);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == n, "fastdg: target must be (N,)");
  TORCH_CHECK(counts.numel() == G && grad.numel() == 1, "fastdg: counts must be (G,), grad a scalar");
  auto out = at::empty({n, K}, probs.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "group_loss_probs_bwd_cpu", [&] {
    using acc_t = scalar_t;
    // G weights: the per-group scale is computed once, on the host (CPU tensors: no sync).
    const auto qn = q_new.to(probs.scalar_type()).contiguous();
    const auto cn = counts.to(probs.scalar_type()).contiguous();
    const acc_t gr = grad.item<acc_t>();
    std::vector<acc_t> scale(static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g)
      scale[g] = gr * qn.const_data_ptr<acc_t>()[g] / std::max(cn.const_data_ptr<acc_t>()[g], acc_t(1));
    const acc_t* pp = probs.const_data_ptr<acc_t>();
    const int64_t* yp = target.const_data_ptr<int64_t>();
    const int64_t* gp = group.const_data_ptr<int64_t>();
    const acc_t off = static_cast<acc_t>(label_smoothing) / static_cast<acc_t>(K);
    const acc_t hit = acc_t(1) - static_cast<acc_t>(label_smoothing);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "group_loss_probs_bwd_out", [&] {
      probs_grad_rows<acc_t, scalar_t>(pp, yp, gp, scale.data(), n, K, G, off, hit, out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The kernels are reached through the dispatcher, so that FakeTensor tracing (opcheck, AOT)
// sees their registered fake implementations instead of running them.
class GroupLossFused : public torch::autograd::Function<GroupLossFused> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& group, const at::Tensor& q, double eta, double label_smoothing,
                               const std::optional<at::Tensor>& adjustment, bool save_probs) {
    static auto fwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("fastdg::group_loss_fused_fwd", "")
                          .typed<decltype(group_loss_fused_fwd_cpu)>();
    auto [robust, q_new, mean, counts, probs] =
        fwd.call(logits, target, group, q, eta, label_smoothing, adjustment, save_probs);
    ctx->save_for_backward({logits, target, group, q_new, counts, probs});
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->mark_non_differentiable({q_new, mean, counts});
    return {robust, q_new, mean, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &target = saved[1], &group = saved[2], &q_new = saved[3],
                     &counts = saved[4], &probs = saved[5];
    const double ls = ctx->saved_data["label_smoothing"].toDouble();
    at::Tensor dz;
    if (at::GradMode::is_enabled() || probs.numel() != logits.numel()) {
      // create_graph (or no saved softmax): the formula in differentiable ATen ops, recomputed
      // from the logits so that second derivatives include the softmax Jacobian.
      const auto acc = acc_type(logits);
      const auto p = at::softmax(logits.to(acc), 1);
      const int64_t K = logits.size(1);
      const auto onehot = at::one_hot(target, K).to(acc) * (1.0 - ls) + ls / static_cast<double>(K);
      const auto scale = grads[0].to(acc) * q_new.to(acc) / counts.to(acc).clamp_min(1);
      dz = ((p - onehot) * scale.index_select(0, group).unsqueeze(1)).to(logits.scalar_type());
    } else {
      static auto bwd = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("fastdg::group_loss_probs_bwd", "")
                            .typed<decltype(group_loss_probs_bwd_cpu)>();
      dz = bwd.call(probs, target, group, grads[0], q_new, counts, ls, logits.scalar_type());
    }
    return {dz, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_loss_fused_autograd(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& group, const at::Tensor& q, double eta,
    double label_smoothing, const std::optional<at::Tensor>& adjustment) {
  // Decided here: inside forward() grad mode is off. Without a backward there is nothing to save.
  const bool save_probs = at::GradMode::is_enabled() && logits.requires_grad();
  auto out = GroupLossFused::apply(logits, target, group, q, eta, label_smoothing, adjustment, save_probs);
  return {out[0], out[1], out[2], out[3]};
}

// Below autograd (inference mode): the forward alone.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_loss_fused_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& group, const at::Tensor& q, double eta,
    double label_smoothing, const std::optional<at::Tensor>& adjustment) {
  auto [robust, q_new, mean, counts, probs] =
      group_loss_fused_fwd_cpu(logits, target, group, q, eta, label_smoothing, adjustment, false);
  return {robust, q_new, mean, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdg, AutogradCPU, m) { m.impl("group_loss_fused", &group_loss_fused_autograd); }

TORCH_LIBRARY_IMPL(fastdg, CPU, m) {
  m.impl("group_loss_fused", &group_loss_fused_cpu);
  m.impl("group_loss_fused_fwd", &group_loss_fused_fwd_cpu);
  m.impl("group_loss_probs_bwd", &group_loss_probs_bwd_cpu);
  m.impl("group_loss_stats", &group_loss_stats_cpu);
  m.impl("group_loss_sums", &group_loss_sums_cpu);
  m.impl("group_q_update", &group_q_update_cpu);
  m.impl("group_loss_bwd", &group_loss_bwd_cpu);
}

}  // namespace fastdg
