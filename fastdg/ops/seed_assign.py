"""`fastdg.ops.seed_assign_by_loss`: seed categories by per-sample loss ranking
(METHODS.md section 3; paper 001's default and best re-distribution rule).

One sort over all samples handles every group at once, on the samples' device; there is no
faster kernel to dispatch to (a segmented sort is what torch.sort already is), so this op's
only backend is the reference.
"""
from __future__ import annotations

import torch

from .. import _dispatch
from ..reference.seed_assign import seed_assign_by_loss_ref
from . import _validate as V

OP = "seed_assign_by_loss"
CANDIDATES = [("reference", lambda *_: None)]


def seed_assign_by_loss(losses, domain, k, *, classes=None, num_classes=None, backend=None):
    """Category ids (N,) int64: each domain (or domain x class) cut into k quantile bins of loss.

    losses: (N,) float, finite. domain: (N,) int64 >= 0. classes: optional (N,) int64 in
    [0, num_classes) (num_classes defaults to classes.max() + 1). Every group needs >= k samples.
    Global id = group * k + bin (bin 0 = lowest losses), group = domain or domain * num_classes + class.
    """
    V.tensor("losses", losses, dim=1, dtypes=V.FLOATS)
    dev = losses.device
    V.tensor("domain", domain, dim=1, dtypes=(torch.int64,), device=dev)
    V.shape("domain", domain, losses.shape)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if losses.numel() == 0:
        raise ValueError("losses must be non-empty")
    V.finite("losses", losses)
    if int(domain.min()) < 0:
        raise ValueError("domain ids must be >= 0")
    if classes is not None:
        V.tensor("classes", classes, dim=1, dtypes=(torch.int64,), device=dev)
        V.shape("classes", classes, losses.shape)
        if num_classes is None:
            num_classes = int(classes.max()) + 1
        V.ids_in_range("classes", classes, num_classes)
        group = domain * num_classes + classes
    else:
        group = domain
    counts = torch.bincount(group)
    present = counts[counts > 0]
    if int(present.min()) < k:
        small = int(torch.nonzero((counts > 0) & (counts < k))[0])
        where = f"domain {small}" if classes is None else f"domain {small // num_classes}, class {small % num_classes}"
        raise ValueError(f"k={k} is larger than {where} ({int(counts[small])} samples); "
                         "every domain (x class) group needs at least k samples")
    _dispatch.choose(OP, CANDIDATES, backend, losses)
    return seed_assign_by_loss_ref(losses, domain, k, classes, num_classes)
