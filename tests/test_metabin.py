"""MetaBIN: the metric losses against plain loops, the meta-learning of rho (which parameters
each stage touches, the clamp, held running statistics, first- vs second-order meta-gradients
checked by finite differences) and training on RotatedDigits."""
import math

import pytest
import torch
from torch.func import functional_call

from fastdg.algorithms import get_algorithm
from fastdg.algorithms.metabin import MetaBIN
from fastdg.algorithms.metric_losses import inter_domain_shuffle_loss, intra_domain_scatter, triplet_loss
from fastdg.nn import BatchInstanceNorm2d, hold_running_stats

SHAPE, CLASSES = (1, 8, 8), 4


def batches(n_domains=3, n=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *SHAPE, generator=g, dtype=dtype), torch.randint(0, CLASSES, (n,), generator=g))
            for _ in range(n_domains)]


# ---- losses vs loops ---------------------------------------------------------------------

def _dist(a, b):
    return math.sqrt(max(float((a * a).sum() + (b * b).sum() - 2 * (a * b).sum()), 1e-12))


def _loop_triplet(f, pos, neg, margin):
    """Plain Python: per anchor the farthest positive and nearest negative (anchors lacking
    either are skipped); hinge or softplus; mean over the kept anchors."""
    n, terms = f.shape[0], []
    for i in range(n):
        ps = [_dist(f[i], f[j]) for j in range(n) if pos(i, j)]
        ns = [_dist(f[i], f[j]) for j in range(n) if neg(i, j)]
        if not ps or not ns:
            continue
        z = max(ps) - min(ns)
        terms.append(max(0.0, z + margin) if margin > 0 else math.log1p(math.exp(z)))
    return sum(terms) / len(terms) if terms else 0.0


@pytest.mark.parametrize("margin", [0.3, 0.0])
def test_triplet_loss_matches_loop(margin):
    g = torch.Generator().manual_seed(1)
    f = torch.randn(13, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (13,), generator=g)
    got = triplet_loss(f, y, margin)
    want = _loop_triplet(f, lambda i, j: y[i] == y[j], lambda i, j: y[i] != y[j], margin)
    assert got.dtype == torch.float64
    assert abs(float(got) - want) < 1e-12 * max(1.0, abs(want))
    # anchors without any negative are skipped; a one-class batch gives 0 with a graph
    fr = f.clone().requires_grad_()
    out = triplet_loss(fr, torch.zeros(13, dtype=torch.int64), margin)
    assert float(out.detach()) == 0.0
    out.backward()
    assert torch.equal(fr.grad, torch.zeros_like(f))


