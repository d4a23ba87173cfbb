"""Fused Batch-Instance Normalization: `fastdg.ops.bin_norm` (METHODS.md section 1).

Every backend computes y = A[n,c] * x + B[n,c] from per-(n, c) statistics, so a backend is
four streaming kernels (see csrc/fastdg.cpp):

    forward : bin_stats (read x)            -> mean[n,c], var[n,c]
              bin_apply (read x, write y)   y = A x + B
    backward: bin_bwd_reduce (read dy, x)   -> S1 = sum dy, S2 = sum dy (x - mean[n,c])
              bin_bwd_apply (read dy, x, write dx)   dx = P dy + Q x + R

3 + 5 passes, the same as BatchNorm. The (N, C)-sized algebra between the kernels (batch
statistics by an exact Chan merge of the per-(n, c) ones, A, B, P, Q, R and the parameter
gradients) is written once, here, with torch ops. Backward equations, with g = dy,
L = H*W, M = N*L, a = gamma*rho and b = gamma*(1-rho) (shared affine) or a = rho*gamma,
b = (1-rho)*in_weight (separate affine), r = 1/sqrt(var + eps):

    T[c]   = sum_n (S2[n,c] + (mean[n,c] - mu[c]) * S1[n,c])       (= sum g*(x - mu[c]))
    P      = a r_c + b r_nc
    Q      = -b r_nc^3 S2 / L  - a r_c^3 T / M        (second term only with batch stats)
    R      = -b r_nc S1 / L - Q_I mean_nc - a r_c sum_n S1 / M - Q_B mu_c
    dgamma = rho r_c T + (1-rho) sum_n r_nc S2;  dbeta = sum_n S1;
    drho   = gamma (r_c T - sum_n r_nc S2)                            (shared affine)

Double backward (create_graph=True, e.g. second-order MetaBIN) is routed through the
differentiable reference, recomputed from the saved inputs. The saved x is the caller's tensor
(not the contiguous copy forward makes of a strided input, which has no graph), so second-order
terms through x survive for any layout; the first-order backward re-makes that copy.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .. import _dispatch
from ..reference.bin_norm import MODES, bin_norm_ref, update_running_stats
from . import _validate as V

OP = "bin_norm"


# ---- kernel sets -------------------------------------------------------------------------

class _CompiledKernels:
    """fastdg._C (C++ CPU or CUDA: the dispatcher routes by device)."""

    @staticmethod
    def stats(x):
        return torch.ops.fastdg.bin_stats(x)

    @staticmethod
    def apply(x, scale, shift):
        return torch.ops.fastdg.bin_apply(x, scale, shift)

    @staticmethod
    def bwd_reduce(dy, x, mean):
        return torch.ops.fastdg.bin_bwd_reduce(dy, x, mean)

    @staticmethod
    def bwd_apply(dy, x, p, q, r):
        return torch.ops.fastdg.bin_bwd_apply(dy, x, p, q, r)


class TorchKernels:
    """The four kernels in plain torch: checks the algebra above independently of any
    compiled code (used by the tests; not a dispatch target, the reference is faster)."""

    @staticmethod
    def stats(x):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        var, mean = torch.var_mean(x.to(acc), dim=(2, 3), unbiased=False)
        return mean, var

    @staticmethod
    def apply(x, scale, shift):
        return (x.to(scale.dtype) * scale[:, :, None, None] + shift[:, :, None, None]).to(x.dtype)

    @staticmethod
    def bwd_reduce(dy, x, mean):
        g = dy.to(mean.dtype)
        return g.sum((2, 3)), (g * (x.to(mean.dtype) - mean[:, :, None, None])).sum((2, 3))

    @staticmethod
    def bwd_apply(dy, x, p, q, r):
        e = (None, None)
        return (p[(...,) + e] * dy.to(p.dtype) + q[(...,) + e] * x.to(p.dtype) + r[(...,) + e]).to(x.dtype)


def _kernels(backend):
    if backend in ("cpp", "cuda"):
        return _CompiledKernels
    if backend == "triton":
        from ..triton import bin_norm as triton_bin_norm  # imported lazily: needs triton

        return triton_bin_norm.KERNELS
    raise ValueError(backend)


# ---- backend choice ----------------------------------------------------------------------

# cpp before triton: on CUDA tensors cpp declines, and on CPU tensors the Triton interpreter
# (TRITON_INTERPRET=1, for tests) must not win over the compiled CPU kernels.
CANDIDATES = [("cuda", _dispatch.compiled_check("bin_stats", "cuda")), ("cpp", _dispatch.compiled_check("bin_stats", "cpu")),
              ("triton", _dispatch.triton_check), ("reference", _dispatch.always)]


# ---- the fused autograd function ---------------------------------------------------------

def memory_format(x):
    """channels_last when x is laid out so (and not also plain-contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _coefficients(sd, weight, bias, rho, in_weight, in_bias):
    """Per-channel a, b (see module docstring) and the affine terms, in the stats dtype."""
    rho = rho.to(sd)
    w = weight.to(sd) if weight is not None else torch.ones_like(rho)
    if in_weight is None:
        return w * rho, w * (1 - rho)
    return rho * w, (1 - rho) * in_weight.to(sd)


class _BinNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rho, in_weight, in_bias, running_mean, running_var,
                mode, momentum, eps, kernels):
        fmt = memory_format(x)
        x_in, x = x, x.contiguous(memory_format=fmt)  # x_in: saved (a copy would lose x's graph)
        N, C, H, W = x.shape
        mean_nc, var_nc = kernels.stats(x)
        sd = mean_nc.dtype
        r_nc = torch.rsqrt(var_nc + eps)
        if mode == "eval":
            mu_c, var_c = running_mean.to(sd), running_var.to(sd)
        else:
            mu_c = mean_nc.mean(0)
            var_c = var_nc.mean(0) + (mean_nc - mu_c).square().mean(0)  # exact Chan merge, equal counts
            if mode == "train" and running_mean is not None:
                update_running_stats(running_mean, running_var, mu_c, var_c, N * H * W, momentum)
        r_c = torch.rsqrt(var_c + eps)
        a, b = _coefficients(sd, weight, bias, rho, in_weight, in_bias)
        scale = a * r_c + b * r_nc
        shift = -(a * r_c * mu_c + b * r_nc * mean_nc)
        if in_weight is None:
            if bias is not None:
                shift = shift + bias.to(sd)
        else:
            shift = shift + rho.to(sd) * bias.to(sd) + (1 - rho.to(sd)) * in_bias.to(sd)
        y = kernels.apply(x, scale.contiguous(), shift.contiguous())
        ctx.save_for_backward(x_in, weight, bias, rho, in_weight, in_bias, mean_nc, r_nc, mu_c, r_c, var_c)
        ctx.mode, ctx.eps, ctx.kernels, ctx.fmt = mode, eps, kernels, fmt
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, rho, in_weight, in_bias, mean_nc, r_nc, mu_c, r_c, var_c = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, dy)
        x = x.contiguous(memory_format=ctx.fmt)  # a no-op unless forward had to copy x
        N, C, H, W = x.shape
        L, M = H * W, N * H * W
        sd = mean_nc.dtype
        dy = dy.contiguous(memory_format=ctx.fmt)
        s1, s2 = ctx.kernels.bwd_reduce(dy, x, mean_nc)
        a, b = _coefficients(sd, weight, bias, rho, in_weight, in_bias)
        sum_dy = s1.sum(0)                                       # sum g            per c
        t = (s2 + (mean_nc - mu_c) * s1).sum(0)                  # sum g (x - mu_c) per c
        g_xb = r_c * t                                           # sum g * xb       per c
        g_xi = (r_nc * s2).sum(0)                                # sum g * xi       per c
        dx = None
        if ctx.needs_input_grad[0]:
            p = a * r_c + b * r_nc
            q_i = -b * r_nc.pow(3) * s2 / L
            r_ = -b * r_nc * s1 / L - q_i * mean_nc
            q = q_i
            if ctx.mode != "eval":
                q_b = -a * r_c.pow(3) * t / M
                q = q + q_b
                r_ = r_ - a * r_c * sum_dy / M - q_b * mu_c
            dx = ctx.kernels.bwd_apply(dy, x, p.contiguous(), q.contiguous(), r_.contiguous())
        rho_ = rho.to(sd)
        if in_weight is None:
            w = weight.to(sd) if weight is not None else None
            dw = rho_ * g_xb + (1 - rho_) * g_xi if weight is not None else None
            db = sum_dy if bias is not None else None
            drho = (w if w is not None else 1.0) * (g_xb - g_xi)
            grads = (dw, db, drho, None, None)
        else:
            w, bb, wi, bi = weight.to(sd), bias.to(sd), in_weight.to(sd), in_bias.to(sd)
            drho = w * g_xb + bb * sum_dy - wi * g_xi - bi * sum_dy
            grads = (rho_ * g_xb, rho_ * sum_dy, drho, (1 - rho_) * g_xi, (1 - rho_) * sum_dy)
        params = (weight, bias, rho, in_weight, in_bias)
        grads = tuple(None if gr is None or not ctx.needs_input_grad[i + 1] else gr.to(p_.dtype)
                      for i, (gr, p_) in enumerate(zip(grads, params)))
        return (dx,) + grads + (None,) * 6


