"""Algorithms: the DomainBed interface, tensor statistics, and each method's defining maths."""
import pytest
import torch
import torch.nn.functional as F

from fastdg.algorithms import ALGORITHMS, get_algorithm
from fastdg.algorithms.sagnet import content_randomize, style_randomize
from fastdg.profile import RoundProfiler

SHAPE, CLASSES, DOMAINS = (1, 8, 8), 10, 3


def batches(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *SHAPE, generator=g), torch.randint(0, CLASSES, (n,), generator=g))
            for _ in range(DOMAINS)]


@pytest.mark.parametrize("name", [n for n in ALGORITHMS if n != "SeedCategories"])
def test_update_returns_finite_tensor_stats_and_changes_weights(name):
    torch.manual_seed(0)
    alg = get_algorithm(name)(SHAPE, CLASSES, DOMAINS, {})
    before = [p.detach().clone() for p in alg.parameters()]
    stats = alg.update(batches())
    assert stats and all(isinstance(v, torch.Tensor) and not v.requires_grad for v in stats.values())
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, alg.parameters()))
    assert alg.predict(batches()[0][0]).shape == (8, CLASSES)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown algorithm 'Nope'"):
        get_algorithm("Nope")
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['lrr'\]"):
        get_algorithm("ERM")(SHAPE, CLASSES, DOMAINS, {"lrr": 1.0})


def test_groupdro_q_follows_the_per_domain_loop():
    torch.manual_seed(0)
    alg = get_algorithm("GroupDRO")(SHAPE, CLASSES, DOMAINS, {"groupdro_eta": 0.5})
    mb = batches()
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(alg.predict(x), y) for x, y in mb])
    expected = torch.full((DOMAINS,), 1 / DOMAINS) * torch.exp(0.5 * losses)
    expected /= expected.sum()
    alg.update(mb)
    torch.testing.assert_close(alg.q, expected, rtol=1e-5, atol=1e-7)


