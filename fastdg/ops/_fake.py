"""Fake (meta) kernels of the compiled ops: shapes, dtypes and layouts without computing,
so torch.compile and FakeTensor tracing see through fastdg._C. Registered once, when the
extension loads (fastdg._ext)."""
from __future__ import annotations

import torch


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like(x):
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    return torch.empty_like(x, memory_format=fmt)


def register():
    lib = torch.library

    @lib.register_fake("fastdg::bin_stats")
    def _(x):
        nc = (x.shape[0], x.shape[1])
        return x.new_empty(nc, dtype=_stat_dtype(x)), x.new_empty(nc, dtype=_stat_dtype(x))

    @lib.register_fake("fastdg::bin_apply")
    def _(x, scale, shift):
        return _like(x)

    @lib.register_fake("fastdg::bin_bwd_reduce")
    def _(dy, x, mean):
        return torch.empty_like(mean), torch.empty_like(mean)

    @lib.register_fake("fastdg::bin_bwd_apply")
    def _(dy, x, p, q, r):
        return _like(x)

    @lib.register_fake("fastdg::group_loss_stats")
    def _(logits, target, group, num_groups, label_smoothing):
        acc = _stat_dtype(logits)
        n = logits.shape[0]
        return (logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc),
                logits.new_empty(num_groups, dtype=acc), logits.new_empty(num_groups, dtype=acc))

    @lib.register_fake("fastdg::group_loss_sums")
    def _(losses, group, num_groups):
        acc = _stat_dtype(losses)
        return losses.new_empty(num_groups, dtype=acc), losses.new_empty(num_groups, dtype=acc)

    @lib.register_fake("fastdg::group_q_update")
    def _(q, sums, counts, eta, adjustment):
        return torch.empty_like(sums), torch.empty_like(sums), sums.new_empty(())

    @lib.register_fake("fastdg::group_loss_bwd")
    def _(logits, target, group, lse, group_scale, label_smoothing):
        return logits.new_empty(logits.shape)  # the kernels write a contiguous gradient

    @lib.register_fake("fastdg::group_loss_fused_fwd")
    def _(logits, target, group, q, eta, label_smoothing, adjustment, save_probs):
        acc = _stat_dtype(logits)
        G = q.shape[0]
        probs = logits.new_empty(logits.shape if save_probs else (0,), dtype=acc)
        return (logits.new_empty((), dtype=acc), logits.new_empty(G, dtype=acc), logits.new_empty(G, dtype=acc),
                logits.new_empty(G, dtype=acc), probs)

    @lib.register_fake("fastdg::group_loss_probs_bwd")
    def _(probs, target, group, grad, q_new, counts, label_smoothing, dtype):
        return probs.new_empty(probs.shape, dtype=dtype)
