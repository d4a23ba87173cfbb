"""bin_norm's Triton backend (fastdg/triton/bin_norm.py).

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest)
with a tiny fixed launch configuration, so that small shapes still loop over several tiles,
mask partial channel blocks and split a plane between programs (then merged). The
interpreter has no bf16 and is slow: fp32 and fp16 on small shapes here; bf16, the
benchmark shapes and the Inductor compile run on a GPU (`gpu` marker).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdg import _dispatch
from fastdg.ops import bin_norm, last_choice
from fastdg.ops.bin_norm import TorchKernels, _BinNormFunction
from fastdg.reference.bin_norm import bin_norm_ref

pytestmark = pytest.mark.skipif(_dispatch.triton_unavailable() is not None,
                                reason=f"Triton cannot run here: {_dispatch.triton_unavailable()}")

T = pytest.importorskip("fastdg.triton.bin_norm")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def fmt(channels_last):
    return CL if channels_last else torch.contiguous_format


def make_x(shape, dtype=torch.float32, channels_last=False, seed=0):
    """Per-channel offsets (so the variance does not come for free) and a random spread."""
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * (0.5 + torch.rand(N, C, 1, 1, generator=g))
    x = x + torch.randn(1, C, 1, 1, generator=g, dtype=torch.float64) * 3
    return x.to(dtype).to(DEVICE).contiguous(memory_format=fmt(channels_last))


@pytest.fixture
def poisoned(monkeypatch):
    """Every tensor the launchers allocate (outputs and per-split partials) starts as NaN: an
    element a kernel does not write shows up as a non-finite value."""
    nc, like = T._nc, T._like_x

    def nc_nan(x, *lead):
        return nc(x, *lead).fill_(float("nan"))

    def like_nan(x):
        return like(x).fill_(float("nan"))

    monkeypatch.setattr(T, "_nc", nc_nan)
    monkeypatch.setattr(T, "_like_x", like_nan)


# ---- the four kernels against TorchKernels in float64 ------------------------------------

# (1, 3, 40, 41): a plane of 1640 > one tile, split over programs; (3, 70, 1, 3): 70 channels
# (not a multiple of the channel block), odd H*W, several planes per NCHW tile; (2, 3, 1, 1):
# H*W = 1, where both layouts coincide.
KERNEL_SHAPES = [(1, 3, 40, 41), (4, 5, 7, 9), (3, 70, 1, 3), (2, 3, 1, 1)]


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_match_torch_kernels_float64(shape, channels_last, dtype, poisoned):
    N, C = shape[:2]
    x = make_x(shape, dtype, channels_last, seed=sum(shape))
    dy = make_x(shape, dtype, channels_last, seed=7) - 1.0
    g = torch.Generator().manual_seed(3)
    scale, shift, q = (torch.randn(N, C, generator=g).to(DEVICE) for _ in range(3))
    x64, dy64 = x.double(), dy.double()
    K = T.KERNELS

    mean, var = K.stats(x)
    mean64, var64 = TorchKernels.stats(x64)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (N, C)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    assert rel(mean, mean64) < 1e-6
    if shape[2] * shape[3] > 1:
        assert rel(var, var64) < 1e-6
    else:
        assert torch.equal(var, torch.zeros_like(var))

    y = K.apply(x, scale, shift)
    y64 = TorchKernels.apply(x64, scale.double(), shift.double())
    y_native = TorchKernels.apply(x, scale, shift)  # torch in x's precision: the error to beat
    assert y.dtype == dtype and y.stride() == x.stride() and torch.isfinite(y).all()
    assert rel(y, y64) <= 2 * rel(y_native, y64) + 1e-6

    s1, s2 = K.bwd_reduce(dy, x, mean)
    s1_64, s2_64 = TorchKernels.bwd_reduce(dy64, x64, mean.double())
    assert torch.isfinite(s1).all() and torch.isfinite(s2).all()
    # S2 = sum dy (x - mean) cancels: measure its error against the sum of |terms|.
    cond = (dy64.abs() * (x64 - mean.double()[:, :, None, None]).abs()).sum((2, 3))
    assert ((s2.double() - s2_64).abs() / cond.clamp_min(1e-30)).max() < 1e-6
    assert ((s1.double() - s1_64).abs() / dy64.abs().sum((2, 3))).max() < 1e-6

    dx = K.bwd_apply(dy, x, scale, q, shift)
    dx64 = TorchKernels.bwd_apply(dy64, x64, scale.double(), q.double(), shift.double())
    dx_native = TorchKernels.bwd_apply(dy, x, scale, q, shift)
    assert dx.dtype == dtype and dx.stride() == x.stride() and torch.isfinite(dx).all()
    assert rel(dx, dx64) <= 2 * rel(dx_native, dx64) + 1e-6

    # Deterministic: a second call gives the same bits.
    assert torch.equal(K.stats(x)[1], var) and torch.equal(K.bwd_reduce(dy, x, mean)[1], s2)


def test_layout_checks():
    """dy may differ from x in the strides of size-1 dims (same addresses); anything that is
    neither NCHW- nor channels_last-contiguous is refused, naming the argument."""
    x = torch.empty_strided((2, 3, 1, 1), (3, 1, 3, 3), device=DEVICE).copy_(make_x((2, 3, 1, 1)))
    dy = make_x((2, 3, 1, 1), seed=1)
    assert x.stride() != dy.stride()
    mean, _ = T.KERNELS.stats(x)
    s1, _ = T.KERNELS.bwd_reduce(dy, x, mean)
    assert torch.allclose(s1, dy[:, :, 0, 0])
    with pytest.raises(ValueError, match="contiguous NCHW or channels_last"):
        T.KERNELS.stats(make_x((2, 3, 4, 5)).transpose(2, 3))
    with pytest.raises(ValueError, match="dy must match x"):
        T.KERNELS.bwd_reduce(make_x((2, 3, 4, 5), channels_last=True), make_x((2, 3, 4, 5)), mean)
    with pytest.raises(ValueError, match="scale must be a contiguous"):
        T.KERNELS.apply(make_x((2, 3, 4, 5)), mean.double(), mean)


def test_launch_configuration_splits_and_covers():
    """The GPU configuration for the benchmark shape (the fixed target of 16 x 132 programs), and
    coverage invariants: the programs of a (n, c-block) cover [0, H*W) exactly once, tiles stay
    bounded."""
    assert T._GPU_TARGET_PROGRAMS == 16 * 132
    nchw = T._choose(256, 64, 56 * 56, 2048, 128, 16 * 132, channels_last=False)
    assert (nchw.block_c, nchw.block_hw, nchw.split, nchw.units) == (1, 2048, 1, 256 * 64)
    nhwc = T._choose(256, 64, 56 * 56, 2048, 128, 16 * 132, channels_last=True)
    assert nhwc.block_c == 64 and nhwc.split > 1 and nhwc.units * nhwc.split >= 16 * 132
    for N, C, L in [(256, 64, 3136), (8, 3, 50176), (1, 3, 1640), (64, 512, 49), (2, 1, 1), (3, 70, 3)]:
        for cl in (False, True):
            for tile, max_c, target in [(2048, 128, 2112), (4096, 128, 2112), (64, 4, 6)]:
                cfg = T._choose(N, C, L, tile, max_c, target, cl)
                assert cfg.block_c * cfg.block_hw <= tile and cfg.hw_per_prog % cfg.block_hw == 0
                assert (cfg.split - 1) * cfg.hw_per_prog < L <= cfg.split * cfg.hw_per_prog
                assert cfg.units == N * -(-C // cfg.block_c) and cfg.split <= 65535


# ---- the full op against the float64 reference -------------------------------------------

def make_params(C, sep, seed=0, affine=True):
    """sep: separate affine (in_weight, in_bias too); affine=False: rho only (weight = bias = None)."""
    g = torch.Generator().manual_seed(seed)

    def vec(lo, hi):
        return (torch.rand(C, generator=g, dtype=torch.float64) * (hi - lo) + lo)

    p = {"weight": vec(0.5, 1.5), "bias": vec(-1, 1), "rho": vec(0, 1)}
    if sep:
        p.update(in_weight=vec(0.5, 1.5), in_bias=vec(-1, 1))
    running = (vec(-1, 1), vec(0.5, 2))
    if not affine:
        p = {"rho": p["rho"]}
    return p, running


def run(x, p, running, mode, dy, backend):
    """bin_norm forward + backward; (y, grads by name, running_mean, running_var)."""
    x = x.detach().clone().requires_grad_()
    params = {k: v.detach().clone().to(DEVICE).requires_grad_() for k, v in p.items()}
    rm, rv = (t.clone().to(DEVICE) for t in running)
    if backend == "reference":
        y = bin_norm_ref(x, running_mean=rm, running_var=rv, mode=mode, **params)
    elif backend == "torch-kernels":  # the op's algebra with the four kernels in plain torch
        y = _BinNormFunction.apply(x, params.get("weight"), params.get("bias"), params["rho"], params.get("in_weight"),
                                   params.get("in_bias"), rm, rv, mode, 0.1, 1e-5, TorchKernels)
    else:
        y = bin_norm(x, running_mean=rm, running_var=rv, mode=mode, backend=backend, **params)
        assert last_choice("bin_norm").backend == backend
    grads = torch.autograd.grad(y, [x] + list(params.values()), dy)
    return y, dict(zip(["x"] + list(params), grads)), rm, rv


def check_against_reference(shape, channels_last, sep, mode, dtype=torch.float32, seed=0, affine=True):
    x = make_x(shape, dtype, channels_last, seed=seed)
    dy = make_x(shape, dtype, channels_last, seed=seed + 1) - 1.0
    p, running = make_params(shape[1], sep, seed, affine)
    exact = run(x.double(), p, running, mode, dy.double(), "reference")
    # The error to beat: the reference, and the op's algebra with TorchKernels, both in x's
    # precision. (The algebra writes y = A x + B, which loses digits when var[n,c] << mean^2,
    # e.g. at H*W = 1; that is the op's, not the kernels', and TorchKernels shares it.)
    p_low = {k: v.float() for k, v in p.items()}
    running_low = tuple(t.float() for t in running)
    ref_low = run(x, p_low, running_low, mode, dy, "reference")
    algebra_low = run(x, p_low, running_low, mode, dy, "torch-kernels")
    ours = run(x, p_low, running_low, mode, dy, "triton")
    y, g, rm, rv = ours
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert y.is_contiguous(memory_format=fmt(channels_last))
    assert g["x"].is_contiguous(memory_format=fmt(channels_last))

    def ok(ours, exact, others, floor):
        return rel(ours, exact) <= 2 * max(rel(o, exact) for o in others) + floor

    floor = 1e-5 if dtype == torch.float32 else 1e-3
    assert ok(y, exact[0], (ref_low[0], algebra_low[0]), floor), (rel(y, exact[0]), rel(ref_low[0], exact[0]))
    assert set(g) == set(exact[1]) == {"x"} | set(p)
    for k in exact[1]:
        assert torch.isfinite(g[k]).all(), k
        assert ok(g[k], exact[1][k], (ref_low[1][k], algebra_low[1][k]), floor), (k, rel(g[k], exact[1][k]))
    assert rel(rm, exact[2]) < 1e-6 and rel(rv, exact[3]) < 1e-6
    if mode != "train":
        assert torch.equal(rm, running_low[0]) and torch.equal(rv, running_low[1])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sep", [False, True])
@pytest.mark.parametrize("mode", ["train", "hold", "eval"])
def test_op_matches_reference(channels_last, sep, mode):
    check_against_reference((4, 5, 7, 9), channels_last, sep, mode, seed=1)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["train", "hold", "eval"])
def test_op_without_affine_matches_reference(channels_last, mode):
    """weight = bias = None: y = rho * xb + (1 - rho) * xi; gradients for x and rho only."""
    check_against_reference((3, 6, 5, 7), channels_last, False, mode, seed=6, affine=False)


@pytest.mark.parametrize("shape, channels_last, sep, mode", [
    ((1, 3, 40, 41), False, False, "train"),   # N = 1, a plane split over programs
    ((1, 3, 40, 41), True, True, "hold"),
    ((3, 70, 1, 3), True, False, "train"),     # 70 channels, odd H*W
    ((3, 70, 1, 3), False, True, "eval"),
    ((2, 6, 1, 1), False, False, "train"),     # H*W = 1: the instance branch sees var 0
])
def test_op_matches_reference_edge_shapes(shape, channels_last, sep, mode):
    check_against_reference(shape, channels_last, sep, mode, seed=2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_op_float16_within_twice_the_reference_error(channels_last):
    check_against_reference((2, 5, 6, 7), channels_last, True, "train", dtype=torch.float16, seed=3)


def test_op_keeps_channels_last():
    x = make_x((2, 4, 5, 6), channels_last=True).requires_grad_()
    y = bin_norm(x, None, None, torch.full((4,), 0.3, device=DEVICE), mode="hold", backend="triton")
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert gx.is_contiguous(memory_format=CL)


# ---- registration: opcheck, torch.compile, the triton_op path ------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
def test_ops_pass_opcheck(channels_last):
    x = make_x((2, 3, 5, 6), channels_last=channels_last)
    dy = make_x((2, 3, 5, 6), channels_last=channels_last, seed=5)
    scale, shift = torch.rand(2, 3, device=DEVICE) + 0.5, torch.randn(2, 3, device=DEVICE)
    mean, _ = T.KERNELS.stats(x)
    cases = {
        "bin_stats_triton": (x,),
        "bin_apply_triton": (x, scale, shift),
        "bin_bwd_reduce_triton": (dy, x, mean),
        "bin_bwd_apply_triton": (dy, x, scale, shift, mean),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.fastdg, name).default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def compile_check(shape, channels_last, mode, backend, tol):
    """fullgraph torch.compile of bin_norm (triton backend) against eager: loss, gradients of x
    and every parameter, and the running statistics (updated in place in train mode)."""
    x = make_x(shape, channels_last=channels_last)
    p0, running0 = make_params(shape[1], sep=False, seed=7)
    p = {k: v.float().to(DEVICE) for k, v in p0.items()}

    def f(x, rm, rv, weight, bias, rho):
        y = bin_norm(x, weight, bias, rho, rm, rv, mode=mode, backend="triton")
        return (y * torch.linspace(-1, 2, y.shape[-1], device=y.device)).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    results = []
    for fn in (f, compiled):
        xx = x.clone().requires_grad_()
        pp = {k: v.clone().requires_grad_() for k, v in p.items()}
        rm, rv = (t.float().to(DEVICE) for t in running0)
        out = fn(xx, rm, rv, **pp)
        grads = torch.autograd.grad(out, [xx] + list(pp.values()))
        results.append((out, grads, rm, rv))
    (o_e, g_e, rm_e, rv_e), (o_c, g_c, rm_c, rv_c) = results
    assert rel(o_c, o_e) < tol
    for a, b in zip(g_c, g_e):
        assert rel(a, b) < tol
    assert rel(rm_c, rm_e) < tol and rel(rv_c, rv_e) < tol
    rm0, rv0 = (t.float().to(DEVICE) for t in running0)
    if mode == "train":  # updated in place, by the compiled graph too
        assert rel(rm_c, rm0) > 1e-3 and rel(rv_c, rv0) > 1e-3
    else:
        assert torch.equal(rm_c, rm0) and torch.equal(rv_c, rv0)


@pytest.mark.parametrize("mode", ["hold", "train"])
def test_torch_compile_fullgraph(mode):
    """On a GPU, Inductor traces through the triton_ops to the kernels; under the interpreter
    the ops are opaque custom ops and aot_eager checks Dynamo + fake-tensor + autograd tracing."""
    compile_check((2, 4, 5, 6), True, mode, "inductor" if DEVICE == "cuda" else "aot_eager", 1e-5)


def test_triton_op_registration_traces_with_fake_cuda_tensors():
    """The GPU registration (torch.library.triton_op + wrap_triton), checked on any machine: a
    fresh interpreter without TRITON_INTERPRET imports the module (nothing compiles at import,
    so no GPU is needed) and traces the ops with fake CUDA tensors."""
    code = textwrap.dedent("""
        import sys, torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        from fastdg.triton import bin_norm as T
        assert not T._INTERPRETED

        def no_device(*args, **kwargs):
            raise AssertionError("the launch configuration must not depend on the GPU model")

        torch.cuda.get_device_properties = no_device
        K = T.KERNELS

        def f(x, dy, s, t):
            mean, var = K.stats(x)
            y = K.apply(x, s, t)
            s1, s2 = K.bwd_reduce(dy, x, mean)
            return y, K.bwd_apply(dy, x, s1, s2, var)

        with FakeTensorMode():
            for dtype in (torch.float32, torch.bfloat16):
                for fmt in (torch.contiguous_format, torch.channels_last):
                    x = torch.empty(256, 64, 56, 56, device="cuda", dtype=dtype, memory_format=fmt)
                    s = torch.empty(256, 64, device="cuda")
                    cfg = T.config(x, reduce=True)  # fixed target: 9 hw ranges in channels_last
                    assert (cfg.units, cfg.split) == ((256, 9) if fmt == torch.channels_last else (16384, 1))
                    y, dx = f(x, torch.empty_like(x), s, s)
                    assert y.dtype == dx.dtype == dtype and y.stride() == dx.stride() == x.stride()
                    gm = make_fx(f)(x, torch.empty_like(x), s, s)
                    names = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
                    for op in ("bin_stats_triton", "bin_apply_triton", "bin_bwd_reduce_triton", "bin_bwd_apply_triton"):
                        assert any(op in n for n in names), (op, names)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ---- GPU only ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(256, 64, 56, 56), (8, 64, 112, 112), (64, 512, 7, 7), (2, 3, 224, 224)])
