"""fastdg.cluster: the scikit-learn shaped KMeans and the seed-category re-distribution methods."""
import numpy as np
import pytest
import torch

from fastdg import ops
from fastdg.cluster import KMeans, adjacency, dominating_set, seed_categories


def points(n, d, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) + 0.25).to(dtype)


# ---- KMeans --------------------------------------------------------------------------------

def test_kmeans_sklearn_shape_ungrouped():
    from sklearn.datasets import load_digits

    X = load_digits().data  # numpy float64 in, like scikit-learn
    km = KMeans(8, seed=1)
    assert km.fit(X) is km
    assert km.labels_.shape == (len(X),) and km.labels_.dtype == torch.int64
    assert km.cluster_centers_.shape == (8, 64) and km.cluster_centers_.dtype == torch.float64
    assert isinstance(km.inertia_, float) and isinstance(km.n_iter_, int) and 1 <= km.n_iter_ <= 300
    assert torch.equal(km.predict(X), km.labels_)  # labels are the argmin to the returned centres
    d = torch.cdist(torch.as_tensor(X), km.cluster_centers_) ** 2
    assert abs(float(d.min(1).values.sum()) - km.inertia_) <= 1e-9 * km.inertia_
    assert torch.equal(KMeans(8, seed=1).fit_predict(X), km.labels_)


def test_kmeans_grouped_matches_op():
    x = points(600, 5, seed=2)
    group = torch.arange(600) % 3
    k = torch.tensor([2, 3, 4])
    km = KMeans(k, seed=4).fit(x, group)
    res = ops.kmeans(x, k, group, seed=4, max_iter=300)
    assert torch.equal(km.labels_, res.labels)
    assert km.cluster_centers_.shape == (3, 4, 5) and km.inertia_.shape == (3,) and km.n_iter_.shape == (3,)
    assert torch.equal(km.predict(x, group), km.labels_)
    # predict on a subset (some groups absent) still works
    sub = group != 1
    assert torch.equal(km.predict(x[sub], group[sub]), km.labels_[sub])


def test_kmeans_errors():
    x = points(50, 3)
    with pytest.raises(RuntimeError, match="before fit"):
        KMeans(3).predict(x)
    km = KMeans(3).fit(x)
    with pytest.raises(ValueError, match="group must be None"):
        km.predict(x, torch.zeros(50, dtype=torch.int64))
    km = KMeans(2).fit(x, torch.arange(50) % 2)
    with pytest.raises(ValueError, match="group is required"):
        km.predict(x)
    # Errors use scikit-learn's argument names (X, n_clusters), not the op's (x, k).
    with pytest.raises(ValueError, match="n_clusters=60 is larger than group 0"):
        KMeans(60).fit(x)
    with pytest.raises(ValueError, match="X must be 2-D"):
        KMeans(3).fit(x[0])
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        KMeans(3).fit(torch.where(x > 1, float("nan"), x))
    with pytest.raises(TypeError, match="X must have dtype"):
        KMeans(3).fit(x.long())
    with pytest.raises(TypeError, match="n_clusters must be an int"):
        KMeans(torch.tensor([2.0])).fit(x, torch.zeros(50, dtype=torch.int64))
    with pytest.raises(ValueError, match="centroids must have D = 2 features like X"):
        KMeans(3).fit(x).predict(x[:, :2])
    with pytest.raises(ValueError, match="X must be non-empty"):
        KMeans(3).fit(x).predict(x[:0])


# ---- seed_categories -----------------------------------------------------------------------

def labelled(n=400, seed=3):
    gen = torch.Generator().manual_seed(seed)
    emb = points(n, 6, seed=seed)
    domain = torch.randint(0, 3, (n,), generator=gen)
    classes = torch.randint(0, 2, (n,), generator=gen)
    losses = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    return emb, domain, classes, losses


@pytest.mark.parametrize("with_classes", [False, True])
def test_loss_rank_is_seed_assign_by_loss(with_classes):
    emb, domain, classes, losses = labelled()
    cls = classes if with_classes else None
    got = seed_categories("loss_rank", losses=losses, domain=domain, classes=cls, k=4)
    assert torch.equal(got, ops.seed_assign_by_loss(losses, domain, 4, classes=cls))


