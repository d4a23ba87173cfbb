"""MetaBIN (Choi et al., CVPR 2021; METHODS.md section 5), classification version for DG.

The featurizer uses Batch-Instance Normalization with separate BN/IN affine parameters
(MetaBIN "ver2", fastdg.nn.BatchInstanceNorm2d(separate_affine=True)):
    y = rho * (gb * xb + bb) + (1 - rho) * (gi * xi + bi),  rho in [0, 1] per channel.
The balancing parameters rho are trained by meta-learning only; every other parameter by the
base update only. One update(minibatches) (one (x, y) batch per training domain) does:

1. base update, every parameter except rho, on all domains concatenated (training-mode BIN:
   batch statistics, running statistics updated):
       L_base = CE_ls(classifier(f), y) + Tri_0.3(f, y),   f = featurizer(x)
   CE_ls: PyTorch's label smoothing 0.1 (target 1 - 0.9 * (K-1)/K, others 0.1/K; the
   official fastreid code gives the others 0.1/(K-1)), Tri_m: batch-hard triplet loss
   (metric_losses.triplet_loss). Optimizer: SGD, momentum 0.9, weight decay (default; or
   Adam with metabin_optimizer="adam"); lr defaults to 0.01, the official base lr.
2. split the training domains at random (self.generator, checkpointed; or `split=` given)
   into meta-train domains and meta-test domains (metabin_mtest_domains of them; default
   n // 2, at least 1: 3 / 2 for DomainBed's five RotatedMNIST training domains, as the
   paper's 3 / 2 split of its five source sets). With one training domain both are that domain.
3. meta-train, at the current rho, on the meta-train domains (running statistics held):
       L_mtr = Tri_0.3(f, y) + w_sct * Scatter(f, dom) + w_shuf * Shuffle(f, y, dom)
   Scatter: intra-domain scatter (mean cosine between each feature and its domain centroid).
   Shuffle: inter-domain shuffle, our reading of the paper's "inter-domain features should be
   closer than intra-domain features", taken from the official code (TripletLoss_add): a
   triplet whose positives are the samples of OTHER domains (any class, plus the anchor) and
   whose negatives are the samples of the SAME domain with another class, margin 0 ->
   softplus(max_pos d - min_neg d). Scatter and shuffle simulate over-style-normalisation, the
   triplet term under-style-normalisation (overfitting the meta-train styles).
       g = dL_mtr / drho,   rho' = clamp(rho - alpha * g, 0, 1)
   alpha = metabin_inner_lr (default: the rho learning rate, as the official inner step uses
   the norm optimizer's lr). The clamp is treated as the identity for gradients (straight
   through), as the official code. metabin_order = 1 (default, official): g is detached, so
   drho'/drho = I. metabin_order = 2: g keeps its graph (create_graph=True) and
   drho'/drho = I - alpha * d^2 L_mtr / drho^2 (a Hessian-vector product through the network).
4. meta-test, at rho' (torch.func.functional_call, running statistics held), on the
   meta-test domains: L_mte = Tri_0.3(f', y). Its gradient w.r.t. rho updates rho with its own
   SGD (lr = metabin_rho_lr_mult * lr = 10x, no momentum, no weight decay: the BIN recipe and
   the official MOMENTUM_NORM 0); then rho is clamped to [0, 1].

The meta passes reuse the step's minibatches (DomainBed hands one batch per domain per step;
the official code draws separate meta batches). Features for every triplet/scatter term are
the featurizer output (official FEAT_ORDER "before").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..networks import featurizer
from ..nn import clamp_rho_, hold_running_stats, rho_parameters
from ..profile import phase
from .base import Algorithm, check_bool, check_choice, check_int, check_real, classifier
from .metric_losses import inter_domain_shuffle_loss, intra_domain_scatter, triplet_loss


class MetaBIN(Algorithm):
    HPARAMS = {
        "lr": 0.01,                   # official base lr (SGD)
        "norm": "bin",                # required
        "bin_separate_affine": True,  # required (MetaBIN ver2)
        "bin_rho_init": 1.0,          # official BIN_INIT "one"
        "metabin_order": 1,           # 1: first order (official), 2: second order
        "metabin_margin": 0.3,        # triplet margin of the base, meta-train and meta-test triplets
        "metabin_label_smoothing": 0.1,
        "metabin_w_scatter": 1.0,
        "metabin_w_shuffle": 1.0,
        "metabin_shuffle_margin": 0.0,  # 0 -> softplus (official)
        "metabin_inner_lr": None,     # alpha; None -> the rho lr
        "metabin_rho_lr_mult": 10.0,
        "metabin_mtest_domains": None,  # None -> n // 2 (at least 1, at most n - 1)
        "metabin_optimizer": "sgd",   # sgd | adam (base parameters)
        "metabin_momentum": 0.9,
    }

    @classmethod
    def check_hparams(cls, hparams, num_classes=None, num_domains=None):
        super().check_hparams(hparams, num_classes, num_domains)
        hp = hparams
        check_bool(hp, "bin_separate_affine")
        if hp["norm"] != "bin" or not hp["bin_separate_affine"]:
            raise ValueError("MetaBIN needs BIN with separate affine parameters: norm='bin' and "
                             f"bin_separate_affine=True (got norm={hp['norm']!r}, "
                             f"bin_separate_affine={hp['bin_separate_affine']!r})")
        check_real(hp, "bin_rho_init", low=0, high=1)
        check_choice(hp, "metabin_order", (1, 2))
        check_choice(hp, "metabin_optimizer", ("sgd", "adam"))
        check_int(hp, "metabin_mtest_domains", low=1, none_ok=True)
        check_real(hp, "metabin_margin", low=0)
        check_real(hp, "metabin_label_smoothing", low=0, high=1, high_open=True)
        check_real(hp, "metabin_w_scatter", low=0)
        check_real(hp, "metabin_w_shuffle", low=0)
        check_real(hp, "metabin_shuffle_margin", low=0)
        check_real(hp, "metabin_inner_lr", low=0, none_ok=True)
        check_real(hp, "metabin_rho_lr_mult", low=0, low_open=True)
        check_real(hp, "metabin_momentum", low=0, high=1, high_open=True)

    def __init__(self, input_shape, num_classes, num_domains, hparams=None):
        super().__init__(input_shape, num_classes, num_domains, hparams)  # checks the hparams
        hp = self.hparams
        self.featurizer = featurizer(self.input_shape, hp)
        self.classifier = classifier(self.featurizer.n_outputs, num_classes, hp["nonlinear_classifier"])
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.rho_names = [n for n, _ in rho_parameters(self.featurizer)]
        if not self.rho_names:
            raise ValueError("MetaBIN found no BIN layer in the featurizer")
        rho_ids = {id(p) for p in self.rho_params()}
        self.base_params = [p for p in self.network.parameters() if p.requires_grad and id(p) not in rho_ids]
        lr, wd = hp["lr"], hp["weight_decay"]
        if hp["metabin_optimizer"] == "sgd":
            self.optimizer = torch.optim.SGD(self.base_params, lr=lr, momentum=hp["metabin_momentum"], weight_decay=wd)
        else:
            self.optimizer = torch.optim.Adam(self.base_params, lr=lr, weight_decay=wd)
        self.rho_optimizer = torch.optim.SGD(self.rho_params(), lr=lr * hp["metabin_rho_lr_mult"], momentum=0.0,
                                             weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(0)

    # ---- pieces -------------------------------------------------------------------------

    def rho_params(self):
        params = dict(self.featurizer.named_parameters())
        return [params[n] for n in self.rho_names]

    @property
    def inner_lr(self) -> float:
        a = self.hparams["metabin_inner_lr"]
        return self.rho_optimizer.param_groups[0]["lr"] if a is None else a

    def split_domains(self, n: int):
        """Random (meta-train, meta-test) lists of domain positions, drawn with self.generator."""
        if n == 1:
            return [0], [0]
        k = self.hparams["metabin_mtest_domains"] or max(1, n // 2)
        k = min(k, n - 1)
        perm = torch.randperm(n, generator=self.generator).tolist()
        return sorted(perm[k:]), sorted(perm[:k])

    def base_loss(self, x, y):
        """(L_base, CE, triplet) at the current parameters (BIN in the module's mode)."""
        f = self.featurizer(x)
        ce = F.cross_entropy(self.classifier(f), y, label_smoothing=self.hparams["metabin_label_smoothing"])
        tri = triplet_loss(f, y, self.hparams["metabin_margin"])
        return ce + tri, ce, tri

    def meta_train_loss(self, f, y, dom, num_domains):
        hp = self.hparams
        loss = triplet_loss(f, y, hp["metabin_margin"])
        if hp["metabin_w_scatter"]:
            loss = loss + hp["metabin_w_scatter"] * intra_domain_scatter(f, dom, num_domains)
        if hp["metabin_w_shuffle"]:
            loss = loss + hp["metabin_w_shuffle"] * inter_domain_shuffle_loss(f, y, dom, hp["metabin_shuffle_margin"])
        return loss

    def rho_meta_gradient(self, x_tr, y_tr, d_tr, x_te, y_te, order=None, num_domains=None):
        """Meta-gradient d L_mte(rho') / d rho (steps 3-4 of the module docstring), computed
        with the running statistics held. d_tr: domain ids of the meta-train rows in
        [0, num_domains). Returns (grads aligned with rho_params(), L_mtr, L_mte); sets no .grad."""
        order = self.hparams["metabin_order"] if order is None else order
        if num_domains is None:
            num_domains = int(d_tr.max()) + 1
        if order == 2:
            return self._rho_meta_gradient_eager(x_tr, y_tr, d_tr, x_te, y_te, order, num_domains)
        return self._rho_meta_gradient(x_tr, y_tr, d_tr, x_te, y_te, order, num_domains)

    def _rho_meta_gradient(self, x_tr, y_tr, d_tr, x_te, y_te, order, num_domains):
        rhos, alpha = self.rho_params(), self.inner_lr
        with hold_running_stats(self.featurizer):
            with phase("forward"):
                l_mtr = self.meta_train_loss(self.featurizer(x_tr), y_tr, d_tr, num_domains)
            with phase("backward"):
                grads = torch.autograd.grad(l_mtr, rhos, create_graph=order == 2)
            fast = {}
            for name, rho, g in zip(self.rho_names, rhos, grads):
                lin = rho - alpha * (g if order == 2 else g.detach())
                fast[name] = lin + (lin.clamp(0.0, 1.0) - lin).detach()  # straight-through clamp
            with phase("forward"):
                l_mte = triplet_loss(functional_call(self.featurizer, fast, (x_te,)), y_te,
                                     self.hparams["metabin_margin"])
            with phase("backward"):
                meta_grads = torch.autograd.grad(l_mte, rhos)
        return meta_grads, l_mtr.detach(), l_mte.detach()

    # Second order runs eagerly under torch.compile: AOT-compiled backward graphs donate their
    # buffers and refuse create_graph=True.
    _rho_meta_gradient_eager = torch.compiler.disable(_rho_meta_gradient)

    # ---- the two stages -----------------------------------------------------------------

    def base_step(self, minibatches):
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        with phase("forward"):
            loss, ce, tri = self.base_loss(x, y)
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=self.base_params)  # rho receives no gradient here
        with phase("optimizer"):
            self.optimizer.step()
        return {"loss": loss.detach(), "loss_ce": ce.detach(), "loss_triplet": tri.detach()}

    def meta_step(self, minibatches, split=None):
        mtr, mte = split if split is not None else self.split_domains(len(minibatches))
        dev = minibatches[0][1].device
        x_tr = torch.cat([minibatches[i][0] for i in mtr])
        y_tr = torch.cat([minibatches[i][1] for i in mtr])
        d_tr = torch.cat([torch.full((len(minibatches[i][1]),), k, dtype=torch.int64, device=dev)
                          for k, i in enumerate(mtr)])
        x_te = torch.cat([minibatches[i][0] for i in mte])
        y_te = torch.cat([minibatches[i][1] for i in mte])
        grads, l_mtr, l_mte = self.rho_meta_gradient(x_tr, y_tr, d_tr, x_te, y_te, num_domains=len(mtr))
        with phase("optimizer"):
            self.rho_optimizer.zero_grad(set_to_none=True)
            for p, g in zip(self.rho_params(), grads):
                p.grad = g
            self.rho_optimizer.step()
            clamp_rho_(self.featurizer)
        return {"loss_mtrain": l_mtr, "loss_mtest": l_mte}

    def update(self, minibatches, unlabeled=None, split=None):
        stats = self.base_step(minibatches)
        stats.update(self.meta_step(minibatches, split))
        with torch.no_grad():
            stats["rho_mean"] = torch.cat([r.detach().flatten() for r in self.rho_params()]).mean()
        return stats

    def predict(self, x):
        return self.network(x)

    def extra_checkpoint_state(self):
        return {"generator": self.generator.get_state()}

    def load_extra_checkpoint_state(self, state):
        if "generator" in state:
            self.generator.set_state(state["generator"])
