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

    @classmethod
    def check_hparams(cls, hparams: dict) -> None:
        """Raise ValueError for a hyper-parameter value the algorithm cannot use (called by the
        trainer before any work, and by subclasses' constructors)."""

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
