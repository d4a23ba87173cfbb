"""Triton kernels of fused Batch-Instance Normalization (METHODS.md section 1).

The four streaming kernels of `fastdg.ops.bin_norm` (the op does the (N, C)-sized algebra):

    bin_stats      (read x)               -> mean[n,c], var[n,c]   (biased, over h, w)
    bin_apply      (read x, write y)      y  = scale[n,c] * x + shift[n,c]
    bin_bwd_reduce (read dy, x)           -> S1 = sum dy, S2 = sum dy * (x - mean[n,c])
    bin_bwd_apply  (read dy, x, write dx) dx = P[n,c] * dy + Q[n,c] * x + R[n,c]

3 passes forward, 5 backward (the floor: PERFORMANCE.md). x, dy, y and dx are 4-D and either
contiguous NCHW or channels_last, read and written in place in that layout; statistics and
coefficients are contiguous (N, C) fp32; element types fp32, fp16, bf16 (fp32 accumulation).

Work decomposition, shared by all kernels: a program owns one sample n, a block of BLOCK_C
channels and a range of HW_PER_PROG spatial positions, which it walks in tiles of BLOCK_HW.
  NCHW:          tile [BLOCK_C, BLOCK_HW], rows are whole (n, c) planes, contiguous along hw.
                 Large planes: BLOCK_C = 1 and a loop along the plane; small planes (7x7):
                 several planes per tile so a tile still holds ~2-4K elements.
  channels_last: tile [BLOCK_HW, BLOCK_C], element (n, c, hw) at n*L*C + hw*C + c, so
                 each row of the tile is a coalesced run of BLOCK_C channels.
Grid = (N * cdiv(C, BLOCK_C), SPLIT). SPLIT > 1 cuts the spatial range of a (n, c-block)
when there are too few of them to fill a GPU (a fixed target of 2112 programs, whatever the
GPU model, so that results do not depend on it): channels_last (256, 64, 56, 56) has only
256 (n, c-block)s of 64 channels, so each is cut into 9 ranges -> 2304 programs (an H100
holds ~1000 of them resident). The reductions then write per-range partials (SPLIT, N, C)
that a small second kernel merges in a fixed order: deterministic, no atomics. With
SPLIT == 1 (NCHW at that shape: 16384 planes) the reduction writes the result directly.

Every element is loaded once per pass; per-(n, c) vectors (mean, scale, P, Q, R) are
loaded once per program. Statistics use Welford per lane of the tile (each lane sees one
element per tile, so its count is the tile index and the update needs no division per
element) and an exact Chan merge of the lanes at the end: no E[x^2] - E[x]^2 anywhere.

Backward equations (for reference; the op computes P, Q, R from S1, S2): with g = dy,
L = H*W, M = N*L, r = 1/sqrt(var + eps), a/b the batch/instance weights of the op,
    P = a r_c + b r_nc,   Q = -b r_nc^3 S2 / L - a r_c^3 T_c / M,
    R = -b r_nc S1 / L - Q_I mean_nc - a r_c sum_n S1 / M - Q_B mu_c,
    T_c = sum_n (S2 + (mean_nc - mu_c) S1).

Registration: each launcher is an operator `fastdg::bin_<name>_triton`, made with
torch.library.triton_op (the kernels wrapped in wrap_triton) so torch.compile traces through
it to the kernels. Under TRITON_INTERPRET=1 (CPU tests) kernels are InterpretedFunctions,
which FakeTensor tracing cannot run, so there the same launchers are registered as opaque
torch.library.custom_ops with a fake (shape-only) implementation: eager, opcheck and
torch.compile then work on the CPU too. Nothing is compiled at import.
"""
# No `from __future__ import annotations`: the launchers' annotations become the operator
# schemas (torch.library infers them) and must be real types on every supported torch.
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["KERNELS", "bin_stats", "bin_apply", "bin_bwd_reduce", "bin_bwd_apply"]


# ---- jit helpers -------------------------------------------------------------------------

