"""Triton kernels of the fused per-group loss with exponential weights (METHODS.md section 2):
the kernel set of `fastdg.ops.group_loss` for backend="triton".

    stats    read logits once          -> losses, lse (N,) fp32; sums, counts (G,) fp32
    sums     read per-sample losses    -> sums, counts (G,) fp32
    q_update (G,)-sized, one program   -> q_new, group_mean (G,) fp32; robust () fp32
    bwd      read logits, write grad   grad = scale[g_i] (softmax(z_i) - onehot_ls(y_i))

with l_i = lse_i - (1 - ls) z_{i,y_i} - ls mean_k z_{i,k} (label-smoothed cross-entropy),
L_g = sum_{g_i = g} l_i / max(n_g, 1), q' = softmax(log q + eta * step), step_g = L_g (+ adj_g)
for non-empty groups and 0 for empty ones, robust = sum_g q'_g L_g. Backward (the op folds the
upstream gradient into `scale`): d robust / d z_{i,k} = q'_g / n_g (p_{i,k} - onehot_ls_{i,k}),
p = softmax(z_i), onehot_ls = (1 - ls) [k = y_i] + ls / K.

Work decomposition
- stats: grid (P,). Program p owns rows [p*R, (p+1)*R) (R = rows_per_prog) and walks them in
  tiles [BLOCK_R, BLOCK_K], each row's log-sum-exp an online (max, sum exp) over K in BLOCK_K
  chunks (any K; BLOCK_K capped). Per-group partial sums and counts of the program's rows come
  from a one-hot [rows, BLOCK_G] match reduced over rows: in registers during the row loop when
  G fits one BLOCK_G, else a second pass over the program's stored losses, G in BLOCK_G chunks.
  They go to a (P, G) buffer and are reduced over p in a fixed order (deterministic, no float
  atomics) by either
    * the last program to finish (FUSED): each program bumps an int32 ticket (acq_rel atomic)
      after its partials; the one that draws P-1 sums the buffer and zeroes the ticket again.
      One launch (eager calls keep one ticket per stream; traced calls and CUDA-graph captures
      add a 4-byte zero fill); used when P*G is small (the target shapes), or
    * a second tiny kernel, grid (cdiv(G, BLOCK_G),), when P*G is large (G in the thousands).
  With P == 1 the single program writes the sums directly.
- sums: the same segmented sums and reduction, the per-sample losses read as given.
- q_update: one program, G in BLOCK_G chunks (in registers when G fits one chunk), log-space
  softmax with an online max, the non-finite guard from the C++ kernel.
- bwd: grid (cdiv(N, BLOCK_R),), one row tile per program, K in BLOCK_K chunks, one read of the
  logits and one write of the gradient in their dtype.
Launches per training step of the op: forward = stats (1 kernel; +1 reduce kernel only for
large P*G) + q_update (1); backward = bwd (1), after the op's own elementwise scale. Nothing
reads device memory on the host: launch configurations are functions of shapes and dtypes
only (not of the SM count either, so results are the same bits on an H100 and an H200), and
every launch goes to the current stream, so every call can be captured in a CUDA graph.

Numerics: fp32 accumulation for fp32/fp16/bf16 logits. Out-of-range ids (possible only with the
op's check_inputs=False) are never used as addresses: a bad target makes that row's loss (and
gradient row) NaN, a bad group id makes every group sum NaN, so q stays unchanged and the
robust loss is non-finite, the op's signal for a bad step.

Registration: each launcher is an operator `fastdg::group_loss_<name>_triton` made with
torch.library.triton_op (kernels wrapped in wrap_triton) so torch.compile traces to the kernels.
Under TRITON_INTERPRET=1 the kernels are InterpretedFunctions, which FakeTensor tracing cannot
run, so there the launchers are registered as opaque custom ops with shape-only fakes. In
plain eager calls KERNELS launches directly (the custom-op dispatcher costs ~8 us a call, which
at (1024, 65) is a good part of the whole step); under torch.compile, make_fx, FakeTensor or
functorch it goes through the registered operators. Nothing is compiled at import.
"""
# No `from __future__ import annotations`: the launchers' annotations become the operator
# schemas (torch.library infers them) and must be real types on every supported torch.
import contextlib
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["KERNELS", "group_loss_stats", "group_loss_sums", "group_q_update", "group_loss_bwd"]


# ---- jit helpers -------------------------------------------------------------------------

