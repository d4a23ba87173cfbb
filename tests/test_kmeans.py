"""fastdg.ops.kmeans: every backend's kernels against the pure-PyTorch reference (fp64 by relative
error, half precision within 2x of the reference's own error), the whole algorithm against the
reference and scikit-learn, ragged groups, duplicates, determinism, validation and opcheck."""
import os

import numpy as np
import pytest
import torch
import torch.utils.deterministic

import fastdg
from fastdg import _ext
from fastdg.cluster import KMeans
from fastdg.ops import kmeans, kmeans_predict
from fastdg.ops.kmeans import _CompiledKernels, register_fakes
from fastdg.reference import kmeans as R
from fastdg.reference.kmeans import TorchKernels, kmeans_ref

HAVE_CPP = _ext.has_kernel("kmeans_step", "CPU")
needs_cpp = pytest.mark.skipif(not HAVE_CPP, reason=f"fastdg._C CPU kmeans kernels unavailable: {_ext.why_not()}")

# (backend, device): the compiled kernels run on their device; the reference runs anywhere.
BACKENDS = [
    pytest.param("cpp", "cpu", marks=needs_cpp),
    pytest.param("cuda", "cuda", marks=pytest.mark.gpu),
]


@pytest.fixture
def poison():
    """at::empty fills new tensors with NaN / INT_MAX, so an output element a kernel forgets to
    write cannot pass for a correct value."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def ragged(sizes, D, dtype=torch.float64, device="cpu", seed=0):
    """Random points (never zeros), sorted by group, with offsets for the given group sizes."""
    gen = torch.Generator().manual_seed(seed)
    N = sum(sizes)
    x = (torch.randn(N, D, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device)
    off = torch.tensor([0] + list(np.cumsum(sizes)), dtype=torch.int64, device=device)
    return x, off


def centroids_for(x, off, kmax, seed=1):
    gen = torch.Generator().manual_seed(seed)
    G = off.numel() - 1
    acc = R.acc_dtype(x.dtype)
    return (torch.randn(G, kmax, x.shape[1], generator=gen, dtype=torch.float64) * 2).to(acc).to(x.device)


SIZES = [37, 1, 0, 130, 8, 2049]  # a single point, an empty group, a group spanning several row blocks
K = [3, 1, 0, 5, 8, 4]            # k = 0 skips a group


# ---- kernels vs reference ------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("D", [1, 19, 67])
def test_kernels_match_reference_fp64(backend, device, D, poison):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, off = ragged(SIZES, D, device=device)
    k = torch.tensor(K, device=device)
    C = centroids_for(x, off, 8)
    lab, md = _CompiledKernels.assign(x, C, off, k)
    rlab, rmd = TorchKernels.assign(x, C, off, k)
    assert torch.equal(lab.cpu(), rlab.cpu())
    assert rel_err(md, rmd) < 1e-12
    out = _CompiledKernels.step(x, C, off, k)
    ref = TorchKernels.step(x, C, off, k)
    assert torch.equal(out[0].cpu(), ref[0].cpu())
    for a, b in zip(out[1:], ref[1:]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_err(a, b) < 1e-12
    sums, counts = _CompiledKernels.update(x, rlab, off, 8)
    rsums, rcounts = TorchKernels.update(x, rlab, off, 8)
    assert torch.equal(counts.cpu(), rcounts.cpu()) and rel_err(sums, rsums) < 1e-12
    cand = centroids_for(x, off, 3, seed=2)
    assert rel_err(_CompiledKernels.dist(x, cand, off), TorchKernels.dist(x, cand, off)) < 1e-12


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_low_precision(backend, device, dtype, poison):
    """fp32 accumulation: the kernel's error against the fp64 truth is within 2x of the error the
    reference makes from the same low-precision input (plus a small floor)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, off = ragged([300, 45, 7], 33, device=device, seed=3)
    xl = x.to(dtype)
    k = torch.tensor([4, 3, 2], device=device)
    C64 = centroids_for(x, off, 4)
    C32 = C64.float()
    truth = TorchKernels.dist(xl.double(), C64, off)          # exact for the rounded input
    got = _CompiledKernels.dist(xl, C32, off)
    ref = TorchKernels.dist(xl, C32, off)
    floor = 1e-6
    assert rel_err(got, truth) <= 2 * rel_err(ref, truth) + floor
    lab, md = _CompiledKernels.assign(xl, C32, off, k)
    # The chosen centroid is the nearest up to the rounding of the distances.
    masked = torch.where(torch.arange(4, device=device)[None] < k.repeat_interleave(off.diff())[:, None],
                         truth, float("inf"))
    chosen = truth.gather(1, lab[:, None])[:, 0]
    assert bool((chosen <= masked.min(1).values + 1e-5 * truth.max()).all())
    out = _CompiledKernels.step(xl, C32, off, k)
    ref_out = TorchKernels.step(xl.double(), C64, off, k)
    assert rel_err(out[4], ref_out[4]) < 1e-4  # inertia
    sums, counts = _CompiledKernels.update(xl, lab, off, 4)
    rsums, rcounts = TorchKernels.update(xl.double(), lab, off, 4)
    assert torch.equal(counts.cpu(), rcounts.cpu()) and rel_err(sums, rsums) < 1e-5


