"""Self-balanced learning: the weighting network's range, the balanced meta batch, the
second-order meta-gradient of phi against a closed form on a linear model, and updates."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdg.algorithms import get_algorithm
from fastdg.algorithms.base import domain_ids
from fastdg.algorithms.self_balanced import SelfBalanced, WeightNet

SHAPE, CLASSES, DOMAINS = (1, 8, 8), 5, 3


def batches(n=10, seed=0, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, CLASSES, (n,), generator=g))
            for _ in range(DOMAINS)]


def test_weights_are_in_open_unit_interval():
    torch.manual_seed(0)
    net = WeightNet(DOMAINS, CLASSES, hidden=16)
    loss = torch.linspace(0, 10, 7).repeat_interleave(DOMAINS * CLASSES)
    dom = torch.arange(DOMAINS).repeat_interleave(CLASSES).repeat(7)
    cls = torch.arange(CLASSES).repeat(DOMAINS * 7)
    with torch.no_grad():
        w = net(loss, dom, cls)
    assert w.shape == loss.shape
    assert bool((w > 0).all() and (w < 1).all())
    # domain and class enter the weight: the same loss gets different weights
    assert float(w[:DOMAINS * CLASSES].std()) > 0


def test_meta_batch_is_domain_and_class_balanced():
    alg = SelfBalanced(SHAPE, CLASSES, DOMAINS, {})
    y = torch.tensor([0, 0, 0, 1, 2, 2, 0, 1, 1, 1, 1, 4])
    d = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2])
    m = alg.meta_weights(y, d)
    cells = d * CLASSES + y
    totals = {int(c): float(m[cells == c].sum()) for c in cells.unique()}
    assert len(totals) == 6 and all(abs(t - 1 / 6) < 1e-6 for t in totals.values())
    assert abs(float(m.sum()) - 1) < 1e-6
    alg.hparams["sb_meta_per_cell"] = 1
    state = alg.extra_checkpoint_state()
    draws = [alg.meta_weights(y, d) for _ in range(8)]
    for m in draws:
        assert all(int(((cells == c) & (m > 0)).sum()) == 1 for c in cells.unique())  # one sample per cell
        assert abs(float(m.sum()) - 1) < 1e-6 and torch.allclose(m[m > 0], torch.full((6,), 1 / 6))
    assert len({tuple(m.nonzero().flatten().tolist()) for m in draws}) > 1  # drawn at random
    alg.load_extra_checkpoint_state(state)
    assert all(torch.equal(a, alg.meta_weights(y, d)) for a in draws)  # reproducible from a checkpoint


def test_phi_gradient_matches_closed_form_on_a_linear_model():
    torch.manual_seed(0)
    a = 0.7
    alg = SelfBalanced(SHAPE, CLASSES, DOMAINS, {"sb_inner_lr": a, "sb_hidden": 12})
    alg.network = nn.Sequential(nn.Flatten(), nn.Linear(16, CLASSES)).double()
    alg.weight_net.double()
    mb = batches(n=7, seed=3, shape=(1, 4, 4), dtype=torch.float64)
    x, y = torch.cat([b[0] for b in mb]), torch.cat([b[1] for b in mb])
    d = domain_ids(mb, "cpu")
    m = alg.meta_weights(y, d).double()
    got, losses, w_alg, l_meta = alg.meta_gradient(x, y, d, m)

    # independent: per-sample gradients of softmax regression written out by hand
    N, X = len(y), x.flatten(1)
    W, b = alg.network[1].weight.detach(), alg.network[1].bias.detach()
    E = F.one_hot(y, CLASSES).double()
    P = torch.softmax(X @ W.t() + b, 1)
    l = -(E * P.log()).sum(1)
    w = alg.weight_net(l, d, y)                                  # keeps the graph to phi
    GW = (P - E).unsqueeze(2) * X.unsqueeze(1)                   # (N, C, 16)
    Gb = P - E
    wd = w.detach()
    W2 = W - a / N * (wd[:, None, None] * GW).sum(0)
    b2 = b - a / N * (wd[:, None] * Gb).sum(0)
    P2 = torch.softmax(X @ W2.t() + b2, 1)
    gW = (m[:, None, None] * (P2 - E).unsqueeze(2) * X.unsqueeze(1)).sum(0)
    gb = (m[:, None] * (P2 - E)).sum(0)
    c = -a / N * ((GW * gW).sum((1, 2)) + (Gb * gb).sum(1))      # dL_meta / dw_i
    want = torch.autograd.grad(w, list(alg.weight_net.parameters()), grad_outputs=c)

    torch.testing.assert_close(l_meta, (m * -(E * P2.log()).sum(1)).sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(w_alg, wd, rtol=1e-12, atol=0)
    assert all(float(g.abs().max()) > 0 for g in want)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-14)


def test_updates_run_and_theta_steps_with_the_new_weights():
    torch.manual_seed(0)
    alg = get_algorithm("SelfBalanced")(SHAPE, CLASSES, DOMAINS, {"sb_meta_lr": 0.05})
    for step in range(3):
        mb = batches(seed=step)
        old = copy.deepcopy(alg)
        phi0 = [p.detach().clone() for p in alg.weight_net.parameters()]
        captured = {}
        real_step = alg.optimizer.step

        def capture(*args, **kwargs):
            captured["g"] = [p.grad.clone() for p in alg.network.parameters()]
            return real_step(*args, **kwargs)

        alg.optimizer.step = capture
        stats = alg.update(mb)
        del alg.optimizer.step
        assert all(isinstance(v, torch.Tensor) and not v.requires_grad and torch.isfinite(v) for v in stats.values())
        assert 0 < float(stats["weight_min"]) <= float(stats["weight_max"]) < 1
        assert any(not torch.equal(a, b) for a, b in zip(phi0, alg.weight_net.parameters()))
        assert any(not torch.equal(a, b) for a, b in zip(old.network.parameters(), alg.network.parameters()))
        # theta's gradient: (1/N) sum w_new l at the old theta, w_new from the UPDATED phi
        x = torch.cat([b[0] for b in mb])
        y = torch.cat([b[1] for b in mb])
        losses = F.cross_entropy(old.network(x), y, reduction="none")
        with torch.no_grad():
            w_new = alg.weight_net(losses, domain_ids(mb, "cpu"), y)
            w_old = old.weight_net(losses, domain_ids(mb, "cpu"), y)
        assert not torch.equal(w_new, w_old)
        want = torch.autograd.grad((w_new * losses).mean(), list(old.network.parameters()))
        for g1, g2 in zip(captured["g"], want):
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats["weight_mean"], w_new.mean())


def test_bad_hparams():
    with pytest.raises(ValueError, match="sb_meta_per_cell"):
        SelfBalanced(SHAPE, CLASSES, DOMAINS, {"sb_meta_per_cell": -1})
