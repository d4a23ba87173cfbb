"""Invariance penalties over per-domain risks: IRM (Arjovsky et al. 2019) and V-REx
(Krueger et al. 2021), as in DomainBed: loss = nll + w * penalty with w = 1 during the first
`<name>_penalty_anneal_iters` updates and w = `<name>_lambda` from then on, and the optimizer
is reset at the switch (Adam's moments are wrong for the new objective).

`<name>_loss_rescale` (default False, as DomainBed) divides the loss by w once w > 1, as the
original IRM colored-MNIST script does (it keeps the gradient scale of the nll; DomainBed
does not rescale)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..profile import phase
from .base import ERM, check_bool, check_int, check_real


class _Penalised(ERM):
    penalty_name = ""

    @classmethod
    def check_hparams(cls, hparams, num_classes=None, num_domains=None):
        super().check_hparams(hparams, num_classes, num_domains)
        n = cls.penalty_name
        check_real(hparams, f"{n}_lambda", low=0)
        check_int(hparams, f"{n}_penalty_anneal_iters", low=0)
        check_bool(hparams, f"{n}_loss_rescale")

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
            if weight > 1.0 and self.hparams[f"{self.penalty_name}_loss_rescale"]:
                loss = loss / weight  # the original IRM script's rescaling (not DomainBed's)
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
    HPARAMS = {"irm_lambda": 1e2, "irm_penalty_anneal_iters": 500, "irm_loss_rescale": False}
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
    HPARAMS = {"vrex_lambda": 1e1, "vrex_penalty_anneal_iters": 500, "vrex_loss_rescale": False}
    penalty_name = "vrex"

    def penalty(self, logits_list, ys):
        risks = torch.stack([F.cross_entropy(p, y) for p, y in zip(logits_list, ys)])
        return ((risks - risks.mean()) ** 2).mean()
