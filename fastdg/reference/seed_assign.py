"""Seed categories by loss ranking (METHODS.md section 3), pure PyTorch: oracle and fallback."""
from __future__ import annotations

import torch


def seed_assign_by_loss_ref(losses, domain, k, classes=None, num_classes=None):
    """Split every group (domain, or domain x class) into k equal-size quantile bins of loss.

    losses (N,), domain (N,) int64, classes (N,) int64 or None. A sample of rank r (ascending
    loss, ties broken by index) in a group of n samples falls in bin floor(r * k / n): bin
    sizes differ by at most one. Returns global ids group * k + bin, int64 (N,), where
    group = domain, or domain * num_classes + class.
    """
    group = domain if classes is None else domain * num_classes + classes
    n = losses.numel()
    # Order by (group, loss, index): a stable sort by loss, then a stable sort by group.
    by_loss = torch.sort(losses.detach(), stable=True).indices
    order = by_loss[torch.sort(group[by_loss], stable=True).indices]
    sorted_group = group[order]
    num_groups = int(group.max()) + 1 if n else 0
    counts = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=losses.device) - starts[sorted_group]
    bins = torch.div(rank * k, counts[sorted_group], rounding_mode="floor")
    out = torch.empty(n, dtype=torch.int64, device=losses.device)
    out[order] = sorted_group * k + bins
    return out