@pytest.mark.parametrize("with_classes", [False, True])
def test_kmeans_categories(with_classes):
    emb, domain, classes, _ = labelled()
    if with_classes:
        keep = ~((domain == 1) & (classes == 0))  # an absent (domain, class) pair
        emb, domain, classes = emb[keep], domain[keep], classes[keep]
    cls = classes if with_classes else None
    ids = seed_categories("kmeans", embeddings=emb, domain=domain, classes=cls, k=4, seed=5)
    group = domain if cls is None else domain * 2 + classes
    assert torch.equal(ids // 4, group)
    for g in group.unique().tolist():
        assert ids[group == g].unique().numel() == 4
    # the same clustering as one batched k-means call over the present groups
    present, local = torch.unique(group, return_inverse=True)
    assert torch.equal(ids % 4, ops.kmeans(emb, 4, local, seed=5).labels)
    assert torch.equal(ids, seed_categories("kmeans", embeddings=emb, domain=domain, classes=cls, k=4, seed=5))


@pytest.mark.parametrize("method", ["kmeans", "loss_rank"])
def test_small_group_error_names_domain_and_class(method):
    """k larger than a group: the error names the (domain, class) pair, not a compacted index
    of the present groups (here domain 0 / class 1 is absent, so they would differ)."""
    emb, domain, classes, losses = labelled()
    keep = ~((domain == 0) & (classes == 1))
    keep &= ~((domain == 2) & (classes == 0)) | (torch.cumsum(((domain == 2) & (classes == 0)).long(), 0) <= 3)
    emb, domain, classes, losses = emb[keep], domain[keep], classes[keep], losses[keep]
    assert int(((domain == 2) & (classes == 0)).sum()) == 3
    kw = dict(embeddings=emb) if method == "kmeans" else dict(losses=losses)
    with pytest.raises(ValueError, match=r"k=4 is larger than domain 2, class 0 \(3 samples\)"):
        seed_categories(method, domain=domain, classes=classes, k=4, **kw)
    few = torch.cat([domain[domain != 1], torch.ones(2, dtype=torch.int64)])
    kw = dict(embeddings=points(few.numel(), 6)) if method == "kmeans" else dict(losses=torch.rand(few.numel()))
    with pytest.raises(ValueError, match=r"k=4 is larger than domain 1 \(2 samples\)"):
        seed_categories(method, domain=few, k=4, **kw)


def naive_greedy(emb, xi):
    """The textbook greedy dominating set, recomputing every gain from scratch each round."""
    d = torch.cdist(emb.double(), emb.double())
    adj = d < xi
    adj.fill_diagonal_(True)
    covered = torch.zeros(len(emb), dtype=torch.bool)
    seeds = []
    while not bool(covered.all()):
        gain = (adj & ~covered[None, :]).sum(1)
        v = int(gain.argmax())
        seeds.append(v)
        covered |= adj[v]
    return seeds


@pytest.mark.parametrize("xi", [0.8, 1.5, 3.0])
def test_dominating_set_is_greedy_and_dominating(xi):
    emb = points(150, 3, seed=6, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    seeds, cat = dominating_set(emb, xi, gen, tile=64)  # several tiles
    assert seeds.tolist() == naive_greedy(emb, xi)
    # every sample is within xi of its seed, and each seed heads its own category
    dist = (emb - emb[seeds[cat]]).norm(dim=1)
    assert bool((dist < xi).all())
    assert torch.equal(cat[seeds], torch.arange(len(seeds)))


def test_dominating_set_extremes_and_seed():
    emb = points(80, 4, seed=7)
    gen = torch.Generator().manual_seed(0)
    seeds, cat = dominating_set(emb, 1e6, gen)
    assert seeds.numel() == 1 and bool((cat == 0).all())
    seeds, cat = dominating_set(emb, 1e-6, gen)
    assert seeds.numel() == 80 and torch.equal(seeds[cat], torch.arange(80))
    a = adjacency(emb, 1.7)
    assert torch.equal(a, a.T) and bool(a.diagonal().all())


def test_dominating_set_categories_global_ids():
    emb, domain, classes, _ = labelled(300)
    ids = seed_categories("dominating_set", embeddings=emb, domain=domain, xi=2.0, seed=1)
    again = seed_categories("dominating_set", embeddings=emb, domain=domain, xi=2.0, seed=1)
    assert torch.equal(ids, again)
    # consecutive ids, and no category spans two domains
    assert torch.equal(ids.unique(), torch.arange(int(ids.max()) + 1))
    for c in ids.unique().tolist():
        assert domain[ids == c].unique().numel() == 1
    other = seed_categories("dominating_set", embeddings=emb, domain=domain, xi=2.0, seed=2)
    assert torch.equal(ids.unique(), other.unique())  # same number of seeds; only the random joins differ


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(method="spectral"), ValueError, "method must be one of"),
    (dict(method="loss_rank"), ValueError, "needs losses"),
    (dict(method="kmeans"), ValueError, "needs embeddings"),
    (dict(method="dominating_set", use_emb=True), ValueError, "xi > 0"),
    (dict(method="dominating_set", use_emb=True, xi=-1.0), ValueError, "xi > 0"),
    (dict(method="kmeans", use_emb=True, k=0), ValueError, "k must be a positive int"),
    (dict(method="kmeans", use_emb=True, domain_dtype=torch.float32), TypeError, "domain must have dtype"),
    (dict(method="kmeans", use_emb=True, rows=5), ValueError, "embeddings must have one row per sample"),
])
def test_seed_categories_bad_inputs(kwargs, exc, match):
    emb, domain, _, _ = labelled(40)
    kw = dict(kwargs)
    method = kw.pop("method")
    if kw.pop("use_emb", False):
        kw["embeddings"] = emb[: kw.pop("rows", 40)]
    domain = domain.to(kw.pop("domain_dtype", torch.int64))
    with pytest.raises(exc, match=match):
        seed_categories(method, domain=domain, **kw)


def test_kmeans_categories_domain_by_class_batch():
    """A domain x class problem of PACS-like size (4 domains x 7 classes) runs as one batch."""
    gen = torch.Generator().manual_seed(8)
    n = 2800
    emb = torch.randn(n, 32, generator=gen)
    domain = torch.arange(n) % 4
    classes = (torch.arange(n) // 4) % 7
    ids = seed_categories("kmeans", embeddings=emb, domain=domain, classes=classes, k=4)
    assert ids.unique().numel() == 4 * 7 * 4
    assert np.array_equal((ids // 4).numpy(), (domain * 7 + classes).numpy())