@needs_cpp
def test_cpp_baseline_isa_loops():
    """The non-AVX2 build of the inner loops (what a CPU without AVX2 runs), in a fresh process."""
    import subprocess
    import sys

    code = (
        "import torch, fastdg._ext as e; e.load()\n"
        "from tests.test_kmeans import ragged, centroids_for, rel_err, SIZES, K\n"
        "from fastdg.ops.kmeans import _CompiledKernels as C\n"
        "from fastdg.reference.kmeans import TorchKernels as T\n"
        "for D in (5, 19, 67):\n"
        "    x, off = ragged(SIZES, D); k = torch.tensor(K); c = centroids_for(x, off, 8)\n"
        "    a, b = C.step(x, c, off, k), T.step(x, c, off, k)\n"
        "    assert torch.equal(a[0], b[0]) and all(rel_err(u, v) < 1e-12 for u, v in zip(a[1:], b[1:]))\n"
        "    for dt in (torch.float32, torch.bfloat16):\n"
        "        xl = x.to(dt); c32 = c.float()\n"
        "        assert rel_err(C.dist(xl, c32, off), T.dist(xl.double(), c, off)) < 1e-5\n"
        "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FASTDG_CPU_BASELINE="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ---- the whole algorithm -------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_matches_reference(backend, device, init):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1500, 23, generator=gen, dtype=torch.float64).to(device)
    group = torch.randint(0, 4, (1500,), generator=gen).to(device)  # unsorted ids
    k = torch.tensor([2, 5, 3, 7])
    got = kmeans(x, k, group, init=init, seed=7, backend=backend)
    assert fastdg.ops.last_choice("kmeans").backend == backend
    ref = kmeans_ref(x, k, group, init=init, seed=7)
    assert torch.equal(got.labels.cpu(), ref.labels.cpu())
    assert torch.equal(got.n_iter.cpu(), ref.n_iter.cpu())
    assert torch.equal(got.centroids.isnan().cpu(), ref.centroids.isnan().cpu())
    assert rel_err(got.centroids.nan_to_num(), ref.centroids.nan_to_num()) < 1e-10
    assert rel_err(got.inertia, ref.inertia) < 1e-10
    got32 = kmeans(x.float(), k, group, init=init, seed=7, backend=backend)
    assert rel_err(got32.inertia, ref.inertia) < 1e-3


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
def test_result_is_consistent(backend):
    """labels = argmin to the returned centroids, inertia = the sum of those distances."""
    x, _ = ragged([400], 11, seed=5)
    for max_iter in (1, 3, 100):
        res = kmeans(x, 6, max_iter=max_iter, backend=backend)
        d = torch.cdist(x, res.centroids[0]) ** 2
        assert torch.equal(res.labels, d.argmin(1))
        assert abs(float(d.min(1).values.sum()) - float(res.inertia[0])) < 1e-9 * float(res.inertia[0])
        assert 1 <= int(res.n_iter[0]) <= max_iter


