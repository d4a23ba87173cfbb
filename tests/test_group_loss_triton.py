"""group_loss's Triton backend (fastdg/triton/group_loss.py).

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest)
with a tiny fixed launch configuration (CPU_PARAMS), so that small shapes still loop over
several K chunks, row tiles and G chunks, split the rows between programs and take every
reduction path (one program; the last program reducing the partials; a separate reduce
kernel). The interpreter has no bf16 and is slow: fp32 and fp16 on small shapes here; bf16,
the benchmark shapes, K = 32768, G = 4096, the no-sync check, CUDA graphs and Inductor run on
a GPU (`gpu` marker).
"""
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fastdg import _dispatch
from fastdg.ops import group_loss, last_choice
from fastdg.ops.group_loss import TorchKernels as TK
from fastdg.reference.group_loss import group_loss_ref

pytestmark = pytest.mark.skipif(_dispatch.triton_unavailable() is not None,
                                reason=f"Triton cannot run here: {_dispatch.triton_unavailable()}")

T = pytest.importorskip("fastdg.triton.group_loss")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KS = T.KERNELS


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(n, k, G, seed=0, empty=(), device=DEVICE, scale=3.0):
    """float64 logits (spread by `scale`), targets, group ids avoiding `empty`, normalised fp32 q."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, k, (n,), generator=g)
    allowed = torch.tensor([i for i in range(G) if i not in empty])
    grp = allowed[torch.randint(0, len(allowed), (n,), generator=g)]
    q = torch.rand(G, generator=g, dtype=torch.float64) + 0.1
    return z.to(device), y.to(device), grp.to(device), (q / q.sum()).float().to(device)


@pytest.fixture
def poisoned(monkeypatch):
    """Every tensor the launchers allocate (outputs, partial buffers) starts as NaN: an element a
    kernel does not write shows up as a non-finite value."""
    empty = T._empty

    def nan_empty(ref, shape, dtype=torch.float32):
        return empty(ref, shape, dtype).fill_(float("nan"))

    monkeypatch.setattr(T, "_empty", nan_empty)


def use_params(monkeypatch, **changes):
    """Launch constants of the device the tests run on, changed."""
    name = "GPU_PARAMS" if DEVICE == "cuda" else "CPU_PARAMS"
    monkeypatch.setattr(T, name, replace(getattr(T, name), **changes))
    return getattr(T, name)


# ---- the four kernels against TorchKernels in float64 ------------------------------------

def check_kernels(n, k, G, ls, dtype, seed=0, empty=(), device=DEVICE):
    """Every kernel of the set against TorchKernels on the same (rounded) values in float64: within
    2x of the error TorchKernels makes in float32 (the precision both accumulate in) + a floor."""
    z64, y, grp, q = make(n, k, G, seed=seed, empty=empty, device=device)
    z = z64.to(dtype)
    zd, zf = z.double(), z.float()
    floor = 1e-6

    losses, lse, sums, counts = KS.stats(z, y, grp, G, ls)
    r64 = TK.stats(zd, y, grp, G, ls)
    r32 = TK.stats(zf, y, grp, G, ls)
    for name, got, ref, low in zip(("losses", "lse", "sums"), (losses, lse, sums), r64[:3], r32[:3]):
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        assert torch.isfinite(got).all(), name
        assert rel(got, ref) <= 2 * rel(low, ref) + floor, (name, rel(got, ref), rel(low, ref))
    assert torch.equal(counts.double(), r64[3])
    again = KS.stats(z, y, grp, G, ls)  # deterministic: the same bits
    assert all(torch.equal(a, b) for a, b in zip(again, (losses, lse, sums, counts)))

    per_sample = r64[0].to(dtype)  # per-sample losses given: the same sums, any float dtype
    s2, c2 = KS.sums(per_sample, grp, G)
    ref_s, ref_c = TK.sums(per_sample.double(), grp, G)
    assert s2.dtype == c2.dtype == torch.float32
    assert rel(s2, ref_s) <= 2 * rel(TK.sums(per_sample.float(), grp, G)[0], ref_s) + floor
    assert torch.equal(c2.double(), ref_c)

    g = torch.Generator().manual_seed(seed + 1)
    adj = (torch.rand(G, generator=g) * 0.5).to(device)
    for a in (None, adj):
        out = KS.q_update(q, sums, counts, 0.3, a)
        ref = TK.q_update(q.double(), sums.double(), counts.double(), 0.3, None if a is None else a.double())
        for name, got, exp in zip(("q_new", "mean", "robust"), out, ref):
            assert got.dtype == torch.float32 and got.shape == exp.shape, name
            assert rel(got, exp) < 2e-6, (name, rel(got, exp))
        assert abs(out[0].double().sum().item() - 1) < 1e-5

    scale = (torch.rand(G, generator=g) + 0.5).to(device)
    grad = KS.bwd(z, y, grp, lse, scale, ls)
    ref = TK.bwd(zd, y, grp, r64[1], scale.double(), ls)
    low = TK.bwd(zf, y, grp, r32[1], scale, ls).to(dtype)
    assert grad.dtype == dtype and grad.shape == z.shape and grad.is_contiguous()
    assert torch.isfinite(grad).all()
    assert rel(grad, ref) <= 2 * rel(low, ref) + floor, (rel(grad, ref), rel(low, ref))


# Interpreter configuration (CPU_PARAMS): logits tiles of 64 elements with BLOCK_K <= 32, at most
# 3 programs, all groups in registers for G <= 8, G chunks of 64 above, the last program reduces
# when P * G <= 64, final-reduction tiles of 16.
KERNEL_CASES = {
    "fused": (50, 13, 5, 0.0, ()),        # 3 programs, last-program reduction; N % BLOCK_R != 0, K odd
    "fused_ls_empty": (50, 13, 5, 0.1, (3,)),
    "chunked_groups": (23, 70, 12, 0.0, (0, 7)),  # G > 8: the second pass over stored losses, fused
    "wide": (9, 3000, 3, 0.1, ()),         # K = 3000: 94 chunks of the online log-sum-exp
    "many_groups": (37, 100, 700, 0.05, ()),  # G = 700: G chunks, the separate reduce kernel, most empty
    "single_sample": (1, 3, 4, 0.1, ()),   # one program writes the sums itself
    "one_group": (20, 5, 1, 0.1, ()),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernels_match_torch_kernels_float64(case, poisoned):
    n, k, G, ls, empty = KERNEL_CASES[case]
    check_kernels(n, k, G, ls, torch.float32, seed=n + k, empty=empty)


@pytest.mark.parametrize("case", ["fused_ls_empty", "chunked_groups"])
def test_kernels_float16(case, poisoned):
    n, k, G, ls, empty = KERNEL_CASES[case]
    check_kernels(n, k, G, ls, torch.float16, seed=3, empty=empty)


@pytest.mark.parametrize("path", ["fused", "reduce_kernel", "one_program"])
def test_every_reduction_path(path, monkeypatch, poisoned):
    """The same sums whichever way the partials are reduced; the plan says which one ran."""
    changes = {"fused": {}, "reduce_kernel": {"fuse_limit": 0}, "one_program": {"max_programs": 1}}[path]
    params = use_params(monkeypatch, **changes)
    n, k, G = (50 if DEVICE == "cpu" else 5000), 13, 5
    z, y, grp, _ = make(n, k, G, seed=9, empty=(2,))
    for cfg in (T.plan(n, k, G, params), T.plan(n, 0, G, params)):
        assert (cfg.programs == 1) == (path == "one_program")
        assert cfg.fused == (path == "fused")
    _, _, sums, counts = KS.stats(z.float(), y, grp, G, 0.1)
    ref = TK.stats(z, y, grp, G, 0.1)
    assert rel(sums, ref[2]) < 1e-6 and torch.equal(counts.double(), ref[3])
    s2, c2 = KS.sums(ref[0].float(), grp, G)
    assert rel(s2, ref[2]) < 1e-6 and torch.equal(c2.double(), ref[3])
    if path == "fused":  # the eager path's per-stream tickets: reused, so back to zero after each launch
        assert T._TICKETS and all(t.item() == 0 for t in T._TICKETS.values())
        for _ in range(2):
            assert torch.equal(KS.stats(z.float(), y, grp, G, 0.1)[2], sums)


def test_masked_logits_and_far_below_the_max():
    """-inf logits (masked classes), a row whose whole first K chunk is -inf (the online
    log-sum-exp must not make it NaN), logits 120 below the row max (exp underflows to 0)."""
    z, y, grp, _ = make(6, 40, 3, seed=4, scale=4.0)
    z[:, ::3] -= 120.0
    z[0, 39] = float("-inf")
    y[0] = 0
    z[1, :32] = float("-inf")  # CPU_PARAMS: BLOCK_K = 32
    y[1] = 35
    for ls in (0.0, 0.1):
        if ls:  # smoothing puts target mass on the masked classes: those losses are +inf
            z[:, :] = torch.where(torch.isinf(z), torch.full_like(z, -200.0), z)
        losses, lse, sums, _ = KS.stats(z.float(), y, grp, 3, ls)
        ref = TK.stats(z, y, grp, 3, ls)
        assert torch.isfinite(losses).all() and torch.isfinite(lse).all()
        assert rel(losses, ref[0]) < 1e-6 and rel(lse, ref[1]) < 1e-6 and rel(sums, ref[2]) < 1e-6
        scale = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
        grad = KS.bwd(z.float(), y, grp, lse, scale, ls)
        assert torch.isfinite(grad).all()
        assert rel(grad, TK.bwd(z, y, grp, ref[1], scale.double(), ls)) < 1e-6


def test_no_rows(poisoned):
    """N = 0: zero sums and counts (one program writes them), an unchanged q, an empty gradient."""
    z = torch.empty(0, 5, device=DEVICE)
    y = torch.empty(0, dtype=torch.int64, device=DEVICE)
    losses, lse, sums, counts = KS.stats(z, y, y, 3, 0.1)
    assert losses.shape == lse.shape == (0,) and torch.equal(sums, torch.zeros(3, device=DEVICE))
    assert torch.equal(counts, torch.zeros(3, device=DEVICE))
    assert torch.equal(KS.sums(losses, y, 3)[0], sums)
    q = torch.tensor([0.2, 0.3, 0.5], device=DEVICE)
    q_new, mean, robust = KS.q_update(q, sums, counts, 0.5, None)
    torch.testing.assert_close(q_new, q)
    assert torch.equal(mean, sums) and robust.item() == 0
    assert KS.bwd(z, y, y, lse, q, 0.1).shape == (0, 5)


def test_direct_and_operator_paths_agree():
    """KERNELS launches directly in eager mode; the registered operators give the same bits."""
    z, y, grp, q = make(30, 9, 4, seed=2)
    z = z.float()
    direct = KS.stats(z, y, grp, 4, 0.1)
    op = torch.ops.fastdg.group_loss_stats_triton(z, y, grp, 4, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(direct, op))
    assert all(torch.equal(a, b) for a, b in zip(KS.sums(direct[0], grp, 4),
                                                  torch.ops.fastdg.group_loss_sums_triton(direct[0], grp, 4)))
    assert all(torch.equal(a, b) for a, b in zip(KS.q_update(q, direct[2], direct[3], 0.1, q),
                                                  torch.ops.fastdg.group_q_update_triton(q, direct[2], direct[3],
                                                                                         0.1, q)))
    assert torch.equal(KS.bwd(z, y, grp, direct[1], q, 0.1),
                       torch.ops.fastdg.group_loss_bwd_triton(z, y, grp, direct[1], q, 0.1))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) of the zero weight
def test_q_update_stays_normalised():
    """Huge eta * L for many steps: in log space q never overflows and stays a distribution; a
    zero weight stays zero; a chunked G (> one BLOCK_G) behaves the same."""
    for G in (5, 150):
        g = torch.Generator().manual_seed(G)
        counts = torch.randint(0, 4, (G,), generator=g).float().to(DEVICE)
        sums = counts * (torch.rand(G, generator=g).to(DEVICE) * 100)
        q = torch.full((G,), 1.0 / G, device=DEVICE)
        q[1] = 0.0
        for _ in range(30):
            q, mean, robust = KS.q_update(q, sums, counts, 5.0, None)
        assert torch.isfinite(q).all() and abs(q.sum().item() - 1) < 1e-5 and q[1] == 0
        assert torch.isfinite(robust)


def test_launch_plans():
    """GPU plans at the benchmark shapes, and coverage invariants on both devices' constants."""
    P = T.GPU_PARAMS
    small = T.plan(1024, 65, 16, P)
    assert (small.block_r, small.block_k, small.programs, small.fused, small.one_g_chunk) == (8, 128, 128, True, True)
    large = T.plan(8192, 1000, 64, P)
    assert (large.block_k, large.programs, large.fused, large.one_g_chunk) == (1024, 256, True, True)
    wide = T.plan(64, 32768, 8, P)
    assert wide.block_k == 8192 and wide.block_r == 1
    many = T.plan(8192, 1000, 4096, P)
    assert not many.fused and not many.one_g_chunk
    for params in (T.GPU_PARAMS, T.CPU_PARAMS):
        for N in (0, 1, 7, 50, 1024, 8191, 100000):
            for K in (0, 1, 3, 65, 1000, 3000, 32768):
                for G in (1, 5, 16, 64, 700, 4096):
                    c = T.plan(N, K, G, params)
                    unit = c.block_r if K else c.block_rg
                    assert c.rows_per_prog % unit == 0 and c.programs >= 1
                    assert (c.programs - 1) * c.rows_per_prog < max(N, 1) <= c.programs * c.rows_per_prog
                    assert c.programs <= params.max_programs
                    assert c.programs == 1 or c.programs * G <= params.part_cap
                    assert c.block_r * c.block_k <= max(params.tile, c.block_k) and c.block_k <= params.max_block_k
                    assert c.fin_p * c.fin_g <= params.fin_tile or c.fin_p == 1
                    assert not c.fused or (c.programs > 1 and c.programs * G <= params.fuse_limit)
                    assert c.one_g_chunk == (K > 0 and T._np2(G) <= params.g_reg)