@triton.jit
def _ce_tile(logits_ptr, target_ptr, rows, ok, K, stride_n, ls,
             BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, HAS_LS: tl.constexpr):
    """(lse, loss) [BLOCK_R] fp32 of a tile of rows (ok: rows that exist).

    Online log-sum-exp: per chunk m' = max(m, max_k z), s = s exp(m - m') + sum_k exp(z - m').
    The shift is 0 while a row has seen only -inf (masked logits), so s stays 0 instead of NaN."""
    row_ptr = logits_ptr + rows.to(tl.int64) * stride_n
    cols = tl.arange(0, BLOCK_K)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    zsum = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = ok[:, None] & (k < K)[None, :]
        z = tl.load(row_ptr[:, None] + k[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        m = m_new
        if HAS_LS:
            zsum += tl.sum(tl.where(mask, z, 0.0), axis=1)
    lse = m + tl.log(tl.where(ok, s, 1.0))  # (rows past N: no log(0))
    y = tl.load(target_ptr + rows, mask=ok, other=0)
    y_ok = ok & (y >= 0) & (y < K)
    # z_y by a gather (the row is in cache); a bad target reads nothing and gives a NaN loss.
    zy = tl.load(row_ptr + y, mask=y_ok, other=float("nan")).to(tl.float32)
    if HAS_LS:
        # (1-ls)(lse - z_y) + ls (lse - mean z). Without smoothing the mean term is left out,
        # not multiplied by 0: a masked (-inf) logit would make it NaN.
        loss = lse - (1.0 - ls) * zy - ls * (zsum / K)
    else:
        loss = lse - zy
    return lse, loss


@triton.jit
def _group_tile_sums(grp, val, ok, g0, BLOCK_G: tl.constexpr):
    """Sums of val and counts per group for groups g0 .. g0+BLOCK_G-1 over one tile of rows:
    a [rows, BLOCK_G] one-hot match reduced over rows (a fixed-order tree, no atomics)."""
    gids = g0 + tl.arange(0, BLOCK_G)
    match = (grp[:, None] == gids[None, :]) & ok[:, None]
    s = tl.sum(tl.where(match, val[:, None], 0.0), axis=0)  # where, not *: NaN stays in its group
    c = tl.sum(match.to(tl.float32), axis=0)
    return s, c


@triton.jit
def _segment_partials(val_ptr, group_ptr, psum_ptr, pcnt_ptr, row_start, row_end, G,
                      BLOCK_RG: tl.constexpr, BLOCK_G: tl.constexpr):
    """One program's per-group sums of val[row_start:row_end] (any float dtype) and counts,
    written to its partial rows psum_ptr[0:G], pcnt_ptr[0:G]; G in BLOCK_G chunks."""
    lane = tl.arange(0, BLOCK_RG)
    nbad = tl.zeros([BLOCK_RG], tl.int32)
    for r0 in range(row_start, row_end, BLOCK_RG):  # out-of-range group ids poison every sum
        rows = r0 + lane
        ok = rows < row_end
        grp = tl.load(group_ptr + rows, mask=ok, other=0)
        nbad += (ok & ((grp < 0) | (grp >= G))).to(tl.int32)
    poison = tl.sum(nbad, axis=0) > 0
    for g0 in range(0, G, BLOCK_G):
        acc_s = tl.zeros([BLOCK_G], tl.float32)
        acc_c = tl.zeros([BLOCK_G], tl.float32)
        for r0 in range(row_start, row_end, BLOCK_RG):
            rows = r0 + lane
            ok = rows < row_end
            v = tl.load(val_ptr + rows, mask=ok, other=0.0).to(tl.float32)
            grp = tl.load(group_ptr + rows, mask=ok, other=0)
            s, c = _group_tile_sums(grp, v, ok, g0, BLOCK_G)
            acc_s += s
            acc_c += c
        gids = g0 + tl.arange(0, BLOCK_G)
        tl.store(psum_ptr + gids, tl.where(poison, float("nan"), acc_s), mask=gids < G)
        tl.store(pcnt_ptr + gids, acc_c, mask=gids < G)


@triton.jit
def _reduce_partials(psum_ptr, pcnt_ptr, sums_ptr, counts_ptr, P, G, g0,
                     FIN_P: tl.constexpr, FIN_G: tl.constexpr):
    """sums[g] = sum_p psum[p, g] (and counts) for g in g0 .. g0+FIN_G-1, p in a fixed order:
    FIN_P rows at a time, each tile reduced by the same tree."""
    g = g0 + tl.arange(0, FIN_G)
    gm = g < G
    lane = tl.arange(0, FIN_P)
    acc_s = tl.zeros([FIN_G], tl.float32)
    acc_c = tl.zeros([FIN_G], tl.float32)
    for p0 in range(0, P, FIN_P):
        p = p0 + lane
        m = (p < P)[:, None] & gm[None, :]
        offs = p.to(tl.int64)[:, None] * G + g[None, :]
        # .cg: straight from L2, where the other programs' partials were written.
        acc_s += tl.sum(tl.load(psum_ptr + offs, mask=m, other=0.0, cache_modifier=".cg"), axis=0)
        acc_c += tl.sum(tl.load(pcnt_ptr + offs, mask=m, other=0.0, cache_modifier=".cg"), axis=0)
    tl.store(sums_ptr + g, acc_s, mask=gm)
    tl.store(counts_ptr + g, acc_c, mask=gm)


@triton.jit
def _finish_if_last(psum_ptr, pcnt_ptr, sums_ptr, counts_ptr, ticket_ptr, P, G,
                    FIN_P: tl.constexpr, FIN_G: tl.constexpr):
    """Last-program reduction: after its partials, each program takes a ticket; the program
    that draws P-1 knows every partial row is written and reduces them all.

    The barrier orders the stores of all this program's threads before the (single-thread)
    release; acq_rel makes the last program's loads see every other program's stores."""
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == P - 1:
        tl.debug_barrier()
        for g0 in range(0, G, FIN_G):
            _reduce_partials(psum_ptr, pcnt_ptr, sums_ptr, counts_ptr, P, G, g0, FIN_P, FIN_G)
        tl.store(ticket_ptr, 0)  # every program has drawn: zero again for the next launch


# ---- kernels -----------------------------------------------------------------------------

@triton.jit
def _group_loss_stats_kernel(
    logits_ptr,  # (N, K) fp32/fp16/bf16, row stride stride_n, column stride 1
    target_ptr,  # (N,) int64 class ids in [0, K)
    group_ptr,   # (N,) int64 group ids in [0, G)
    losses_ptr,  # (N,) fp32 out: per-sample (label-smoothed) cross-entropy
    lse_ptr,     # (N,) fp32 out: per-sample log-sum-exp (saved for bwd)
    psum_ptr,    # (P, G) fp32 out: per-program group loss sums (P == 1: the sums themselves)
    pcnt_ptr,    # (P, G) fp32 out: per-program group counts (P == 1: the counts)
    sums_ptr,    # (G,) fp32 out when FUSED (else None): sum over p of psum, in p order
    counts_ptr,  # (G,) fp32 out when FUSED (else None): sum over p of pcnt
    ticket_ptr,  # (1,) int32, zero on entry and on exit, when FUSED (else None): programs done
    N, K, stride_n, G, ls, rows_per_prog, P,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, ONE_G_CHUNK: tl.constexpr,
    BLOCK_RG: tl.constexpr, HAS_LS: tl.constexpr, FUSED: tl.constexpr, FIN_P: tl.constexpr,
    FIN_G: tl.constexpr,
):
    """Per-row cross-entropy and lse, per-program per-group partial sums and counts."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    lane = tl.arange(0, BLOCK_R)
    part = pid.to(tl.int64) * G
    acc_s = tl.zeros([BLOCK_G], tl.float32)
    acc_c = tl.zeros([BLOCK_G], tl.float32)
    nbad = tl.zeros([BLOCK_R], tl.int32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + lane
        ok = rows < row_end
        lse, loss = _ce_tile(logits_ptr, target_ptr, rows, ok, K, stride_n, ls, BLOCK_R, BLOCK_K, HAS_LS)
        tl.store(lse_ptr + rows, lse, mask=ok)
        tl.store(losses_ptr + rows, loss, mask=ok)
        if ONE_G_CHUNK:  # all G groups in registers: no second pass
            grp = tl.load(group_ptr + rows, mask=ok, other=0)
            s, c = _group_tile_sums(grp, loss, ok, 0, BLOCK_G)
            acc_s += s
            acc_c += c
            nbad += (ok & ((grp < 0) | (grp >= G))).to(tl.int32)
    if ONE_G_CHUNK:
        gids = tl.arange(0, BLOCK_G)
        acc_s = tl.where(tl.sum(nbad, axis=0) > 0, float("nan"), acc_s)
        tl.store(psum_ptr + part + gids, acc_s, mask=gids < G)
        tl.store(pcnt_ptr + part + gids, acc_c, mask=gids < G)
    else:
        tl.debug_barrier()  # the losses just stored by all threads are read back below
        _segment_partials(losses_ptr, group_ptr, psum_ptr + part, pcnt_ptr + part, row_start, row_end, G,
                          BLOCK_RG, BLOCK_G)
    if FUSED:
        _finish_if_last(psum_ptr, pcnt_ptr, sums_ptr, counts_ptr, ticket_ptr, P, G, FIN_P, FIN_G)


@triton.jit
def _group_loss_sums_kernel(
    losses_ptr,  # (N,) fp32/fp16/bf16 per-sample losses
    group_ptr,   # (N,) int64 group ids in [0, G)
    psum_ptr,    # (P, G) fp32 out: per-program group loss sums (P == 1: the sums themselves)
    pcnt_ptr,    # (P, G) fp32 out: per-program group counts (P == 1: the counts)
    sums_ptr,    # (G,) fp32 out when FUSED (else None)
    counts_ptr,  # (G,) fp32 out when FUSED (else None)
    ticket_ptr,  # (1,) int32, zero on entry and on exit, when FUSED (else None)
    N, G, rows_per_prog, P,
    BLOCK_RG: tl.constexpr, BLOCK_G: tl.constexpr, FUSED: tl.constexpr, FIN_P: tl.constexpr,
    FIN_G: tl.constexpr,
):
    """Per-program per-group partial sums and counts of given per-sample losses."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    part = pid.to(tl.int64) * G
    _segment_partials(losses_ptr, group_ptr, psum_ptr + part, pcnt_ptr + part, row_start, row_end, G,
                      BLOCK_RG, BLOCK_G)
    if FUSED:
        _finish_if_last(psum_ptr, pcnt_ptr, sums_ptr, counts_ptr, ticket_ptr, P, G, FIN_P, FIN_G)


@triton.jit
def _group_loss_reduce_kernel(
    psum_ptr,    # (P, G) fp32 per-program group sums
    pcnt_ptr,    # (P, G) fp32 per-program group counts
    sums_ptr,    # (G,) fp32 out
    counts_ptr,  # (G,) fp32 out
    P, G,
    FIN_P: tl.constexpr, FIN_G: tl.constexpr,
):
    """The fixed-order reduction over p when P*G is too large for one program: grid over G."""
    _reduce_partials(psum_ptr, pcnt_ptr, sums_ptr, counts_ptr, P, G, tl.program_id(0) * FIN_G, FIN_P, FIN_G)


@triton.jit
def _q_terms(q_ptr, sums_ptr, counts_ptr, adj_ptr, g, gm, eta, HAS_ADJ: tl.constexpr):
    """(q, mean, log q + eta * step, non-finite mean) for group ids g (gm: ids < G)."""
    q = tl.load(q_ptr + g, mask=gm, other=1.0).to(tl.float32)
    s = tl.load(sums_ptr + g, mask=gm, other=0.0)
    c = tl.load(counts_ptr + g, mask=gm, other=0.0)
    mean = s / tl.maximum(c, 1.0)
    step = mean
    if HAS_ADJ:
        step = step + tl.load(adj_ptr + g, mask=gm, other=0.0).to(tl.float32)
    step = tl.where(c > 0, step, 0.0)  # empty groups keep their weight (adjustment included)
    logq = tl.where(gm, tl.log(q) + eta * step, float("-inf"))
    # A non-finite mean, or a NaN / +inf log-weight (non-finite adjustment), would poison q: -inf
    # is a zero weight and is fine. NaN fails both comparisons.
    bad = gm & (~(tl.abs(mean) < float("inf")) | ~(logq < float("inf")))
    return q, mean, logq, bad


@triton.jit
def _group_loss_q_update_kernel(
    q_ptr,       # (G,) fp32/fp64 current weights
    sums_ptr,    # (G,) fp32 per-group loss sums
    counts_ptr,  # (G,) fp32 per-group counts
    adj_ptr,     # (G,) float adjustment added to the step when HAS_ADJ (else None)
    q_new_ptr,   # (G,) fp32 out: softmax(log q + eta * step), or q if a mean is non-finite
    mean_ptr,    # (G,) fp32 out: sums / max(counts, 1)
    robust_ptr,  # () fp32 out: sum_g q_new * mean
    G, eta,
    BLOCK_G: tl.constexpr, ONE_CHUNK: tl.constexpr, HAS_ADJ: tl.constexpr,
):
    """q' = softmax(log q + eta * step) in log space (normalised, cannot overflow); a non-finite
    group mean (robust = sum q' L is then non-finite), a NaN / +inf log-weight or all-zero weights
    leave q unchanged."""
    lane = tl.arange(0, BLOCK_G)
    if ONE_CHUNK:
        gm = lane < G
        q, mean, logq, bad = _q_terms(q_ptr, sums_ptr, counts_ptr, adj_ptr, lane, gm, eta, HAS_ADJ)
        hi = tl.max(logq, axis=0)
        e = tl.exp(logq - tl.where(hi == float("-inf"), 0.0, hi))
        q_new = e / tl.sum(e, axis=0)
        ok = (tl.sum(bad.to(tl.int32), axis=0) == 0) & (hi > float("-inf"))  # not every weight zero
        q_new = tl.where(ok, q_new, q)
        tl.store(q_new_ptr + lane, q_new, mask=gm)
        tl.store(mean_ptr + lane, mean, mask=gm)
        tl.store(robust_ptr, tl.sum(tl.where(gm, q_new * mean, 0.0), axis=0))
    else:
        # Pass 1: per-lane online (max, sum exp) of log q', and the finiteness check.
        hi_l = tl.full([BLOCK_G], float("-inf"), tl.float32)
        tot_l = tl.zeros([BLOCK_G], tl.float32)
        nbad = tl.zeros([BLOCK_G], tl.int32)
        for g0 in range(0, G, BLOCK_G):
            g = g0 + lane
            q, mean, logq, bad = _q_terms(q_ptr, sums_ptr, counts_ptr, adj_ptr, g, g < G, eta, HAS_ADJ)
            m_new = tl.maximum(hi_l, logq)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            tot_l = tot_l * tl.exp(hi_l - shift) + tl.exp(logq - shift)
            hi_l = m_new
            nbad += bad.to(tl.int32)
        hi = tl.max(hi_l, axis=0)
        finite = (tl.sum(nbad, axis=0) == 0) & (hi > float("-inf"))  # not every weight zero
        hi = tl.where(hi == float("-inf"), 0.0, hi)
        total = tl.sum(tot_l * tl.exp(hi_l - hi), axis=0)
        # Pass 2: the same terms again (deterministic), normalised and written.
        rob = tl.zeros([BLOCK_G], tl.float32)
        for g0 in range(0, G, BLOCK_G):
            g = g0 + lane
            gm = g < G
            q, mean, logq, bad = _q_terms(q_ptr, sums_ptr, counts_ptr, adj_ptr, g, gm, eta, HAS_ADJ)
            q_new = tl.where(finite, tl.exp(logq - hi) / total, q)
            tl.store(q_new_ptr + g, q_new, mask=gm)
            tl.store(mean_ptr + g, mean, mask=gm)
            rob += tl.where(gm, q_new * mean, 0.0)
        tl.store(robust_ptr, tl.sum(rob, axis=0))


@triton.jit
def _group_loss_bwd_kernel(
    logits_ptr,  # (N, K) fp32/fp16/bf16, row stride stride_n, column stride 1
    target_ptr,  # (N,) int64 class ids in [0, K)
    group_ptr,   # (N,) int64 group ids in [0, G)
    lse_ptr,     # (N,) fp32 log-sum-exp from stats
    scale_ptr,   # (G,) fp32 per-group gradient scale (upstream grad * q'_g / max(n_g, 1))
    grad_ptr,    # (N, K) logits' dtype out, contiguous: scale[g_i] (p_ik - onehot_ls_ik)
    N, K, stride_n, G, off, hit,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_ik = scale[g_i] (exp(z_ik - lse_i) - off - hit [k = y_i]), off = ls/K, hit = 1 - ls."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < N
    lse = tl.load(lse_ptr + rows, mask=ok, other=0.0)
    y = tl.load(target_ptr + rows, mask=ok, other=0)
    grp = tl.load(group_ptr + rows, mask=ok, other=0)
    sc = tl.load(scale_ptr + grp, mask=ok & (grp >= 0) & (grp < G), other=float("nan"))
    sc = tl.where((y >= 0) & (y < K), sc, float("nan"))  # bad ids: a NaN row, never a wild read
    z_row = logits_ptr + rows.to(tl.int64) * stride_n
    g_row = grad_ptr + rows.to(tl.int64) * K
    cols = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = ok[:, None] & (k < K)[None, :]
        z = tl.load(z_row[:, None] + k[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse[:, None])
        t = tl.where(k[None, :] == y[:, None], hit + off, off)
        tl.store(g_row[:, None] + k[None, :], (sc[:, None] * (p - t)).to(grad_ptr.dtype.element_ty), mask=mask)


# ---- launch configuration ----------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """Launch constants per device kind (GPU, or the CPU interpreter)."""
    tile: int            # elements of a [BLOCK_R, BLOCK_K] logits tile
    max_block_k: int     # cap on BLOCK_K (larger K loops)
    min_tiles: int       # shrink BLOCK_R until there are this many row tiles (small N)
    max_programs: int    # cap on P, the programs of stats/sums (partial rows)
    part_cap: int        # cap on P * G (partial buffer entries)
    g_reg: int           # G up to this: all groups in registers (one BLOCK_G chunk)
    g_chunk: int         # BLOCK_G of the chunked group pass (G > g_reg)
    group_tile: int      # elements of a [BLOCK_RG, BLOCK_G] group-match tile
    max_block_rg: int    # cap on BLOCK_RG
    fuse_limit: int      # P * G up to this: the last program reduces the partials
    fin_tile: int        # elements of a [FIN_P, FIN_G] tile of the final reduction
    fin_g: int           # cap on FIN_G
    q_block: int         # cap on q_update's BLOCK_G


# GPU: 8192-element logits tiles (32 KB fp32) in 8 warps, i.e. 32 elements a thread, and up to 256
# programs, ~2 per SM on an H100 (132 SMs), each streaming its rows; small N shrinks the tile so
# that at least 128 programs share the work ((1024, 65): 128 programs of 8 x 128). The partial
# buffer stays small enough (P*G <= 16384) for the last program to reduce it in a few tile loads
# at the target shapes ((8192, 1000, 64): P = 256, 4 loads); beyond that a grid over G reduces it.
# Interpreter (CPU tests): tiny tiles and few programs, so that small test shapes still loop over
# several K chunks, row tiles and G chunks, split rows between programs and take every path.
GPU_PARAMS = Params(tile=8192, max_block_k=8192, min_tiles=128, max_programs=256, part_cap=1 << 22,
                    g_reg=256, g_chunk=256, group_tile=4096, max_block_rg=1024, fuse_limit=16384,
                    fin_tile=4096, fin_g=128, q_block=1024)
CPU_PARAMS = Params(tile=64, max_block_k=32, min_tiles=1, max_programs=3, part_cap=1 << 16,
                    g_reg=8, g_chunk=64, group_tile=256, max_block_rg=16, fuse_limit=64,
                    fin_tile=16, fin_g=16, q_block=64)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _np2(n):
    return triton.next_power_of_2(max(int(n), 1))


@dataclass(frozen=True)
class RowConfig:
    block_r: int        # rows of a logits tile (stats, bwd)
    block_k: int        # columns of a logits tile
    block_g: int        # groups per match chunk
    one_g_chunk: bool   # G <= block_g: group sums in registers during the row loop
    block_rg: int       # rows of a group-match tile (chunked pass, sums)
    rows_per_prog: int  # rows of one stats/sums program
    programs: int       # P
    fused: bool         # P > 1 and the last program reduces the partials
    fin_p: int          # final reduction tile [fin_p, fin_g]
    fin_g: int
    num_warps: int


@functools.lru_cache(maxsize=1024)
def plan(N: int, K: int, G: int, params: Params) -> RowConfig:
    """Launch configuration of stats (K >= 1) or sums (K == 0) for N rows and G groups."""
    c = params
    gp = _np2(G)
    one = gp <= c.g_reg
    block_g = gp if one else c.g_chunk
    block_rg = max(1, min(c.max_block_rg, c.group_tile // block_g))
    if K:
        block_k = min(_np2(K), c.max_block_k)
        block_r = max(1, min(c.tile // block_k, _np2(N)))
        while block_r > 1 and triton.cdiv(N, block_r) < c.min_tiles:
            block_r //= 2
        unit = block_r
    else:
        block_k, block_r = 1, 1
        unit = block_rg
        one = False  # the losses are read as given: the chunked pass is the only pass
    tiles = max(1, triton.cdiv(N, unit))
    programs = min(tiles, c.max_programs, max(1, c.part_cap // G))
    rows_per_prog = triton.cdiv(tiles, programs) * unit
    programs = max(1, triton.cdiv(N, rows_per_prog))
    fin_g = min(gp, c.fin_g)
    fin_p = max(1, min(_np2(programs), c.fin_tile // fin_g))
    fused = programs > 1 and programs * G <= c.fuse_limit
    num_warps = 8 if block_r * block_k >= 4096 else 4
    return RowConfig(block_r, block_k, block_g, one, block_rg, rows_per_prog, programs, fused, fin_p, fin_g,
                     num_warps)


@functools.lru_cache(maxsize=1024)
def plan_bwd(N: int, K: int, params: Params) -> tuple:
    """(BLOCK_R, BLOCK_K, num_warps) of bwd: the stats tile, one tile per program."""
    cfg = plan(N, K, 1, params)
    return cfg.block_r, cfg.block_k, cfg.num_warps


def _params(t):
    return GPU_PARAMS if t.device.type == "cuda" else CPU_PARAMS


# ---- launchers ---------------------------------------------------------------------------

def _kernel(k, wrap):
    """wrap_triton(k) inside the registered operators, so torch.compile sees the launch; the
    bare kernel on the direct eager path and under the interpreter (recent torch passes
    interpreted kernels through wrap_triton, older torch refuses them)."""
    return wrap_triton(k) if wrap and not _INTERPRETED else k


def _check_rows(name, t, n):
    if t.dim() != 1 or t.shape[0] != n or t.dtype != torch.int64:
        raise ValueError(f"{name} must be an int64 ({n},) tensor, got {t.dtype} {tuple(t.shape)}")


def _check_logits(logits, target, group):
    if logits.dim() != 2 or logits.dtype not in _DTYPES:
        raise ValueError(f"logits must be a 2-D fp32/fp16/bf16 tensor, got {logits.dtype} {tuple(logits.shape)}")
    _check_rows("target", target, logits.shape[0])
    _check_rows("group", group, logits.shape[0])
    if logits.shape[1] < 1:
        raise ValueError("logits need at least one class column")
    if logits.stride(1) != 1:  # rows may be strided; columns must be contiguous
        logits = logits.contiguous()
    return logits, target.contiguous(), group.contiguous()


def _empty(ref, shape, dtype=torch.float32):
    """Every output and partial buffer the launchers allocate (tests poison them through here)."""
    return torch.empty(shape, dtype=dtype, device=ref.device)


_TICKETS = {}  # (device, stream) -> (1,) int32 ticket counter of the eager path, zero between launches


def _ticket(ref, direct):
    """The ticket counter of a FUSED launch, zero on entry. The last program sets it back to zero,
    and launches on one stream run one after the other, so plain eager calls reuse one counter per
    (device, stream) and need no zero fill; traced calls (torch.compile, make_fx) and CUDA-graph
    captures get a fresh zeroed tensor (in a graph: a fill node replayed with it)."""
    dev = ref.device
    if not direct or (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.zeros(1, dtype=torch.int32, device=dev)
    key = (dev.type, dev.index, torch._C._cuda_getCurrentRawStream(dev.index) if dev.type == "cuda" else 0)
    ticket = _TICKETS.get(key)
    if ticket is None:
        if len(_TICKETS) >= 64:  # streams come and go: forget the old ones (their launches are queued
            _TICKETS.clear()     # before any reuse of the memory on the same stream)
        ticket = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=dev)
    return ticket


def _group_outputs(ref, G, cfg, direct):
    """(sums, counts, psum, pcnt, fin): the partial buffers are the outputs themselves when
    P == 1; fin = the (sums, counts, ticket) arguments of a FUSED kernel, else None for each: no
    tensor is passed twice to a kernel (torch.compile's mutation analysis)."""
    sums, counts = _empty(ref, (G,)), _empty(ref, (G,))
    if cfg.programs == 1:
        return sums, counts, sums, counts, (None, None, None)
    psum, pcnt = _empty(ref, (cfg.programs, G)), _empty(ref, (cfg.programs, G))
    if cfg.fused:
        return sums, counts, psum, pcnt, (sums, counts, _ticket(ref, direct))
    return sums, counts, psum, pcnt, (None, None, None)


def _reduce_if_split(cfg, G, psum, pcnt, sums, counts, wrap):
    if cfg.programs > 1 and not cfg.fused:
        _kernel(_group_loss_reduce_kernel, wrap)[(triton.cdiv(G, cfg.fin_g),)](
            psum, pcnt, sums, counts, cfg.programs, G, FIN_P=cfg.fin_p, FIN_G=cfg.fin_g, num_warps=4)


def _stats(logits, target, group, num_groups, label_smoothing, wrap):
    G = int(num_groups)
    if G < 1:
        raise ValueError(f"num_groups must be >= 1, got {G}")
    logits, target, group = _check_logits(logits, target, group)
    N, K = logits.shape
    cfg = plan(N, K, G, _params(logits))
    losses, lse = _empty(logits, (N,)), _empty(logits, (N,))
    sums, counts, psum, pcnt, fin = _group_outputs(logits, G, cfg, direct=not wrap)
    ls = float(label_smoothing)
    _kernel(_group_loss_stats_kernel, wrap)[(cfg.programs,)](
        logits, target, group, losses, lse, psum, pcnt, *fin,
        N, K, logits.stride(0), G, ls, cfg.rows_per_prog, cfg.programs,
        BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, BLOCK_G=cfg.block_g, ONE_G_CHUNK=cfg.one_g_chunk,
        BLOCK_RG=cfg.block_rg, HAS_LS=ls > 0, FUSED=cfg.fused, FIN_P=cfg.fin_p, FIN_G=cfg.fin_g,
        num_warps=cfg.num_warps)
    _reduce_if_split(cfg, G, psum, pcnt, sums, counts, wrap)
    return losses, lse, sums, counts


def _sums(losses, group, num_groups, wrap):
    G = int(num_groups)
    if G < 1:
        raise ValueError(f"num_groups must be >= 1, got {G}")
    if losses.dim() != 1 or losses.dtype not in _DTYPES:
        raise ValueError(f"losses must be a 1-D fp32/fp16/bf16 tensor, got {losses.dtype} {tuple(losses.shape)}")
    N = losses.shape[0]
    _check_rows("group", group, N)
    losses, group = losses.contiguous(), group.contiguous()
    cfg = plan(N, 0, G, _params(losses))
    sums, counts, psum, pcnt, fin = _group_outputs(losses, G, cfg, direct=not wrap)
    _kernel(_group_loss_sums_kernel, wrap)[(cfg.programs,)](
        losses, group, psum, pcnt, *fin, N, G, cfg.rows_per_prog, cfg.programs,
        BLOCK_RG=cfg.block_rg, BLOCK_G=cfg.block_g, FUSED=cfg.fused, FIN_P=cfg.fin_p, FIN_G=cfg.fin_g,
        num_warps=4)
    _reduce_if_split(cfg, G, psum, pcnt, sums, counts, wrap)
    return sums, counts


def _q_update(q, sums, counts, eta, adjustment, wrap):
    G = q.shape[0]
    if q.dim() != 1 or not q.is_floating_point():
        raise ValueError(f"q must be a 1-D float tensor, got {q.dtype} {tuple(q.shape)}")
    for name, t in (("sums", sums), ("counts", counts), ("adjustment", adjustment)):
        if t is not None and (t.shape != q.shape or not t.is_floating_point()):
            raise ValueError(f"{name} must be a float ({G},) tensor like q, got {t.dtype} {tuple(t.shape)}")
    q = q.contiguous()
    sums = sums.to(torch.float32).contiguous()
    counts = counts.to(torch.float32).contiguous()
    adj = adjustment.contiguous() if adjustment is not None else None
    q_new, mean, robust = _empty(sums, (G,)), _empty(sums, (G,)), _empty(sums, ())
    block = min(_np2(G), _params(sums).q_block)
    _kernel(_group_loss_q_update_kernel, wrap)[(1,)](
        q, sums, counts, adj, q_new, mean, robust, G, float(eta),
        BLOCK_G=block, ONE_CHUNK=G <= block, HAS_ADJ=adjustment is not None, num_warps=4)
    return q_new, mean, robust


def _bwd(logits, target, group, lse, group_scale, label_smoothing, wrap):
    logits, target, group = _check_logits(logits, target, group)
    N, K = logits.shape
    if lse.shape != (N,) or group_scale.dim() != 1:
        raise ValueError(f"lse must be ({N},) and group_scale (G,), got {tuple(lse.shape)}, "
                         f"{tuple(group_scale.shape)}")
    lse = lse.to(torch.float32).contiguous()
    scale = group_scale.to(torch.float32).contiguous()
    grad = _empty(logits, (N, K), logits.dtype)
    if N == 0:
        return grad
    block_r, block_k, num_warps = plan_bwd(N, K, _params(logits))
    ls = float(label_smoothing)
    _kernel(_group_loss_bwd_kernel, wrap)[(triton.cdiv(N, block_r),)](
        logits, target, group, lse, scale, grad, N, K, logits.stride(0), scale.shape[0], ls / K, 1.0 - ls,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps)
    return grad


# The registered operators (schemas inferred from these annotations).

def group_loss_stats(logits: torch.Tensor, target: torch.Tensor, group: torch.Tensor, num_groups: int,
                     label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, K) fp32/fp16/bf16, target/group (N,) int64 -> losses (N,), lse (N,), sums (G,),
    counts (G,), all fp32: l_i = lse_i - (1-ls) z_{i,y_i} - ls mean_k z_ik, sums/counts per group."""
    return _stats(logits, target, group, num_groups, label_smoothing, wrap=True)


def group_loss_sums(losses: torch.Tensor, group: torch.Tensor,
                    num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """losses (N,) fp32/fp16/bf16, group (N,) int64 -> per-group sums and counts (G,) fp32."""
    return _sums(losses, group, num_groups, wrap=True)


def group_q_update(q: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, eta: float,
                   adjustment: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (G,) fp32/fp64, sums/counts (G,) -> q_new (G,), group_mean (G,), robust (): fp32.
    q_new = softmax(log q + eta step), step = mean (+ adjustment) if count > 0 else 0; q_new = q
    when a group mean is non-finite; robust = sum q_new * mean."""
    return _q_update(q, sums, counts, eta, adjustment, wrap=True)


def group_loss_bwd(logits: torch.Tensor, target: torch.Tensor, group: torch.Tensor, lse: torch.Tensor,
                   group_scale: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """grad (N, K) in logits' dtype = group_scale[group_i] (softmax(z_i) - onehot_ls(y_i))."""
    return _bwd(logits, target, group, lse, group_scale, label_smoothing, wrap=True)


# ---- operator registration ---------------------------------------------------------------

def _is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


_INTERPRETED = _is_interpreted(_group_loss_stats_kernel)


def _fake_stats(logits, target, group, num_groups, label_smoothing):
    n = logits.shape[0]
    return (logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(num_groups, dtype=torch.float32), logits.new_empty(num_groups, dtype=torch.float32))


def _fake_sums(losses, group, num_groups):
    return losses.new_empty(num_groups, dtype=torch.float32), losses.new_empty(num_groups, dtype=torch.float32)


def _fake_q_update(q, sums, counts, eta, adjustment):
    G = q.shape[0]
    return (sums.new_empty(G, dtype=torch.float32), sums.new_empty(G, dtype=torch.float32),
            sums.new_empty((), dtype=torch.float32))


def _fake_bwd(logits, target, group, lse, group_scale, label_smoothing):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _register(name, fn, fake):
    qualname = f"fastdg::{name}"
    if _INTERPRETED:  # opaque op + shape-only fake: FakeTensor tracing cannot run the interpreter
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return triton_op(qualname, fn, mutates_args=())


group_loss_stats_op = _register("group_loss_stats_triton", group_loss_stats, _fake_stats)
group_loss_sums_op = _register("group_loss_sums_triton", group_loss_sums, _fake_sums)
group_q_update_op = _register("group_q_update_triton", group_q_update, _fake_q_update)
group_loss_bwd_op = _register("group_loss_bwd_triton", group_loss_bwd, _fake_bwd)


# ---- the kernel set ----------------------------------------------------------------------

def _direct(t) -> bool:
    """Plain eager call on a plain tensor: launch without the operator dispatcher. Anything
    that traces (torch.compile, make_fx / AOTAutograd, FakeTensor, functorch) or a tensor
    subclass goes through the registered operator instead."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active()) and type(t) is torch.Tensor


def _on_device(t):
    """Triton launches on the current CUDA device: make it the tensor's."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


class KERNELS:
    """The kernel set fastdg.ops.group_loss uses for backend="triton" (fastdg/ops/group_loss.py,
    TorchKernels there is the plain-torch definition of each entry)."""

    @staticmethod
    def stats(logits, target, group, num_groups, label_smoothing):
        if _direct(logits):
            with _on_device(logits):
                return _stats(logits, target, group, num_groups, label_smoothing, wrap=False)
        return torch.ops.fastdg.group_loss_stats_triton(logits, target, group, num_groups, label_smoothing)

    @staticmethod
    def sums(losses, group, num_groups):
        if _direct(losses):
            with _on_device(losses):
                return _sums(losses, group, num_groups, wrap=False)
        return torch.ops.fastdg.group_loss_sums_triton(losses, group, num_groups)

    @staticmethod
    def q_update(q, sums, counts, eta, adjustment):
        if _direct(sums):
            with _on_device(sums):
                return _q_update(q, sums, counts, eta, adjustment, wrap=False)
        return torch.ops.fastdg.group_q_update_triton(q, sums, counts, eta, adjustment)

    @staticmethod
    def bwd(logits, target, group, lse, group_scale, label_smoothing):
        if _direct(logits):
            with _on_device(logits):
                return _bwd(logits, target, group, lse, group_scale, label_smoothing, wrap=False)
        return torch.ops.fastdg.group_loss_bwd_triton(logits, target, group, lse, group_scale, label_smoothing)
