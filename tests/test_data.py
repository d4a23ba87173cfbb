"""Tensor data sets (DomainBed constructions) and on-device loaders."""
import pytest
import torch

from fastdg.data import (DATASETS, DomainStreams, EvalLoader, get_dataset, read_mnist, rotate,
                         split_holdout)


def test_rotation_is_counter_clockwise_like_torchvision():
    x = torch.rand(3, 2, 6, 6)
    torch.testing.assert_close(rotate(x, 90), torch.rot90(x, 1, (2, 3)))
    torch.testing.assert_close(rotate(x, 0), x)


def test_rotated_digits_construction():
    ds = get_dataset("RotatedDigits", seed=3)
    assert ds.environments == ["0", "15", "30", "45", "60", "75"] and ds.num_classes == 10
    assert ds.input_shape == (1, 8, 8) and not ds.is_image
    assert sum(len(e) for e in ds.domains) == 1797
    assert [len(e) for e in ds.domains] == [300, 300, 300, 299, 299, 299]  # split by stride
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(3))
    images = torch.tensor(d.images, dtype=torch.float32)[perm][:, None] / 16
    for i, angle in enumerate((0, 15, 30, 45, 60, 75)):
        torch.testing.assert_close(ds[i].x, rotate(images[i::6], angle))
        assert torch.equal(ds[i].y, torch.tensor(d.target)[perm][i::6])


def test_colored_digits_agreement_and_noise():
    ds = get_dataset("ColoredDigits", seed=0)
    assert ds.num_classes == 2 and ds.input_shape == (2, 8, 8)
    for env, e in zip(ds.domains, (0.1, 0.2, 0.9)):
        lit = env.x.flatten(2).sum(-1) > 0
        assert not (lit[:, 0] & lit[:, 1]).any()        # one colour channel per image
        colour = lit[:, 1].long()
        agree = (colour == env.y).float().mean().item()
        assert abs(agree - (1 - e)) < 0.06, (agree, e)  # ~600 samples: 4 sigma


@pytest.mark.slow
def test_mnist_variants_from_raw_files(data_dir):
    x, y = read_mnist(data_dir)
    assert x.shape == (70000, 1, 28, 28) and y.shape == (70000,) and 0 <= x.min() and x.max() <= 1
    rot = get_dataset("RotatedMNIST", data_dir)
    assert sum(len(e) for e in rot.domains) == 70000 and rot.input_shape == (1, 28, 28)
    col = get_dataset("ColoredMNIST", data_dir)
    assert col.input_shape == (2, 28, 28)
    for env, e in zip(col.domains, (0.1, 0.2, 0.9)):
        colour = (env.x[:, 1].flatten(1).sum(-1) > 0).long()
        assert abs((colour == env.y).float().mean().item() - (1 - e)) < 0.015
    # 25% label noise relative to the digit: recover the digits by the same permutation
    perm = torch.randperm(70000, generator=torch.Generator().manual_seed(0))
    digits = y[perm]
    noise = torch.cat([((digits[i::3] < 5).long() != col[i].y).float() for i in range(3)]).mean().item()
    assert abs(noise - 0.25) < 0.01


def test_split_holdout_is_seeded_and_disjoint():
    a_tr, a_ho = split_holdout(101, 0.2, seed=(0, 1))
    b_tr, b_ho = split_holdout(101, 0.2, seed=(0, 1))
    c_tr, _ = split_holdout(101, 0.2, seed=(0, 2))
    assert torch.equal(a_tr, b_tr) and torch.equal(a_ho, b_ho) and not torch.equal(a_tr, c_tr)
    assert len(a_ho) == 20 and sorted(torch.cat([a_tr, a_ho]).tolist()) == list(range(101))


def test_streams_and_eval_loader():
    ds = get_dataset("RotatedDigits")
    subsets = [torch.arange(0, 50), torch.arange(10, 20)]
    s = DomainStreams(ds, [1, 4], 7, "cpu", seed=5, subsets=subsets)
    state = s.state_dict()
    first = next(iter(s))
    assert [b[0].shape for b in first] == [(7, 1, 8, 8)] * 2
    allowed = ds[4].x[10:20].flatten(1)
    assert all((allowed == row).all(1).any() for row in first[1][0].flatten(1))  # drawn from the subset
    s.load_state_dict(state)
    again = next(s)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # resumable sampling
    ev = EvalLoader(ds, 2, 64, "cpu", subset=torch.arange(100, 230))
    xs = torch.cat([x for x, _ in ev])
    assert torch.equal(xs, ds[2].x[100:230]) and len(ev) == 3


def test_bad_input():
    with pytest.raises(ValueError, match="unknown data set 'Nope'"):
        get_dataset("Nope")
    with pytest.raises(ValueError, match="MNIST raw files missing"):
        get_dataset("RotatedMNIST", "/nonexistent")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        DomainStreams(get_dataset("RotatedDigits"), [0], 0, "cpu")
    assert set(DATASETS) >= {"RotatedDigits", "ColoredDigits", "RotatedMNIST", "ColoredMNIST"}
