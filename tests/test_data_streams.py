"""DomainStreams / EvalLoader on tensor data sets (RotatedDigits, on the CPU): batches are the
right samples, epochs cover every sample once, seed categories give exactly B per category,
categories can be swapped, shards are disjoint, state_dict resumes exactly, inputs validated."""
import pytest
import torch

from fastdg.data import DomainStreams, EvalLoader, get_dataset, split_holdout


@pytest.fixture(scope="module")
def ds():
    return get_dataset("RotatedDigits", seed=0)


def subsets_of(ds, envs, frac=0.2):
    return [split_holdout(len(ds[e]), frac, seed=(0, e))[0] for e in envs]


def test_domain_mode_batches_are_the_indexed_samples(ds):
    envs = [0, 2, 5]
    subs = subsets_of(ds, envs)
    st = DomainStreams(ds, envs, 16, "cpu", seed=1, subsets=subs, return_index=True)
    assert st.backend == "tensor" and not st.category_mode
    for _ in range(3):
        batches = next(st)
        assert len(batches) == 3
        for (x, y, idx), e, sub in zip(batches, envs, subs):
            assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
            assert idx.min() >= 0 and idx.max() < sub.numel()
            assert torch.equal(x, ds[e].x[sub[idx]]) and torch.equal(y, ds[e].y[sub[idx]])


def test_domain_mode_epoch_covers_each_sample_once(ds):
    sub = torch.arange(48)
    st = DomainStreams(ds, [1, 3], 8, "cpu", subsets=[sub, sub], return_index=True)
    seen = [[], []]
    for _ in range(6):  # 6 x 8 = 48: exactly one epoch per env
        for k, (_, _, idx) in enumerate(next(st)):
            seen[k].append(idx)
    for s in seen:
        assert torch.equal(torch.cat(s).sort().values, sub)
    # a batch larger than the subset wraps into the next permutation
    st = DomainStreams(ds, [0], 50, "cpu", subsets=[torch.arange(20)], return_index=True)
    idx = next(st)[0][2]
    assert idx.numel() == 50 and torch.equal(idx[:20].sort().values, torch.arange(20))


def test_seed_is_reproducible(ds):
    a = [next(DomainStreams(ds, [0, 1], 8, "cpu", seed=5, return_index=True))[1][2] for _ in range(2)]
    b = next(DomainStreams(ds, [0, 1], 8, "cpu", seed=6, return_index=True))[1][2]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], b)


def test_category_mode_exactly_b_per_category(ds):
    envs = [0, 1, 2]
    subs = subsets_of(ds, envs)
    st = DomainStreams(ds, envs, 8, "cpu", seed=2, subsets=subs, per_category=5, return_index=True)
    total = st.total
    assert total == sum(s.numel() for s in subs) and st.num_categories == 3  # default: one per env
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (total,), generator=g)
    ids[:7] = torch.arange(7)  # every category present
    ids[ids == 6] = 5
    ids[10] = 6                # category 6 has one member: drawn 5 times
    st.set_categories(ids)
    x_all = torch.cat([ds[e].x[s] for e, s in zip(envs, subs)])
    for _ in range(4):
        batches = next(st)
        assert len(batches) == 7 == st.num_categories
        for c, (x, y, idx) in enumerate(batches):
            assert x.shape == (5, 1, 8, 8) and idx.shape == (5,)
            assert torch.all(ids[idx] == c)
            assert torch.equal(x, x_all[idx])
            if c < 6:
                assert idx.unique().numel() == 5  # no repeats within a step when the category is big enough
        env = st.env_of(batches[0][2])
        local = batches[0][2] - st.offsets[env]
        assert torch.equal(batches[0][1], torch.stack([ds[envs[e]].y[subs[e][i]] for e, i in zip(env, local)]))
    # swap again: fewer categories, takes effect at the next step
    st.set_categories(torch.arange(total) % 2)
    batches = next(st)
    assert len(batches) == 2 and all(torch.all(idx % 2 == c) for c, (_, _, idx) in enumerate(batches))


