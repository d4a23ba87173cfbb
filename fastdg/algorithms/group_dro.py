"""GroupDRO (Sagawa et al. 2020) with domains as groups, on fastdg's fused group loss.

One forward over the concatenated batch (DomainBed runs one per domain: identical maths for
networks without batch statistics; with BatchNorm the statistics differ). q starts at 1/G
(DomainBed starts at ones; the two agree after the first normalised update) and is updated
on the device: no host synchronisation per step.
"""
from __future__ import annotations

import torch

from ..ops import group_loss
from ..profile import phase
from .base import ERM, check_real, domain_ids


class GroupDRO(ERM):
    HPARAMS = {"groupdro_eta": 1e-2}

    @classmethod
    def check_hparams(cls, hparams, num_classes=None, num_domains=None):
        super().check_hparams(hparams, num_classes, num_domains)
        check_real(hparams, "groupdro_eta", low=0)  # 0: q stays uniform (ERM over the groups)

    def __init__(self, input_shape, num_classes, num_domains, hparams=None):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.register_buffer("q", torch.full((num_domains,), 1.0 / num_domains))

    def robust_step(self, minibatches, group, q):
        with phase("forward"):
            x = torch.cat([x for x, _ in minibatches]) if len(minibatches) > 1 else minibatches[0][0]
            y = torch.cat([y for _, y in minibatches]) if len(minibatches) > 1 else minibatches[0][1]
            out = group_loss(self.predict(x), y, group, q, eta=self.hparams["groupdro_eta"], check_inputs=False)
            q.copy_(out.q)  # the q update is part of the loss (it uses the updated q)
        self.step(out.loss)
        return {"loss": out.loss.detach(), "group_loss": out.group_loss}

    def update(self, minibatches, unlabeled=None):
        device = minibatches[0][1].device
        return self.robust_step(minibatches, domain_ids(minibatches, device), self.q)