def _differentiable_backward(ctx, dy):
    """create_graph=True: recompute through the reference so the gradient is differentiable."""
    x, weight, bias, rho, in_weight, in_bias, mean_nc, r_nc, mu_c, r_c, var_c = ctx.saved_tensors
    inputs = [x, weight, bias, rho, in_weight, in_bias]
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[:6]) if need]
    with torch.enable_grad():
        # The batch branch is recomputed from x ("hold"), or uses the statistics forward used.
        running = (mu_c, var_c) if ctx.mode == "eval" else (None, None)
        y = bin_norm_ref(x, weight, bias, rho, *running, mode="eval" if ctx.mode == "eval" else "hold",
                         eps=ctx.eps, in_weight=in_weight, in_bias=in_bias)
        grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    out = [next(grads) if need else None for need in ctx.needs_input_grad[:6]]
    return tuple(out) + (None,) * 6


# ---- public op ---------------------------------------------------------------------------

def bin_norm(x, weight=None, bias=None, rho=None, running_mean=None, running_var=None, *,
             mode="train", momentum=0.1, eps=1e-5, in_weight=None, in_bias=None, backend=None,
             check_inputs=None):
    """Batch-Instance Normalization of x (N, C, H, W), NCHW or channels_last.

    Shared affine: y = weight * (rho * xb + (1 - rho) * xi) + bias (weight/bias may be None).
    Separate affine (MetaBIN ver2, when in_weight/in_bias are given):
        y = rho * (weight * xb + bias) + (1 - rho) * (in_weight * xi + in_bias).
    xb is x normalised with batch statistics ("train", "hold") or running ones ("eval");
    xi with per-(n, c) statistics in every mode. "train" updates running_mean/var in place
    (momentum, unbiased variance). All per-channel tensors are (C,). rho must lie in [0, 1]
    (keep it there with fastdg.nn.clamp_rho_; MetaBIN's rho' = clamp(rho - alpha g, 0, 1) does).
    momentum: a number in [0, 1] or a one-element float tensor on x's device (e.g. 1 / the
    batch count for BatchNorm's cumulative average, computed without a host read).
    Returns y with x's dtype and layout.
    backend: None (fastest that can run), "cuda", "triton", "cpp" or "reference".
    check_inputs: check the values of rho (and of a tensor momentum) are in [0, 1], which reads
    them on the host. None (default): only when they are on the CPU and not being traced by
    torch.compile (on a GPU the read would be a host synchronisation every call, and traced code
    cannot branch on values); True: always (a sync on CUDA, a graph break under torch.compile);
    False: never (out-of-range rho then extrapolates between the branches). Shapes, dtypes,
    devices and the other arguments are always checked (no device reads).
    """
    _check_inputs(x, weight, bias, rho, running_mean, running_var, mode, momentum, eps, in_weight, in_bias,
                  check_inputs)
    choice = _dispatch.choose(OP, CANDIDATES, backend, x)
    if choice.backend == "reference":
        return bin_norm_ref(x, weight, bias, rho, running_mean, running_var, mode=mode, momentum=momentum,
                            eps=eps, in_weight=in_weight, in_bias=in_bias)
    return _BinNormFunction.apply(x, weight, bias, rho, in_weight, in_bias, running_mean, running_var,
                                  mode, momentum, eps, _kernels(choice.backend))