def test_category_validation(ds):
    st = DomainStreams(ds, [0, 1], 4, "cpu", per_category=3)
    with pytest.raises(ValueError, match=r"shape \(600,\)"):
        st.set_categories(torch.zeros(10, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        st.set_categories(torch.zeros(600))
    with pytest.raises(ValueError, match=">= 0"):
        st.set_categories(torch.full((600,), -1))
    bad = torch.zeros(600, dtype=torch.int64)
    bad[0] = 2
    with pytest.raises(ValueError, match=r"categories \[1\] have no samples"):
        st.set_categories(bad)
    plain = DomainStreams(ds, [0], 4, "cpu")
    with pytest.raises(ValueError, match="per_category"):
        plain.set_categories(torch.zeros(300, dtype=torch.int64))
    with pytest.raises(ValueError, match="per_category"):
        DomainStreams(ds, [0], 4, "cpu", per_category=0)


def test_shards_are_disjoint(ds):
    sub = torch.arange(30)
    seen = []
    for r in range(3):
        st = DomainStreams(ds, [0], 10, "cpu", subsets=[sub], return_index=True, shard_id=r, num_shards=3)
        seen.append(next(st)[0][2])
    assert torch.equal(torch.cat(seen).sort().values, sub)
    ids = torch.arange(30) % 3
    cat_seen = [next(DomainStreams(ds, [0], 4, "cpu", subsets=[sub], per_category=2, categories=ids,
                                   return_index=True, shard_id=r, num_shards=2)) for r in range(2)]
    for c in range(3):
        a, b = set(cat_seen[0][c][2].tolist()), set(cat_seen[1][c][2].tolist())
        assert not a & b and all(i % 3 == c for i in a | b)


@pytest.mark.parametrize("per_category", [None, 3])
def test_state_dict_resume(ds, per_category):
    kw = dict(seed=4, return_index=True, per_category=per_category)
    st = DomainStreams(ds, [0, 4], 7, "cpu", **kw)
    if per_category:
        st.set_categories(torch.arange(st.total) % 5)
    for _ in range(50):  # crosses permutation boundaries of the 300-sample envs
        next(st)
    state = st.state_dict()
    ref = [[b[2] for b in next(st)] for _ in range(60)]
    fresh = DomainStreams(ds, [0, 4], 7, "cpu", **kw)
    fresh.load_state_dict(state)
    got = [[b[2] for b in next(fresh)] for _ in range(60)]
    assert all(torch.equal(a, b) for ra, rb in zip(ref, got) for a, b in zip(ra, rb))
    with pytest.raises(ValueError, match="subset sizes"):
        DomainStreams(ds, [0], 7, "cpu").load_state_dict(state)


def test_eval_loader_sees_each_sample_once(ds):
    ev = EvalLoader(ds, 3, 64, "cpu", return_index=True)
    xs, ys, idx = zip(*ev)
    assert len(ev) == len(xs) == 5 and torch.equal(torch.cat(idx), torch.arange(299))
    assert torch.equal(torch.cat(xs), ds[3].x) and torch.equal(torch.cat(ys), ds[3].y)
    sub = split_holdout(299, 0.2, seed=(0, 3))[1]
    parts = [torch.cat([i for _, _, i in EvalLoader(ds, 3, 8, "cpu", subset=sub, return_index=True,
                                                    shard_id=r, num_shards=3)]) for r in range(3)]
    assert torch.equal(torch.cat(parts), torch.arange(sub.numel()))
    y = torch.cat([b[1] for b in EvalLoader(ds, 3, 8, "cpu", subset=sub)])
    assert torch.equal(y, ds[3].y[sub])


def test_stream_validation(ds):
    with pytest.raises(ValueError, match="env_indices"):
        DomainStreams(ds, [0, 9], 4, "cpu")
    with pytest.raises(ValueError, match="batch_size"):
        DomainStreams(ds, [0], 0, "cpu")
    with pytest.raises(ValueError, match="shard_id"):
        DomainStreams(ds, [0], 4, "cpu", shard_id=2, num_shards=2)
    with pytest.raises(TypeError, match="device"):
        DomainStreams(ds, [0], 4, "nodevice")
    with pytest.raises(ValueError, match=r"subsets\[0\] must hold positions in \[0, 300\)"):
        DomainStreams(ds, [0], 4, "cpu", subsets=[torch.tensor([0, 300])])
    with pytest.raises(TypeError, match="subsets"):
        DomainStreams(ds, [0], 4, "cpu", subsets=[torch.rand(4)])
    with pytest.raises(ValueError, match="env_index"):
        EvalLoader(ds, 6, 4, "cpu")


@pytest.mark.gpu
def test_tensor_streams_on_gpu(ds):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    st = DomainStreams(ds, [0, 1], 8, "cuda", per_category=4, return_index=True)
    x, y, idx = next(st)[1]
    assert x.is_cuda and y.is_cuda and idx.is_cuda and x.shape == (4, 1, 8, 8)
    assert torch.all(st.env_of(idx) == 1)
