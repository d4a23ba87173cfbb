"""Clustering for seed categories (METHODS.md sections 3 and 4).

- `KMeans`: a scikit-learn shaped front end of `fastdg.ops.kmeans` (fit / predict / fit_predict,
  labels_, cluster_centers_, inertia_, n_iter_), batched over groups when fit(X, group) is given.
- `seed_categories`: the seed-category re-distribution of paper 001: loss ranking (the paper's
  default and best), k-means on embeddings, or the definition-exact greedy dominating set.

Global category ids: group * k + local id, with group = domain or domain * num_classes + class
(num_classes = max(class) + 1), for "loss_rank" and "kmeans" alike; "dominating_set" numbers
its seeds consecutively, group by group.
"""
from __future__ import annotations

import numbers

import torch

from . import ops
from .ops import _validate as V
from .ops.kmeans import _kmeans, _predict

# KMeans speaks scikit-learn's argument names in its errors.
_SK_NAMES = ("X", "n_clusters")

METHODS = ("loss_rank", "kmeans", "dominating_set")


def _as_tensor(name, a, dtype=None):
    if a is None:
        return None
    if not isinstance(a, torch.Tensor):
        try:
            a = torch.as_tensor(a)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a tensor or array-like, got {type(a).__name__}") from exc
    if dtype is not None and a.dtype != dtype and not a.is_floating_point():
        a = a.to(dtype)
    return a


class KMeans:
    """k-means with scikit-learn's shape, on many groups at once.

    n_clusters: int, or (G,) int64 tensor of clusters per group. Other arguments as in
    fastdg.ops.kmeans (max_iter defaults to 300 like scikit-learn). After fit(X, group):

    labels_          (N,) int64, cluster of each point within its group
    cluster_centers_ (k, D) without groups; (G, Kmax, D) with groups (NaN rows past k_g)
    inertia_         float without groups; (G,) tensor with groups
    n_iter_          int without groups; (G,) int64 tensor with groups
    """

    def __init__(self, n_clusters, max_iter=300, tol=1e-4, init="k-means++", seed=0, cosine=False, backend=None):
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.tol = tol
        self.init = init
        self.seed = seed
        self.cosine = cosine
        self.backend = backend

    def fit(self, X, group=None):
        """X: (N, D) points (tensor or array-like); group: optional (N,) int64 ids in [0, G)."""
        X = _as_tensor("X", X)
        group = _as_tensor("group", group, torch.int64)
        if group is not None and isinstance(group, torch.Tensor) and isinstance(X, torch.Tensor):
            group = group.to(X.device)
        res = _kmeans(X, self.n_clusters, group, max_iter=self.max_iter, tol=self.tol, init=self.init,
                      seed=self.seed, cosine=self.cosine, backend=self.backend, names=_SK_NAMES)
        self._grouped = group is not None
        self._k = self.n_clusters if not isinstance(self.n_clusters, torch.Tensor) else \
            self.n_clusters.to(X.device, torch.int64)
        self.labels_ = res.labels
        if self._grouped:
            self.cluster_centers_, self.inertia_, self.n_iter_ = res.centroids, res.inertia, res.n_iter
        else:
            self.cluster_centers_ = res.centroids[0]
            self.inertia_, self.n_iter_ = float(res.inertia[0]), int(res.n_iter[0])
        return self

    def predict(self, X, group=None):
        """Nearest fitted centroid (N,) int64 for new points; `group` is required when fit had one."""
        if not hasattr(self, "labels_"):
            raise RuntimeError("KMeans.predict called before fit")
        X = _as_tensor("X", X)
        group = _as_tensor("group", group, torch.int64)
        if self._grouped and group is None:
            raise ValueError("group is required: this KMeans was fitted with groups")
        if not self._grouped and group is not None:
            raise ValueError("group must be None: this KMeans was fitted without groups")
        centers = self.cluster_centers_ if self._grouped else self.cluster_centers_[None]
        if isinstance(X, torch.Tensor):
            centers = centers.to(X.device)
            group = group.to(X.device) if group is not None else None
        return _predict(X, centers, self._k, group, cosine=self.cosine, backend=self.backend, names=_SK_NAMES)

    def fit_predict(self, X, group=None):
        return self.fit(X, group).labels_


# ---- seed categories -----------------------------------------------------------------------