@triton.jit
def _program_range(C, L, HW_PER_PROG, BLOCK_C: tl.constexpr):
    """(n, channel indices [BLOCK_C], hw start, hw end) of this program."""
    c_blocks = tl.cdiv(C, BLOCK_C)
    unit = tl.program_id(0)
    n = unit // c_blocks
    c = (unit % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw_start = tl.program_id(1) * HW_PER_PROG
    hw_end = tl.minimum(hw_start + HW_PER_PROG, L)
    return n, c, hw_start, hw_end


@triton.jit
def _tile(c, hw, C, L, hw_end, CHANNELS_LAST: tl.constexpr):
    """Offsets (within one sample's C*L slab) and mask (c < C, hw < hw_end) of a tile, contiguous
    along its last axis: [BLOCK_HW, BLOCK_C] for channels_last, [BLOCK_C, BLOCK_HW] for NCHW."""
    if CHANNELS_LAST:
        offs = hw[:, None] * C + c[None, :]
        mask = (hw[:, None] < hw_end) & (c[None, :] < C)
    else:
        offs = c[:, None] * L + hw[None, :]
        mask = (c[:, None] < C) & (hw[None, :] < hw_end)
    return offs, mask


@triton.jit
def _per_channel(v, CHANNELS_LAST: tl.constexpr):
    """A [BLOCK_C] vector broadcast against a tile."""
    if CHANNELS_LAST:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _per_hw(v, CHANNELS_LAST: tl.constexpr):
    """A [BLOCK_HW] vector broadcast against a tile."""
    if CHANNELS_LAST:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _sum_hw(t, CHANNELS_LAST: tl.constexpr):
    """Sum a tile over its hw axis -> [BLOCK_C]."""
    if CHANNELS_LAST:
        return tl.sum(t, axis=0)
    else:
        return tl.sum(t, axis=1)


@triton.jit
def _zeros_tile(BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return tl.zeros([BLOCK_HW, BLOCK_C], tl.float32)
    else:
        return tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)


# ---- kernels -----------------------------------------------------------------------------

@triton.jit
def _bin_stats_kernel(
    x_ptr,     # (N, C, H, W) fp32/fp16/bf16, NCHW or channels_last (CHANNELS_LAST)
    mean_ptr,  # (SPLIT, N, C) fp32: mean of x[n, c] over this program's hw range; FINAL: (N, C) mean
    m2_ptr,    # (SPLIT, N, C) fp32: M2 (sum of squared deviations) of the range; FINAL: (N, C) biased var
    N, C, L, HW_PER_PROG,
    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, FINAL: tl.constexpr,
):
    """Per-(n, c) mean and M2 over a range of hw: Welford per tile lane, Chan merge of the lanes."""
    n, c, hw_start, hw_end = _program_range(C, L, HW_PER_PROG, BLOCK_C)
    x_ptr += n.to(tl.int64) * C * L  # 64-bit sample offset; offsets inside a sample fit in 32 bits
    hw_lane = tl.arange(0, BLOCK_HW)
    mean = _zeros_tile(BLOCK_C, BLOCK_HW, CHANNELS_LAST)
    m2 = _zeros_tile(BLOCK_C, BLOCK_HW, CHANNELS_LAST)
    length = hw_end - hw_start
    for i in range(0, tl.cdiv(length, BLOCK_HW)):
        offs, mask = _tile(c, hw_start + i * BLOCK_HW + hw_lane, C, L, hw_end, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # A lane valid in tile i was valid in tiles 0..i-1 (only the last tile is partial),
        # so its count is i + 1: one scalar reciprocal per tile instead of a divide per element.
        delta = tl.where(mask, x - mean, 0.0)
        mean += delta * (1.0 / (i + 1))
        m2 += delta * (x - mean)  # delta is 0 on masked lanes
    # Count of lane j: the tiles in which hw_start + i*BLOCK_HW + j < hw_end (known, not accumulated).
    cnt = _per_hw(tl.maximum(length - hw_lane + BLOCK_HW - 1, 0) // BLOCK_HW * 1.0, CHANNELS_LAST)
    # Chan merge of all lanes at once: M2 = sum M2_lane + sum n_lane (mean_lane - mean)^2.
    total = length * 1.0
    mean_c = _sum_hw(cnt * mean, CHANNELS_LAST) / total
    dev = mean - _per_channel(mean_c, CHANNELS_LAST)
    m2_c = _sum_hw(m2 + cnt * dev * dev, CHANNELS_LAST)
    out = (tl.program_id(1) * N + n).to(tl.int64) * C + c
    if FINAL:
        m2_c = m2_c / total
    tl.store(mean_ptr + out, mean_c, mask=c < C)
    tl.store(m2_ptr + out, m2_c, mask=c < C)


@triton.jit
def _bin_stats_merge_kernel(
    pmean_ptr,  # (SPLIT, N*C) fp32 partial means, range s covers hw [s*HW_PER_PROG, (s+1)*HW_PER_PROG) & [0, L)
    pm2_ptr,    # (SPLIT, N*C) fp32 partial M2
    mean_ptr,   # (N*C,) fp32 out: mean
    var_ptr,    # (N*C,) fp32 out: biased variance
    NC, L, HW_PER_PROG, SPLIT, BLOCK: tl.constexpr,
):
    """Chan merge of the SPLIT partial (count, mean, M2), in order s = 0, 1, ... (deterministic)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < NC
    mean = tl.load(pmean_ptr + i, mask=m, other=0.0)
    m2 = tl.load(pm2_ptr + i, mask=m, other=0.0)
    for s in range(1, SPLIT):
        n_a = 1.0 * s * HW_PER_PROG  # every range before the last is full
        n_b = 1.0 * tl.minimum(HW_PER_PROG, L - s * HW_PER_PROG)
        mean_b = tl.load(pmean_ptr + s * NC + i, mask=m, other=0.0)
        m2_b = tl.load(pm2_ptr + s * NC + i, mask=m, other=0.0)
        w_b = n_b / (n_a + n_b)
        delta = mean_b - mean
        mean += delta * w_b
        m2 += m2_b + delta * delta * (n_a * w_b)
    tl.store(mean_ptr + i, mean, mask=m)
    tl.store(var_ptr + i, m2 / L, mask=m)


@triton.jit
def _bin_apply_kernel(
    x_ptr,      # (N, C, H, W) fp32/fp16/bf16, NCHW or channels_last
    scale_ptr,  # (N, C) fp32 contiguous
    shift_ptr,  # (N, C) fp32 contiguous
    y_ptr,      # (N, C, H, W) x's dtype and layout: y = scale * x + shift
    C, L, HW_PER_PROG,
    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n, c, hw_start, hw_end = _program_range(C, L, HW_PER_PROG, BLOCK_C)
    a = _per_channel(tl.load(scale_ptr + n * C + c, mask=c < C, other=0.0), CHANNELS_LAST)
    b = _per_channel(tl.load(shift_ptr + n * C + c, mask=c < C, other=0.0), CHANNELS_LAST)
    base = n.to(tl.int64) * C * L
    x_ptr += base
    y_ptr += base
    hw_lane = tl.arange(0, BLOCK_HW)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        offs, mask = _tile(c, hw0 + hw_lane, C, L, hw_end, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (x * a + b).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bin_bwd_reduce_kernel(
    dy_ptr,    # (N, C, H, W) x's dtype and layout
    x_ptr,     # (N, C, H, W) fp32/fp16/bf16, NCHW or channels_last
    mean_ptr,  # (N, C) fp32: the per-(n, c) mean saved by forward
    s1_ptr,    # (SPLIT, N, C) fp32 out: sum dy over this program's hw range (SPLIT == 1: the result)
    s2_ptr,    # (SPLIT, N, C) fp32 out: sum dy * (x - mean) over the range
    N, C, L, HW_PER_PROG,
    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Per-lane fp32 partial sums, one tree reduction at the end (centred on the mean, so S2
    does not cancel)."""
    n, c, hw_start, hw_end = _program_range(C, L, HW_PER_PROG, BLOCK_C)
    mu = _per_channel(tl.load(mean_ptr + n * C + c, mask=c < C, other=0.0), CHANNELS_LAST)
    base = n.to(tl.int64) * C * L
    dy_ptr += base
    x_ptr += base
    hw_lane = tl.arange(0, BLOCK_HW)
    acc1 = _zeros_tile(BLOCK_C, BLOCK_HW, CHANNELS_LAST)
    acc2 = _zeros_tile(BLOCK_C, BLOCK_HW, CHANNELS_LAST)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        offs, mask = _tile(c, hw0 + hw_lane, C, L, hw_end, CHANNELS_LAST)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc1 += g
        acc2 += g * (x - mu)  # g is 0 on masked lanes
    out = (tl.program_id(1) * N + n).to(tl.int64) * C + c
    tl.store(s1_ptr + out, _sum_hw(acc1, CHANNELS_LAST), mask=c < C)
    tl.store(s2_ptr + out, _sum_hw(acc2, CHANNELS_LAST), mask=c < C)


@triton.jit
def _bin_bwd_reduce_merge_kernel(
    p1_ptr,  # (SPLIT, N*C) fp32 partial sum dy
    p2_ptr,  # (SPLIT, N*C) fp32 partial sum dy * (x - mean)
    s1_ptr,  # (N*C,) fp32 out
    s2_ptr,  # (N*C,) fp32 out
    NC, SPLIT, BLOCK: tl.constexpr,
):
    """Sum the SPLIT partials in order s = 0, 1, ... (deterministic)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < NC
    t1 = tl.load(p1_ptr + i, mask=m, other=0.0)
    t2 = tl.load(p2_ptr + i, mask=m, other=0.0)
    for s in range(1, SPLIT):
        t1 += tl.load(p1_ptr + s * NC + i, mask=m, other=0.0)
        t2 += tl.load(p2_ptr + s * NC + i, mask=m, other=0.0)
    tl.store(s1_ptr + i, t1, mask=m)
    tl.store(s2_ptr + i, t2, mask=m)


@triton.jit
def _bin_bwd_apply_kernel(
    dy_ptr,  # (N, C, H, W) x's dtype and layout
    x_ptr,   # (N, C, H, W) fp32/fp16/bf16, NCHW or channels_last
    p_ptr,   # (N, C) fp32 contiguous
    q_ptr,   # (N, C) fp32 contiguous
    r_ptr,   # (N, C) fp32 contiguous
    dx_ptr,  # (N, C, H, W) x's dtype and layout: dx = p * dy + q * x + r
    C, L, HW_PER_PROG,
    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n, c, hw_start, hw_end = _program_range(C, L, HW_PER_PROG, BLOCK_C)
    p = _per_channel(tl.load(p_ptr + n * C + c, mask=c < C, other=0.0), CHANNELS_LAST)
    q = _per_channel(tl.load(q_ptr + n * C + c, mask=c < C, other=0.0), CHANNELS_LAST)
    r = _per_channel(tl.load(r_ptr + n * C + c, mask=c < C, other=0.0), CHANNELS_LAST)
    base = n.to(tl.int64) * C * L
    dy_ptr += base
    x_ptr += base
    dx_ptr += base
    hw_lane = tl.arange(0, BLOCK_HW)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        offs, mask = _tile(c, hw0 + hw_lane, C, L, hw_end, CHANNELS_LAST)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, (p * g + q * x + r).to(dx_ptr.dtype.element_ty), mask=mask)


# ---- launch configuration ----------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MERGE_BLOCK = 256


@dataclass(frozen=True)
class Config:
    channels_last: bool
    block_c: int
    block_hw: int
    hw_per_prog: int  # spatial positions per program (a multiple of block_hw)
    split: int        # programs per (n, c-block) along hw
    units: int        # (n, c-block) pairs: grid = (units, split)
    num_warps: int


# GPU: a tile holds ~8 KB (2048 fp32 / 4096 half elements) in 8 warps: two 16-byte loads per
# thread per tensor. The reductions keep two fp32 accumulators per tile element, so their
# tiles stay at 2048 elements in every dtype (registers: ~50 per thread, 4-5 programs per SM).
# The hw range is split until about _GPU_TARGET_PROGRAMS programs exist: 16 per SM of a 132-SM
# H100/H200, so enough loads are in flight to stream from HBM. The target is a fixed number,
# not derived from the device's SM count (as kTargetBlocks in csrc/cuda/bin_norm.cu): the
# split, and with it the order of the fp32 partial sums, is a function of the shape, dtype and
# layout only, so results are bitwise the same on every GPU. Interpreter (CPU tests): tiny
# tiles and few programs, so that small test shapes still loop over several tiles, mask
# partial channel blocks and split the hw range.
_GPU_TILE_BYTES, _GPU_REDUCE_TILE, _GPU_MAX_BLOCK_C, _GPU_TARGET_PROGRAMS = 8192, 2048, 128, 16 * 132
_CPU_TILE, _CPU_MAX_BLOCK_C, _CPU_PROGRAMS = 64, 4, 6


def _layout(x):
    if x.is_contiguous():  # also covers C == 1 or H*W == 1, where both layouts coincide
        return False
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    raise ValueError("x must be contiguous NCHW or channels_last (bin_norm makes it so)")


def _choose(N, C, L, tile, max_block_c, target_programs, channels_last):
    lp, cp = triton.next_power_of_2(L), triton.next_power_of_2(C)
    if channels_last:  # rows of BLOCK_C channels, as many rows as fill the tile
        block_c = min(cp, max_block_c)
        block_hw = min(lp, max(tile // block_c, 1))
    else:  # whole planes along the fast axis, several planes per tile when planes are small
        block_hw = min(lp, tile)
        block_c = min(cp, max(tile // block_hw, 1))
    units = N * triton.cdiv(C, block_c)
    tiles = triton.cdiv(L, block_hw)
    split = min(tiles, max(1, triton.cdiv(target_programs, units)))
    tiles_per_prog = triton.cdiv(tiles, split)
    split = triton.cdiv(tiles, tiles_per_prog)
    num_warps = min(8, max(1, block_c * block_hw // 256))
    return Config(channels_last, block_c, block_hw, tiles_per_prog * block_hw, split, units, num_warps)


def config(x: torch.Tensor, reduce: bool) -> Config:
    """Launch configuration for x: a function of its shape, dtype, layout and device type only
    (not of the GPU model). reduce: for bin_stats / bin_bwd_reduce (else bin_apply / bin_bwd_apply)."""
    N, C, H, W = (int(s) for s in x.shape)
    L = H * W
    if C * L >= 2**31:
        raise ValueError(f"one sample of x has {C * L} elements; the kernels index a sample with 32 bits")
    if x.device.type == "cuda":
        tile = _GPU_REDUCE_TILE if reduce else _GPU_TILE_BYTES // x.element_size()
        return _choose(N, C, L, tile, _GPU_MAX_BLOCK_C, _GPU_TARGET_PROGRAMS, _layout(x))
    return _choose(N, C, L, _CPU_TILE, _CPU_MAX_BLOCK_C, _CPU_PROGRAMS, _layout(x))


def _check_x(name, t):
    if t.dim() != 4 or t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be a 4-D fp32/fp16/bf16 tensor, got {tuple(t.shape)} {t.dtype}")


def _check_like(name, t, x):
    # Same layout, not same strides: strides of size-1 dims may differ and do not move elements.
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device or _layout(t) != _layout(x):
        raise ValueError(f"{name} must match x in shape, dtype, memory format and device")


def _check_nc(name, t, x):
    if t.shape != x.shape[:2] or t.dtype != torch.float32 or not t.is_contiguous() or t.device != x.device:
        raise ValueError(f"{name} must be a contiguous (N, C) float32 tensor on x's device")


def _like_x(x):
    return torch.empty_like(x, memory_format=torch.channels_last if _layout(x) else torch.contiguous_format)


def _nc(x, *lead):
    return x.new_empty((*lead, x.shape[0], x.shape[1]), dtype=torch.float32)


# ---- launchers ---------------------------------------------------------------------------

def _kernel(k):
    """wrap_triton(k), so that torch.compile sees the launch. The interpreter's kernels are
    launched as they are (recent torch passes them through wrap_triton, older torch refuses them)."""
    return k if _INTERPRETED else wrap_triton(k)


def bin_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C, H, W) -> (mean, var): (N, C) fp32, biased variance over (h, w)."""
    _check_x("x", x)
    cfg = config(x, reduce=True)
    N, C, H, W = x.shape
    L = H * W
    mean, var = _nc(x), _nc(x)
    final = cfg.split == 1
    pmean, pm2 = (mean, var) if final else (_nc(x, cfg.split), _nc(x, cfg.split))
    _kernel(_bin_stats_kernel)[(cfg.units, cfg.split)](
        x, pmean, pm2, N, C, L, cfg.hw_per_prog, CHANNELS_LAST=cfg.channels_last,
        BLOCK_C=cfg.block_c, BLOCK_HW=cfg.block_hw, FINAL=final, num_warps=cfg.num_warps)
    if not final:
        _kernel(_bin_stats_merge_kernel)[(triton.cdiv(N * C, _MERGE_BLOCK),)](
            pmean, pm2, mean, var, N * C, L, cfg.hw_per_prog, cfg.split, BLOCK=_MERGE_BLOCK, num_warps=4)
    return mean, var


def bin_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """y = scale[n,c] * x + shift[n,c]; y has x's dtype and memory format."""
    _check_x("x", x)
    _check_nc("scale", scale, x)
    _check_nc("shift", shift, x)
    cfg = config(x, reduce=False)
    y = _like_x(x)
    N, C, H, W = x.shape
    _kernel(_bin_apply_kernel)[(cfg.units, cfg.split)](
        x, scale, shift, y, C, H * W, cfg.hw_per_prog, CHANNELS_LAST=cfg.channels_last,
        BLOCK_C=cfg.block_c, BLOCK_HW=cfg.block_hw, num_warps=cfg.num_warps)
    return y


def bin_bwd_reduce(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sum_dy, sum_dy_xc): (N, C) fp32 sums over (h, w) of dy and dy * (x - mean[n,c])."""
    _check_x("x", x)
    _check_like("dy", dy, x)
    _check_nc("mean", mean, x)
    cfg = config(x, reduce=True)
    N, C, H, W = x.shape
    s1, s2 = _nc(x), _nc(x)
    final = cfg.split == 1
    p1, p2 = (s1, s2) if final else (_nc(x, cfg.split), _nc(x, cfg.split))
    _kernel(_bin_bwd_reduce_kernel)[(cfg.units, cfg.split)](
        dy, x, mean, p1, p2, N, C, H * W, cfg.hw_per_prog, CHANNELS_LAST=cfg.channels_last,
        BLOCK_C=cfg.block_c, BLOCK_HW=cfg.block_hw, num_warps=cfg.num_warps)
    if not final:
        _kernel(_bin_bwd_reduce_merge_kernel)[(triton.cdiv(N * C, _MERGE_BLOCK),)](
            p1, p2, s1, s2, N * C, cfg.split, BLOCK=_MERGE_BLOCK, num_warps=4)
    return s1, s2


def bin_bwd_apply(dy: torch.Tensor, x: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                  r: torch.Tensor) -> torch.Tensor:
    """dx = p[n,c] * dy + q[n,c] * x + r[n,c]; dx has x's dtype and memory format."""
    _check_x("x", x)
    _check_like("dy", dy, x)
    for name, t in (("p", p), ("q", q), ("r", r)):
        _check_nc(name, t, x)
    cfg = config(x, reduce=False)
    dx = _like_x(x)
    N, C, H, W = x.shape
    _kernel(_bin_bwd_apply_kernel)[(cfg.units, cfg.split)](
        dy, x, p, q, r, dx, C, H * W, cfg.hw_per_prog, CHANNELS_LAST=cfg.channels_last,
        BLOCK_C=cfg.block_c, BLOCK_HW=cfg.block_hw, num_warps=cfg.num_warps)
    return dx


# ---- operator registration ---------------------------------------------------------------

def _is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


_INTERPRETED = _is_interpreted(_bin_stats_kernel)


def _fake_stats(x):
    return _nc(x), _nc(x)


def _fake_apply(x, scale, shift):
    return _like_x(x)


def _fake_bwd_reduce(dy, x, mean):
    return _nc(x), _nc(x)


def _fake_bwd_apply(dy, x, p, q, r):
    return _like_x(x)


def _register(name, fn, fake):
    qualname = f"fastdg::{name}"
    if _INTERPRETED:  # opaque op + shape-only fake: FakeTensor tracing cannot run the interpreter
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return triton_op(qualname, fn, mutates_args=())


bin_stats_op = _register("bin_stats_triton", bin_stats, _fake_stats)
bin_apply_op = _register("bin_apply_triton", bin_apply, _fake_apply)
bin_bwd_reduce_op = _register("bin_bwd_reduce_triton", bin_bwd_reduce, _fake_bwd_reduce)
bin_bwd_apply_op = _register("bin_bwd_apply_triton", bin_bwd_apply, _fake_bwd_apply)


class KERNELS:
    """The kernel set fastdg.ops.bin_norm uses for backend="triton" (through the registered ops)."""

    @staticmethod
    def stats(x):
        return torch.ops.fastdg.bin_stats_triton(x)

    @staticmethod
    def apply(x, scale, shift):
        return torch.ops.fastdg.bin_apply_triton(x, scale, shift)

    @staticmethod
    def bwd_reduce(dy, x, mean):
        return torch.ops.fastdg.bin_bwd_reduce_triton(dy, x, mean)

    @staticmethod
    def bwd_apply(dy, x, p, q, r):
        return torch.ops.fastdg.bin_bwd_apply_triton(dy, x, p, q, r)
