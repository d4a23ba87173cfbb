"""SagNet (Nam et al. 2021; METHODS.md section 7): style-agnostic networks.

A content-biased classifier sees feature maps whose style (per-(n, c) mean and variance) is
swapped towards another sample's; a style-biased classifier sees maps whose content is swapped;
an adversarial loss pushes the featurizer to make the style classifier uncertain. The
randomness (the permutation and alpha) is injectable for tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Algorithm, check_real, classifier
from ..networks import featurizer
from ..profile import phase


def _moments(x, eps):
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    mean = flat.mean(-1).view(n, c, 1, 1)
    var = flat.var(-1, unbiased=flat.shape[-1] > 1).view(n, c, 1, 1)  # official code: unbiased
    return mean, var, (x - mean) / (var + eps).sqrt()


def style_randomize(x, perm, alpha, eps=1e-5):
    """xhat * sqrt(alpha var + (1-alpha) var[perm] + eps) + alpha mean + (1-alpha) mean[perm];
    alpha (N,) in [0, 1]."""
    mean, var, xhat = _moments(x, eps)
    a = alpha.view(-1, 1, 1, 1)
    return xhat * (a * var + (1 - a) * var[perm] + eps).sqrt() + a * mean + (1 - a) * mean[perm]


def content_randomize(x, perm, eps=1e-5):
    """The content of sample perm[n] with the style (mean, variance) of sample n."""
    mean, var, xhat = _moments(x, eps)
    return xhat[perm].detach() * (var + eps).sqrt() + mean


class SagNet(Algorithm):
    HPARAMS = {"sag_w_adv": 0.1, "sag_clip_adv": 0.1, "sag_eps": 1e-5}

    @classmethod
    def check_hparams(cls, hparams, num_classes=None, num_domains=None):
        super().check_hparams(hparams, num_classes, num_domains)
        check_real(hparams, "sag_w_adv", low=0)
        check_real(hparams, "sag_clip_adv", low=0, low_open=True)  # a gradient-norm bound
        check_real(hparams, "sag_eps", low=0, low_open=True)

    def __init__(self, input_shape, num_classes, num_domains, hparams=None):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = featurizer(self.input_shape, self.hparams)
        n = self.featurizer.n_outputs
        nonlinear = self.hparams["nonlinear_classifier"]  # DomainBed: both heads follow it
        self.classifier_c = classifier(n, num_classes, nonlinear)
        self.classifier_s = classifier(n, num_classes, nonlinear)
        self.pool = nn.AdaptiveAvgPool2d(1)
        lr, wd = self.hparams["lr"], self.hparams["weight_decay"]
        self.opt_f = torch.optim.Adam(self.featurizer.parameters(), lr=lr, weight_decay=wd)
        self.opt_c = torch.optim.Adam(self.classifier_c.parameters(), lr=lr, weight_decay=wd)
        self.opt_s = torch.optim.Adam(self.classifier_s.parameters(), lr=lr, weight_decay=wd)
        self.generator = torch.Generator().manual_seed(0)

    def _head(self, head, maps):
        return head(self.pool(maps).flatten(1))

    def draw(self, n, device):
        perm = torch.randperm(n, generator=self.generator).to(device)
        alpha = torch.rand(n, generator=self.generator).to(device)
        return perm, alpha

    def update(self, minibatches, unlabeled=None, randomness=None):
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        perm, alpha = randomness if randomness is not None else self.draw(len(y), y.device)
        eps = self.hparams["sag_eps"]
        # content-biased branch: trains featurizer and content classifier
        with phase("forward"):
            loss_c = F.cross_entropy(self._head(self.classifier_c, style_randomize(self.featurizer.feature_maps(x),
                                                                                   perm, alpha, eps)), y)
        with phase("backward"):
            self.opt_f.zero_grad(set_to_none=True)
            self.opt_c.zero_grad(set_to_none=True)
            loss_c.backward()
        with phase("optimizer"):
            self.opt_f.step()
            self.opt_c.step()
        # style-biased branch: trains the style classifier only
        with phase("forward"):
            with torch.no_grad():
                maps = self.featurizer.feature_maps(x)
            loss_s = F.cross_entropy(self._head(self.classifier_s, content_randomize(maps, perm, eps)), y)
        with phase("backward"):
            self.opt_s.zero_grad(set_to_none=True)
            loss_s.backward()
        with phase("optimizer"):
            self.opt_s.step()
        # adversarial: the featurizer makes the style classifier uncertain
        with phase("forward"):
            probs = F.softmax(self._head(self.classifier_s, content_randomize(self.featurizer.feature_maps(x),
                                                                              perm, eps)), 1)
            loss_adv = -self.hparams["sag_w_adv"] * torch.log(probs + 1e-5).mean()
        with phase("backward"):
            self.opt_f.zero_grad(set_to_none=True)
            loss_adv.backward()
        with phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.featurizer.parameters(), self.hparams["sag_clip_adv"])
            self.opt_f.step()
        return {"loss": loss_c.detach(), "loss_s": loss_s.detach(), "loss_adv": loss_adv.detach()}

    def predict(self, x):
        return self.classifier_c(self.featurizer(x))

    def extra_checkpoint_state(self):
        return {"generator": self.generator.get_state()}

    def load_extra_checkpoint_state(self, state):
        if "generator" in state:
            self.generator.set_state(state["generator"])
