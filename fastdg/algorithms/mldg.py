"""MLDG (Li et al. 2018), first order as DomainBed implements it: for each training domain i
paired with another domain j, take a virtual SGD step on the loss of i and add beta times the
gradient of the loss of j at the virtual parameters. Virtual steps use torch.func.functional_call,
so no network copy is made."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..profile import phase
from .base import ERM, check_real


class MLDG(ERM):
    HPARAMS = {"mldg_beta": 1.0, "mldg_inner_lr": None}  # inner lr defaults to lr

    @classmethod
    def check_hparams(cls, hparams, num_classes=None, num_domains=None):
        super().check_hparams(hparams, num_classes, num_domains)
        check_real(hparams, "mldg_beta", low=0)
        check_real(hparams, "mldg_inner_lr", low=0, low_open=True, none_ok=True)

    def __init__(self, input_shape, num_classes, num_domains, hparams=None):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.generator = torch.Generator().manual_seed(0)

    def update(self, minibatches, unlabeled=None):
        n = len(minibatches)
        names, params = zip(*[(k, p) for k, p in self.network.named_parameters() if p.requires_grad])
        grads = [torch.zeros_like(p) for p in params]
        inner_lr = self.hparams["mldg_inner_lr"] or self.hparams["lr"]
        beta = self.hparams["mldg_beta"]
        perm = torch.randperm(n, generator=self.generator).tolist() if n > 1 else [0]
        total = 0.0
        for a in range(n):
            i, j = perm[a], perm[(a + 1) % n]
            xi, yi = minibatches[i]
            xj, yj = minibatches[j]
            with phase("forward"):
                loss_i = F.cross_entropy(self.network(xi), yi)
            with phase("backward"):
                gi = torch.autograd.grad(loss_i, params)
            with phase("optimizer"):  # the virtual (inner) SGD step
                fast = {k: (p - inner_lr * g).detach().requires_grad_() for k, p, g in zip(names, params, gi)}
            with phase("forward"):
                loss_j = F.cross_entropy(functional_call(self.network, fast, (xj,)), yj)
            with phase("backward"):
                gj = torch.autograd.grad(loss_j, list(fast.values()))
            with phase("optimizer"):
                for acc, g1, g2 in zip(grads, gi, gj):
                    acc.add_(g1 / n).add_(g2, alpha=beta / n)
            total = total + (loss_i.detach() + beta * loss_j.detach()) / n
        with phase("optimizer"):
            self.optimizer.zero_grad(set_to_none=True)
            for p, g in zip(params, grads):
                p.grad = g
            self.optimizer.step()
        return {"loss": total}

    def extra_checkpoint_state(self):
        return {"generator": self.generator.get_state()}

    def load_extra_checkpoint_state(self, state):
        if "generator" in state:
            self.generator.set_state(state["generator"])