def seed_categories(method, *, losses=None, embeddings=None, domain, classes=None, k=4, xi=None, seed=0):
    """Seed category of every sample, (N,) int64 global ids (METHODS.md section 3).

    method: "loss_rank" (needs losses (N,)): each group's samples sorted by loss and cut into k
        equal quantile bins (fastdg.ops.seed_assign_by_loss). "kmeans" (needs embeddings (N, D)):
        k-means with k clusters in each group, all groups in one batched call. "dominating_set"
        (needs embeddings and xi > 0): samples a, b are adjacent when ||a - b|| < xi; the seeds
        of a group are a greedy dominating set of that graph (repeatedly take the sample that
        covers the most uncovered samples, lowest index on ties); every other sample joins a
        random adjacent seed (seeded). k is not used: xi sets the number of seeds.
    domain: (N,) int64 >= 0. classes: optional (N,) int64 >= 0; groups are then domain x class.
    Ids: group * k + local id ("loss_rank", "kmeans"; group = domain or domain * num_classes +
    class, num_classes = max(class) + 1), or consecutive seed numbers ("dominating_set").
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    V.tensor("domain", domain, dim=1, dtypes=(torch.int64,))
    n, dev = domain.shape[0], domain.device
    if n == 0:
        raise ValueError("domain must be non-empty")
    if int(domain.min()) < 0:
        raise ValueError("domain ids must be >= 0")
    if classes is not None:
        V.tensor("classes", classes, dim=1, dtypes=(torch.int64,), device=dev)
        V.shape("classes", classes, (n,))
        if int(classes.min()) < 0:
            raise ValueError("classes ids must be >= 0")
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")

    if method == "loss_rank":
        if losses is None:
            raise ValueError("method='loss_rank' needs losses (N,)")
        V.tensor("losses", losses, dim=1, dtypes=V.FLOATS, device=dev)
        V.shape("losses", losses, (n,))
        return ops.seed_assign_by_loss(losses, domain, int(k), classes=classes)

    if embeddings is None:
        raise ValueError(f"method={method!r} needs embeddings (N, D)")
    V.tensor("embeddings", embeddings, dim=2, dtypes=V.FLOATS, device=dev)
    if embeddings.shape[0] != n:
        raise ValueError(f"embeddings must have one row per sample ({n}), got shape {tuple(embeddings.shape)}")
    num_classes = None if classes is None else int(classes.max()) + 1
    group = domain if classes is None else domain * num_classes + classes
    present, local = torch.unique(group, return_inverse=True)

    if method == "kmeans":
        # Checked here so that the error names the domain (and class), not a compacted index.
        sizes = torch.bincount(local, minlength=present.numel())
        small = torch.nonzero(sizes < k)
        if small.numel():
            g = int(small[0])
            raise ValueError(f"k={k} is larger than {group_name(int(present[g]), num_classes)} "
                             f"({int(sizes[g])} samples); every domain (x class) group needs at least k samples")
        # Absent (domain, class) pairs are dropped from the batch, then ids mapped back.
        res = ops.kmeans(embeddings, int(k), local, seed=int(seed))
        return group * int(k) + res.labels

    if xi is None or not isinstance(xi, numbers.Real) or not (0 < xi < float("inf")):
        raise ValueError(f"method='dominating_set' needs a finite distance threshold xi > 0, got {xi!r}")
    V.finite("embeddings", embeddings)
    gen = torch.Generator().manual_seed(int(seed))
    out = torch.empty(n, dtype=torch.int64, device=dev)
    next_id = 0
    for g in range(present.numel()):
        rows = torch.nonzero(local == g)[:, 0]
        seeds, cat = dominating_set(embeddings[rows], float(xi), gen)
        out[rows] = cat + next_id
        next_id += seeds.numel()
    return out


def group_name(g, num_classes=None):
    """'domain d' or 'domain d, class c' for global group id g = d * num_classes + c."""
    if num_classes is None:
        return f"domain {g}"
    return f"domain {g // num_classes}, class {g % num_classes}"


def adjacency(emb, xi, tile=1024):
    """(n, n) bool: ||emb_a - emb_b|| < xi, computed tile by tile (no n x n float matrix),
    symmetric, with a True diagonal (a sample dominates itself)."""
    acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
    e = emb.to(acc)
    sq = (e * e).sum(1)
    n = e.shape[0]
    adj = torch.empty(n, n, dtype=torch.bool, device=e.device)
    for a in range(0, n, tile):
        b = min(n, a + tile)
        d2 = (sq[a:b, None] - 2.0 * (e[a:b] @ e.T) + sq[None, :]).clamp_min_(0)
        adj[a:b] = d2 < xi * xi
    adj &= adj.T.clone()  # rounding must not make a pair adjacent in one direction only
    adj.fill_diagonal_(True)
    return adj


def dominating_set(emb, xi, gen, tile=1024):
    """Greedy dominating set of the xi-graph of emb (n, D), and each sample's category.

    Returns (seeds (s,) int64 row indices in the order picked, category (n,) int64 in [0, s)):
    seed i has category i; every other sample the category of a uniformly random adjacent seed
    (drawn with `gen`, a CPU torch.Generator). Greedy: the gain of v is the number of still
    uncovered samples in its closed neighbourhood; take the first maximum, mark its
    neighbourhood covered, subtract the newly covered from the gains (O(n^2) in all).
    There is no k: the number of seeds (categories) s follows from xi and the data (smaller
    xi, more seeds; s = n when no two samples are closer than xi).
    """
    adj = adjacency(emb, xi, tile)
    n, dev = adj.shape[0], adj.device
    gain = adj.sum(1)
    uncovered = torch.ones(n, dtype=torch.bool, device=dev)
    seeds = []
    while True:
        v = int(torch.argmax(gain))
        if int(gain[v]) <= 0:
            break
        seeds.append(v)
        newly = adj[v] & uncovered
        uncovered &= ~newly
        gain -= adj[newly].sum(0)
    seeds_t = torch.tensor(seeds, dtype=torch.int64, device=dev)
    cat = torch.empty(n, dtype=torch.int64, device=dev)
    s = len(seeds)
    for a in range(0, n, tile):
        b = min(n, a + tile)
        near = adj[a:b][:, seeds_t]
        keys = torch.rand(b - a, s, generator=gen).to(dev)
        cat[a:b] = torch.where(near, keys, -1.0).argmax(1)
    cat[seeds_t] = torch.arange(s, device=dev)
    return seeds_t, cat