# ---- the full op against the float64 reference -------------------------------------------

OP_CASES = {
    # name: (n, k, G, empty groups, label smoothing, with adjustment)
    "plain": (50, 13, 5, (3,), 0.0, False),
    "smoothing_adjustment": (50, 13, 5, (3,), 0.1, True),
    "one_group": (20, 5, 1, (), 0.05, True),
    "all_in_one": (20, 5, 6, (0, 1, 2, 4, 5), 0.05, True),
    "single_sample": (1, 3, 4, (), 0.05, False),
    "wide": (9, 3000, 3, (), 0.05, False),
    "many_groups": (37, 20, 700, (), 0.05, True),
}


def run_op(z, y, grp, q, eta, ls, adj, backend, **kw):
    z = z.detach().clone().requires_grad_()
    if backend == "reference":
        out = group_loss_ref(z, y, grp, q, eta=eta, label_smoothing=ls, adjustment=adj)
    else:
        out = group_loss(z, y, grp, q, eta=eta, label_smoothing=ls, adjustment=adj, backend=backend, **kw)
        assert last_choice("group_loss").backend == backend
    (g,) = torch.autograd.grad(out.loss, z)
    return out, g


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_matches_reference_float64(case):
    n, k, G, empty, ls, with_adj = OP_CASES[case]
    z, y, grp, q = make(n, k, G, seed=len(case), empty=empty)
    adj = (torch.rand(G, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.5).to(DEVICE) \
        if with_adj else None
    eta = 0.3
    exact, g_exact = run_op(z, y, grp, q, eta, ls, adj, "reference")
    out, g = run_op(z.float(), y, grp, q, eta, ls, None if adj is None else adj.float(), "triton")
    assert out.loss.dtype == out.group_loss.dtype == out.group_count.dtype == torch.float32
    assert out.q.dtype == q.dtype and g.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), exact.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.q.double(), exact.q.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.group_loss.double(), exact.group_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.group_count.double(), exact.group_count)
    assert rel(g, g_exact) < 1e-5
    if empty:  # an empty group keeps its weight: its ratio q'/q is the normaliser alone
        ratio = out.q.double() / q.double()
        full = next(i for i in range(G) if i not in empty)
        step = exact.group_loss[full] + (0 if adj is None else adj[full])
        for e in empty:
            assert ratio[e].item() == pytest.approx((ratio[full] / torch.exp(eta * step)).item(), rel=1e-5)


