"""bin_norm's CUDA backend (csrc/cuda/bin_norm.cu): the four kernels against TorchKernels in
float64, the full op against the reference, both layouts, fp32/fp64/fp16/bf16, misaligned
inputs, split planes, determinism, argument checks. Every test needs a GPU (module-level gpu
marker: skipped with a reason on CPU-only machines) and fastdg._C built with its CUDA kernels.

Shapes cover: odd H*W (head/tail of the 16-byte vectors), N = 1, C that is not a multiple of
the vector width or of the channels_last tile (70, 136, 300), H*W = 1 with N > 1, planes long
enough to be split across blocks ((2, 3, 200, 201) NCHW, (3, 64, 33, 35) channels_last), and
(256, 64, 56, 56) once. Half precision passes when its error against float64 is within 2x of
the error of the same computation done by the reference in that precision (DESIGN.md).
"""
import pytest
import torch

from fastdg import _dispatch
from fastdg.ops import bin_norm, last_choice
from fastdg.ops.bin_norm import TorchKernels
from fastdg.reference.bin_norm import bin_norm_ref

pytestmark = pytest.mark.gpu

DEV = "cuda"
OPS = torch.ops.fastdg
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _cuda_kernels():
    why = _dispatch.compiled_reason("bin_stats", torch.empty(1, device=DEV))
    if why is not None:
        pytest.skip(f"fastdg CUDA BIN kernels unavailable: {why}")


# ---- helpers -----------------------------------------------------------------------------

def master(shape, seed=0):
    """float64 CPU data, never zero: N(0, 4) plus a per-channel offset N(0, 9)."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2
            + torch.randn(1, C, 1, 1, generator=g, dtype=torch.float64) * 3)


def place(t64, dtype, channels_last=False, offset=0):
    """t64 on the GPU as `dtype`, NCHW or channels_last, starting `offset` elements into its
    storage (offset 1 breaks the 16-byte alignment the vector paths look for)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = t64.to(device=DEV, dtype=dtype).contiguous(memory_format=fmt)
    if offset == 0:
        return t
    buf = torch.full((t.numel() + offset,), float("nan"), dtype=dtype, device=DEV)
    out = buf[offset:].as_strided(t.shape, t.stride())
    out.copy_(t)
    assert out.data_ptr() % 16 != 0 and out.is_contiguous(memory_format=fmt)
    return out


def nc(shape, seed, dtype, lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape[:2], generator=g, dtype=torch.float64) * (hi - lo) + lo).to(DEV, dtype)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def poison(*specs):
    """Return NaN-filled blocks of these (shape, dtype) sizes to the caching allocator, so the
    kernel outputs allocated next most likely start as NaN: an element a kernel fails to write
    then shows up as a mismatch instead of passing on leftover values."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=DEV) for shape, dtype in specs for _ in range(2)]
    del blocks


def stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def within(err, ref_err, dtype, floor):
    """fp64: a fixed bound; otherwise 2x the reference's own error in that precision, plus floor."""
    return err <= (floor if dtype == torch.float64 else 2 * ref_err + floor)


def assert_layout(t, like, channels_last):
    assert t.dtype == like.dtype and t.shape == like.shape and t.device == like.device
    assert t.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ---- the four kernels --------------------------------------------------------------------

KSHAPES = [(4, 5, 7, 9), (1, 3, 5, 5), (3, 70, 1, 3), (5, 6, 1, 1), (2, 136, 9, 10), (2, 300, 20, 20),
           (3, 64, 33, 35), (2, 3, 200, 201), (2, 1, 6, 7)]