def test_triplet_gradient_matches_autograd_of_a_loop():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3])
    triplet_loss(f, y, 0.3).backward()
    f2 = f.detach().clone().requires_grad_()
    terms = []
    for i in range(10):
        d = [((f2[i] - f2[j]).pow(2).sum()).clamp(min=1e-12).sqrt() for j in range(10)]
        dap = max((d[j] for j in range(10) if y[j] == y[i]), key=lambda t: float(t.detach()))
        dan = min((d[j] for j in range(10) if y[j] != y[i]), key=lambda t: float(t.detach()))
        terms.append(torch.relu(dap - dan + 0.3))
    torch.stack(terms).mean().backward()
    torch.testing.assert_close(f.grad, f2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_inter_domain_shuffle_matches_loop(margin):
    g = torch.Generator().manual_seed(3)
    f = torch.randn(14, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (14,), generator=g)
    dom = torch.randint(0, 3, (14,), generator=g)
    dom[0], y[0] = 2, 0
    dom[1:][dom[1:] == 2] = 1  # anchor 0 is alone in domain 2: no negative, skipped
    got = inter_domain_shuffle_loss(f, y, dom, margin)
    want = _loop_triplet(f, lambda i, j: i == j or dom[i] != dom[j],
                         lambda i, j: dom[i] == dom[j] and y[i] != y[j], margin)
    assert abs(float(got) - want) < 1e-12 * max(1.0, abs(want))
    # it differs from the ordinary triplet: it is a different objective, not a renaming
    assert abs(float(got) - float(triplet_loss(f, y, margin))) > 1e-3


def test_intra_domain_scatter_matches_loop():
    g = torch.Generator().manual_seed(4)
    f = torch.randn(11, 5, generator=g, dtype=torch.float64) + 0.5
    dom = torch.tensor([0, 0, 0, 2, 2, 2, 2, 0, 2, 0, 2])  # domain 1 absent
    got = intra_domain_scatter(f, dom, num_domains=3)
    per = []
    for d in (0, 2):
        rows = [f[i] / f[i].norm() for i in range(11) if dom[i] == d]
        c = sum(rows) / len(rows)
        per.append(sum(float((c @ r) / (c.norm() * r.norm())) for r in rows) / len(rows))
    assert abs(float(got) - sum(per) / 2) < 1e-12
    torch.testing.assert_close(intra_domain_scatter(f, dom), got)  # inferred num_domains
    # features equal within each domain: every cosine is 1
    same = torch.cat([torch.ones(3, 5), -torch.ones(4, 5)]).double()
    torch.testing.assert_close(intra_domain_scatter(same, torch.tensor([0] * 3 + [1] * 4), 2),
                               torch.tensor(1.0, dtype=torch.float64))


# ---- the algorithm -----------------------------------------------------------------------

def make(hp=None, domains=3, dtype=torch.float32):
    torch.manual_seed(0)
    alg = MetaBIN(SHAPE, CLASSES, domains, {"bin_rho_init": 0.5, **(hp or {})})
    return alg.to(dtype)


def test_featurizer_is_separate_affine_bin_and_other_norms_are_refused():
    alg = make()
    layers = [m for m in alg.featurizer.modules() if isinstance(m, BatchInstanceNorm2d)]
    assert len(layers) == 4 and all(m.separate_affine for m in layers)
    assert all(torch.equal(m.rho, torch.full_like(m.rho, 0.5)) for m in layers)
    assert get_algorithm("MetaBIN") is MetaBIN
    with pytest.raises(ValueError, match="norm='bin'"):
        MetaBIN(SHAPE, CLASSES, 3, {"norm": "group"})
    with pytest.raises(ValueError, match="bin_separate_affine=True"):
        MetaBIN(SHAPE, CLASSES, 3, {"bin_separate_affine": False})
    with pytest.raises(ValueError, match="metabin_order"):
        MetaBIN(SHAPE, CLASSES, 3, {"metabin_order": 3})


def _split(alg):
    rho_ids = {id(p) for p in alg.rho_params()}
    rho = [p.detach().clone() for p in alg.rho_params()]
    rest = [p.detach().clone() for p in alg.parameters() if id(p) not in rho_ids]
    return rho, rest


def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


def test_rho_changes_only_in_meta_step_and_the_rest_only_in_base_step():
    alg = make()
    mb = batches()
    rho0, rest0 = _split(alg)
    alg.base_step(mb)
    rho1, rest1 = _split(alg)
    assert _same(rho0, rho1) and not _same(rest0, rest1)
    assert all(p.grad is None for p in alg.rho_params())
    alg.meta_step(mb, split=([0, 1], [2]))
    rho2, rest2 = _split(alg)
    assert _same(rest1, rest2) and not _same(rho1, rho2)


def test_running_stats_are_held_in_the_meta_passes():
    alg = make()
    mb = batches()
    bufs = lambda: [b.clone() for b in alg.buffers()]  # noqa: E731
    b0 = bufs()
    alg.meta_step(mb, split=([0], [1, 2]))
    assert _same(b0, bufs())
    for order in (1, 2):
        alg.hparams["metabin_order"] = order
        alg.meta_step(mb)
        assert _same(b0, bufs())
    alg.base_step(mb)  # the base step does update them (so the check above can fail)
    assert not _same(b0, bufs())


def test_rho_stays_in_unit_interval():
    alg = make({"metabin_rho_lr_mult": 1e5, "metabin_inner_lr": 0.1})
    for step in range(4):
        stats = alg.update(batches(seed=step))
        rho = torch.cat([r.detach() for r in alg.rho_params()])
        assert float(rho.min()) >= 0.0 and float(rho.max()) <= 1.0
    assert bool(((rho == 0) | (rho == 1)).any())  # the huge lr drove some to the bounds
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad and torch.isfinite(v) for v in stats.values())


