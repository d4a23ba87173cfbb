"""Fused per-group loss aggregation with exponential weights: `fastdg.ops.group_loss`
(METHODS.md section 2; GroupDRO, the seed-category dynamic distribution, self-balancing).

A backend is a kernel set with four entry points (schemas in csrc/fastdg.cpp):

    stats(logits, target, group, G, ls) -> losses, lse, sums, counts   per-sample CE + segmented sums
    sums(losses, group, G)              -> sums, counts                 when losses are given
    q_update(q, sums, counts, eta, adj) -> q_new, group_mean, robust    q' = normalise(q exp(eta L))
    bwd(logits, target, group, lse, scale, ls) -> grad_logits           scale[g] (softmax - onehot_ls)

Eager calls on CPU tensors (no reduce_fn, logits given) take `fastdg::group_loss_fused` instead:
the same C++ kernels in one call, with the backward in C++ reading the softmax the forward saved
(at DomainBed sizes the Python autograd.Function and the small ops between kernels cost as much
as the kernels). torch.compile and the all-reduce path use the kernel set through `_FromLogits`.

Between `stats` and `q_update` an optional `reduce_fn(sums, counts)` can all-reduce the
per-group sums and counts across data-parallel ranks (fastdg.nn.GroupDROLoss does), so that
every rank computes the same q. Nothing here reads a device value on the host, except the
optional input checks (`check_inputs=True`, one read each for id ranges and finiteness).

Numerics: q is updated in log space (softmax of log q + eta * L), so it stays normalised and
cannot overflow; a non-finite group mean leaves q unchanged on the device (and the robust
loss becomes non-finite, so the caller sees it) rather than poisoning q for every later step.
"""
from __future__ import annotations

import math

import torch

from .. import _dispatch
from ..reference.group_loss import GroupLossOutput, group_loss_ref, per_sample_loss, q_update_ref
from . import _validate as V

OP = "group_loss"


class TorchKernels:
    """The kernel set in plain torch (the algebra of the fused path, used by the tests)."""

    @staticmethod
    def stats(logits, target, group, num_groups, label_smoothing):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        z = logits.to(acc)
        lse = torch.logsumexp(z, 1)
        losses = per_sample_loss(z, target, label_smoothing)
        sums, counts = TorchKernels.sums(losses, group, num_groups)
        return losses, lse, sums, counts

    @staticmethod
    def sums(losses, group, num_groups):
        acc = torch.float64 if losses.dtype == torch.float64 else torch.float32
        sums = torch.zeros(num_groups, dtype=acc, device=losses.device).index_add_(0, group, losses.to(acc))
        counts = torch.zeros(num_groups, dtype=acc, device=losses.device).index_add_(
            0, group, torch.ones_like(losses, dtype=acc))
        return sums, counts

    @staticmethod
    def q_update(q, sums, counts, eta, adjustment):
        q_new, mean = q_update_ref(q, sums, counts, eta, adjustment)  # guarded: NaN keeps q
        return q_new, mean, (q_new * mean).sum()

    @staticmethod
    def bwd(logits, target, group, lse, group_scale, label_smoothing):
        acc = lse.dtype
        z = logits.to(acc)
        p = torch.exp(z - lse[:, None])
        K = z.shape[1]
        onehot = torch.full_like(p, label_smoothing / K)
        onehot.scatter_add_(1, target[:, None], torch.full_like(p[:, :1], 1.0 - label_smoothing))
        return ((p - onehot) * group_scale[group][:, None]).to(logits.dtype)


class _CompiledKernels:
    @staticmethod
    def stats(logits, target, group, num_groups, label_smoothing):
        return torch.ops.fastdg.group_loss_stats(logits, target, group, num_groups, label_smoothing)

    @staticmethod
    def sums(losses, group, num_groups):
        return torch.ops.fastdg.group_loss_sums(losses, group, num_groups)

    @staticmethod
    def q_update(q, sums, counts, eta, adjustment):
        return torch.ops.fastdg.group_q_update(q, sums, counts, eta, adjustment)

    @staticmethod
    def bwd(logits, target, group, lse, group_scale, label_smoothing):
        return torch.ops.fastdg.group_loss_bwd(logits, target, group, lse, group_scale, label_smoothing)


def _kernels(backend):
    if backend == "cpp":
        return _CompiledKernels
    if backend == "triton":
        from ..triton import group_loss as triton_group_loss  # lazy: needs triton

        return triton_group_loss.KERNELS
    raise ValueError(backend)


# cpp first: it declines CUDA tensors, and on CPU tensors it must beat the Triton interpreter.
CANDIDATES = [("cpp", _dispatch.compiled_check("group_loss_stats", "cpu")), ("triton", _dispatch.triton_check),
              ("reference", _dispatch.always)]


def _scale(grad, q_new, counts):
    return (grad * q_new / counts.clamp_min(1)).contiguous()


class _FromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, q, eta, label_smoothing, adjustment, kernels, reduce_fn):
        G = q.numel()
        losses, lse, sums, counts = kernels.stats(logits, target, group, G, label_smoothing)
        if reduce_fn is not None:
            sums, counts = reduce_fn(sums, counts)
        q_new, mean, robust = kernels.q_update(q, sums, counts, eta, adjustment)
        ctx.save_for_backward(logits, target, group, lse, q_new, counts)
        ctx.kernels, ctx.label_smoothing = kernels, label_smoothing
        ctx.mark_non_differentiable(q_new, mean, counts)
        return robust, q_new, mean, counts

    @staticmethod
    def backward(ctx, grad, *_):
        logits, target, group, lse, q_new, counts = ctx.saved_tensors
        scale = _scale(grad.to(q_new.dtype), q_new, counts)
        if torch.is_grad_enabled():
            # create_graph: the torch formula, with the log-sum-exp recomputed from the logits (the
            # saved one carries no graph, and the softmax Jacobian would drop out of the Hessian).
            lse = torch.logsumexp(logits.to(lse.dtype), 1)
            dz = TorchKernels.bwd(logits, target, group, lse, scale, ctx.label_smoothing)
        else:
            dz = ctx.kernels.bwd(logits, target, group, lse, scale, ctx.label_smoothing)
        return (dz,) + (None,) * 8


