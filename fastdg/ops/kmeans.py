"""Batched k-means: `fastdg.ops.kmeans` and `fastdg.ops.kmeans_predict` (METHODS.md section 4).

Many independent k-means problems at once: a ragged batch of groups given by per-point group ids,
k per group. The driver (init, Lloyd loop, reseeding, stopping rule) is written once in
fastdg/reference/kmeans.py; a backend supplies four kernels on the group-sorted layout (schemas
in csrc/fastdg.cpp):

    kmeans_step   one pass over x: assign (fused distance + argmin) + per-cluster sums + inertia
    kmeans_assign distance + argmin only (predict)
    kmeans_update per-cluster sums and counts of given labels
    kmeans_dist   distances to a few candidate centres per group (k-means++)

Backends: "cuda" (fastdg._C CUDA kernels, one launch per kernel for the whole ragged batch),
"cpp" (fastdg._C CPU kernels, at::parallel_for over fixed row blocks), "reference" (torch ops,
one group at a time). There is no Triton backend: the C++/CUDA pair already covers both devices.
Nothing is read back to the host inside the Lloyd loop except, every `sync_every` iterations
on a GPU (8), whether any group is still running. Validation reads the inputs once (ids, sizes,
finiteness) before the loop. On the CPU the C++ backend runs the groups in chunks of about
fastdg.reference.kmeans.CPU_CHUNK_BYTES of x (init and loop per chunk, so a chunk stays in
cache across its iterations), with bitwise the result of one pass over all groups.
"""
from __future__ import annotations

import numbers

import torch

from .. import _dispatch, _ext
from ..reference import kmeans as R
from ..reference.kmeans import KMeansResult
from . import _validate as V

OP = "kmeans"
INITS = ("k-means++", "random")
GPU_SYNC_EVERY = 8


class _CompiledKernels:
    """fastdg._C kernels (the dispatcher routes to the CPU or CUDA implementation by device)."""

    @staticmethod
    def assign(x, centroids, offsets, k):
        return torch.ops.fastdg.kmeans_assign(x, centroids, offsets, k)

    @staticmethod
    def update(x, labels, offsets, kmax):
        return torch.ops.fastdg.kmeans_update(x, labels, offsets, kmax)

    @staticmethod
    def step(x, centroids, offsets, k):
        return torch.ops.fastdg.kmeans_step(x, centroids, offsets, k)

    @staticmethod
    def dist(x, centers, offsets):
        return torch.ops.fastdg.kmeans_dist(x, centers, offsets)


CANDIDATES = [("cuda", _dispatch.compiled_check("kmeans_step", "cuda")),
              ("cpp", _dispatch.compiled_check("kmeans_step", "cpu")), ("reference", _dispatch.always)]


def _kernels(backend):
    return R.TorchKernels if backend == "reference" else _CompiledKernels


# ---- fake (meta) kernels, so torch.compile and opcheck can trace the ops ------------------

_FAKES_REGISTERED = False