def _meta_objective(alg, rho_values, x_tr, y_tr, d_tr, x_te, y_te, alpha):
    """Independent of MetaBIN.rho_meta_gradient: F(rho) = L_mte(clamp(rho - alpha dL_mtr/drho))."""
    with hold_running_stats(alg.featurizer):
        f = functional_call(alg.featurizer, dict(zip(alg.rho_names, rho_values)), (x_tr,))
        l_tr = triplet_loss(f, y_tr, 0.3) + intra_domain_scatter(f, d_tr, 2) + inter_domain_shuffle_loss(f, y_tr, d_tr)
        grads = torch.autograd.grad(l_tr, rho_values, create_graph=True)
        new = [(r - alpha * g).clamp(0, 1) for r, g in zip(rho_values, grads)]
        assert all(bool(((n > 0) & (n < 1)).all()) for n in new)  # clamp inactive: F is smooth here
        f_te = functional_call(alg.featurizer, dict(zip(alg.rho_names, new)), (x_te,))
        return triplet_loss(f_te, y_te, 0.3), new


def test_meta_gradients_first_order_and_second_order_by_finite_differences():
    alg = make({"metabin_inner_lr": 1.0}, dtype=torch.float64)
    alg.base_step(batches(dtype=torch.float64))  # move away from the initial symmetric state
    mb = batches(seed=5, dtype=torch.float64)
    x_tr, y_tr = torch.cat([mb[0][0], mb[1][0]]), torch.cat([mb[0][1], mb[1][1]])
    d_tr = torch.tensor([0] * 8 + [1] * 8)
    x_te, y_te = mb[2]
    alpha = alg.inner_lr
    g1, _, _ = alg.rho_meta_gradient(x_tr, y_tr, d_tr, x_te, y_te, order=1, num_domains=2)
    g2, l_mtr, l_mte = alg.rho_meta_gradient(x_tr, y_tr, d_tr, x_te, y_te, order=2, num_domains=2)
    rho = [r.detach() for r in alg.rho_params()]

    # first order: the gradient of L_mte w.r.t. rho' at the (fixed) rho'
    _, new = _meta_objective(alg, [r.clone().requires_grad_() for r in rho], x_tr, y_tr, d_tr, x_te, y_te, alpha)
    fixed = [n.detach().requires_grad_() for n in new]
    with hold_running_stats(alg.featurizer):
        l_te = triplet_loss(functional_call(alg.featurizer, dict(zip(alg.rho_names, fixed)), (x_te,)), y_te, 0.3)
    torch.testing.assert_close(torch.autograd.grad(l_te, fixed), g1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(l_te.detach(), l_mte, rtol=1e-12, atol=0)

    # second order: central differences of F along random directions
    gen = torch.Generator().manual_seed(7)
    h = 1e-5
    for _ in range(2):
        v = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in rho]
        fp = _meta_objective(alg, [(r + h * d).requires_grad_() for r, d in zip(rho, v)],
                             x_tr, y_tr, d_tr, x_te, y_te, alpha)[0]
        fm = _meta_objective(alg, [(r - h * d).requires_grad_() for r, d in zip(rho, v)],
                             x_tr, y_tr, d_tr, x_te, y_te, alpha)[0]
        fd = float((fp - fm).detach()) / (2 * h)
        an2 = float(sum((g * d).sum() for g, d in zip(g2, v)))
        an1 = float(sum((g * d).sum() for g, d in zip(g1, v)))
        assert abs(an2 - fd) <= 1e-6 * max(1.0, abs(fd)), (an2, fd)
        assert abs(an1 - fd) > 1e-3 * abs(fd)  # the first-order gradient is a different quantity
    diff = max(float((a - b).abs().max()) for a, b in zip(g1, g2))
    assert diff > 1e-6