def _sk_mean_inertia(X, k, seeds):
    from sklearn.cluster import KMeans as SK

    return float(np.mean([SK(k, random_state=s).fit(X).inertia_ for s in seeds]))


def _our_mean_inertia(X, k, seeds, dtype=torch.float32):
    x = torch.as_tensor(X).to(dtype)
    return float(np.mean([float(kmeans(x, k, seed=s).inertia[0]) for s in seeds]))


# Single runs land in different local minima for both libraries; compare means over seeds.
SEEDS = range(3)


@pytest.mark.parametrize("k", [4, 10])
def test_quality_digits(k):
    from sklearn.datasets import load_digits

    X = load_digits().data
    assert _our_mean_inertia(X, k, SEEDS) <= 1.01 * _sk_mean_inertia(X, k, SEEDS)


def _mnist_pixels(data_dir, n):
    path = os.path.join(data_dir, "MNIST", "raw", "train-images-idx3-ubyte")
    if not os.path.exists(path):
        pytest.skip(f"MNIST images not found at {path}")
    with open(path, "rb") as f:
        magic, count, rows, cols = np.frombuffer(f.read(16), dtype=">i4")
        assert magic == 2051
        pixels = np.frombuffer(f.read(n * rows * cols), dtype=np.uint8)
    return pixels.reshape(n, rows * cols).astype(np.float32)


def test_quality_mnist(data_dir):
    X = _mnist_pixels(data_dir, 3000)
    assert _our_mean_inertia(X, 10, SEEDS) <= 1.01 * _sk_mean_inertia(X, 10, SEEDS)


def test_quality_blobs_grouped():
    from sklearn.datasets import make_blobs

    Xs = [make_blobs(500 + 100 * g, 16, centers=5, cluster_std=2.0, random_state=g)[0] for g in range(4)]
    x = torch.tensor(np.concatenate(Xs), dtype=torch.float32)
    group = torch.cat([torch.full((len(X),), g) for g, X in enumerate(Xs)])
    ours = np.mean([kmeans(x, 5, group, seed=s).inertia.sum().item() for s in SEEDS])
    theirs = sum(_sk_mean_inertia(X, 5, SEEDS) for X in Xs)
    assert ours <= 1.01 * theirs


# ---- groups, duplicates, determinism -------------------------------------------------------

@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
def test_ragged_groups_and_exact_k(backend):
    x, _ = ragged([50, 4, 200, 1], 6, dtype=torch.float32, seed=6)
    group = torch.cat([torch.full((n,), g) for g, n in enumerate([50, 4, 200, 1])])
    k = torch.tensor([3, 4, 6, 1])
    res = kmeans(x, k, group, backend=backend)
    assert res.centroids.shape == (4, 6, 6)
    assert bool(res.centroids[0, 3:].isnan().all()) and not bool(res.centroids[2].isnan().any())
    for g, kg in enumerate(k.tolist()):
        lab = res.labels[group == g]
        assert int(lab.min()) >= 0 and int(lab.max()) < kg
    assert sorted(res.labels[group == 1].tolist()) == [0, 1, 2, 3]  # exactly k points: one each
    # Zero up to the rounding of ||x||^2 - 2 x.c + ||c||^2 in fp32.
    for g in (1, 3):
        assert float(res.inertia[g]) <= 1e-6 * float((x[group == g] ** 2).sum())
    assert torch.allclose(res.centroids[3, 0], x[group == 3][0])


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
@pytest.mark.parametrize("k", [3, 5])
def test_duplicate_points(backend, k):
    """Three distinct points, each repeated: zero inertia, no NaN centroid even when k exceeds the
    number of distinct points (empty clusters are reseeded)."""
    base = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [4.0, -1.0]], dtype=torch.float64)
    x = base.repeat(20, 1)
    res = kmeans(x, k, backend=backend)
    assert float(res.inertia[0]) == 0.0
    assert not bool(res.centroids[0].isnan().any())
    assert int(res.labels.max()) < k
    assert res.labels.unique().numel() == 3