def test_gpu_kernels_large_shapes(shape, channels_last, dtype):
    N, C = shape[:2]
    x = make_x(shape, dtype, channels_last)
    dy = (torch.randn(shape, device="cuda", dtype=dtype) * 0.1).contiguous(memory_format=fmt(channels_last))
    scale, shift, q = (torch.randn(N, C, device="cuda") for _ in range(3))
    x64, dy64 = x.double(), dy.double()
    K = T.KERNELS
    mean, var = K.stats(x)
    mean64, var64 = TorchKernels.stats(x64)
    assert rel(mean, mean64) < 1e-5 and rel(var, var64) < 1e-5
    y = K.apply(x, scale, shift)
    y64 = TorchKernels.apply(x64, scale.double(), shift.double())
    assert y.stride() == x.stride() and rel(y, y64) <= 2 * rel(TorchKernels.apply(x, scale, shift), y64) + 1e-6
    s1, s2 = K.bwd_reduce(dy, x, mean)
    s1_64, s2_64 = TorchKernels.bwd_reduce(dy64, x64, mean.double())
    cond = (dy64.abs() * (x64 - mean.double()[:, :, None, None]).abs()).sum((2, 3))
    assert ((s2.double() - s2_64).abs() / cond).max() < 1e-5
    assert ((s1.double() - s1_64).abs() / dy64.abs().sum((2, 3))).max() < 1e-5
    dx = K.bwd_apply(dy, x, scale, q, shift)
    dx64 = TorchKernels.bwd_apply(dy64, x64, scale.double(), q.double(), shift.double())
    assert dx.stride() == x.stride()
    assert rel(dx, dx64) <= 2 * rel(TorchKernels.bwd_apply(dy, x, scale, q, shift), dx64) + 1e-6
    assert torch.equal(K.stats(x)[1], var) and torch.equal(K.bwd_reduce(dy, x, mean)[1], s2)  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_op_bfloat16_within_twice_the_reference_error(channels_last):
    check_against_reference((8, 16, 28, 28), channels_last, False, "train", dtype=torch.bfloat16, seed=4)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_torch_compile_inductor_train_mode(channels_last):
    """Inductor, train mode, a shape whose channels_last reductions split the planes (merge
    kernels): the running statistics updated in place under the compiled graph match eager."""
    compile_check((16, 32, 28, 28), channels_last, "train", "inductor", 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sep", [False, True])
def test_gpu_op_matches_reference(channels_last, sep):
    check_against_reference((16, 32, 56, 56), channels_last, sep, "train", seed=5)
