"""The algorithm interface, compatible with DomainBed's:

    alg = Algorithm(input_shape, num_classes, num_domains, hparams)
    stats = alg.update(minibatches)      # one (x, y) batch per training domain
    logits = alg.predict(x)

Unlike DomainBed, `update` returns its statistics as detached tensors, never Python floats:
reading them is the caller's choice, so a training step forces no host synchronisation.
Hyper-parameters: every algorithm lists its own with defaults; an unknown name is an error.
Profiling: updates mark their "forward", "backward" and "optimizer" parts with
fastdg.profile.phase (a no-op unless a RoundProfiler is active; no synchronisation).
"""
from __future__ import annotations

import math
import numbers
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..networks import featurizer
from ..profile import phase

COMMON_HPARAMS = {
    "lr": 1e-3,
    "weight_decay": 0.0,
    "batch_size": 32,          # per training domain
    "norm": "group",           # MNIST CNN normalisation: group | batch | bin
    "resnet_depth": 50,
    "pretrained_path": None,   # local state_dict for ResNets (never downloaded)
    "freeze_bn": True,
    "nonlinear_classifier": False,
}


# ---- value checks: a wrong type is a TypeError, a value out of range a ValueError, both
# naming the hyper-parameter (numpy scalars pass: DomainBed's random hparams can be numpy).

def _range_text(low, high, low_open, high_open):
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def check_real(hp, name, low=None, high=None, low_open=False, high_open=False, none_ok=False):
    v = hp[name]
    if v is None and none_ok:
        return
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"hyper-parameter {name} must be a number{' or None' if none_ok else ''}, "
                        f"got {type(v).__name__} {v!r}")
    bad = not math.isfinite(v)
    bad = bad or (low is not None and (v <= low if low_open else v < low))
    bad = bad or (high is not None and (v >= high if high_open else v > high))
    if bad:
        rng = _range_text(low, high, low_open, high_open)
        raise ValueError(f"hyper-parameter {name} must be a finite number{' ' + rng if rng else ''}, got {v!r}")


def check_int(hp, name, low=None, none_ok=False):
    v = hp[name]
    if v is None and none_ok:
        return
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"hyper-parameter {name} must be an int{' or None' if none_ok else ''}, "
                        f"got {type(v).__name__} {v!r}")
    if low is not None and v < low:
        raise ValueError(f"hyper-parameter {name} must be an int >= {low}, got {v!r}")


def check_bool(hp, name):
    v = hp[name]
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"hyper-parameter {name} must be true or false, got {type(v).__name__} {v!r}")


def check_choice(hp, name, choices):
    v = hp[name]
    # bool is an int: True must not pass for 1; nor 50.0 for the int 50
    ok = not isinstance(v, (bool, np.bool_)) and v in choices
    if ok and all(isinstance(c, int) for c in choices):
        ok = isinstance(v, numbers.Integral)
    if not ok:
        raise ValueError(f"hyper-parameter {name} must be one of {list(choices)}, got {v!r}")


def check_common_hparams(hp: dict) -> None:
    check_real(hp, "lr", low=0, low_open=True)
    check_real(hp, "weight_decay", low=0)
    check_int(hp, "batch_size", low=1)
    check_choice(hp, "norm", ("group", "batch", "bin"))
    check_choice(hp, "resnet_depth", (18, 50))
    check_bool(hp, "freeze_bn")
    check_bool(hp, "nonlinear_classifier")
    path = hp["pretrained_path"]
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"hyper-parameter pretrained_path must be a file path or None, got {type(path).__name__}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"hyper-parameter pretrained_path: no such file {os.fspath(path)!r} (a local "
                                    "state_dict; fastdg never downloads weights)")


def default_hparams(cls) -> dict:
    out = dict(COMMON_HPARAMS)
    for klass in reversed(cls.__mro__):
        out.update(getattr(klass, "HPARAMS", {}))
    return out


def resolve_hparams(cls, hparams: dict | None) -> dict:
    out = default_hparams(cls)
    unknown = sorted(set(hparams or {}) - set(out))
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown} for {cls.__name__}; known: {sorted(out)}")
    out.update(hparams or {})
    return out


class Algorithm(nn.Module):
    """Base class. Subclasses set HPARAMS (their extra defaults) and implement update()."""

    HPARAMS: dict = {}

    def __init__(self, input_shape, num_classes, num_domains, hparams=None):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.hparams = resolve_hparams(type(self), hparams)
        type(self).check_hparams(self.hparams, num_classes, num_domains)

    @classmethod
    def check_hparams(cls, hparams: dict, num_classes: int | None = None, num_domains: int | None = None) -> None:
        """Raise TypeError / ValueError (FileNotFoundError for a missing pretrained_path), naming
        the hyper-parameter, for a value the algorithm cannot use. `hparams` are resolved (every
        name present). Called by the trainer's config check before any work (with the data
        set's num_classes and number of training domains once it is loaded) and by the
        constructor. Subclasses extend it and call super() first."""
        check_common_hparams(hparams)

    def update(self, minibatches, unlabeled=None) -> dict:
        raise NotImplementedError

    def predict(self, x):
        raise NotImplementedError

    def optimizers(self) -> dict:
        """Every optimizer the algorithm owns, by attribute name (for checkpoints)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.optim.Optimizer)}

    # Extra state that is not in state_dict (e.g. Python-side counters) for checkpoints.
    def extra_checkpoint_state(self) -> dict:
        return {}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        pass


def classifier(n_in, n_out, nonlinear=False):
    if nonlinear:
        return nn.Sequential(nn.Linear(n_in, n_in // 2), nn.ReLU(), nn.Linear(n_in // 2, n_out))
    return nn.Linear(n_in, n_out)


class ERM(Algorithm):
    """Empirical risk minimisation over the concatenated domain batches."""

    def __init__(self, input_shape, num_classes, num_domains, hparams=None):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = featurizer(self.input_shape, self.hparams)
        self.classifier = classifier(self.featurizer.n_outputs, num_classes, self.hparams["nonlinear_classifier"])
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.optimizer = self.make_optimizer(self.network.parameters())

    def make_optimizer(self, params):
        return torch.optim.Adam(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def step(self, loss):
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with phase("optimizer"):
            self.optimizer.step()

    def update(self, minibatches, unlabeled=None):
        with phase("forward"):
            x = torch.cat([x for x, _ in minibatches])
            y = torch.cat([y for _, y in minibatches])
            loss = F.cross_entropy(self.predict(x), y)
        self.step(loss)
        return {"loss": loss.detach()}

    def predict(self, x):
        return self.network(x)


def domain_ids(minibatches, device):
    """(N,) int64 domain index of every row of the concatenated minibatches."""
    return torch.cat([torch.full((len(y),), i, dtype=torch.int64, device=device)
                      for i, (_, y) in enumerate(minibatches)])
