"""Batch-Instance Normalization as a module: a drop-in for torch.nn.BatchNorm2d.

    from fastdg.nn import BatchInstanceNorm2d, convert_bin, clamp_rho_, bin_param_groups
    model = convert_bin(torchvision.models.resnet50())      # every BatchNorm2d -> BIN, rho = 1
    opt = torch.optim.SGD(bin_param_groups(model, lr=0.01, weight_decay=5e-4), momentum=0.9)
    ...; opt.step(); clamp_rho_(model)                     # the original recipe keeps rho in [0, 1]

With rho = 1 a converted layer computes exactly what the BatchNorm2d it replaced computed
(same parameters, running statistics and momentum), so conversion changes nothing until rho
is trained. Meta-learning (MetaBIN) passes rho and the affine parameters per call with
torch.func.functional_call; `hold_running_stats` runs training-mode forwards (batch
statistics) without touching the running statistics, as MetaBIN's meta-train/test passes do.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..ops.bin_norm import bin_norm


class BatchInstanceNorm2d(nn.Module):
    """y = weight * (rho * BN(x) + (1 - rho) * IN(x)) + bias, per channel (METHODS.md section 1).

    With separate_affine=True (MetaBIN "ver2"):
        y = rho * (weight * BN(x) + bias) + (1 - rho) * (in_weight * IN(x) + in_bias).
    Parameters weight, bias (when affine), rho (always; learned; keep it in [0, 1] with
    clamp_rho_), in_weight, in_bias (separate_affine); buffers running_mean, running_var and
    num_batches_tracked (when track_running_stats), as BatchNorm2d. Input (N, C, H, W), NCHW or
    channels_last; the output keeps the input's dtype and layout.

    Modes: training -> batch statistics for the BN branch, running statistics updated (unless
    `hold` is set or track_running_stats is False); eval -> running statistics. The IN branch
    always uses per-sample statistics. momentum=None means a cumulative average, as in BatchNorm
    (the factor 1 / num_batches_tracked stays a device tensor: no host read, and torch.compile
    with fullgraph=True works).

    Signature: the positional arguments are BatchNorm2d's, in its order (num_features, eps,
    momentum, affine, track_running_stats, device, dtype), so BatchNorm2d(*args) ->
    BatchInstanceNorm2d(*args) means the same. The BIN-specific arguments are keyword-only, so a
    positional call written for BatchNorm2d cannot set one of them by mistake:
        separate_affine: MetaBIN "ver2" (needs affine=True);
        rho_init: initial rho in [0, 1] (1 = exactly BatchNorm2d);
        backend: forwarded to fastdg.ops.bin_norm (None = fastest that runs).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, separate_affine: bool = False,
                 rho_init: float = 1.0, backend: str | None = None):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if not 0.0 <= rho_init <= 1.0:
            raise ValueError(f"rho_init must be in [0, 1], got {rho_init}")
        if separate_affine and not affine:
            raise ValueError("separate_affine=True needs affine=True (the BN branch keeps weight and bias)")
        fk = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.separate_affine, self.backend = separate_affine, backend
        self.hold = False  # training-mode forward without running-stat updates (hold_running_stats)
        self.rho = nn.Parameter(torch.full((num_features,), float(rho_init), **fk))
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **fk))
            self.bias = nn.Parameter(torch.zeros(num_features, **fk))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if separate_affine:
            self.in_weight = nn.Parameter(torch.ones(num_features, **fk))
            self.in_bias = nn.Parameter(torch.zeros(num_features, **fk))
        else:
            self.register_parameter("in_weight", None)
            self.register_parameter("in_bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **fk))
            self.register_buffer("running_var", torch.ones(num_features, **fk))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self, rho_init: float = 1.0) -> None:
        self.reset_running_stats()
        with torch.no_grad():
            self.rho.fill_(rho_init)
            for name in ("weight", "in_weight"):
                if getattr(self, name) is not None:
                    getattr(self, name).fill_(1)
            for name in ("bias", "in_bias"):
                if getattr(self, name) is not None:
                    getattr(self, name).zero_()

    def _mode_and_momentum(self):
        if not self.training:
            return ("eval" if self.track_running_stats else "hold"), 0.0
        if self.hold or not self.track_running_stats:
            return "hold", 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            # Cumulative average: 1 / count as a tensor on the counter's device (BatchNorm2d reads
            # the counter on the host instead). float64, so the factor rounds once, to the
            # running statistics' dtype, as BatchNorm2d's Python float does.
            return "train", self.num_batches_tracked.to(torch.float64).reciprocal()
        return "train", self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchInstanceNorm2d expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
        mode, momentum = self._mode_and_momentum()
        use_running = mode != "hold"
        return bin_norm(x, self.weight, self.bias, self.rho,
                        self.running_mean if use_running else None, self.running_var if use_running else None,
                        mode=mode, momentum=momentum, eps=self.eps, in_weight=self.in_weight, in_bias=self.in_bias,
                        backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, separate_affine={self.separate_affine}")


def convert_bin(module: nn.Module, separate_affine: bool = False, rho_init: float = 1.0,
                backend: str | None = None) -> nn.Module:
    """Replace every torch.nn.BatchNorm2d in `module` (in place, recursively) by a
    BatchInstanceNorm2d holding the same weight, bias, running statistics, counter, eps,
    momentum, device, dtype and train/eval flag. Returns the module (or the new layer when
    `module` itself is a BatchNorm2d). With rho_init=1 the converted model computes what the
    original did. Subclasses of BatchNorm2d that change its forward (e.g. timm's BatchNormAct2d)
    are left alone with a warning: replacing them would drop their extra behaviour."""
    if type(module) is nn.BatchNorm2d:
        return _from_batchnorm(module, separate_affine, rho_init, backend)
    skipped = []
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, _from_batchnorm(child, separate_affine, rho_init, backend))
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, BatchInstanceNorm2d):
            skipped.append(f"{name} ({type(child).__name__})")
        else:
            convert_bin(child, separate_affine, rho_init, backend)
    if skipped:
        warnings.warn(f"convert_bin left {len(skipped)} normalisation layer(s) unconverted: {skipped}", stacklevel=2)
    return module


