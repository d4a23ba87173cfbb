"""Pure-PyTorch per-group loss aggregation with exponential weights (METHODS.md section 2).

The oracle and fallback of fastdg.ops.group_loss. Differentiable end to end through autograd.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class GroupLossOutput(NamedTuple):
    loss: torch.Tensor         # () robust loss sum_g q_new[g] * L_g (differentiable)
    q: torch.Tensor            # (G,) updated, normalised weights (no grad)
    group_loss: torch.Tensor   # (G,) per-group mean loss L_g (no grad; 0 for empty groups)
    group_count: torch.Tensor  # (G,) samples per group in this batch (float)


def per_sample_loss(logits, target, label_smoothing=0.0):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(logits.to(acc), target, reduction="none", label_smoothing=label_smoothing)


def q_update_ref(q, sums, counts, eta, adjustment=None):
    """q_new = normalise(q * exp(eta * (L_g + adj_g))) for non-empty groups, in log space so
    the weights can neither overflow nor underflow to all-zero. Returns (q_new, L).

    A non-finite group mean or log-weight (NaN loss, infinite adjustment) leaves q as it was,
    decided on the device (no host read): one bad batch must not poison every later step."""
    mean = sums / counts.clamp_min(1)
    step = mean if adjustment is None else mean + adjustment.to(mean.dtype)
    step = torch.where(counts > 0, step, torch.zeros_like(step))  # empty groups keep their weight
    logq = torch.log(q.to(mean.dtype)) + eta * step
    # -inf is a zero weight and stays one; NaN, +inf or all weights zero would poison the softmax.
    ok = torch.isfinite(mean).all() & (logq < math.inf).all() & (logq.max() > -math.inf)
    return torch.where(ok, torch.softmax(logq, 0), q.to(mean.dtype)), mean


def group_loss_ref(input, target, group, q, *, eta=0.01, label_smoothing=0.0, adjustment=None):
    """Robust GroupDRO loss from logits (N, K) and target (N,), or from per-sample losses (N,)
    with target=None. group (N,) int64 in [0, G); q (G,) current weights (not modified).

        L_g = sum_{i in g} l_i / max(n_g, 1);  q' = normalise(q * exp(eta * L_g));
        loss = sum_g q'_g L_g  =>  d loss / d l_i = q'_{g_i} / n_{g_i}.
    """
    losses = input if target is None else per_sample_loss(input, target, label_smoothing)
    acc = torch.float64 if losses.dtype == torch.float64 else torch.float32
    losses = losses.to(acc)
    G = q.numel()
    sums = torch.zeros(G, dtype=acc, device=losses.device).index_add(0, group, losses)
    counts = torch.bincount(group, minlength=G).to(acc)
    q_new, mean = q_update_ref(q.detach(), sums.detach(), counts, eta, adjustment)
    loss = (q_new * sums / counts.clamp_min(1)).sum()
    return GroupLossOutput(loss, q_new.to(q.dtype), mean.detach(), counts)
