"""Pure-PyTorch Batch-Instance Normalization (METHODS.md section 1): the oracle and fallback.

Written as the textbook composite so that autograd (including double backward) is exact.
Computes in float64 for float64 inputs and in float32 otherwise; returns x's dtype.
"""
from __future__ import annotations

import torch

MODES = ("train", "hold", "eval")


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def update_running_stats(running_mean, running_var, mean_c, var_c, count, momentum):
    """In-place momentum update; running_var takes the unbiased batch variance (as BatchNorm).
    momentum: a number or a one-element tensor (read on the device, no host sync)."""
    with torch.no_grad():
        if isinstance(momentum, torch.Tensor):
            momentum = momentum.reshape(()).to(running_mean.dtype)
        unbiased = var_c * (count / (count - 1))
        running_mean.lerp_(mean_c.to(running_mean.dtype), momentum)
        running_var.lerp_(unbiased.to(running_var.dtype), momentum)


def bin_norm_ref(x, weight=None, bias=None, rho=None, running_mean=None, running_var=None, *,
                 mode="train", momentum=0.1, eps=1e-5, in_weight=None, in_bias=None):
    """y = gamma*(rho*xb + (1-rho)*xi) + beta (shared affine), or
    y = rho*(gamma*xb + beta) + (1-rho)*(in_weight*xi + in_bias) (separate affine, MetaBIN ver2).

    x: (N, C, H, W); weight, bias, rho, in_weight, in_bias, running_*: (C,).
    xb uses batch statistics in "train"/"hold" and running statistics in "eval"; xi always
    uses per-(n, c) statistics. "train" updates running_mean/var in place.
    """
    acc = acc_dtype(x)
    xf = x.to(acc)
    C = x.shape[1]

    def col(t):
        return t.to(acc).view(1, C, 1, 1)

    var_i, mean_i = torch.var_mean(xf, dim=(2, 3), unbiased=False, keepdim=True)
    xi = (xf - mean_i) * torch.rsqrt(var_i + eps)
    if mode == "eval":
        mean_b, var_b = col(running_mean), col(running_var)
    else:
        var_b, mean_b = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False, keepdim=True)
        if mode == "train" and running_mean is not None:
            count = x.shape[0] * x.shape[2] * x.shape[3]
            update_running_stats(running_mean, running_var, mean_b.detach().flatten(),
                                 var_b.detach().flatten(), count, momentum)
    xb = (xf - mean_b) * torch.rsqrt(var_b + eps)
    r = col(rho)
    if in_weight is None:
        y = r * xb + (1 - r) * xi
        if weight is not None:
            y = y * col(weight) + col(bias)
    else:
        y = r * (col(weight) * xb + col(bias)) + (1 - r) * (col(in_weight) * xi + col(in_bias))
    return y.to(x.dtype)