def register_fakes():
    """Register the fake kernels of the fastdg::kmeans_* ops (once, after fastdg._C loaded)."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED or _ext.load() is None:
        return
    lib = "fastdg::"

    @torch.library.register_fake(lib + "kmeans_assign")
    def _assign_fake(x, centroids, offsets, k):
        n = x.shape[0]
        return x.new_empty(n, dtype=torch.int64), centroids.new_empty(n)

    @torch.library.register_fake(lib + "kmeans_update")
    def _update_fake(x, labels, offsets, kmax):
        G, D = offsets.shape[0] - 1, x.shape[1]
        acc = R.acc_dtype(x.dtype)
        return x.new_empty(G, kmax, D, dtype=acc), x.new_empty(G, kmax, dtype=torch.int64)

    @torch.library.register_fake(lib + "kmeans_step")
    def _step_fake(x, centroids, offsets, k):
        n = x.shape[0]
        G, kmax, _ = centroids.shape
        return (x.new_empty(n, dtype=torch.int64), centroids.new_empty(n), centroids.new_empty(centroids.shape),
                x.new_empty(G, kmax, dtype=torch.int64), centroids.new_empty(G))

    @torch.library.register_fake(lib + "kmeans_dist")
    def _dist_fake(x, centers, offsets):
        return centers.new_empty(x.shape[0], centers.shape[1])

    _FAKES_REGISTERED = True


# ---- validation ----------------------------------------------------------------------------

def _check_x(name, x, finite=True):
    V.tensor(name, x, dtypes=V.FLOATS)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D) points, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty (N >= 1 points, D >= 1 features), got shape {tuple(x.shape)}")
    if finite:
        _check_finite(name, x)


def _check_finite(name, x):
    # min and max propagate NaN and expose inf: one read of x, no N x D mask (isfinite(x).all()
    # costs 20x more on the CPU).
    lo, hi = torch.aminmax(x)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or inf")


def _check_group(group, n, dev):
    if group is None:
        return
    V.tensor("group", group, dim=1, dtypes=(torch.int64,), device=dev)
    if group.shape[0] != n:
        raise ValueError(f"group must have one id per point, shape ({n},), got {tuple(group.shape)}")
    if int(group.min()) < 0:
        raise ValueError(f"group ids must be >= 0, got min {int(group.min())}")


def _check_k(k, group, n, dev, name="k"):
    """Returns the (G,) k tensor on dev, after checking every group has k_g <= its size."""
    if isinstance(k, torch.Tensor):
        if k.dim() != 1 or k.numel() == 0 or k.dtype not in V.INTS:
            raise TypeError(f"{name} must be an int or a (G,) integer tensor, got {k.dtype} of shape {tuple(k.shape)}")
        k_t = k.to(device=dev, dtype=torch.int64)
        G = k_t.numel()
        if group is None and G != 1:
            raise ValueError(f"{name} has {G} entries but group is None (one group); pass group ids")
        if group is not None:
            V.ids_in_range("group", group, G)
    elif isinstance(k, numbers.Integral) and not isinstance(k, bool):
        G = 1 if group is None else int(group.max()) + 1
        k_t = torch.full((G,), int(k), dtype=torch.int64, device=dev)
    else:
        raise TypeError(f"{name} must be an int or a (G,) int64 tensor, got {type(k).__name__}")
    if int(k_t.min()) < 1:
        raise ValueError(f"{name} must be >= 1 for every group, got min {int(k_t.min())}")
    sizes = torch.full((1,), n, device=dev) if group is None else torch.bincount(group, minlength=G)
    bad = torch.nonzero(k_t > sizes)
    if bad.numel():
        g = int(bad[0])
        raise ValueError(f"{name}={int(k_t[g])} is larger than group {g} ({int(sizes[g])} points); "
                         "every group needs at least k_g points")
    return k_t


def _check_options(max_iter, tol, init, seed, cosine):
    if not isinstance(max_iter, numbers.Integral) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"tol must be a real number >= 0, got {tol!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(cosine, bool):
        raise TypeError(f"cosine must be a bool, got {type(cosine).__name__}")


# ---- public ops ----------------------------------------------------------------------------

def kmeans(x, k, group=None, *, max_iter=100, tol=1e-4, init="k-means++", seed=0, cosine=False,
           backend=None) -> KMeansResult:
    """Lloyd's k-means on many independent groups at once.

    x: (N, D) fp32, fp16, bf16 or fp64 points (fp32 accumulation; fp64 for fp64).
    k: int, or (G,) int64 tensor of clusters per group; 1 <= k_g <= size of group g.
    group: (N,) int64 group id of each point in [0, G) (G = len(k) for a tensor k, else
        max(group) + 1; every group must be non-empty), or None for one group.
    init: "k-means++" (greedy, 2 + ln k_g candidates per centre, as scikit-learn) or "random"
        (k_g distinct points); their uniforms come from a torch.Generator seeded with `seed`,
        on the CPU, copied to x's device once before the loop: the same numbers on every
        backend and device, and no host sync per round.
    cosine: normalise rows to unit length first (then ||a - b||^2 = 2 - 2 cos(a, b)).
    Stops group g at max_iter or when its inertia changes by <= tol relative to the previous
    iteration. An empty cluster is reseeded with the farthest point of its group.

    Returns KMeansResult(labels (N,) int64 in [0, k_g), centroids (G, Kmax, D) fp32/fp64 with
    NaN rows past k_g, inertia (G,) = sum_i min_j ||x_i - c_j||^2 per group, n_iter (G,) int64).
    The centroids are those the labels were assigned to (labels = argmin, inertia consistent).
    """
    return _kmeans(x, k, group, max_iter=max_iter, tol=tol, init=init, seed=seed, cosine=cosine, backend=backend)


def _kmeans(x, k, group, *, max_iter, tol, init, seed, cosine, backend, names=("x", "k")):
    """kmeans; `names` are the caller's names of x and k for the error messages."""
    _check_x(names[0], x, finite=False)
    _check_group(group, x.shape[0], x.device)
    k_t = _check_k(k, group, x.shape[0], x.device, names[1])
    _check_options(max_iter, tol, init, seed, cosine)
    choice = _dispatch.choose(OP, CANDIDATES, backend, x)
    if choice.backend != "reference":
        register_fakes()
    sync_every = GPU_SYNC_EVERY if x.is_cuda else 1
    # The C++ CPU kernels compute every group on its own, so the driver may run the groups in
    # cache-sized chunks (same result, bitwise); the reference's inertia is one prefix sum over
    # all rows, so it runs unchunked. Chunked, x is checked for NaN/inf chunk by chunk, just
    # before the chunk's first use: one fewer pass over x from memory.
    chunk, check_rows = None, None
    if choice.backend == "cpp":
        chunk, check_rows = R.CPU_CHUNK_BYTES, lambda rows: _check_finite(names[0], rows)
    else:
        _check_finite(names[0], x)
    return R.run(_kernels(choice.backend), x, k_t, group, max_iter=int(max_iter), tol=float(tol), init=init,
                 seed=int(seed), cosine=cosine, sync_every=sync_every, chunk_bytes=chunk, check_rows=check_rows)


