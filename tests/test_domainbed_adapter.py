"""fastdg.algorithms.domainbed.register against a minimal stand-in for a DomainBed checkout,
written to tmp_path with DomainBed's interface: algorithms.ALGORITHMS (a list of names),
algorithms.get_algorithm_class (a globals() look-up), hparams_registry._hparams(algorithm,
dataset, random_seed) -> {name: (default, random)} called at run time by default_hparams /
random_hparams, and a training loop shaped like domainbed/scripts/train.py."""
import collections
import importlib
import json
import pickle
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch

from fastdg.algorithms import MetaBIN, SelfBalanced
from fastdg.algorithms.domainbed import register, stats_to_floats, translate_hparams

ALGORITHMS_PY = '''
import torch
import torch.nn.functional as F

ALGORITHMS = ["ERM", "GroupDRO"]


def get_algorithm_class(algorithm_name):
    """Return the algorithm class with the given name (DomainBed looks in globals())."""
    if algorithm_name not in globals():
        raise NotImplementedError("Algorithm not found: {}".format(algorithm_name))
    return globals()[algorithm_name]


class Algorithm(torch.nn.Module):
    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__()
        self.hparams = hparams

    def update(self, minibatches, unlabeled=None):
        raise NotImplementedError

    def predict(self, x):
        raise NotImplementedError


class ERM(Algorithm):
    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        n = 1
        for s in input_shape:
            n *= s
        self.network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n, num_classes))
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=hparams["lr"])

    def update(self, minibatches, unlabeled=None):
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.predict(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def predict(self, x):
        return self.network(x)


class GroupDRO(ERM):
    pass
'''

REGISTRY_PY = '''
import hashlib

import numpy as np


def seed_hash(*args):
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2 ** 31)


def _hparams(algorithm, dataset, random_seed):
    """{name: (default, random)}."""
    small = ["Debug28", "RotatedMNIST", "ColoredMNIST"]
    hparams = {}

    def _hparam(name, default_val, random_val_fn):
        assert name not in hparams
        hparams[name] = (default_val, random_val_fn(np.random.RandomState(seed_hash(random_seed, name))))

    _hparam("data_augmentation", True, lambda r: True)
    _hparam("resnet18", False, lambda r: False)
    _hparam("resnet_dropout", 0.0, lambda r: r.choice([0.0, 0.1, 0.5]))
    _hparam("class_balanced", False, lambda r: False)
    _hparam("nonlinear_classifier", False, lambda r: False)
    if algorithm == "GroupDRO":
        _hparam("groupdro_eta", 1e-2, lambda r: 10 ** r.uniform(-3, -1))
    _hparam("lr", 1e-3 if dataset in small else 5e-5, lambda r: 10 ** r.uniform(-4.5, -2.5))
    _hparam("weight_decay", 0.0, lambda r: 0.0)
    _hparam("batch_size", 64 if dataset in small else 32, lambda r: int(2 ** r.uniform(3, 9)))
    return hparams


def default_hparams(algorithm, dataset):
    return {a: b for a, (b, c) in _hparams(algorithm, dataset, 0).items()}


def random_hparams(algorithm, dataset, seed):
    return {a: c for a, (b, c) in _hparams(algorithm, dataset, seed).items()}
'''


@pytest.fixture
def domainbed(tmp_path, monkeypatch):
    """A fresh stand-in package per test (a unique name, so no module state leaks)."""
    name = f"fakebed_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "algorithms.py").write_text(textwrap.dedent(ALGORITHMS_PY))
    (pkg / "hparams_registry.py").write_text(textwrap.dedent(REGISTRY_PY))
    monkeypatch.syspath_prepend(str(tmp_path))
    algorithms = importlib.import_module(f"{name}.algorithms")
    registry = importlib.import_module(f"{name}.hparams_registry")
    yield algorithms, registry
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def _minibatches(n_domains, seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(n_domains)]