def test_seed_categories_redistribute_and_sample_exactly_b_per_category():
    torch.manual_seed(0)
    alg = get_algorithm("SeedCategories")(SHAPE, CLASSES, DOMAINS, {"seed_k": 4, "batch_size": 16})
    n = 120
    x, y = torch.randn(n, *SHAPE), torch.randint(0, CLASSES, (n,))
    dom = torch.arange(n) % DOMAINS
    cats = alg.recompute_categories(x, y, dom)
    assert cats.shape == (n,) and int(cats.max()) < alg.num_categories
    assert torch.equal(cats // 4, dom)  # categories nest inside domains
    torch.testing.assert_close(alg.q, torch.full((12,), 1 / 12))
    idx, cat = alg.sample_categories(torch.Generator().manual_seed(1))
    B = alg.per_category()
    assert B == 16 * DOMAINS // 12
    assert torch.equal(torch.bincount(cat, minlength=12), torch.full((12,), B))
    assert torch.equal(cats[idx], cat)  # every drawn sample belongs to the category it stands for
    stats = alg.update_categories(x[idx], y[idx], cat)
    assert torch.isfinite(stats["loss"]) and not torch.equal(alg.q, torch.full((12,), 1 / 12))
    assert alg.due(alg.hparams["seed_t0"]) and not alg.due(1)


def test_sagnet_randomisations():
    torch.manual_seed(0)
    x = torch.randn(5, 4, 6, 7, dtype=torch.float64) * 3 + 1
    ident = torch.arange(5)
    torch.testing.assert_close(style_randomize(x, ident, torch.rand(5, dtype=torch.float64), eps=0.0), x)
    torch.testing.assert_close(content_randomize(x, ident, eps=0.0), x)
    perm = torch.tensor([1, 2, 3, 4, 0])
    # alpha = 0: the style (per-(n, c) mean and unbiased variance) of sample perm[n]
    out = style_randomize(x, perm, torch.zeros(5, dtype=torch.float64), eps=0.0)
    torch.testing.assert_close(out.mean((2, 3)), x[perm].mean((2, 3)))
    torch.testing.assert_close(out.var((2, 3)), x[perm].var((2, 3)))
    out = content_randomize(x, perm, eps=0.0)
    torch.testing.assert_close(out.mean((2, 3)), x.mean((2, 3)))


def test_sagnet_randomness_is_injectable():
    torch.manual_seed(0)
    a = get_algorithm("SagNet")(SHAPE, CLASSES, DOMAINS, {})
    b = get_algorithm("SagNet")(SHAPE, CLASSES, DOMAINS, {})
    b.load_state_dict(a.state_dict())
    mb = batches()
    r = (torch.tensor([5, 3, 1, 0, 2, 4, 6, 7] * 3)[:24].argsort(), torch.full((24,), 0.3))
    sa, sb = a.update(mb, randomness=r), b.update(mb, randomness=r)
    torch.testing.assert_close(sa["loss"], sb["loss"])


@pytest.mark.parametrize("name", ["ERM", "GroupDRO", "SeedCategories", "IRM", "VREx", "MLDG", "SagNet"])
def test_update_marks_forward_backward_and_optimizer_phases(name):
    torch.manual_seed(0)
    alg = get_algorithm(name)(SHAPE, CLASSES, DOMAINS, {"batch_size": 8})
    prof = RoundProfiler("cpu")
    with prof.activate():
        if name == "SeedCategories":
            x, y = torch.randn(60, *SHAPE), torch.randint(0, CLASSES, (60,))
            with prof.phase("categories"):
                alg.recompute_categories(x, y, torch.arange(60) % DOMAINS)
            idx, cat = alg.sample_categories(torch.Generator().manual_seed(0))
            with prof.phase("update"):
                alg.update_categories(x[idx], y[idx], cat)
        else:
            with prof.phase("update"):
                alg.update(batches())
    s = prof.summary()
    assert set(s["phase_tree"]["update"]["children"]) == {"forward", "backward", "optimizer"}
    assert [p for p in s["phases_s"] if "/" not in p] == (["categories", "update"] if name == "SeedCategories"
                                                          else ["update"])
    if name == "SeedCategories":
        assert set(s["phase_tree"]["categories"]["children"]) == {"forward", "assign"}


def test_seed_categories_refuse_domainbed_update_and_point_at_the_supported_path():
    alg = get_algorithm("SeedCategories")(SHAPE, CLASSES, DOMAINS, {"batch_size": 8})
    before = [p.detach().clone() for p in alg.parameters()]
    with pytest.raises(NotImplementedError, match=r"fastdg train --algorithm SeedCategories.*update_categories"):
        alg.update(batches())
    assert all(torch.equal(a, b) for a, b in zip(before, alg.parameters()))  # GroupDRO's update did not run


def test_seed_categories_total_batch_is_fixed_or_refused():
    make = get_algorithm("SeedCategories")
    # per class: 10 classes x 3 domains x k 2 = 60 categories; batch 20 x 3 domains = 60 rows, one each
    alg = make(SHAPE, CLASSES, DOMAINS, {"batch_size": 20, "seed_k": 2, "seed_per_class": True})
    assert alg.num_categories == 60 and alg.per_category() == 1
    # 21 x 3 = 63 rows: rounded down to the largest multiple of |C| (60), never above
    assert make(SHAPE, CLASSES, DOMAINS, {"batch_size": 21, "seed_k": 2, "seed_per_class": True}).per_category() == 1
    assert make(SHAPE, CLASSES, DOMAINS, {"batch_size": 16}).per_category() * 12 == 16 * 3
    with pytest.raises(ValueError, match=r"60 categories, but the total batch .* = 57 .* batch_size to >= 20"):
        make(SHAPE, CLASSES, DOMAINS, {"batch_size": 19, "seed_k": 2, "seed_per_class": True})


BAD_HPARAMS = [  # (algorithm, hparams, exception, message naming the hyper-parameter)
    ("ERM", {"lr": "0.1"}, TypeError, "lr must be a number"),
    ("ERM", {"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
    ("ERM", {"lr": float("nan")}, ValueError, "lr must be a finite number"),
    ("ERM", {"weight_decay": -1e-4}, ValueError, "weight_decay must be a finite number >= 0"),
    ("ERM", {"batch_size": 0}, ValueError, "batch_size must be an int >= 1"),
    ("ERM", {"batch_size": 8.0}, TypeError, "batch_size must be an int"),
    ("ERM", {"batch_size": True}, TypeError, "batch_size must be an int"),
    ("ERM", {"norm": "layer"}, ValueError, "norm must be one of"),
    ("ERM", {"resnet_depth": 34}, ValueError, "resnet_depth must be one of"),
    ("ERM", {"resnet_depth": 50.0}, ValueError, "resnet_depth must be one of"),
    ("ERM", {"freeze_bn": "no"}, TypeError, "freeze_bn must be true or false"),
    ("ERM", {"pretrained_path": 3}, TypeError, "pretrained_path must be a file path"),
    ("ERM", {"pretrained_path": "/nonexistent/fastdg.pt"}, FileNotFoundError, "pretrained_path: no such file"),
    ("GroupDRO", {"groupdro_eta": -0.5}, ValueError, "groupdro_eta"),
    ("IRM", {"irm_lambda": -1.0}, ValueError, "irm_lambda"),
    ("IRM", {"irm_penalty_anneal_iters": 1.5}, TypeError, "irm_penalty_anneal_iters must be an int"),
    ("IRM", {"irm_loss_rescale": 1}, TypeError, "irm_loss_rescale must be true or false"),
    ("VREx", {"vrex_lambda": "big"}, TypeError, "vrex_lambda"),
    ("VREx", {"vrex_penalty_anneal_iters": -1}, ValueError, "vrex_penalty_anneal_iters"),
    ("MLDG", {"mldg_beta": -1.0}, ValueError, "mldg_beta"),
    ("MLDG", {"mldg_inner_lr": 0.0}, ValueError, "mldg_inner_lr"),
    ("SagNet", {"sag_w_adv": -0.1}, ValueError, "sag_w_adv"),
    ("SagNet", {"sag_clip_adv": 0.0}, ValueError, "sag_clip_adv"),
    ("SagNet", {"sag_eps": 0.0}, ValueError, "sag_eps"),
    ("SelfBalanced", {"sb_hidden": 0}, ValueError, "sb_hidden"),
    ("SelfBalanced", {"sb_meta_lr": 0.0}, ValueError, "sb_meta_lr"),
    ("SelfBalanced", {"sb_inner_lr": -1.0}, ValueError, "sb_inner_lr"),
    ("SelfBalanced", {"sb_meta_per_cell": 1.0}, TypeError, "sb_meta_per_cell"),
    ("MetaBIN", {"norm": "group"}, ValueError, "norm='bin'"),
    ("MetaBIN", {"bin_rho_init": 1.5}, ValueError, "bin_rho_init"),
    ("MetaBIN", {"metabin_order": 3}, ValueError, "metabin_order"),
    ("MetaBIN", {"metabin_optimizer": "rmsprop"}, ValueError, "metabin_optimizer"),
    ("MetaBIN", {"metabin_mtest_domains": 0}, ValueError, "metabin_mtest_domains"),
    ("MetaBIN", {"metabin_label_smoothing": 1.0}, ValueError, "metabin_label_smoothing"),
    ("MetaBIN", {"metabin_momentum": 1.0}, ValueError, "metabin_momentum"),
    ("MetaBIN", {"metabin_rho_lr_mult": 0.0}, ValueError, "metabin_rho_lr_mult"),
    ("SeedCategories", {"seed_k": 0}, ValueError, "seed_k"),
    ("SeedCategories", {"seed_t0": "5"}, TypeError, "seed_t0"),
    ("SeedCategories", {"seed_method": "median"}, ValueError, "seed_method must be one of"),
    ("SeedCategories", {"seed_per_class": 1}, TypeError, "seed_per_class"),
]


@pytest.mark.parametrize("name, hp, exc, message", BAD_HPARAMS)
def test_bad_hparam_values_are_refused_by_check_hparams_and_the_constructor(name, hp, exc, message):
    from fastdg.algorithms.base import resolve_hparams

    cls = get_algorithm(name)
    with pytest.raises(exc, match=message):
        cls.check_hparams(resolve_hparams(cls, hp))  # no model built: what the trainer runs before any work
    with pytest.raises(exc, match=message):
        cls(SHAPE, CLASSES, DOMAINS, hp)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_defaults_and_numpy_values_pass_the_checks(name):
    import numpy as np

    from fastdg.algorithms.base import resolve_hparams

    cls = get_algorithm(name)
    cls.check_hparams(resolve_hparams(cls, {}), CLASSES, DOMAINS)
    # DomainBed's random hparams may hold numpy scalars
    cls.check_hparams(resolve_hparams(cls, {"lr": np.float64(1e-3), "batch_size": np.int64(32)}), CLASSES, DOMAINS)


@pytest.mark.parametrize("name, rescale", [("IRM", False), ("VREx", False), ("IRM", True)])
def test_penalties_match_domainbed(name, rescale):
    """DomainBed's IRM / VREx update written out: loss = nll + w * penalty (w = lambda from the
    anneal step on), the optimizer reset at the anneal step, no division by w;
    irm_loss_rescale=True gives the original IRM script's loss / w. Plain SGD stands in for
    Adam (a subclass), so that the parameters compare exactly: Adam's normalised steps blow
    rounding differences of near-zero gradients up to the learning rate."""
    import copy

    p = name.lower()
    lam = 100.0 if p == "irm" else 10.0
    cls = type(f"SGD{name}", (get_algorithm(name),), {"make_optimizer": lambda self, ps: torch.optim.SGD(ps, lr=0.05)})
    torch.manual_seed(0)
    alg = cls(SHAPE, CLASSES, DOMAINS,
              {f"{p}_lambda": lam, f"{p}_penalty_anneal_iters": 1, f"{p}_loss_rescale": rescale})
    ref = copy.deepcopy(alg.network)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    first_opt = alg.optimizer
    for step in range(3):
        mb = batches(seed=step)
        stats = alg.update(mb)
        logits = torch.split(ref(torch.cat([x for x, _ in mb])), [len(y) for _, y in mb])
        nll = sum(F.cross_entropy(lg, y) for lg, (_, y) in zip(logits, mb)) / len(mb)
        if p == "irm":
            pens = []
            for lg, (_, y) in zip(logits, mb):
                scale = torch.tensor(1.0, requires_grad=True)
                g1 = torch.autograd.grad(F.cross_entropy(lg[::2] * scale, y[::2]), [scale], create_graph=True)[0]
                g2 = torch.autograd.grad(F.cross_entropy(lg[1::2] * scale, y[1::2]), [scale], create_graph=True)[0]
                pens.append(torch.sum(g1 * g2))
            penalty = sum(pens) / len(mb)
        else:
            losses = torch.stack([F.cross_entropy(lg, y) for lg, (_, y) in zip(logits, mb)])
            nll, penalty = losses.mean(), ((losses - losses.mean()) ** 2).mean()
        w = lam if step >= 1 else 1.0
        loss = nll + w * penalty
        if rescale and w > 1.0:
            loss = loss / w
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        torch.testing.assert_close(stats["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats["penalty"], penalty.detach(), rtol=1e-5, atol=1e-7)
        for a, b in zip(alg.network.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        if step == 0:
            assert alg.optimizer is first_opt
    assert alg.optimizer is not first_opt  # reset when update_count == anneal_iters, as DomainBed