def test_split_is_random_reproducible_and_checkpointed():
    alg = make(domains=5)
    state = alg.extra_checkpoint_state()
    splits = [alg.split_domains(5) for _ in range(6)]
    assert all(len(tr) == 3 and len(te) == 2 and sorted(tr + te) == list(range(5)) for tr, te in splits)
    assert len({tuple(te) for _, te in splits}) > 1
    alg.load_extra_checkpoint_state(state)
    assert [alg.split_domains(5) for _ in range(6)] == splits
    assert alg.split_domains(1) == ([0], [0])
    alg.hparams["metabin_mtest_domains"] = 9
    assert len(alg.split_domains(5)[1]) == 4  # at least one meta-train domain remains


def test_updates_decrease_the_loss_on_rotated_digits():
    from fastdg.data import get_dataset

    ds = get_dataset("RotatedDigits")
    mb = [(ds[i].x[:24].float(), ds[i].y[:24]) for i in (1, 2, 3)]
    torch.manual_seed(0)
    alg = MetaBIN(ds.input_shape, ds.num_classes, 3, {"batch_size": 24})
    x, y = torch.cat([b[0] for b in mb]), torch.cat([b[1] for b in mb])

    def loss():
        with torch.no_grad(), hold_running_stats(alg.featurizer):
            return float(alg.base_loss(x, y)[0])

    before = loss()
    for _ in range(12):
        stats = alg.update(mb)
    after = loss()
    assert after < 0.7 * before, (before, after)
    assert set(stats) >= {"loss", "loss_ce", "loss_triplet", "loss_mtrain", "loss_mtest", "rho_mean"}


def test_clamp_is_straight_through_for_the_meta_gradient():
    """At rho = 1 many channels of rho - alpha g leave [0, 1]; the clamp is the identity for
    gradients (official), so the first-order meta-gradient is dL_mte/drho' there, not 0."""
    alg = make({"bin_rho_init": 1.0, "metabin_inner_lr": 1.0}, dtype=torch.float64)
    mb = batches(dtype=torch.float64)
    x_tr, y_tr = torch.cat([mb[0][0], mb[1][0]]), torch.cat([mb[0][1], mb[1][1]])
    d_tr = torch.tensor([0] * 8 + [1] * 8)
    g1, _, _ = alg.rho_meta_gradient(x_tr, y_tr, d_tr, *mb[2], order=1, num_domains=2)
    rhos = alg.rho_params()
    with hold_running_stats(alg.featurizer):
        f = alg.featurizer(x_tr)
        l_tr = triplet_loss(f, y_tr, 0.3) + intra_domain_scatter(f, d_tr, 2) + inter_domain_shuffle_loss(f, y_tr, d_tr)
        lin = [r.detach() - g for r, g in zip(rhos, torch.autograd.grad(l_tr, rhos))]
        fixed = [v.clamp(0, 1).requires_grad_() for v in lin]
        l_te = triplet_loss(functional_call(alg.featurizer, dict(zip(alg.rho_names, fixed)), (mb[2][0],)), mb[2][1])
        want = torch.autograd.grad(l_te, fixed)
    outside = torch.cat([(v > 1) | (v < 0) for v in lin])
    assert int(outside.sum()) > 10
    assert float(torch.cat(want)[outside].abs().max()) > 0
    torch.testing.assert_close(g1, want, rtol=1e-9, atol=1e-12)