def _domainbed_train(algorithms, registry, name, hparams_seed=0, steps=3):
    """What domainbed/scripts/train.py does with an algorithm."""
    if hparams_seed == 0:
        hparams = registry.default_hparams(name, "RotatedMNIST")
    else:
        hparams = registry.random_hparams(name, "RotatedMNIST", hparams_seed)
    hparams.update({"batch_size": 8})
    algorithm = algorithms.get_algorithm_class(name)((1, 8, 8), 4, 3, hparams)
    algorithm.to("cpu")
    checkpoint_vals = collections.defaultdict(list)
    for step in range(steps):
        step_vals = algorithm.update(_minibatches(3, step), None)
        for key, val in step_vals.items():
            checkpoint_vals[key].append(val)
    results = {key: np.mean(val) for key, val in checkpoint_vals.items()}
    results["acc"] = float((algorithm.predict(_minibatches(1, 9)[0][0]).argmax(1) >= 0).float().mean())
    results.update({"hparams": hparams})
    json.dumps(results, sort_keys=True)  # DomainBed writes this line to results.jsonl
    return algorithm, hparams, step_vals, results


@pytest.mark.parametrize("name", ["MetaBIN", "SelfBalanced"])
def test_domainbed_finds_and_trains_registered_algorithms(domainbed, name):
    algorithms, registry = domainbed
    erm_defaults = registry.default_hparams("ERM", "RotatedMNIST")
    added = register(algorithms, registry, names=["MetaBIN", "SelfBalanced"])
    assert set(added) == {"MetaBIN", "SelfBalanced"}
    assert algorithms.ALGORITHMS[-2:] == ["MetaBIN", "SelfBalanced"]
    assert registry.default_hparams("ERM", "RotatedMNIST") == erm_defaults  # others untouched

    alg, hparams, step_vals, results = _domainbed_train(algorithms, registry, name)
    assert isinstance(alg, {"MetaBIN": MetaBIN, "SelfBalanced": SelfBalanced}[name])
    assert isinstance(alg, algorithms.get_algorithm_class(name))
    assert step_vals and all(type(v) is float for v in step_vals.values())
    assert np.isfinite(results["loss"])
    # DomainBed's shared names keep DomainBed's values; fastdg's own names are added
    assert hparams["lr"] == 1e-3 and hparams["batch_size"] == 8
    prefix = "metabin_" if name == "MetaBIN" else "sb_"
    assert any(k.startswith(prefix) for k in hparams) and "resnet_depth" not in hparams
    assert alg.hparams["lr"] == 1e-3
    assert alg.ignored_hparams == ["class_balanced", "data_augmentation", "resnet_dropout"]
    # random hparams work (fastdg's extras: the default as the random value)
    rand = registry.random_hparams(name, "RotatedMNIST", 5)
    assert rand["lr"] != hparams["lr"] and all(rand[k] == hparams[k] for k in hparams if k.startswith(prefix))
    _domainbed_train(algorithms, registry, name, hparams_seed=5, steps=1)
    # checkpoints: the state dict reloads into a fresh instance; the class pickles by name
    fresh = algorithms.get_algorithm_class(name)((1, 8, 8), 4, 3, hparams)
    fresh.load_state_dict(alg.state_dict())
    x = _minibatches(1, 4)[0][0]
    alg.eval(), fresh.eval()
    torch.testing.assert_close(fresh.predict(x), alg.predict(x))
    assert pickle.loads(pickle.dumps(type(alg))) is type(alg)


