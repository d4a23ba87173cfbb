"""Metric-learning losses on feature vectors (MetaBIN, METHODS.md section 5), vectorised.

All functions take features f (N, D) float, integer labels y (N,) and, where needed, domain
ids (N,) in [0, num_domains), and return a 0-dim tensor that keeps the autograd graph (so they
work under create_graph=True for second-order meta-gradients). None of them reads a device
value (no host synchronisation) when num_domains is given.

Distances (the official code's `euclidean_dist`):
    d(a, b) = sqrt(clamp(|a|^2 + |b|^2 - 2 a.b, min=1e-12))
so d(a, a) = 1e-6, not 0, and the gradient of d is 0 where the clamp is active.

Hard-mined triplet on masks P (positives) and Q (negatives), per anchor i:
    d_ap(i) = max_{j in P_i} d(i, j),   d_an(i) = min_{j in Q_i} d(i, j)
    l_i = max(0, d_ap - d_an + m)   (m > 0)    or    softplus(d_ap - d_an)   (m = 0, the
    official "soft margin"/logistic form: log(1 + exp(d_ap - d_an)))
    loss = mean of l_i over the anchors that have at least one positive and one negative
    (0 when none has). The official code assumes P x K sampling, where every anchor has both,
    and fails otherwise; skipping such anchors is our choice for DomainBed's random batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DIST_EPS = 1e-12


def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) Euclidean distances sqrt(clamp(|a|^2 + |b|^2 - 2ab, 1e-12))."""
    sq = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * (a @ b.t())
    return sq.clamp(min=DIST_EPS).sqrt()


def hard_mined_triplet(dist: torch.Tensor, is_pos: torch.Tensor, is_neg: torch.Tensor,
                       margin: float) -> torch.Tensor:
    """Hard-mined triplet loss from an (N, N) distance matrix and boolean (N, N) masks of the
    positives and negatives of each anchor (row); see the module docstring."""
    valid = is_pos.any(1) & is_neg.any(1)
    d_ap = dist.masked_fill(~is_pos, float("-inf")).amax(1)
    d_an = dist.masked_fill(~is_neg, float("inf")).amin(1)
    zero = dist.new_zeros(())
    d_ap = torch.where(valid, d_ap, zero)  # where() sends no gradient to the +-inf branch
    d_an = torch.where(valid, d_an, zero)
    per = F.relu(d_ap - d_an + margin) if margin > 0 else F.softplus(d_ap - d_an)
    w = valid.to(dist.dtype)
    return (per * w).sum() / w.sum().clamp(min=1.0)


def triplet_loss(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3,
                 normalize: bool = False) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017; MetaBIN's base and meta-test loss).
    Positives of anchor i: every j with y_j == y_i, i itself included (as the official code:
    an anchor whose class has no other sample still pushes its nearest negative beyond the
    margin, with d_ap = 1e-6). Negatives: every j with y_j != y_i.
    normalize: L2-normalise the features first (official NORM_FEAT, off by default)."""
    f = F.normalize(features, dim=1) if normalize else features
    same = labels.view(-1, 1) == labels.view(1, -1)
    return hard_mined_triplet(pairwise_distance(f, f), same, ~same, margin)


def inter_domain_shuffle_loss(features: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor,
                              margin: float = 0.0, normalize: bool = False) -> torch.Tensor:
    """MetaBIN's inter-domain shuffle loss ("inter-domain features should be closer than
    intra-domain features"), as the official TripletLoss_add (NEW_POS [0,0,1], NEW_NEG
    [0,1,0], margin 0 -> soft margin):
        positives of anchor i: i itself and every sample of ANOTHER domain (any class);
        negatives of anchor i: every sample of the SAME domain with a different class.
    Minimising softplus(max_pos d - min_neg d) pulls the farthest other-domain sample closer
    than the nearest same-domain sample of another class: it shuffles the domains in feature
    space, i.e. it rewards removing domain style (over-style-normalisation), which is the
    unsuccessful-generalisation scenario the meta-train stage simulates."""
    f = F.normalize(features, dim=1) if normalize else features
    n = f.shape[0]
    same_dom = domains.view(-1, 1) == domains.view(1, -1)
    same_cls = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    return hard_mined_triplet(pairwise_distance(f, f), eye | ~same_dom, same_dom & ~same_cls, margin)


def intra_domain_scatter(features: torch.Tensor, domains: torch.Tensor, num_domains: int | None = None) -> torch.Tensor:
    """MetaBIN's intra-domain scatter loss (official SCT, type cosine_sim):
        fhat_i = f_i / |f_i|,  c_d = mean_{i in d} fhat_i,
        loss = mean over the domains present of  mean_{i in d} cos(c_d, fhat_i).
    Minimising it spreads each domain's features away from their domain centroid.
    num_domains: number of possible domain ids (None: domains.max() + 1, which reads a
    device value)."""
    f = F.normalize(features, dim=1)
    if num_domains is None:
        num_domains = int(domains.max()) + 1
    onehot = F.one_hot(domains, num_domains).to(f.dtype)            # (N, K)
    counts = onehot.sum(0)                                           # (K,)
    centroids = (onehot.t() @ f) / counts.clamp(min=1.0).unsqueeze(1)
    cos = (f * F.normalize(centroids, dim=1)[domains]).sum(1)        # (N,)
    per_domain = (onehot.t() @ cos) / counts.clamp(min=1.0)
    present = (counts > 0).to(f.dtype)
    return (per_domain * present).sum() / present.sum().clamp(min=1.0)
