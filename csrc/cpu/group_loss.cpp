// C++ CPU kernels of the per-group loss with exponential weights (METHODS.md section 2).
// Forward: one pass over the logits computes each row's log-sum-exp and (label-smoothed)
// cross-entropy and adds it to its group's partial sum; partial sums are kept per fixed
// block of rows and reduced in block order, so the result does not depend on the thread
// count or scheduling (no float atomics). Backward: one pass writing
// grad[i] = group_scale[g_i] * (softmax(z_i) - smoothed_onehot(y_i)).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace fastdg {
namespace {

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
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* z = zp + i * K;
        const int64_t y = yp[i];
        TORCH_CHECK(y >= 0 && y < K, "fastdg: target ", y, " out of range [0, ", K, ")");
        acc_t m = -std::numeric_limits<acc_t>::infinity(), zsum = 0;
        for (int64_t k = 0; k < K; ++k) {
          const acc_t v = static_cast<acc_t>(z[k]);
          m = std::max(m, v);
          zsum += v;
        }
        acc_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += std::exp(static_cast<acc_t>(z[k]) - m);
        const acc_t l = m + std::log(s);
        ep[i] = l;
        // CE with smoothing: (1-ls) (lse - z_y) + ls (lse - mean_k z_k)
        lp[i] = l - (acc_t(1) - ls) * static_cast<acc_t>(z[y]) - ls * zsum / static_cast<acc_t>(K);
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
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t s = sp[gp[i]], l = ep[i];
        const scalar_t* z = zp + i * K;
        scalar_t* o = out + i * K;
        const int64_t y = yp[i];
        for (int64_t k = 0; k < K; ++k) {
          const acc_t target_k = k == y ? off + hit : off;  // rounded once, in acc_t
          o[k] = static_cast<scalar_t>(s * (std::exp(static_cast<acc_t>(z[k]) - l) - target_k));
        }
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