def _reads_values(check_inputs, *tensors):
    """Whether to check tensor values on the host (see bin_norm's check_inputs)."""
    if check_inputs is not None:
        return bool(check_inputs)
    if torch.compiler.is_compiling():
        return False
    return all(t.device.type == "cpu" and not is_fake(t) for t in tensors)


def _in_unit_interval(name, t, hint=""):
    """One host read: every value of t in [0, 1] (NaN fails)."""
    if not bool(((t >= 0) & (t <= 1)).all()):
        lo, hi = torch.aminmax(t.detach().float().flatten())
        raise ValueError(f"{name} must be in [0, 1]{hint}, got values in [{lo.item():g}, {hi.item():g}]")


def _check_inputs(x, weight, bias, rho, running_mean, running_var, mode, momentum, eps, in_weight, in_bias,
                  check_inputs=None):
    V.tensor("x", x, dim=4, dtypes=V.FLOATS)
    C = x.shape[1]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    V.tensor("rho", rho, dtypes=V.FLOATS, device=x.device)
    V.shape("rho", rho, (C,))
    for name, t in (("weight", weight), ("bias", bias), ("in_weight", in_weight), ("in_bias", in_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        V.tensor(name, t, dtypes=V.FLOATS, device=x.device, allow_none=True)
        V.shape(name, t, (C,))
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias must be given together (affine) or both be None")
    if (in_weight is None) != (in_bias is None):
        raise ValueError("in_weight and in_bias must be given together (separate affine) or both be None")
    if in_weight is not None and weight is None:
        raise ValueError("separate affine (in_weight, in_bias) needs weight and bias for the BN branch")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if mode == "eval" and running_mean is None:
        raise ValueError("mode='eval' needs running_mean and running_var")
    if x.shape[2] * x.shape[3] == 0 or x.shape[0] == 0 or C == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if mode == "train" and running_mean is not None and x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError("mode='train' needs more than one value per channel to update running_var "
                         f"(x has shape {tuple(x.shape)})")
    if isinstance(momentum, torch.Tensor):
        V.tensor("momentum", momentum, dtypes=V.FLOATS, device=x.device)
        if momentum.numel() != 1:
            raise ValueError(f"momentum must be a number or a one-element tensor, got shape {tuple(momentum.shape)}")
    elif not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if _reads_values(check_inputs, rho):
        _in_unit_interval("rho", rho, " (clamp it, e.g. with fastdg.nn.clamp_rho_)")
    if isinstance(momentum, torch.Tensor) and mode == "train" and _reads_values(check_inputs, momentum):
        _in_unit_interval("momentum", momentum)
