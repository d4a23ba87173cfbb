"""Invariance penalties over per-domain risks: IRM (Arjovsky et al. 2019) and V-REx
(Krueger et al. 2021), as in DomainBed: the penalty weight switches on after an annealing
period, and the optimizer is reset then (Adam's moments are wrong for the new objective)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..profile import phase
from .base import ERM, check_int, check_real


class _Penalised(ERM):
    penalty_name = ""

    @classmethod
    def check_hparams(cls, hparams, num_classes=None, num_domains=None):
        super().check_hparams(hparams, num_classes, num_domains)
        n = cls.penalty_name
        check_real(hparams, f"{n}_lambda", low=0)
        check_int(hparams, f"{n}_penalty_anneal_iters", low=0)

    def __init__(self, input_shape, num_classes, num_domains, hparams=None):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.steps_done = 0  # a host-side counter: reading a device counter would sync

    def penalty(self, logits_list, ys):
        raise NotImplementedError

    def update(self, minibatches, unlabeled=None):
        anneal = self.hparams[f"{self.penalty_name}_penalty_anneal_iters"]
        weight = self.hparams[f"{self.penalty_name}_lambda"] if self.steps_done >= anneal else 1.0
        with phase("forward"):
            sizes = [len(y) for _, y in minibatches]
            ys = [y for _, y in minibatches]
            parts = torch.split(self.predict(torch.cat([x for x, _ in minibatches])), sizes)
            nll = torch.stack([F.cross_entropy(p, y) for p, y in zip(parts, ys)]).mean()
            pen = self.penalty(parts, ys)  # IRM's penalty differentiates (create_graph) inside the forward
            loss = nll + weight * pen
            if weight > 1.0:
                loss = loss / weight  # DomainBed's rescaling keeps the gradient scale of the nll
        if self.steps_done == anneal:
            with phase("optimizer"):
                self.optimizer = self.make_optimizer(self.network.parameters())
        self.step(loss)
        self.steps_done += 1
        return {"loss": loss.detach(), "nll": nll.detach(), "penalty": pen.detach()}

    def extra_checkpoint_state(self):
        return {"steps_done": self.steps_done}

    def load_extra_checkpoint_state(self, state):
        self.steps_done = state.get("steps_done", 0)


class IRM(_Penalised):
    HPARAMS = {"irm_lambda": 1e2, "irm_penalty_anneal_iters": 500}
    penalty_name = "irm"

    def penalty(self, logits_list, ys):
        # Gradient of the risk w.r.t. a dummy scale, from two halves of each batch (unbiased).
        out = []
        for logits, y in zip(logits_list, ys):
            scale = torch.ones((), device=logits.device, requires_grad=True)
            g1 = torch.autograd.grad(F.cross_entropy(logits[0::2] * scale, y[0::2]), [scale], create_graph=True)[0]
            g2 = torch.autograd.grad(F.cross_entropy(logits[1::2] * scale, y[1::2]), [scale], create_graph=True)[0]
            out.append(g1 * g2)
        return torch.stack(out).mean()


class VREx(_Penalised):
    HPARAMS = {"vrex_lambda": 1e1, "vrex_penalty_anneal_iters": 500}
    penalty_name = "vrex"

    def penalty(self, logits_list, ys):
        risks = torch.stack([F.cross_entropy(p, y) for p, y in zip(logits_list, ys)])
        return ((risks - risks.mean()) ** 2).mean()