def _from_batchnorm(bn: nn.BatchNorm2d, separate_affine, rho_init, backend) -> BatchInstanceNorm2d:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    out = BatchInstanceNorm2d(bn.num_features, bn.eps, bn.momentum, affine=bn.affine or separate_affine,
                              track_running_stats=bn.track_running_stats, separate_affine=separate_affine,
                              rho_init=rho_init, backend=backend, **kw)
    with torch.no_grad():
        if bn.affine:
            out.weight.copy_(bn.weight)
            out.weight.requires_grad_(bn.weight.requires_grad)
            if bn.bias is not None:
                out.bias.copy_(bn.bias)
                out.bias.requires_grad_(bn.bias.requires_grad)
            else:  # BatchNorm2d(..., bias=False) (torch >= 2.12): a bias frozen at 0 computes the same
                out.bias.zero_()
                out.bias.requires_grad_(False)
        if bn.track_running_stats:
            out.running_mean.copy_(bn.running_mean)
            out.running_var.copy_(bn.running_var)
            out.num_batches_tracked.copy_(bn.num_batches_tracked)
    out.train(bn.training)
    return out


def bin_layers(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, BatchInstanceNorm2d)]


@torch.no_grad()
def clamp_rho_(module: nn.Module) -> None:
    """Clamp every BIN rho to [0, 1] in place (call after each optimizer step, as the original
    BIN code does)."""
    for m in bin_layers(module):
        m.rho.clamp_(0.0, 1.0)


def bin_param_groups(module: nn.Module, lr: float, weight_decay: float = 0.0, rho_lr_mult: float = 10.0):
    """Optimizer parameter groups of the original BIN recipe: every rho with lr * rho_lr_mult
    and no weight decay, every other trainable parameter with (lr, weight_decay)."""
    rho_ids = {id(m.rho) for m in bin_layers(module)}
    rhos, rest = [], []
    for p in module.parameters():
        if p.requires_grad:
            (rhos if id(p) in rho_ids else rest).append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if rhos:
        groups.append({"params": rhos, "lr": lr * rho_lr_mult, "weight_decay": 0.0})
    return groups


def rho_parameters(module: nn.Module):
    """(name, parameter) of every BIN rho, for meta-learning rho separately (MetaBIN)."""
    ids = {id(m.rho) for m in bin_layers(module)}
    return [(n, p) for n, p in module.named_parameters() if id(p) in ids]


@contextlib.contextmanager
def hold_running_stats(module: nn.Module):
    """Within the block, BIN layers in training mode use batch statistics but leave their
    running statistics untouched (METHODS.md "hold" mode)."""
    layers = bin_layers(module)
    before = [m.hold for m in layers]
    for m in layers:
        m.hold = True
    try:
        yield module
    finally:
        for m, h in zip(layers, before):
            m.hold = h
