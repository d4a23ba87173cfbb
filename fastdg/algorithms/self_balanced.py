"""Self-balanced learning (Kim et al., ICIP 2021; METHODS.md section 6), in the
Meta-Weight-Net recipe (Shu et al., NeurIPS 2019).

A weighting network w_phi maps a sample's loss, its domain and its class to a weight in (0, 1):
    w_i = sigmoid(MLP([l_i, onehot(d_i), onehot(y_i)]))       (l_i detached, as MWN)
One-hot inputs into the first linear layer are exactly learned domain and class embeddings
added to the loss feature. Per update (all domains concatenated, l_i = CE(f_theta(x_i), y_i)):

1. virtual step:  theta' = theta - a * grad_theta (1/N) sum_i w_phi(l_i, d_i, y_i) l_i(theta)
   (torch.func.functional_call, create_graph=True, so theta' is a function of phi);
   a = sb_inner_lr (default: lr).
2. meta loss at theta' on a domain- and class-balanced meta batch:
       L_meta(phi) = sum_i m_i CE(f_theta'(x_i), y_i)
   Our choice for the meta batch, drawn from the given minibatches (the only data a DomainBed
   step has): group the samples into cells (domain, class); with sb_meta_per_cell = k > 0,
   draw k samples of each cell at random (all of a smaller cell; self.generator, checkpointed);
   with k = 0 (default) keep every sample. Then weight m_i = 1 / (n_cells * n_cell(i)) over
   the drawn samples: every non-empty (domain, class) cell counts equally, whatever its size,
   which is the balanced objective the paper's balanced meta data stands for. Cells absent
   from the step's batch cannot be represented (no data pool is available to the algorithm).
3. phi <- phi - meta_opt(dL_meta/dphi), second order through the virtual step
   (Adam, sb_meta_lr 1e-3, weight decay 1e-4, as MWN's weighting net).
4. theta update with the NEW weights, detached: L = (1/N) sum_i w_phi'(l_i, d_i, y_i) l_i,
   with the algorithm's Adam optimizer (as every fastdg/DomainBed algorithm; the virtual step
   is plain SGD, as MWN). The forward pass of step 1 is reused (theta has not changed).

With BatchNorm in the network, the virtual forward at theta' also updates running statistics
(the default MNIST CNN uses GroupNorm, which has none).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..profile import phase
from .base import ERM, check_int, check_real, domain_ids


class WeightNet(nn.Module):
    """w_phi(loss, domain, class) -> (0, 1): an MLP with one hidden ReLU layer and a sigmoid."""

    def __init__(self, num_domains: int, num_classes: int, hidden: int = 100):
        super().__init__()
        self.num_domains, self.num_classes = num_domains, num_classes
        self.net = nn.Sequential(nn.Linear(1 + num_domains + num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, loss: torch.Tensor, domain: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        dt = self.net[0].weight.dtype
        z = torch.cat([loss.to(dt).unsqueeze(1), F.one_hot(domain, self.num_domains).to(dt),
                       F.one_hot(label, self.num_classes).to(dt)], 1)
        return torch.sigmoid(self.net(z)).squeeze(1)


class SelfBalanced(ERM):
    HPARAMS = {
        "sb_hidden": 100,
        "sb_meta_lr": 1e-3,
        "sb_meta_weight_decay": 1e-4,
        "sb_inner_lr": None,     # virtual SGD step size; None -> lr
        "sb_meta_per_cell": 0,   # 0: every sample, cell-balanced weights; k > 0: k random samples per cell
    }

    @classmethod
    def check_hparams(cls, hparams, num_classes=None, num_domains=None):
        super().check_hparams(hparams, num_classes, num_domains)
        check_int(hparams, "sb_hidden", low=1)
        check_real(hparams, "sb_meta_lr", low=0, low_open=True)
        check_real(hparams, "sb_meta_weight_decay", low=0)
        check_real(hparams, "sb_inner_lr", low=0, low_open=True, none_ok=True)
        check_int(hparams, "sb_meta_per_cell", low=0)

    def __init__(self, input_shape, num_classes, num_domains, hparams=None):
        super().__init__(input_shape, num_classes, num_domains, hparams)  # checks the hparams
        hp = self.hparams
        self.weight_net = WeightNet(num_domains, num_classes, hp["sb_hidden"])
        self.meta_optimizer = torch.optim.Adam(self.weight_net.parameters(), lr=hp["sb_meta_lr"],
                                               weight_decay=hp["sb_meta_weight_decay"])
        self.generator = torch.Generator().manual_seed(0)

    @property
    def inner_lr(self) -> float:
        a = self.hparams["sb_inner_lr"]
        return self.hparams["lr"] if a is None else a

    def meta_weights(self, y, d):
        """(N,) weights m of the balanced meta loss (module docstring, step 2); sum(m) = 1.
        No device value is read."""
        n_cells_total = self.num_domains * self.num_classes
        cell = d * self.num_classes + y
        dt = torch.float32
        ones = torch.ones(len(y), dtype=dt, device=y.device)
        k = self.hparams["sb_meta_per_cell"]
        if k > 0:
            u = torch.rand(len(y), generator=self.generator, dtype=torch.float64).to(y.device)
            order = (cell.double() + u).argsort()            # by cell, random within a cell
            counts = torch.zeros(n_cells_total, dtype=torch.int64, device=y.device).scatter_add_(
                0, cell, torch.ones_like(cell))
            start = counts.cumsum(0) - counts
            rank = torch.empty_like(cell)
            rank[order] = torch.arange(len(y), device=y.device) - start[cell[order]]
            sel = (rank < k).to(dt)
        else:
            sel = ones
        n_sel = torch.zeros(n_cells_total, dtype=dt, device=y.device).scatter_add_(0, cell, sel)
        n_cells = (n_sel > 0).sum().to(dt)
        return sel / (n_sel[cell].clamp(min=1.0) * n_cells)

    # Runs eagerly under torch.compile: AOT-compiled backward graphs donate their buffers and
    # refuse create_graph=True (the second-order step).
    @torch.compiler.disable
    def meta_gradient(self, x, y, d, m):
        """Steps 1-2: returns (dL_meta/dphi aligned with weight_net.parameters(), per-sample
        losses l (graph kept for step 4), weights w (detached), L_meta (detached))."""
        names, params = zip(*[(k, p) for k, p in self.network.named_parameters() if p.requires_grad])
        with phase("forward"):
            losses = F.cross_entropy(self.network(x), y, reduction="none")
            w = self.weight_net(losses.detach(), d, y)
            virtual = (w.to(losses.dtype) * losses).sum() / len(y)
        with phase("backward"):
            grads = torch.autograd.grad(virtual, params, create_graph=True)
        a = self.inner_lr
        fast = {k: p - a * g for k, p, g in zip(names, params, grads)}
        with phase("forward"):
            meta_losses = F.cross_entropy(functional_call(self.network, fast, (x,)), y, reduction="none")
            l_meta = (m.to(meta_losses.dtype) * meta_losses).sum()
        with phase("backward"):
            # retain the graph: step 4 backpropagates through `losses` again
            phi_grads = torch.autograd.grad(l_meta, list(self.weight_net.parameters()), retain_graph=True)
        return phi_grads, losses, w.detach(), l_meta.detach()

    def update(self, minibatches, unlabeled=None):
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        d = domain_ids(minibatches, y.device)
        m = self.meta_weights(y, d)
        phi_grads, losses, w_old, l_meta = self.meta_gradient(x, y, d, m)
        with phase("optimizer"):
            self.meta_optimizer.zero_grad(set_to_none=True)
            for p, g in zip(self.weight_net.parameters(), phi_grads):
                p.grad = g
            self.meta_optimizer.step()
        with torch.no_grad():
            w = self.weight_net(losses.detach(), d, y)
        loss = (w.to(losses.dtype) * losses).sum() / len(y)
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with phase("optimizer"):
            self.optimizer.step()
        return {"loss": loss.detach(), "loss_meta": l_meta, "loss_mean": losses.detach().mean(),
                "weight_mean": w.mean(), "weight_min": w.min(), "weight_max": w.max()}

    def extra_checkpoint_state(self):
        return {"generator": self.generator.get_state()}

    def load_extra_checkpoint_state(self, state):
        if "generator" in state:
            self.generator.set_state(state["generator"])