def check_kernels(shape, dtype, channels_last, x_offset=0, dy_offset=0, seed=0):
    N, C = shape[:2]
    sd = stat_dtype(dtype)
    x64, dy64 = master(shape, seed), master(shape, seed + 1) * 0.5
    x = place(x64, dtype, channels_last, x_offset)
    dy = place(dy64, dtype, channels_last, dy_offset)
    xe, dye = x.double(), dy.double()  # the exact values of the (rounded) inputs
    # Floors for the fp32-accumulated (N, C) results. Emulating the kernels' fp32 arithmetic in
    # numpy (same shapes) gives relative errors ~1e-7 for mean/var and up to ~9e-7 for the sums
    # (dy has a per-channel offset, so sum dy (x - mean) cancels); one element missed or counted
    # twice moves them by >= ~1e-3.
    stat_floor = 1e-12 if dtype == torch.float64 else 1e-6
    sum_floor = 1e-12 if dtype == torch.float64 else 1e-5

    poison(((N, C), sd))
    mean, var = OPS.bin_stats(x)
    assert mean.dtype == var.dtype == sd and mean.shape == var.shape == (N, C)
    assert mean.is_contiguous() and var.is_contiguous() and mean.device == x.device
    m_ref, v_ref = TorchKernels.stats(xe)
    m_low, v_low = TorchKernels.stats(x)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()
    assert within(rel(mean, m_ref), rel(m_low, m_ref), dtype, stat_floor)
    assert within(rel(var, v_ref), rel(v_low, v_ref), dtype, stat_floor)

    scale, shift = nc(shape, seed + 2, sd, 0.5, 1.5), nc(shape, seed + 3, sd)
    poison((tuple(shape), dtype))
    y = OPS.bin_apply(x, scale, shift)
    assert_layout(y, x, channels_last and not x.is_contiguous())
    y_ref = TorchKernels.apply(xe, scale.double(), shift.double())
    y_low = TorchKernels.apply(x, scale, shift)
    assert torch.isfinite(y).all()
    assert within(rel(y, y_ref), rel(y_low, y_ref), dtype, 1e-13 if dtype == torch.float64 else 1e-7)

    poison(((N, C), sd))
    s1, s2 = OPS.bin_bwd_reduce(dy, x, mean)
    assert s1.dtype == s2.dtype == sd and s1.shape == s2.shape == (N, C) and s1.is_contiguous()
    s1_ref, s2_ref = TorchKernels.bwd_reduce(dye, xe, mean.double())
    s1_low, s2_low = TorchKernels.bwd_reduce(dy, x, mean)
    assert torch.isfinite(s1).all() and torch.isfinite(s2).all()
    assert within(rel(s1, s1_ref), rel(s1_low, s1_ref), dtype, sum_floor)
    assert within(rel(s2, s2_ref), rel(s2_low, s2_ref), dtype, sum_floor)

    p, q, r = nc(shape, seed + 4, sd, 0.5, 1.5), nc(shape, seed + 5, sd), nc(shape, seed + 6, sd)
    poison((tuple(shape), dtype))
    dx = OPS.bin_bwd_apply(dy, x, p, q, r)
    assert_layout(dx, x, channels_last and not x.is_contiguous())
    dx_ref = TorchKernels.bwd_apply(dye, xe, p.double(), q.double(), r.double())
    dx_low = TorchKernels.bwd_apply(dy, x, p, q, r)
    assert torch.isfinite(dx).all()
    assert within(rel(dx, dx_ref), rel(dx_low, dx_ref), dtype, 1e-13 if dtype == torch.float64 else 1e-7)
    return mean, var, y, s1, s2, dx


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KSHAPES, ids=str)
def test_kernels_match_float64(shape, dtype, channels_last, offset):
    check_kernels(shape, dtype, channels_last, x_offset=offset, dy_offset=offset)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernels_dy_and_x_at_different_alignments(dtype, channels_last):
    """x aligned, dy one element off: the NCHW vector paths need equal addresses mod 16."""
    check_kernels((3, 8, 13, 11), dtype, channels_last, x_offset=0, dy_offset=1)
    check_kernels((3, 8, 13, 11), dtype, channels_last, x_offset=1, dy_offset=0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(4, 5, 7, 9), (3, 70, 1, 3), (2, 3, 200, 201), (3, 64, 33, 35), (5, 6, 1, 1)],
                         ids=str)