def test_reseed_takes_farthest_points():
    x = torch.tensor([[0.0], [1.0], [10.0], [3.0], [20.0]], dtype=torch.float64)
    lay = R.prepare(x, torch.tensor([3]))
    md = torch.tensor([0.0, 1.0, 100.0, 9.0, 400.0], dtype=torch.float64)
    C = torch.zeros(1, 3, 1, dtype=torch.float64)
    empty = torch.tensor([[False, True, True]])
    out = R.reseed_empty(C, empty, lay, md, torch.float64)
    assert out[0, :, 0].tolist() == [0.0, 20.0, 10.0]


def _old_farthest(lay, md, r):
    """The reseeding order as first written: two stable sorts (distance descending, then group)."""
    by_dist = torch.sort(md, descending=True, stable=True).indices
    order = by_dist[torch.sort(lay.point_group[by_dist], stable=True).indices]
    return R._first_k(order, lay.offsets, lay.k, r)


@pytest.mark.parametrize("sizes", [[5, 1, 40, 3, 17], [30, 31, 29, 30], [2000, 1, 1, 1, 1, 1, 1, 1]])
def test_farthest_rows_topk_matches_sorts(sizes):
    """The sort-free top-k order (what a GPU runs every iteration) is the stable-sort order:
    ties (many, from a few distinct values, with -0.0 among the zeros) go to the lower row, and
    positions past a group's size repeat its last row."""
    gen = torch.Generator().manual_seed(14)
    N = sum(sizes)
    group = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    lay = R.prepare(torch.zeros(N, 1), torch.full((len(sizes),), 1), group)
    md = torch.randint(0, 4, (N,), generator=gen).float() * 0.5
    md[torch.randperm(N, generator=gen)[:N // 5]] = -0.0
    for r in (1, 3, 6):
        want = _old_farthest(lay, md, r)
        for method in ("topk", "sort", None):
            assert torch.equal(R.farthest_rows(lay, md, r, method=method), want), (r, method)
        assert torch.equal(R.farthest_rows(lay, md.double(), r), want)
    # The default picks the padded top-k unless the batch is too ragged for it.
    assert (R.padded_view(lay) is None) == (len(sizes) * max(sizes) > R.PADDED_MAX_BLOWUP * N + 1024)
    with pytest.raises(ValueError, match="float32"):
        R.farthest_rows(lay, md.double(), 2, method="topk")


def test_reseed_padded_path_matches_sorts():
    """reseed_empty through the padded view gives the centroids the sorting rule gives."""
    x, off = ragged([20, 7, 33], 3, dtype=torch.float32, seed=15)
    group = torch.repeat_interleave(torch.arange(3), off.diff())
    lay = R.prepare(x, torch.tensor([4, 4, 4]), group)
    gen = torch.Generator().manual_seed(16)
    md = torch.randint(0, 3, (x.shape[0],), generator=gen).float()
    empty = torch.tensor([[True, False, True, True], [False, True, False, True], [False, False, False, False]])
    C = torch.zeros(3, 4, 3)
    got = R.reseed_empty(C, empty, lay, md, torch.float32, R.padded_view(lay))
    rank = (torch.cumsum(empty.long(), 1) - 1).clamp_min(0)
    want = torch.where(empty[..., None], x[_old_farthest(lay, md, 4).gather(1, rank)], C)
    assert torch.equal(got, want)
    assert not torch.equal(got, C)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_reseeding_as_on_gpu(backend, dtype, monkeypatch):
    """The GPU's loop (reseed every iteration, masked by `empty`, through the padded top-k for
    fp32) gives the CPU's result (reseed only when a cluster is empty), here with duplicates
    that empty clusters in most groups."""
    gen = torch.Generator().manual_seed(20)
    base = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    x = torch.cat([base.repeat(12, 1), torch.randn(90, 3, generator=gen, dtype=torch.float64)]).to(dtype)
    group = torch.arange(x.shape[0]) % 4
    k = torch.tensor([7, 3, 9, 6])
    calls = []
    reseed = R.reseed_empty
    monkeypatch.setattr(R, "reseed_empty", lambda *a: calls.append(int(a[1].sum())) or reseed(*a))
    want = kmeans(x, k, group, init="random", seed=1, backend=backend)
    assert sum(calls) > 0  # the CPU loop did meet empty clusters
    on_cpu = len(calls)
    monkeypatch.setattr(R, "MASKED_RESEED_ON_CPU", True)
    got = kmeans(x, k, group, init="random", seed=1, backend=backend)
    assert len(calls) - on_cpu >= int(want.n_iter.max()) - 1 > on_cpu  # ... the masked loop at every step
    for a, b in zip(got, want):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@needs_cpp
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_chunked_run_checks_every_chunk(monkeypatch, cosine, bad):
    """Chunked, x is checked for NaN/inf chunk by chunk: a bad value in the last chunk raises."""
    x, off = ragged([40, 50, 60], 4, dtype=torch.float32, seed=21)
    group = torch.repeat_interleave(torch.arange(3), off.diff())
    x[-3, 2] = bad
    monkeypatch.setattr(R, "CPU_CHUNK_BYTES", 0)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        kmeans(x, 3, group, cosine=cosine, backend="cpp")
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        KMeans(3, cosine=cosine, backend="cpp").fit(x, group)


def test_chunk_spans():
    off = torch.tensor([0, 10, 20, 100, 105, 110, 111])
    assert R.chunk_spans(off, 1, 25) == [(0, 2), (2, 3), (3, 6)]  # a group over the budget runs alone
    assert R.chunk_spans(off, 1, 10 ** 9) == [(0, 6)]
    assert R.chunk_spans(off, 1, 0) == [(g, g + 1) for g in range(6)]


def test_kmeanspp_carry_continues_the_prefix_sums():
    """k-means++ over consecutive chunks of groups, each begun at the carry the previous one
    left, ends with bitwise the prefix sums (and centres) of one pass over all rows."""
    x, off = ragged([300, 41, 7, 520, 96], 6, seed=19)
    group = torch.repeat_interleave(torch.arange(5), off.diff())
    lay = R.prepare(x, torch.tensor([5, 2, 3, 8, 4]), group)
    u0, u = R.init_draws(lay, "k-means++", 3)
    whole = torch.zeros(lay.kmax - 1, 1 + u.shape[2], dtype=torch.float64)
    C = R.init_kmeanspp(TorchKernels, lay, torch.float64, u0, u, whole)
    carry, parts = torch.zeros_like(whole), []
    bounds = off.tolist()
    for g0, g1 in [(0, 2), (2, 3), (3, 5)]:
        a, b = bounds[g0], bounds[g1]
        sub = R.Layout(lay.x[a:b], lay.offsets[g0:g1 + 1] - a, lay.k[g0:g1], lay.kmax, None,
                       lay.point_group[a:b] - g0, max(off.diff()[g0:g1].tolist()))
        parts.append(R.init_kmeanspp(TorchKernels, sub, torch.float64, u0[g0:g1], u[:, g0:g1], carry))
    assert torch.equal(torch.cat(parts), C)
    assert torch.equal(carry, whole) and bool((whole > 0).all())


@needs_cpp
@pytest.mark.parametrize("init", ["k-means++", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_chunks_give_the_unchunked_result(init, dtype, monkeypatch):
    """On the CPU the C++ backend runs groups in cache-sized chunks; any chunking (here one group
    per chunk, and a few groups per chunk) gives bitwise the labels, centroids, inertia and
    iteration counts of one pass over the whole batch (k-means++ carries its prefix sums over)."""
    sizes = [37, 1, 130, 8, 900, 3, 64, 250]
    x, off = ragged(sizes, 9, dtype=dtype, seed=17)
    x[off[6]:off[7]] = x[off[6]:off[6] + 4].repeat(16, 1)  # 4 distinct points, k = 6: reseeding
    group = torch.repeat_interleave(torch.arange(len(sizes)), off.diff())
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(18))
    x, group = x[perm], group[perm]
    k = torch.tensor([3, 1, 5, 8, 4, 2, 6, 7])
    monkeypatch.setattr(R, "CPU_CHUNK_BYTES", 1 << 40)
    whole = kmeans(x, k, group, init=init, seed=2, backend="cpp")
    for budget in (0, 200 * x.shape[1] * x.element_size()):
        monkeypatch.setattr(R, "CPU_CHUNK_BYTES", budget)
        part = kmeans(x, k, group, init=init, seed=2, backend="cpp")
        for a, b in zip(part, whole):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), budget
    ref = kmeans_ref(x.double(), k, group, init=init, seed=2)
    assert bool((whole.labels >= 0).all()) and whole.n_iter.shape == ref.n_iter.shape


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
def test_same_seed_same_labels(backend):
    x, _ = ragged([700], 9, dtype=torch.float32, seed=8)
    a = kmeans(x, 5, seed=3, backend=backend)
    b = kmeans(x, 5, seed=3, backend=backend)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)


@needs_cpp
def test_cpp_independent_of_thread_count():
    x, _ = ragged([5000], 17, dtype=torch.float32, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = kmeans(x, 4, backend="cpp")
        torch.set_num_threads(2)
        b = kmeans(x, 4, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.inertia, b.inertia)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
def test_cosine_and_predict(backend):
    x, _ = ragged([300], 8, dtype=torch.float32, seed=10)
    group = torch.arange(300) % 3
    res = kmeans(x, 4, group, cosine=True, backend=backend)
    xn = torch.nn.functional.normalize(x, dim=1)
    plain = kmeans(xn, 4, group, backend=backend)
    assert torch.equal(res.labels, plain.labels)
    pred = kmeans_predict(x, res.centroids, 4, group, cosine=True, backend=backend)
    assert torch.equal(pred, res.labels)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(backend, dtype):
    """Half-precision points, fp32 accumulation: fp32 centroids, inertia close to the fp32 run."""
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(900, 12, centers=4, cluster_std=1.0, random_state=3)
    x = torch.tensor(X, dtype=torch.float32)
    group = torch.arange(900) % 2
    lo = kmeans(x.to(dtype), 4, group, backend=backend)
    hi = kmeans(x.to(dtype).float(), 4, group, backend=backend)
    assert lo.centroids.dtype == torch.float32 and lo.inertia.dtype == torch.float32
    assert torch.equal(lo.labels, hi.labels)
    assert rel_err(lo.inertia, hi.inertia) < 1e-5


@pytest.mark.gpu
def test_cuda_loop_syncs_do_not_grow_with_iterations():
    """The stopping test reads the device every GPU_SYNC_EVERY iterations, not every iteration."""
    import warnings

    from fastdg.ops.kmeans import GPU_SYNC_EVERY

    gen = torch.Generator().manual_seed(13)
    x = torch.randn(4000, 32, generator=gen).cuda()
    group = (torch.arange(4000) % 4).cuda()

    def syncs(max_iter):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                res = kmeans(x, 6, group, max_iter=max_iter, tol=0.0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught), int(res.n_iter.max())

    few, it_few = syncs(GPU_SYNC_EVERY)
    many, it_many = syncs(8 * GPU_SYNC_EVERY)
    assert many - few <= (it_many - it_few) // GPU_SYNC_EVERY + 1


# ---- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("call,exc,match", [
    (lambda x, g: kmeans(x[0], 2), ValueError, "x must be 2-D"),
    (lambda x, g: kmeans(x.long(), 2), TypeError, "x must have dtype"),
    (lambda x, g: kmeans(x[:0], 2), ValueError, "x must be non-empty"),
    (lambda x, g: kmeans(torch.where(x > 1, float("nan"), x), 2), ValueError, "x contains NaN or inf"),
    (lambda x, g: kmeans(torch.where(x > 1, float("inf"), x), 2), ValueError, "x contains NaN or inf"),
    (lambda x, g: kmeans(x, 2, g[:-1]), ValueError, "group must have one id per point"),
    (lambda x, g: kmeans(x, 2, g.float()), TypeError, "group must have dtype"),
    (lambda x, g: kmeans(x, 2, g - 1), ValueError, "group ids must be >= 0"),
    (lambda x, g: kmeans(x, 2, g.to("meta")), ValueError, "group is on meta but the input is on cpu"),
    (lambda x, g: kmeans(x, 11), ValueError, "k=11 is larger than group 0"),
    (lambda x, g: kmeans(x, 6, g), ValueError, "k=6 is larger than group"),
    (lambda x, g: kmeans(x, 0), ValueError, "k must be >= 1"),
    (lambda x, g: kmeans(x, 2.5), TypeError, "k must be an int"),
    (lambda x, g: kmeans(x, torch.tensor([2.0, 2.0]), g), TypeError, "k must be an int"),
    (lambda x, g: kmeans(x, torch.tensor([2]), g), ValueError, r"group must hold ids in \[0, 1\)"),
    (lambda x, g: kmeans(x, 2, init="forgy"), ValueError, "init must be one of"),
    (lambda x, g: kmeans(x, 2, max_iter=0), ValueError, "max_iter must be"),
    (lambda x, g: kmeans(x, 2, tol=-1.0), ValueError, "tol must be"),
    (lambda x, g: kmeans(x, 2, backend="triton"), ValueError, "not a backend of kmeans"),
    (lambda x, g: kmeans_predict(x, torch.zeros(1, 2, 5), 2), ValueError, "centroids must have D"),
    (lambda x, g: kmeans_predict(x, torch.zeros(2, 2, 3), torch.tensor([2.0, 2.0]), g), TypeError,
     "k must be an int or a"),
    (lambda x, g: kmeans_predict(x, torch.zeros(2, 2, 3), torch.tensor([2, 3]), g), ValueError,
     r"k must hold G = 2 values in \[1, 2\]"),
])
def test_bad_inputs(call, exc, match):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(10, 3, generator=gen) + 0.1
    g = torch.tensor([0, 1] * 5)
    with pytest.raises(exc, match=match):
        call(x, g)


# ---- opcheck -------------------------------------------------------------------------------

def _op_samples(device):
    x, off = ragged([9, 0, 5], 7, dtype=torch.float32, device=device, seed=12)
    C = centroids_for(x, off, 3)
    k = torch.tensor([3, 0, 2], device=device)
    lab = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, -1, 1, 0], device=device)
    return [
        (torch.ops.fastdg.kmeans_assign.default, (x, C, off, k)),
        (torch.ops.fastdg.kmeans_step.default, (x, C, off, k)),
        (torch.ops.fastdg.kmeans_update.default, (x, lab, off, 3)),
        (torch.ops.fastdg.kmeans_dist.default, (x, C, off)),
        (torch.ops.fastdg.kmeans_dist.default, (x.half(), C, off)),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    if device == "cpu" and not HAVE_CPP:
        pytest.skip(f"fastdg._C unavailable: {_ext.why_not()}")
    register_fakes()
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args)