class _FromLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, losses, group, q, eta, adjustment, kernels, reduce_fn):
        sums, counts = kernels.sums(losses, group, q.numel())
        if reduce_fn is not None:
            sums, counts = reduce_fn(sums, counts)
        q_new, mean, robust = kernels.q_update(q, sums, counts, eta, adjustment)
        ctx.save_for_backward(group, q_new, counts)
        ctx.mark_non_differentiable(q_new, mean, counts)
        ctx.dtype = losses.dtype
        return robust, q_new, mean, counts

    @staticmethod
    def backward(ctx, grad, *_):
        group, q_new, counts = ctx.saved_tensors
        return (_scale(grad.to(q_new.dtype), q_new, counts)[group].to(ctx.dtype),) + (None,) * 6


def group_loss(input, target, group, q, *, eta=0.01, label_smoothing=0.0, adjustment=None,
               reduce_fn=None, check_inputs=True, backend=None) -> GroupLossOutput:
    """Robust per-group loss with an exponential weight update, fused.

    input: logits (N, K) with target (N,) int64 (cross-entropy, optional label smoothing), or
    per-sample losses (N,) with target=None. group: (N,) int64 ids in [0, G). q: (G,) current
    weights (float32 state; not modified: the updated weights are returned).
    adjustment: optional (G,) added to L_g in the q update only (Sagawa's C / sqrt(N_g)).
    reduce_fn: optional (sums, counts) -> (sums, counts), e.g. an all-reduce across ranks.
    check_inputs: validate id ranges and finiteness (reads device values; turn off for
    sync-free GPU steps: a non-finite loss then leaves q unchanged and makes `loss` non-finite).

    Returns GroupLossOutput(loss, q, group_loss, group_count):
        L_g = mean loss of group g (0 when empty), q' = normalise(q * exp(eta * (L_g + adj_g))),
        loss = sum_g q'_g L_g, with d loss / d l_i = q'_{g_i} / n_{g_i}.
    """
    _check(input, target, group, q, eta, label_smoothing, adjustment, check_inputs)
    choice = _dispatch.choose(OP, CANDIDATES, backend, input)
    if choice.backend == "cpp" and target is not None and reduce_fn is None and not _dispatch._compiling():
        # Eager CPU: one fused op with its backward in C++ (torch.compile traces the kernel set below).
        loss, q_new, mean, counts = torch.ops.fastdg.group_loss_fused(input, target, group, q, float(eta),
                                                                      float(label_smoothing), adjustment)
        return GroupLossOutput(loss, q_new if q_new.dtype == q.dtype else q_new.to(q.dtype), mean, counts)
    if choice.backend == "reference":
        if reduce_fn is not None:
            kernels = TorchKernels
        else:
            return group_loss_ref(input, target, group, q, eta=eta, label_smoothing=label_smoothing,
                                  adjustment=adjustment)
    else:
        kernels = _kernels(choice.backend)
    if target is None:
        loss, q_new, mean, counts = _FromLosses.apply(input, group, q, eta, adjustment, kernels, reduce_fn)
    else:
        loss, q_new, mean, counts = _FromLogits.apply(input, target, group, q, eta, label_smoothing, adjustment,
                                                      kernels, reduce_fn)
    return GroupLossOutput(loss, q_new.to(q.dtype), mean, counts)


def _check(input, target, group, q, eta, label_smoothing, adjustment, check_inputs):
    V.tensor("input", input, dtypes=V.FLOATS)
    dev = input.device
    if target is None:
        if input.dim() != 1:
            raise ValueError(f"input must be per-sample losses (N,) when target is None, got {tuple(input.shape)}")
    else:
        V.tensor("input", input, dim=2)
        V.tensor("target", target, dim=1, dtypes=(torch.int64,), device=dev)
        V.shape("target", target, (input.shape[0],))
        if input.shape[1] < 1:
            raise ValueError("input (logits) needs at least one class column")
    V.tensor("group", group, dim=1, dtypes=(torch.int64,), device=dev)
    V.shape("group", group, (input.shape[0],))
    V.tensor("q", q, dim=1, dtypes=(torch.float32, torch.float64), device=dev)
    if q.numel() < 1:
        raise ValueError("q must hold one weight per group (G >= 1)")
    V.tensor("adjustment", adjustment, dim=1, dtypes=V.FLOATS, device=dev, allow_none=True)
    V.shape("adjustment", adjustment, q.shape)
    if not (0 <= eta < math.inf):  # inf * 0 (an empty group) would be NaN in every weight
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if target is not None and label_smoothing > 0 and input.shape[1] < 2:
        raise ValueError("label smoothing needs at least two classes")
    if check_inputs:
        V.ids_in_range("group", group, q.numel())
        if target is not None:
            V.ids_in_range("target", target, input.shape[1])
        V.finite("input", input)
        V.finite("q", q)
        if adjustment is not None:
            V.finite("adjustment", adjustment)
        if bool((q < 0).any()):
            raise ValueError("q must be non-negative weights")