def test_kernels_match_cpu_kernels_float64(shape, channels_last):
    """Same semantics as csrc/cpu/bin_norm.cpp, output layouts included."""
    x64, dy64 = master(shape, 3), master(shape, 4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xc, dyc = x64.contiguous(memory_format=fmt), dy64.contiguous(memory_format=fmt)
    xg, dyg = xc.to(DEV), dyc.to(DEV)
    m_c, v_c = OPS.bin_stats(xc)
    m_g, v_g = OPS.bin_stats(xg)
    assert rel(m_g.cpu(), m_c) < 1e-13 and rel(v_g.cpu(), v_c) < 1e-13
    a, b, c = nc(shape, 5, torch.float64), nc(shape, 6, torch.float64), nc(shape, 7, torch.float64)
    for out_g, out_c in [
        (OPS.bin_apply(xg, a, b), OPS.bin_apply(xc, a.cpu(), b.cpu())),
        (OPS.bin_bwd_apply(dyg, xg, a, b, c), OPS.bin_bwd_apply(dyc, xc, a.cpu(), b.cpu(), c.cpu())),
    ]:
        assert out_g.stride() == out_c.stride()
        assert rel(out_g.cpu(), out_c) < 1e-14
    s_g = OPS.bin_bwd_reduce(dyg, xg, m_g)
    s_c = OPS.bin_bwd_reduce(dyc, xc, m_c)
    for g, c_ in zip(s_g, s_c):
        assert rel(g.cpu(), c_) < 1e-12


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 200, 201), (3, 64, 33, 35), (2, 300, 20, 20)], ids=str)
def test_kernels_are_deterministic(shape, dtype, channels_last):
    """Split planes / channel tiles reduce through fixed-order trees: bitwise equal reruns."""
    first = check_kernels(shape, dtype, channels_last, seed=7)
    torch.cuda.synchronize()
    second = check_kernels(shape, dtype, channels_last, seed=7)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_kernels_on_a_side_stream():
    """Kernels run on the current stream: results on a side stream equal the default stream's."""
    x = place(master((4, 64, 30, 30), 8), torch.float32, channels_last=True)
    base = OPS.bin_stats(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = OPS.bin_stats(x)
    side.synchronize()
    for a, b in zip(base, got):
        assert torch.equal(a, b)


def test_kernels_pass_opcheck():
    x = place(master((3, 4, 5, 7), 9), torch.float32)
    mean, _ = OPS.bin_stats(x)
    scale, shift, r = nc(x.shape, 1, torch.float32), nc(x.shape, 2, torch.float32), nc(x.shape, 3, torch.float32)
    dy = place(master((3, 4, 5, 7), 10), torch.float32)
    for cl in (False, True):
        fmt = torch.channels_last if cl else torch.contiguous_format
        x_, dy_ = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
        args = {
            "bin_stats": (x_,),
            "bin_apply": (x_, scale, shift),
            "bin_bwd_reduce": (dy_, x_, mean),
            "bin_bwd_apply": (dy_, x_, scale, shift, r),
        }
        for op, a in args.items():
            torch.library.opcheck(getattr(OPS, op).default, a,
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_kernels_reject_bad_arguments_like_the_cpu_kernels():
    x = place(master((2, 3, 4, 5), 11), torch.float32)
    m, _ = OPS.bin_stats(x)
    with pytest.raises(RuntimeError, match="contiguous NCHW or channels_last"):
        OPS.bin_stats(x.transpose(2, 3))
    with pytest.raises(RuntimeError, match="4-d"):
        OPS.bin_stats(x[0])
    with pytest.raises(RuntimeError, match="H \\* W > 0"):
        OPS.bin_stats(x[:, :, :0])
    with pytest.raises(RuntimeError, match="scale must be Float"):
        OPS.bin_apply(x, m.double(), m)
    with pytest.raises(RuntimeError, match="shift must be a contiguous"):
        OPS.bin_apply(x, m, m[:1])
    with pytest.raises(RuntimeError, match="scale must be on"):
        OPS.bin_apply(x, m.cpu(), m)
    with pytest.raises(RuntimeError, match="dy must match x"):
        OPS.bin_bwd_reduce(x.contiguous(memory_format=torch.channels_last), x, m)
    with pytest.raises(RuntimeError, match="dy must match x"):
        OPS.bin_bwd_apply(x.half(), x, m, m, m)
    # Empty inputs behave as on the CPU: empty outputs, zero sums over empty planes.
    e = x[:, :, :0]
    s1, s2 = OPS.bin_bwd_reduce(e, e, m)
    assert torch.equal(s1, torch.zeros_like(m)) and torch.equal(s2, torch.zeros_like(m))
    assert OPS.bin_apply(x[:0], m[:0], m[:0]).shape == (0, 3, 4, 5)


# ---- the full op -------------------------------------------------------------------------

def params(C, dtype, affine, seed):
    g = torch.Generator().manual_seed(seed)

    def vec(lo, hi):
        return (torch.rand(C, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(DEV, dtype)

    p = {"rho": vec(0, 1)}
    if affine != "none":
        p.update(weight=vec(0.5, 1.5), bias=vec(-1, 1))
    if affine == "separate":
        p.update(in_weight=vec(0.5, 1.5), in_bias=vec(-1, 1))
    return p, (vec(-1, 1), vec(0.5, 2))


def run(backend, x, p, running, mode, dy):
    x = x.detach().clone().requires_grad_()  # clone keeps the memory format
    ps = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    rm, rv = (t.clone() for t in running)
    if backend == "reference":
        y = bin_norm_ref(x, running_mean=rm, running_var=rv, mode=mode, **ps)
    else:
        y = bin_norm(x, running_mean=rm, running_var=rv, mode=mode, backend=backend, **ps)
        assert last_choice("bin_norm").backend == backend
    grads = torch.autograd.grad(y, [x] + list(ps.values()), dy)
    return y, dict(zip(["x"] + list(ps), grads)), rm, rv


def term_scale(x, dy, mode, running, eps=1e-5):
    """Per channel, sum over (n, h, w) of |dy| (1 + |xb| + |xi|): the size of the terms every
    parameter gradient is a sum of. Parameter gradients are compared relative to it, because
    d rho = sum dy (xb - xi) (and d weight through sum dy (x - mu_c)) cancel heavily when the
    instance and batch statistics nearly agree: then the float64 reference itself is off by
    ~1e-9 relative to |d rho| at (2, 3, 200, 201), the fused algebra by ~1e-11, and in fp32 the
    fused algebra (which subtracts sums) by a few times the reference (which subtracts
    elementwise). Against this scale both are ~1e-14 (fp64) / ~1e-9 (fp32); an indexing or
    reduction bug is ~1e-3 or more."""
    x, g = x.double(), dy.double()
    vi, mi = torch.var_mean(x, dim=(2, 3), unbiased=False, keepdim=True)
    if mode == "eval":
        mb, vb = (t.double().view(1, -1, 1, 1) for t in running)
    else:
        vb, mb = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
    xb, xi = (x - mb) * torch.rsqrt(vb + eps), (x - mi) * torch.rsqrt(vi + eps)
    return (g.abs() * (1 + xb.abs() + xi.abs())).sum((0, 2, 3))


def grad_err(k, a, b, scale):
    """dx: relative error; per-channel parameter gradients: error relative to `scale`."""
    if k == "x":
        return rel(a, b)
    return ((a.double() - b.double()).norm() / scale.norm()).item()


OSHAPES = [(4, 5, 7, 9), (1, 3, 5, 5), (3, 70, 1, 3), (5, 6, 1, 1), (2, 136, 9, 10), (2, 3, 200, 201),
           (3, 64, 33, 35)]


@pytest.mark.parametrize("mode", ["train", "hold", "eval"])
@pytest.mark.parametrize("affine", ["shared", "separate", "none"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", OSHAPES, ids=str)
def test_op_matches_reference_float64(shape, channels_last, affine, mode):
    x = place(master(shape, 12), torch.float64, channels_last)
    dy = place(master(shape, 13), torch.float64, channels_last)
    p, running = params(shape[1], torch.float64, affine, 14)
    y, g, rm, rv = run("cuda", x, p, running, mode, dy)
    y_r, g_r, rm_r, rv_r = run("reference", x, p, running, mode, dy)
    scale = term_scale(x, dy, mode, running)
    assert rel(y, y_r) < 1e-11
    assert rel(g["x"], g_r["x"]) < 1e-9
    for k in g_r:
        assert grad_err(k, g[k], g_r[k], scale) < 1e-12, k
    assert rel(rm, rm_r) < 1e-12 and rel(rv, rv_r) < 1e-12
    if mode != "train":
        assert torch.equal(rm, running[0]) and torch.equal(rv, running[1])
    cl = channels_last and not x.is_contiguous()
    assert_layout(y, x, cl)
    assert_layout(g["x"], x, cl)


def check_low_precision(shape, dtype, channels_last, affine="shared", mode="train", seed=20):
    """Errors against float64 (from the unrounded data) within 2x the reference's own in `dtype`."""
    x64, dy64 = master(shape, seed).to(DEV), master(shape, seed + 1).to(DEV)
    p64, run64 = params(shape[1], torch.float64, affine, seed + 2)
    exact = run("reference", place(x64, torch.float64, channels_last), p64, run64, mode,
                place(dy64, torch.float64, channels_last))
    x, dy = place(x64, dtype, channels_last), place(dy64, dtype, channels_last)
    p = {k: v.float() for k, v in p64.items()}
    running = tuple(t.float() for t in run64)
    ours = run("cuda", x, p, running, mode, dy)
    ref = run("reference", x, p, running, mode, dy)
    floor = 1e-5
    scale = term_scale(x64, dy64, mode, run64)
    assert ours[0].dtype == dtype
    assert rel(ours[0], exact[0]) <= 2 * rel(ref[0], exact[0]) + floor
    for k in exact[1]:
        err, ref_err = (grad_err(k, r_[1][k], exact[1][k], scale) for r_ in (ours, ref))
        assert err <= 2 * ref_err + floor, (k, err, ref_err)
    for i in (2, 3):
        assert rel(ours[i], exact[i]) <= 2 * rel(ref[i], exact[i]) + floor
    cl = channels_last and not x.is_contiguous()
    assert_layout(ours[0], x, cl)
    assert_layout(ours[1]["x"], x, cl)
    return ours


@pytest.mark.parametrize("affine", ["shared", "separate"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", [(4, 6, 9, 11), (2, 136, 9, 10), (2, 3, 200, 201), (8, 64, 28, 28)], ids=str)
def test_op_low_precision_within_twice_the_reference_error(shape, dtype, channels_last, affine):
    check_low_precision(shape, dtype, channels_last, affine)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_op_benchmark_shape_once(channels_last):
    """(256, 64, 56, 56) fp32: the shape of the performance target (grid sizes, no splits in NCHW,
    16 hw splits in channels_last)."""
    check_low_precision((256, 64, 56, 56), torch.float32, channels_last, seed=30)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_is_deterministic(dtype, channels_last):
    shape = (3, 64, 33, 35)
    x = place(master(shape, 40), dtype, channels_last)
    dy = place(master(shape, 41), dtype, channels_last)
    p, running = params(shape[1], torch.float32, "separate", 42)
    a = run("cuda", x, p, running, "train", dy)
    b = run("cuda", x, p, running, "train", dy)
    assert torch.equal(a[0], b[0])
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


# ---- torch.compile, autocast, host syncs ---------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "hold", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_op_torch_compile_inductor_matches_eager(channels_last, mode):
    """Inductor, fullgraph: the op (an autograd.Function over the fastdg::bin_* custom ops, with
    the running statistics updated in place in train mode) compiles and matches eager: loss,
    gradients of x and of every parameter, running statistics."""
    shape = (4, 16, 12, 13)
    x = place(master(shape, 60), torch.float32, channels_last)
    p, running = params(shape[1], torch.float32, "separate", 61)
    w = torch.linspace(-1, 2, shape[-1], device=DEV)

    def f(x, rm, rv, **ps):
        y = bin_norm(x, running_mean=rm, running_var=rv, mode=mode, backend="cuda", **ps)
        return (y * w).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    results = []
    for fn in (f, compiled):
        xx = x.detach().clone().requires_grad_()
        ps = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
        rm, rv = (t.clone() for t in running)
        out = fn(xx, rm, rv, **ps)
        grads = torch.autograd.grad(out, [xx] + list(ps.values()))
        results.append((out, grads, rm, rv))
    (o_e, g_e, rm_e, rv_e), (o_c, g_c, rm_c, rv_c) = results
    assert torch.isfinite(o_c) and rel(o_c, o_e) < 1e-5
    for name, a, b in zip(["x"] + list(p), g_c, g_e):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-5, name
    assert_layout(g_c[0], x, channels_last)
    assert rel(rm_c, rm_e) < 1e-6 and rel(rv_c, rv_e) < 1e-6
    if mode == "train":  # updated in place by the compiled graph
        assert rel(rm_c, running[0]) > 1e-3 and rel(rv_c, running[1]) > 1e-3
    else:
        assert torch.equal(rm_c, running[0]) and torch.equal(rv_c, running[1])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_op_under_autocast(dtype, channels_last):
    """torch.autocast: a conv hands the op x in `dtype` while the parameters and running
    statistics stay fp32. y and dx come back in `dtype`, parameter gradients and running
    statistics in fp32, all within 2x the error of the reference under the same autocast."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(62)
    conv = torch.nn.Conv2d(3, 16, 3, padding=1).to(DEV).to(memory_format=fmt)
    inp = place(master((4, 3, 14, 15), 63), torch.float32, channels_last)
    with torch.autocast("cuda", dtype=dtype):
        x = conv(inp)
    assert x.dtype == dtype
    x = x.detach().contiguous(memory_format=fmt)
    dy = place(master(tuple(x.shape), 64), dtype, channels_last)
    p, running = params(16, torch.float32, "shared", 65)
    exact = run("reference", x.double(), {k: v.double() for k, v in p.items()},
                tuple(t.double() for t in running), "train", dy.double())
    with torch.autocast("cuda", dtype=dtype):
        ours = run("cuda", x, p, running, "train", dy)
        ref = run("reference", x, p, running, "train", dy)
    y, g, rm, rv = ours
    assert y.dtype == dtype and g["x"].dtype == dtype and torch.isfinite(y).all()
    assert_layout(y, x, channels_last)
    assert all(g[k].dtype == torch.float32 for k in p) and rm.dtype == rv.dtype == torch.float32
    floor = 1e-5
    scale = term_scale(x, dy, "train", running)
    assert rel(y, exact[0]) <= 2 * rel(ref[0], exact[0]) + floor
    for k in exact[1]:
        err, ref_err = (grad_err(k, r_[1][k], exact[1][k], scale) for r_ in (ours, ref))
        assert torch.isfinite(g[k]).all() and err <= 2 * ref_err + floor, (k, err, ref_err)
    for i in (2, 3):
        assert rel(ours[i], exact[i]) <= 2 * rel(ref[i], exact[i]) + 1e-7
    assert rel(rm, running[0]) > 1e-3  # the update happened


@pytest.mark.parametrize("momentum", ["float", "tensor"])
def test_op_step_has_no_host_sync(momentum):
    """Default checks on CUDA tensors read no values (rho's [0, 1] check runs on the CPU only):
    a train-mode forward + backward, tensor momentum included, never synchronises."""
    shape = (8, 32, 14, 14)
    x = place(master(shape, 66), torch.float32).requires_grad_()
    dy = place(master(shape, 67), torch.float32)
    p, (rm, rv) = params(shape[1], torch.float32, "separate", 68)
    ps = {k: v.requires_grad_() for k, v in p.items()}
    m = 0.1 if momentum == "float" else torch.tensor(0.1, device=DEV)

    def step():
        y = bin_norm(x, running_mean=rm, running_var=rv, mode="train", momentum=m, backend="cuda", **ps)
        return torch.autograd.grad(y, [x] + list(ps.values()), dy)

    step()  # warm-up: loads the extension, caches the backend choice
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(t).all() for t in grads)


def test_op_checks_rho_on_cuda_only_when_asked():
    x = place(master((2, 4, 5, 6), 69), torch.float32)
    p, _ = params(4, torch.float32, "shared", 70)
    bad = p["rho"].clone()
    bad[2] = 1.5
    with pytest.raises(ValueError, match=r"rho must be in \[0, 1\]"):
        bin_norm(x, p["weight"], p["bias"], bad, mode="hold", backend="cuda", check_inputs=True)
    y = bin_norm(x, p["weight"], p["bias"], bad, mode="hold", backend="cuda")  # unchecked by default
    y_r = bin_norm_ref(x, p["weight"], p["bias"], bad, mode="hold")
    assert rel(y, y_r) < 1e-5