def kmeans_predict(x, centroids, k, group=None, *, cosine=False, backend=None):
    """Nearest-centroid labels (N,) int64 for new points, per group.

    x: (N, D) float. centroids: (G, Kmax, D) as returned by kmeans (rows past k_g ignored).
    k: int or (G,) int64 clusters in use. group: (N,) int64 ids in [0, G), or None (G = 1).
    cosine: normalise rows of x first (use the setting the centroids were fitted with).
    Groups may be empty here (predicting a subset of the points).
    """
    return _predict(x, centroids, k, group, cosine=cosine, backend=backend)


def _predict(x, centroids, k, group, *, cosine, backend, names=("x", "k")):
    xn, kn = names
    _check_x(xn, x)
    V.tensor("centroids", centroids, dim=3, dtypes=V.FLOATS, device=x.device)
    G, kmax, D = centroids.shape
    if D != x.shape[1]:
        raise ValueError(f"centroids must have D = {x.shape[1]} features like {xn}, got shape {tuple(centroids.shape)}")
    _check_group(group, x.shape[0], x.device)
    if group is not None:
        V.ids_in_range("group", group, G)
    elif G != 1:
        raise ValueError(f"centroids hold {G} groups but group is None; pass group ids")
    if isinstance(k, torch.Tensor):
        # As in kmeans: a float tensor would be truncated silently.
        if k.dim() != 1 or k.numel() == 0 or k.dtype not in V.INTS:
            raise TypeError(f"{kn} must be an int or a (G,) integer tensor, got {k.dtype} of shape {tuple(k.shape)}")
        k_t = k.to(device=x.device, dtype=torch.int64)
    elif isinstance(k, numbers.Integral) and not isinstance(k, bool):
        k_t = torch.full((G,), int(k), dtype=torch.int64, device=x.device)
    else:
        raise TypeError(f"{kn} must be an int or a (G,) int64 tensor, got {type(k).__name__}")
    if k_t.numel() != G or int(k_t.min()) < 1 or int(k_t.max()) > kmax:
        raise ValueError(f"{kn} must hold G = {G} values in [1, {kmax}]")
    choice = _dispatch.choose("kmeans_predict", CANDIDATES, backend, x)
    if choice.backend != "reference":
        register_fakes()
    lay = R.prepare(x, k_t, group, cosine=cosine)
    C = centroids.to(R.acc_dtype(lay.x.dtype)).contiguous()
    labels, _ = _kernels(choice.backend).assign(lay.x, C, lay.offsets, lay.k)
    if lay.perm is None:
        return labels
    out = torch.empty_like(labels)
    out[lay.perm] = labels
    return out