def test_op_float64_weights():
    """q may be float64 state: the update runs in fp32 like the other backends, q comes back float64."""
    z, y, grp, q = make(30, 7, 4, seed=12, empty=(2,))
    exact, g_exact = run_op(z, y, grp, q.double(), 0.2, 0.1, None, "reference")
    out, g = run_op(z.float(), y, grp, q.double(), 0.2, 0.1, None, "triton")
    assert out.q.dtype == torch.float64
    torch.testing.assert_close(out.q, exact.q, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss.double(), exact.loss, rtol=1e-5, atol=1e-6)
    assert rel(g, g_exact) < 1e-5


@pytest.mark.parametrize("G", [5, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_op_from_per_sample_losses(G, dtype):
    g = torch.Generator().manual_seed(G)
    n = 50
    losses64 = (torch.rand(n, generator=g, dtype=torch.float64) * 2).to(DEVICE)
    grp = torch.randint(0, G, (n,), generator=g).to(DEVICE)
    q = torch.full((G,), 1.0 / G, device=DEVICE)
    adj = torch.rand(G, generator=g).to(DEVICE)
    losses = losses64.to(dtype)
    exact = group_loss_ref(losses.double(), None, grp, q, eta=0.1, adjustment=adj)
    x = losses.clone().requires_grad_()
    out = group_loss(x, None, grp, q, eta=0.1, adjustment=adj, backend="triton")
    torch.testing.assert_close(out.loss.double(), exact.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.q.double(), exact.q.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.group_loss.double(), exact.group_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.group_count.double(), exact.group_count)
    (gl,) = torch.autograd.grad(out.loss, x)
    assert gl.dtype == dtype
    counts = torch.bincount(grp, minlength=G).double()
    torch.testing.assert_close(gl.double(), (out.q.double() / counts.clamp_min(1))[grp],
                               rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=0)


def check_op_low_precision(n, k, G, dtype, seed=3, ls=0.1):
    """Half-precision logits: loss, q and gradient within 2x of the error the reference itself
    makes on the same half-precision input (+ a floor)."""
    z64, y, grp, q = make(n, k, G, seed=seed)
    z = z64.to(dtype)
    exact, g_exact = run_op(z.double(), y, grp, q, 0.1, ls, None, "reference")
    low, g_low = run_op(z, y, grp, q, 0.1, ls, None, "reference")
    out, g = run_op(z, y, grp, q, 0.1, ls, None, "triton", check_inputs=False)
    assert g.dtype == dtype
    floor = 1e-6
    assert rel(out.loss, exact.loss) <= 2 * rel(low.loss, exact.loss) + floor
    assert rel(out.q, exact.q) <= 2 * rel(low.q, exact.q) + floor
    assert rel(g, g_exact) <= 2 * rel(g_low, g_exact) + 1e-4


def test_op_float16():
    check_op_low_precision(40, 21, 5, torch.float16)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy on NaN
def test_nonfinite_loss_never_poisons_q():
    z, y, grp, q = make(20, 4, 3)
    z = z.float()
    z[0, 0] = float("nan")
    with pytest.raises(ValueError, match="input contains NaN"):
        group_loss(z, y, grp, q, backend="triton")
    out = group_loss(z, y, grp, q, check_inputs=False, backend="triton")
    assert torch.equal(out.q, q) and not torch.isfinite(out.loss)
    assert not torch.isfinite(out.group_loss[grp[0]])
    others = torch.ones(3, dtype=torch.bool, device=DEVICE)
    others[grp[0]] = False
    assert torch.isfinite(out.group_loss[others]).all()
    losses = torch.rand(20, device=DEVICE)
    losses[3] = float("inf")
    out = group_loss(losses, None, grp, q, check_inputs=False, backend="triton")
    assert torch.equal(out.q, q) and not torch.isfinite(out.loss)
    # The q update alone: a non-finite adjustment or all-zero weights leave q as it was, in both
    # the one-chunk and the chunked (G > BLOCK_G) kernel; a zero weight stays zero.
    z, y, grp, q = make(20, 4, 3)
    z = z.float()
    for G in (3, 3000):
        qG = torch.full((G,), 1.0 / G, device=DEVICE)
        for adj_bad in (float("inf"), float("nan")):
            adj = torch.zeros(G, device=DEVICE)
            adj[1] = adj_bad
            out = group_loss(z, y, grp, qG, adjustment=adj, check_inputs=False, backend="triton")
            assert torch.equal(out.q, qG)
        zero = torch.zeros(G, device=DEVICE)
        assert torch.equal(group_loss(z, y, grp, zero, check_inputs=False, backend="triton").q, zero)
        q0 = qG.clone()
        q0[0] = 0
        out = group_loss(z, y, grp, q0 / q0.sum(), eta=0.1, backend="triton")
        assert out.q[0] == 0 and abs(float(out.q.sum()) - 1) < 1e-5


def test_out_of_range_ids_make_the_step_non_finite():
    """check_inputs=False and an id out of range: no wild memory access, q unchanged, a
    non-finite loss (a bad target: that row; a bad group: every group sum)."""
    z, y, grp, q = make(20, 4, 3, seed=6)
    z = z.float()
    for bad_y, bad_g in ((4, None), (-1, None), (None, 3), (None, -2)):
        yy, gg = y.clone(), grp.clone()
        if bad_y is not None:
            yy[5] = bad_y
        if bad_g is not None:
            gg[5] = bad_g
        out = group_loss(z, yy, gg, q, check_inputs=False, backend="triton")
        assert torch.equal(out.q, q) and not torch.isfinite(out.loss)
        losses, lse, _, _ = KS.stats(z, yy, gg, 3, 0.0)
        grad = KS.bwd(z, yy, gg, lse, q, 0.0)
        assert not torch.isfinite(grad[5]).any()
        assert torch.isfinite(grad[torch.arange(20, device=DEVICE) != 5]).all()


# ---- registration: opcheck, torch.compile, the triton_op path ------------------------------

def test_ops_pass_opcheck():
    z, y, grp, q = make(12, 7, 3, seed=8)
    z = z.float()
    losses, lse, sums, counts = KS.stats(z, y, grp, 3, 0.1)
    cases = {
        "group_loss_stats_triton": (z, y, grp, 3, 0.1),
        "group_loss_sums_triton": (losses, grp, 3),
        "group_q_update_triton": (q, sums, counts, 0.01, None),
        "group_loss_bwd_triton": (z, y, grp, lse, q, 0.1),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.fastdg, name).default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastdg.group_q_update_triton.default, (q, sums, counts, 0.01, q.double()),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """On a GPU, Inductor traces through the triton_ops to the kernels; under the interpreter
    the ops are opaque custom ops and aot_eager checks Dynamo + fake-tensor + autograd tracing."""
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    z, y, grp, q = make(24, 9, 4, seed=11)
    z = z.float()

    def f(z):
        out = group_loss(z, y, grp, q, eta=0.2, label_smoothing=0.1, check_inputs=False, backend="triton")
        return out.loss, out.q

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    zs = [z.clone().requires_grad_() for _ in range(2)]
    outs = [fn(zz) for fn, zz in zip((f, compiled), zs)]
    grads = [torch.autograd.grad(o[0], zz)[0] for o, zz in zip(outs, zs)]
    assert rel(outs[1][0], outs[0][0]) < 1e-6 and rel(outs[1][1], outs[0][1]) < 1e-6
    assert rel(grads[1], grads[0]) < 1e-6


def test_triton_op_registration_traces_with_fake_cuda_tensors():
    """The GPU registration (torch.library.triton_op + wrap_triton), checked on any machine: a
    fresh interpreter without TRITON_INTERPRET imports the module (nothing compiles at import,
    so no GPU is needed) and traces the kernel set with fake CUDA tensors at the GPU shapes."""
    code = textwrap.dedent("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        from fastdg.triton import group_loss as T
        assert not T._INTERPRETED
        K = T.KERNELS

        def f(z, y, g, q, adj):
            G = q.shape[0]
            losses, lse, sums, counts = K.stats(z, y, g, G, 0.1)
            s2, c2 = K.sums(losses, g, G)
            q_new, mean, robust = K.q_update(q, sums, counts, 0.01, adj)
            return robust, q_new, K.bwd(z, y, g, lse, q_new / counts.clamp_min(1), 0.1), s2

        with FakeTensorMode():
            for N, C, G in [(1024, 65, 16), (8192, 1000, 64), (8192, 1000, 4096), (64, 32768, 8), (1, 3, 1)]:
                for dtype in (torch.float32, torch.bfloat16):
                    z = torch.empty(N, C, device="cuda", dtype=dtype)
                    y = torch.empty(N, device="cuda", dtype=torch.int64)
                    g = torch.empty(N, device="cuda", dtype=torch.int64)
                    q = torch.empty(G, device="cuda")
                    robust, q_new, grad, s2 = f(z, y, g, q, q)
                    assert grad.dtype == dtype and grad.shape == (N, C) and robust.shape == ()
                    assert q_new.shape == s2.shape == (G,)
                    gm = make_fx(f)(z, y, g, q, None)
                    names = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
                    for op in ("group_loss_stats_triton", "group_loss_sums_triton", "group_q_update_triton",
                               "group_loss_bwd_triton"):
                        assert any(op in n for n in names), (op, names)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ---- GPU only ----------------------------------------------------------------------------

GPU_SHAPES = [(1024, 65, 16), (8192, 1000, 64), (64, 32768, 8), (8192, 1000, 4096), (3000, 50, 4096),
              (100003, 7, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_kernels_match_float64(shape, dtype, poisoned):
    check_kernels(*shape, ls=0.1, dtype=dtype, seed=sum(shape), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1024, 65, 16), (8192, 1000, 64), (2000, 10, 4096)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_reductions_are_deterministic_and_agree(shape, monkeypatch):
    """The last-program reduction under contention: 50 launches give the same bits (a program
    reading a partial row before it is written would not), close to the reduce-kernel path."""
    n, k, G = shape
    z, y, grp, _ = make(n, k, G, seed=1, device="cuda")
    z = z.float()
    first = KS.stats(z, y, grp, G, 0.1)
    s_first = KS.sums(first[0], grp, G)
    for _ in range(50):
        again = KS.stats(z, y, grp, G, 0.1)
        assert torch.equal(again[2], first[2]) and torch.equal(again[3], first[3])
        s_again = KS.sums(first[0], grp, G)
        assert torch.equal(s_again[0], s_first[0]) and torch.equal(s_again[1], s_first[1])
    ref = TK.stats(z.double(), y, grp, G, 0.1)
    assert rel(first[2], ref[2]) < 1e-5 and torch.equal(first[3].double(), ref[3])
    params = use_params(monkeypatch, fuse_limit=0)
    assert not T.plan(n, k, G, params).fused
    split = KS.stats(z, y, grp, G, 0.1)
    assert rel(split[2], first[2]) < 1e-6 and torch.equal(split[3], first[3])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_op_low_precision(dtype):
    check_op_low_precision(8192, 1000, 64, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1024, 65, 16), (8192, 1000, 64), (9, 32768, 3), (600, 40, 4096)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_op_matches_reference(shape):
    n, k, G = shape
    z, y, grp, q = make(n, k, G, seed=2, device="cuda", empty=(1,))
    adj = torch.rand(G, device="cuda", dtype=torch.float64) * 0.5
    exact, g_exact = run_op(z, y, grp, q, 0.05, 0.1, adj, "reference")
    out, g = run_op(z.float(), y, grp, q, 0.05, 0.1, adj.float(), "triton", check_inputs=False)
    torch.testing.assert_close(out.loss.double(), exact.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.q.double(), exact.q.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.group_loss.double(), exact.group_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.group_count.double(), exact.group_count)
    assert rel(g, g_exact) < 1e-5


def _gpu_forward(z, y, grp, q, from_losses):
    """The fused op, from logits or from per-sample losses, without input checks (no host reads)."""
    if from_losses:
        losses = F.cross_entropy(z, y, reduction="none")
        out = group_loss(losses, None, grp, q, eta=0.1, check_inputs=False, backend="triton")
    else:
        out = group_loss(z, y, grp, q, eta=0.1, label_smoothing=0.1, check_inputs=False, backend="triton")
    return out.loss, out.q, out.group_loss, out.group_count


def _gpu_step(z, y, grp, q, from_losses):
    """One forward + backward: (loss, q, group_loss, group_count, d loss / d z)."""
    out = _gpu_forward(z, y, grp, q, from_losses)
    (g,) = torch.autograd.grad(out[0], z)
    return (*out, g)


@pytest.mark.gpu
@pytest.mark.parametrize("from_losses", [False, True])
@pytest.mark.parametrize("shape", [(1024, 65, 16), (8192, 1000, 64), (3000, 50, 4096)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_no_host_sync(shape, from_losses):
    z, y, grp, q = make(*shape, device="cuda")
    z = z.float().requires_grad_()
    _gpu_step(z, y, grp, q, from_losses)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            _gpu_step(z, y, grp, q, from_losses)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("from_losses", [False, True])
@pytest.mark.parametrize("shape", [(1024, 65, 16), (8192, 1000, 64), (3000, 50, 4096)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_cuda_graph_replay_matches_eager(shape, from_losses):
    z, y, grp, q = make(*shape, device="cuda")
    static_z = z.float().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _gpu_step(static_z, y, grp, q, from_losses)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _gpu_step(static_z, y, grp, q, from_losses)
    for scale in (1.0, 0.5):  # the captured inputs, then new values copied into them
        with torch.no_grad():
            static_z.copy_(z.float() * scale)
        graph.replay()
        torch.cuda.synchronize()
        eager = _gpu_step(static_z, y, grp, q, from_losses)
        for name, a, b in zip(("loss", "q", "group_loss", "group_count", "grad"), captured, eager):
            assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.parametrize("from_losses", [False, True])
def test_gpu_torch_compile_fullgraph_inductor(from_losses):
    z, y, grp, q = make(1024, 65, 16, device="cuda")

    def f(z):
        return _gpu_forward(z, y, grp, q, from_losses)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    results = []
    for fn in (f, compiled):
        zz = z.float().requires_grad_()
        out = fn(zz)
        results.append((*out, torch.autograd.grad(out[0], zz)[0]))
    for name, a, b in zip(("loss", "q", "group_loss", "group_count", "grad"), results[1], results[0]):
        assert rel(a, b) < 1e-5, name