def test_default_names_collisions_prefix_and_replace(domainbed):
    algorithms, registry = domainbed
    own_erm, own_dro = algorithms.ERM, algorithms.GroupDRO
    added = register(algorithms, registry)
    assert {"MetaBIN", "SelfBalanced", "MLDG", "SagNet"} <= set(added)
    assert "ERM" not in added and "GroupDRO" not in added and "SeedCategories" not in added
    assert algorithms.get_algorithm_class("ERM") is own_erm and algorithms.GroupDRO is own_dro
    n = len(algorithms.ALGORITHMS)
    assert len(set(algorithms.ALGORITHMS)) == n
    register(algorithms, registry)  # again: harmless
    assert len(algorithms.ALGORITHMS) == n
    assert not hasattr(registry._hparams.__wrapped__, "__wrapped__")  # wrapped once

    with pytest.raises(ValueError, match="already defines 'GroupDRO'"):
        register(algorithms, registry, names=["GroupDRO"])
    register(algorithms, registry, names=["GroupDRO"], prefix="fastdg_")
    hp = registry.default_hparams("fastdg_GroupDRO", "RotatedMNIST")
    assert hp["groupdro_eta"] == 1e-2 and hp["norm"] == "group"
    _domainbed_train(algorithms, registry, "fastdg_GroupDRO", steps=1)
    register(algorithms, registry, names="GroupDRO", replace=True)
    assert algorithms.GroupDRO is not own_dro and algorithms.ALGORITHMS.count("GroupDRO") == 1
    assert registry.default_hparams("GroupDRO", "RotatedMNIST")["groupdro_eta"] == 1e-2  # DomainBed's entry

    with pytest.raises(ValueError, match="needs fastdg's trainer"):
        register(algorithms, registry, names=["SeedCategories"])
    with pytest.raises(ValueError, match="unknown fastdg algorithm"):
        register(algorithms, registry, names=["Nope"])
    with pytest.raises(TypeError, match="DomainBed's algorithms module"):
        register(registry)


def test_without_a_registry_and_hparam_translation(domainbed):
    algorithms, _ = domainbed
    register(algorithms, names=["SelfBalanced"])
    alg = algorithms.get_algorithm_class("SelfBalanced")((1, 8, 8), 4, 3, {"lr": 1e-3, "batch_size": 8,
                                                                            "resnet_dropout": 0.1})
    assert alg.ignored_hparams == ["resnet_dropout"]
    out, ignored = translate_hparams(MetaBIN, {"resnet18": True, "lr": 0.1, "mixup_alpha": 0.2})
    assert out == {"resnet_depth": 18, "lr": 0.1} and ignored == ["mixup_alpha"]
    assert translate_hparams(MetaBIN, {"resnet18": False})[0] == {}


def test_stats_to_floats():
    out = stats_to_floats({"a": torch.tensor(2.5), "b": torch.tensor([1.0, 3.0]), "c": 7,
                           "d": torch.tensor(1, dtype=torch.int64)})
    assert out == {"a": 2.5, "b": 2.0, "c": 7, "d": 1.0}
    assert all(type(out[k]) is float for k in "abd")


def test_domainbed_hparams_are_checked_and_seed_categories_update_is_refused(domainbed):
    """Random DomainBed hparams (numpy scalars included) pass fastdg's checks; a bad value fails
    in the constructor, naming it; SeedCategories (wrapped by hand: register refuses it) raises
    instead of silently running GroupDRO's update."""
    from fastdg.algorithms import SeedCategories
    from fastdg.algorithms.domainbed import wrap

    algorithms, registry = domainbed
    register(algorithms, registry, names=["SelfBalanced"])
    hp = registry.random_hparams("SelfBalanced", "RotatedMNIST", 3)
    hp["batch_size"] = np.int64(8)
    cls = algorithms.get_algorithm_class("SelfBalanced")
    cls((1, 8, 8), 4, 3, hp).update(_minibatches(3))
    with pytest.raises(ValueError, match="hyper-parameter lr must be a finite number > 0"):
        cls((1, 8, 8), 4, 3, {**hp, "lr": -1e-3})
    seed = wrap(SeedCategories)((1, 8, 8), 4, 3, {"batch_size": 8})
    with pytest.raises(NotImplementedError, match="update_categories"):
        seed.update(_minibatches(3))
