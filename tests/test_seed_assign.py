"""seed_assign_by_loss against an independent per-group loop (METHODS.md section 3)."""
import pytest
import torch

from fastdg.ops import seed_assign_by_loss


def loop_oracle(losses, group, k):
    out = torch.empty_like(group)
    for g in group.unique().tolist():
        idx = torch.nonzero(group == g).flatten()
        order = sorted(idx.tolist(), key=lambda i: (losses[i].item(), i))
        n = len(order)
        for r, i in enumerate(order):
            out[i] = g * k + (r * k) // n
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_loop_and_bins_are_balanced(dtype):
    gen = torch.Generator().manual_seed(3)
    domain = torch.randint(0, 5, (503,), generator=gen)
    losses = torch.rand(503, generator=gen, dtype=dtype) * 3
    ids = seed_assign_by_loss(losses, domain, 4)
    assert torch.equal(ids, loop_oracle(losses, domain, 4))
    for d in range(5):
        sizes = torch.bincount(ids[domain == d] - d * 4, minlength=4)
        assert sizes.max() - sizes.min() <= 1
        # bins are ordered by loss: every loss of bin b is <= every loss of bin b + 1
        for b in range(3):
            lo = losses[(ids == d * 4 + b)].max()
            hi = losses[(ids == d * 4 + b + 1)].min()
            assert lo <= hi


def test_domain_by_class_groups_and_ties():
    domain = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
    classes = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    losses = torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1, 0.3, 0.2])
    ids = seed_assign_by_loss(losses, domain, 2, classes=classes, num_classes=2)
    # ties broken by index; group = domain * 2 + class
    assert ids.tolist() == [0, 0, 1, 1, 5, 5, 4, 4, 3, 2, 3, 2]
    assert torch.equal(ids, loop_oracle(losses, domain * 2 + classes, 2))


def test_bad_inputs():
    losses, domain = torch.rand(10), torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"k=11 is larger than domain 0 \(10 samples\)"):
        seed_assign_by_loss(losses, domain, 11)
    cls = torch.tensor([0] * 8 + [1] * 2)  # domain 0, class 1 has 2 samples: global group 1
    with pytest.raises(ValueError, match=r"k=3 is larger than domain 0, class 1 \(2 samples\)"):
        seed_assign_by_loss(losses, domain, 3, classes=cls)
    with pytest.raises(ValueError, match="NaN"):
        seed_assign_by_loss(torch.tensor([float("nan")] * 10), domain, 2)
    with pytest.raises(TypeError, match="domain must have dtype"):
        seed_assign_by_loss(losses, domain.float(), 2)
    with pytest.raises(ValueError, match="domain must have shape"):
        seed_assign_by_loss(losses, domain[:5], 2)
    with pytest.raises(ValueError, match="k must be a positive int"):
        seed_assign_by_loss(losses, domain, 0)
    with pytest.raises(ValueError, match="classes must hold ids"):
        seed_assign_by_loss(losses, domain, 2, classes=torch.full((10,), 3), num_classes=2)
