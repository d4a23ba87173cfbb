"""Batched k-means (METHODS.md section 4), pure PyTorch: the oracle, the fallback backend, and
the one driver (layout, k-means++ / random init, Lloyd loop, empty-cluster reseeding, stopping
rule) that every backend runs.

A backend is a kernel set with four entry points on a group-sorted layout: x (N, D) with the
rows of group g at offsets[g]:offsets[g+1] (offsets (G+1,) int64), centroids (G, Kmax, D) in
the accumulation dtype (fp64 for fp64 x, else fp32), k (G,) int64 clusters in use per group
(k[g] = 0 skips group g: its labels are -1 and it adds nothing to the sums):

    assign(x, C, offsets, k)  -> labels (N,) int64, min_dist (N,)    argmin_j d(x_i, C[g, j]), j < k[g]
    update(x, labels, offsets, kmax) -> sums (G, Kmax, D), counts (G, Kmax) int64   (labels < 0 ignored)
    step(x, C, offsets, k)    -> assign + update + inertia (G,) in one pass over x
    dist(x, centers, offsets) -> (N, L) d(x_i, centers[g, l]) for every l   (k-means++ candidates)

with d(x, c) = ||x||^2 - 2 x.c + ||c||^2 clamped at 0 (fp32 accumulation for fp32/fp16/bf16 x).
Ties go to the lowest cluster index. Reductions run in a fixed order (deterministic).

The loop needs no host read per iteration: a converged group is frozen on the device by
masking (its k is passed as 0), and the host asks "is any group still running?" only every
`sync_every` iterations (1 on the CPU, where it costs nothing). The returned centroids are the
ones the returned labels were assigned to, and inertia is their sum of squared distances: the
returned triple is always consistent (no extra E-step is needed after the last iteration).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class KMeansResult(NamedTuple):
    labels: torch.Tensor     # (N,) int64, local cluster id in [0, k_g) of each point's group
    centroids: torch.Tensor  # (G, Kmax, D) fp32 (fp64 for fp64 x); rows j >= k_g are NaN
    inertia: torch.Tensor    # (G,) sum of squared distances of a group's points to their centroid
    n_iter: torch.Tensor     # (G,) int64 Lloyd iterations (assignment steps) run per group


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- the kernel set in plain torch --------------------------------------------------------

def _spans(offsets):
    return [(g, int(a), int(b)) for g, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))]


def _sq_dists(xg, cg):
    """(n, L) ||x||^2 - 2 x.c + ||c||^2 in the accumulation dtype of cg, clamped at 0."""
    xg = xg.to(cg.dtype)
    return ((xg * xg).sum(1, keepdim=True) - 2.0 * (xg @ cg.T) + (cg * cg).sum(1)[None, :]).clamp_min_(0)


class TorchKernels:
    """The kernel set written with torch ops, one group at a time (reads offsets on the host)."""

    @staticmethod
    def assign(x, centroids, offsets, k):
        labels = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
        min_dist = torch.zeros(x.shape[0], dtype=centroids.dtype, device=x.device)
        for (g, a, b), kg in zip(_spans(offsets), k.tolist()):
            if kg <= 0 or b == a:
                continue
            d = _sq_dists(x[a:b], centroids[g, :kg])
            lab = d.argmin(1)  # argmin returns the first minimum: ties go to the lowest index
            labels[a:b] = lab
            min_dist[a:b] = d.gather(1, lab[:, None])[:, 0]
        return labels, min_dist

    @staticmethod
    def update(x, labels, offsets, kmax):
        G, D = offsets.numel() - 1, x.shape[1]
        acc = acc_dtype(x.dtype)
        sums = torch.zeros(G, kmax, D, dtype=acc, device=x.device)
        counts = torch.zeros(G, kmax, dtype=torch.int64, device=x.device)
        cluster = torch.arange(kmax, device=x.device)
        for g, a, b in _spans(offsets):
            # A one-hot product is a fixed-order reduction (index_add_ on CUDA is not).
            onehot = labels[a:b, None] == cluster[None, :]
            sums[g] = onehot.to(acc).T @ x[a:b].to(acc)
            counts[g] = onehot.sum(0)
        return sums, counts

    @staticmethod
    def step(x, centroids, offsets, k):
        labels, min_dist = TorchKernels.assign(x, centroids, offsets, k)
        sums, counts = TorchKernels.update(x, labels, offsets, centroids.shape[1])
        inertia = segment_sum(min_dist.double()[:, None], offsets)[:, 0].to(centroids.dtype)
        return labels, min_dist, sums, counts, inertia

    @staticmethod
    def dist(x, centers, offsets):
        out = torch.empty(x.shape[0], centers.shape[1], dtype=centers.dtype, device=x.device)
        for g, a, b in _spans(offsets):
            out[a:b] = _sq_dists(x[a:b], centers[g])
        return out


def segment_sum(values, offsets):
    """(N, L) -> (G, L) sums over the row segments given by offsets, by differences of one
    fp64 prefix sum (a scan: fixed order on every device, no atomics)."""
    cs = torch.cumsum(values.double(), 0)
    cs = torch.cat([cs.new_zeros(1, values.shape[1]), cs])
    return cs[offsets[1:]] - cs[offsets[:-1]]


# ---- the driver shared by all backends -----------------------------------------------------

class Layout(NamedTuple):
    x: torch.Tensor        # (N, D) rows sorted by group, contiguous (normalised when cosine)
    offsets: torch.Tensor  # (G+1,) int64 on x's device
    k: torch.Tensor        # (G,) int64 on x's device
    kmax: int
    perm: torch.Tensor | None  # sorted row i is input row perm[i]; None when already sorted
    point_group: torch.Tensor  # (N,) int64 group of each sorted row
    max_n: int = 0         # size of the largest group (width of the padded (G, max_n) views)


def prepare(x, k, group=None, *, cosine=False) -> Layout:
    """Sort rows by group (stable; skipped when already sorted) and build offsets. One host read
    of max(k) and the largest group size, once per call (the loop itself reads nothing)."""
    dev = x.device
    if isinstance(k, torch.Tensor):
        k_t = k.to(device=dev, dtype=torch.int64).reshape(-1)
    else:
        k_t = None
    if group is None:
        G = 1 if k_t is None else k_t.numel()
        group = torch.zeros(x.shape[0], dtype=torch.int64, device=dev)
    else:
        G = k_t.numel() if k_t is not None else int(group.max()) + 1
    if k_t is None:
        k_t = torch.full((G,), int(k), dtype=torch.int64, device=dev)
    counts = torch.bincount(group, minlength=G)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    perm = None
    if x.shape[0] > 1 and not bool((group[1:] >= group[:-1]).all()):
        perm = torch.sort(group, stable=True).indices
        x, group = x[perm], group[perm]
    x = x.contiguous()
    if cosine:
        x = torch.nn.functional.normalize(x.to(acc_dtype(x.dtype)), dim=1)
    kmax, max_n = torch.stack([k_t.max(), counts.max()]).tolist()
    return Layout(x, offsets, k_t, int(kmax), perm, group, int(max_n))


def _first_k(order, offsets, k, kmax):
    """Indices order[offsets[g] + j] for j < kmax (clamped inside the group), shape (G, kmax)."""
    j = torch.arange(kmax, device=offsets.device)
    pos = torch.minimum(offsets[:-1, None] + j[None, :], (offsets[1:, None] - 1).clamp_min(0))
    return order[pos]


def init_draws(lay: Layout, init: str, seed: int):
    """Every uniform the init needs, for all groups, drawn before any work (so running groups in
    chunks cannot change them). They come from a CPU torch.Generator seeded with `seed` and are
    copied to x's device once, before the loop: the same numbers on every device and backend,
    and no host traffic per k-means++ round. random: (keys (N,) in sorted-row order,);
    k-means++: (u0 (G,), u (kmax-1, G, L) or None when kmax = 1)."""
    gen = torch.Generator().manual_seed(seed)
    dev = lay.x.device
    if init == "random":
        # Drawn in input row order, so the keys do not depend on how the rows were sorted.
        keys = torch.rand(lay.x.shape[0], generator=gen, dtype=torch.float64).to(dev)
        return (keys if lay.perm is None else keys[lay.perm],)
    G = lay.k.numel()
    u0 = torch.rand(G, generator=gen, dtype=torch.float64).to(dev)
    if lay.kmax == 1:
        return (u0, None)
    L = 2 + int(math.log(lay.kmax))
    return (u0, torch.rand(lay.kmax - 1, G, L, generator=gen, dtype=torch.float64).to(dev))


def init_random(lay: Layout, acc, keys):
    """k_g distinct rows per group, uniformly: the k_g smallest of the N random keys."""
    by_key = torch.sort(keys, stable=True).indices
    order = by_key[torch.sort(lay.point_group[by_key], stable=True).indices]
    idx = _first_k(order, lay.offsets, lay.k, lay.kmax)
    valid = torch.arange(lay.kmax, device=lay.x.device)[None, :] < lay.k[:, None]
    return torch.where(valid[..., None], lay.x[idx].to(acc), 0)


def _scan(values, start=None):
    """(n+1,) fp64 running sums of values (n,): entry i = start (0 when None) + the sum of the
    entries < i, added in order on the CPU (a sequential scan), so that consecutive pieces of
    the rows, each begun at the last sum of the previous piece, give bitwise the same sums."""
    v = values.double()
    if start is None:
        return torch.cat([v.new_zeros(1), torch.cumsum(v, 0)])
    return torch.cumsum(torch.cat([start.reshape(1), v]), 0)


def _scan_rows(values, start):
    """(L, n+1) fp64 running sums along the rows of values (L, n), begun at start (L,). Scanned
    along the last dimension: on a GPU a dim-0 scan of an (n, L) tensor runs one thread per
    column over all n rows; on the CPU both are the same sequential sums."""
    return torch.cumsum(torch.cat([start[:, None], values.double()], 1), 1)


def init_kmeanspp(kernels, lay: Layout, acc, u0, u, carry=None):
    """Greedy k-means++ (Arthur & Vassilvitskii; the variant scikit-learn uses): the first centre
    is a uniform row; each further centre is the best of 2 + floor(ln k_g) candidates drawn with
    probability proportional to D(x)^2, "best" = lowest resulting potential sum_x min D(x)^2.
    All groups advance together on the uniforms of init_draws. Sampling is an inverse-CDF search
    in one fp64 prefix sum over all rows (no host reads).

    carry: None, or a (kmax-1, 1+L) fp64 tensor holding, per round, the prefix sums (of D(x)^2,
    then of each candidate's potential) reached at the end of the previous chunk of groups; it
    is updated in place, so that chunks run one after the other give bitwise the result of one
    call over all the groups."""
    x, off, k, kmax = lay.x, lay.offsets, lay.k, lay.kmax
    dev, G, D = x.device, k.numel(), x.shape[1]
    n = off[1:] - off[:-1]
    first = off[:-1] + torch.minimum((u0 * n).long(), n - 1)
    C = torch.zeros(G, kmax, D, dtype=acc, device=dev)
    C[:, 0] = x[first].to(acc)
    closest = kernels.dist(x, C[:, :1].contiguous(), off)[:, 0]
    if kmax == 1:
        return C
    L = u.shape[2]
    start = torch.zeros(kmax - 1, 1 + L, dtype=torch.float64, device=dev) if carry is None else carry.clone()
    trials = 2 + torch.log(k.double()).floor().long()
    lo, hi = off[:-1, None], (off[1:, None] - 1)
    for c in range(1, kmax):
        cs0 = _scan(closest, None if carry is None else start[c - 1, 0])
        cs = cs0[1:]
        base, pot = cs0[off[:-1]], cs0[off[1:]] - cs0[off[:-1]]
        target = base[:, None] + u[c - 1] * pot[:, None]
        # First row whose prefix sum exceeds the target: a row with D(x)^2 = 0 is never drawn
        # unless the whole group has zero potential (then the clamp picks a row of the group).
        cand = torch.searchsorted(cs, target, right=True)
        cand = torch.minimum(torch.maximum(cand, lo), hi)
        cd = kernels.dist(x, x[cand].to(acc).contiguous(), off)
        newd = torch.minimum(closest[:, None], cd)
        pre = _scan_rows(newd.T, start[c - 1, 1:])
        cand_pot = (pre[:, off[1:]] - pre[:, off[:-1]]).T
        if carry is not None:
            carry[c - 1, 0], carry[c - 1, 1:] = cs0[-1], pre[:, -1]
        cand_pot = torch.where(torch.arange(L, device=dev)[None, :] < trials[:, None], cand_pot, math.inf)
        best = cand_pot.argmin(1)
        chosen = cand.gather(1, best[:, None])[:, 0]
        use = c < k
        C[:, c] = torch.where(use[:, None], x[chosen].to(acc), 0)
        picked = newd.gather(1, best[lay.point_group][:, None])[:, 0]
        closest = torch.where(use[lay.point_group], picked, closest)
    return C


class Padded(NamedTuple):
    """A (G, max_n) view of the rows: row index of column j of group g (clamped into x) and a
    tie-break key, larger for lower rows, that makes every key past the group's end negative."""
    rows: torch.Tensor
    tie: torch.Tensor


# The padded view is used while it costs at most this many times the N rows (ragged batches
# with one large group and many small ones fall back to sorting).
PADDED_MAX_BLOWUP = 4


def padded_view(lay: Layout, max_blowup=PADDED_MAX_BLOWUP) -> Padded | None:
    """The Padded view of lay, or None when G * max_n > max_blowup * N (+ 1024)."""
    G, N = lay.k.numel(), lay.x.shape[0]
    if G * lay.max_n > max_blowup * N + 1024 or lay.max_n >= 2 ** 31:
        return None
    dev = lay.x.device
    j = torch.arange(lay.max_n, device=dev)
    n = lay.offsets[1:] - lay.offsets[:-1]
    rows = (lay.offsets[:-1, None] + j[None, :]).clamp_max(max(N - 1, 0))
    tie = torch.where(j[None, :] < n[:, None], lay.max_n - 1 - j[None, :], torch.iinfo(torch.int64).min)
    return Padded(rows, tie)


def farthest_rows(lay: Layout, min_dist, r, pad: Padded | None = None, method=None):
    """(G, r) int64: column j holds the row of group g with the (j+1)-th largest min_dist, ties
    to the lower row (the order of a stable descending sort); j is clamped to the group's size
    minus one. method "topk" (fp32 min_dist, needs the padded view): one top-r of composite
    int64 keys (distance bits, then the tie key) per group, O(N) work and no sort; "sort": two
    stable sorts over N. None picks "topk" where it applies."""
    fp32 = min_dist.dtype == torch.float32
    if method is None:
        if pad is None and fp32:
            pad = padded_view(lay)
        method = "topk" if fp32 and pad is not None else "sort"
    if method == "sort":
        by_dist = torch.sort(min_dist, descending=True, stable=True).indices
        order = by_dist[torch.sort(lay.point_group[by_dist], stable=True).indices]
        return _first_k(order, lay.offsets, lay.k, r)
    if not fp32:
        raise ValueError(f"method='topk' needs float32 min_dist, got {min_dist.dtype}")
    if pad is None:
        pad = padded_view(lay, math.inf)
    # Finite non-negative floats order like their bit patterns read as integers; "+ 0.0" turns
    # a -0.0 into +0.0 so that it ties with zero as in the sort. The keys are distinct, so the
    # top-r (and its order) is fully determined.
    bits = (min_dist + 0.0).view(torch.int32).to(torch.int64)
    key = bits[pad.rows] * 2 ** 32 + pad.tie  # in [0, 2^63) inside a group, < 0 past its end
    top = key.topk(min(r, lay.max_n), dim=1).indices
    n = lay.offsets[1:] - lay.offsets[:-1]
    # Python-scalar clamps only: a tensor made from a Python int would be a host-to-device copy
    # (and a sync) every GPU iteration.
    last = (n.clamp_max(top.shape[1]) - 1).clamp_min(0)
    j = torch.minimum(torch.arange(r, device=top.device)[None, :], last[:, None])
    return lay.offsets[:-1, None] + top.gather(1, j)


def reseed_empty(C_new, empty, lay: Layout, min_dist, acc, pad: Padded | None = None):
    """Give each empty cluster of a group one of the group's farthest rows from their current
    centroid: the r-th empty cluster (in index order) gets the r-th farthest row (distinct)."""
    rank = (torch.cumsum(empty.long(), 1) - 1).clamp_min(0)
    far = farthest_rows(lay, min_dist, empty.shape[1], pad)
    return torch.where(empty[..., None], lay.x[far.gather(1, rank)].to(acc), C_new)


# Run the Lloyd loop on the CPU over consecutive groups whose rows take about this many bytes,
# so that a chunk stays in the last-level cache across its iterations (a whole batch streamed
# from memory every iteration made the batched call slower than a loop over the groups).
CPU_CHUNK_BYTES = 8 << 20


def chunk_spans(offsets, row_bytes, budget):
    """[(g0, g1)] consecutive group ranges of at most `budget` bytes each (a larger group is a
    range of its own); offsets on the host."""
    off = offsets.tolist()
    spans, g0 = [], 0
    for g in range(1, len(off)):
        if g - 1 > g0 and (off[g] - off[g0]) * row_bytes > budget:
            spans.append((g0, g - 1))
            g0 = g - 1
    spans.append((g0, len(off) - 1))
    return spans


def lloyd(kernels, lay: Layout, *, max_iter, tol, init, seed, sync_every, chunk_bytes=None,
          check_rows=None) -> KMeansResult:
    """Lloyd iterations on every group at once; returns results in sorted-row order.

    Group g stops after iteration t when |I_{t-1} - I_t| <= tol * I_{t-1} (I = its inertia), or
    at max_iter. Its centroids are then the ones its final labels were assigned against.
    chunk_bytes (CPU only, kernels whose per-group results do not depend on the other groups):
    run consecutive groups of about that many bytes of x one chunk after the other, init and
    loop; the result is bitwise the same as one run over all groups. check_rows: called with
    each chunk's rows (or all rows) before they are used (e.g. to validate them while they are
    about to be in cache)."""
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    draws = init_draws(lay, init, seed)
    spans = None
    if chunk_bytes is not None and lay.x.device.type == "cpu":
        spans = chunk_spans(lay.offsets, lay.x.shape[1] * lay.x.element_size(), chunk_bytes)
    if spans is None or len(spans) == 1:
        if check_rows is not None:
            check_rows(lay.x)
        return _lloyd(kernels, lay, draws, None, max_iter=max_iter, tol=tol, sync_every=sync_every)
    carry = None
    if init == "k-means++" and lay.kmax > 1:
        carry = torch.zeros(lay.kmax - 1, 1 + draws[1].shape[2], dtype=torch.float64)
    off = lay.offsets.tolist()
    parts = []
    for g0, g1 in spans:
        a, b = off[g0], off[g1]
        sub = Layout(lay.x[a:b], lay.offsets[g0:g1 + 1] - a, lay.k[g0:g1], lay.kmax, None,
                     lay.point_group[a:b] - g0, max(o1 - o0 for o0, o1 in zip(off[g0:g1], off[g0 + 1:g1 + 1])))
        if check_rows is not None:
            check_rows(sub.x)
        if init == "random":
            sub_draws = (draws[0][a:b],)
        else:
            sub_draws = (draws[0][g0:g1], None if draws[1] is None else draws[1][:, g0:g1])
        parts.append(_lloyd(kernels, sub, sub_draws, carry, max_iter=max_iter, tol=tol, sync_every=sync_every))
    return KMeansResult(*(torch.cat(t) for t in zip(*parts)))


# True: reseed every iteration, masked, as on a GPU (lets CPU tests run the GPU's code path).
MASKED_RESEED_ON_CPU = False


def _lloyd(kernels, lay: Layout, draws, carry, *, max_iter, tol, sync_every) -> KMeansResult:
    x, off, k, kmax = lay.x, lay.offsets, lay.k, lay.kmax
    acc, dev, G = acc_dtype(x.dtype), x.device, k.numel()
    if len(draws) == 1:
        C = init_random(lay, acc, *draws)
    else:
        C = init_kmeanspp(kernels, lay, acc, *draws, carry=carry)
    pg = lay.point_group
    valid = torch.arange(kmax, device=dev)[None, :] < k[:, None]
    labels = torch.full((x.shape[0],), -1, dtype=torch.int64, device=dev)
    inertia = torch.zeros(G, dtype=acc, device=dev)
    prev = torch.zeros(G, dtype=acc, device=dev)
    n_iter = torch.zeros(G, dtype=torch.int64, device=dev)
    active = torch.ones(G, dtype=torch.bool, device=dev)
    on_cpu = dev.type == "cpu" and not MASKED_RESEED_ON_CPU
    # Built once: on a GPU every iteration reseeds (masked), through this O(N) view.
    pad = None if on_cpu or kmax == 1 else padded_view(lay)
    for it in range(1, max_iter + 1):
        lab, md, sums, counts, inert = kernels.step(x, C, off, torch.where(active, k, 0))
        labels = torch.where(active[pg], lab, labels)
        inertia = torch.where(active, inert, inertia)
        n_iter += active
        if it > 1:
            moving = active & ((prev - inert).abs() > tol * prev)
        else:
            moving = active
        prev = torch.where(active, inert, prev)
        if it < max_iter:
            C_new = sums / counts.clamp_min(1)[..., None].to(acc)
            # With k = 1 every point is in cluster 0: nothing can be empty.
            if kmax > 1:
                empty = (counts == 0) & valid & moving[:, None]
                # On the CPU the test is free; on a GPU reading it would be a sync, so reseed
                # always (masked by `empty`; a top-k per group, no sort).
                if not on_cpu or bool(empty.any()):
                    C_new = reseed_empty(C_new, empty, lay, md, acc, pad)
            C = torch.where(moving[:, None, None], C_new, C)
        active = moving
        if (on_cpu or it % sync_every == 0) and not bool(active.any()):
            break
    centroids = torch.where(valid[..., None], C, math.nan)
    return KMeansResult(labels, centroids, inertia, n_iter)


def run(kernels, x, k, group=None, *, max_iter=100, tol=1e-4, init="k-means++", seed=0, cosine=False,
        sync_every=8, chunk_bytes=None, check_rows=None) -> KMeansResult:
    """prepare + lloyd + back to input row order (what every backend of fastdg.ops.kmeans runs)."""
    lay = prepare(x, k, group, cosine=cosine)
    res = lloyd(kernels, lay, max_iter=max_iter, tol=tol, init=init, seed=seed, sync_every=sync_every,
                chunk_bytes=chunk_bytes, check_rows=check_rows)
    if lay.perm is None:
        return res
    labels = torch.empty_like(res.labels)
    labels[lay.perm] = res.labels
    return res._replace(labels=labels)


def kmeans_ref(x, k, group=None, *, max_iter=100, tol=1e-4, init="k-means++", seed=0, cosine=False):
    """Batched k-means in pure PyTorch (any device; fp64-capable; host reads allowed).

    x: (N, D) float. k: int, or (G,) int64 tensor of clusters per group (1 <= k_g <= group size).
    group: (N,) int64 ids in [0, G), or None (one group). Inputs are assumed valid (the public
    op fastdg.ops.kmeans validates them). Distances accumulate in fp32 (fp64 for fp64 x).
    Returns KMeansResult(labels (N,) int64 local ids, centroids (G, Kmax, D) with NaN rows past
    k_g, inertia (G,), n_iter (G,) int64). The same seed gives the same result.
    """
    return run(TorchKernels, x, k, group, max_iter=max_iter, tol=tol, init=init, seed=seed, cosine=cosine,
               sync_every=1)
