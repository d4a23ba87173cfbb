"""bin_norm: the reference against torch's own norms, and every backend against the reference."""
import pytest
import torch
import torch.nn.functional as F

from fastdg import _ext
from fastdg.ops import bin_norm, last_choice
from fastdg.ops.bin_norm import TorchKernels, _BinNormFunction
from fastdg.reference.bin_norm import bin_norm_ref

needs_ext = pytest.mark.skipif(_ext.load() is None, reason=f"fastdg._C not loaded: {_ext.why_not()}")


def make(shape, dtype=torch.float64, channels_last=False, seed=0, sep=False, affine=None):
    """x (never zero, per-channel offsets), parameters by name, running (mean, var).
    affine: "shared" (weight, bias), "separate" (+ in_weight, in_bias) or "none" (rho only);
    default from sep."""
    affine = affine or ("separate" if sep else "shared")
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + torch.randn(1, C, 1, 1, generator=g,
                                                                              dtype=torch.float64) * 3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def vec(lo, hi):
        return (torch.rand(C, generator=g, dtype=torch.float64) * (hi - lo) + lo)

    p = {"weight": vec(0.5, 1.5), "bias": vec(-1, 1), "rho": vec(0, 1)}
    if affine == "separate":
        p.update(in_weight=vec(0.5, 1.5), in_bias=vec(-1, 1))
    running = (vec(-1, 1), vec(0.5, 2))
    if affine == "none":
        p = {"rho": p["rho"]}
    return x, p, running


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(backend, x, p, running, mode, dy):
    x = x.detach().clone().requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    rm, rv = (t.clone() for t in running)
    if backend == "torch-kernels":
        y = _BinNormFunction.apply(x, params.get("weight"), params.get("bias"), params["rho"], params.get("in_weight"),
                                   params.get("in_bias"), rm, rv, mode, 0.1, 1e-5, TorchKernels)
    else:
        y = bin_norm(x, running_mean=rm, running_var=rv, mode=mode, backend=backend, **params)
    grads = torch.autograd.grad(y, [x] + list(params.values()), dy)
    return y, dict(zip(["x"] + list(params), grads)), rm, rv


# ---- the reference is right: rho = 1 is BatchNorm2d, rho = 0 is InstanceNorm2d ------------

@pytest.mark.parametrize("rho_value, mode", [(1.0, "train"), (1.0, "eval"), (0.0, "train"), (0.0, "eval")])
def test_reference_reduces_to_torch_norms(rho_value, mode):
    x, p, (rm, rv) = make((4, 5, 7, 9))
    x.requires_grad_()
    w, b = p["weight"].requires_grad_(), p["bias"].requires_grad_()
    rho = torch.full((5,), rho_value, dtype=torch.float64)
    dy = torch.randn_like(x)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y = bin_norm_ref(x, w, b, rho, rm1, rv1, mode=mode)
    if rho_value == 1.0:
        y_t = F.batch_norm(x, rm2, rv2, w, b, mode == "train", 0.1, 1e-5)
    else:
        y_t = F.instance_norm(x, weight=w, bias=b, eps=1e-5)
    g = torch.autograd.grad(y, (x, w, b), dy)
    g_t = torch.autograd.grad(y_t, (x, w, b), dy)
    torch.testing.assert_close(y, y_t)
    for a, e in zip(g, g_t):
        torch.testing.assert_close(a, e)
    if rho_value == 1.0:  # running statistics: momentum update with the unbiased variance
        torch.testing.assert_close(rm1, rm2)
        torch.testing.assert_close(rv1, rv2)


def test_hold_mode_leaves_running_stats_and_eval_ignores_batch():
    x, p, (rm, rv) = make((3, 4, 5, 6))
    rm0, rv0 = rm.clone(), rv.clone()
    bin_norm_ref(x, **p, running_mean=rm, running_var=rv, mode="hold")
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    y1 = bin_norm_ref(x, **p, running_mean=rm, running_var=rv, mode="eval")
    y2 = bin_norm_ref(torch.cat([x, x * 5 + 3])[:3], **p, running_mean=rm, running_var=rv, mode="eval")
    torch.testing.assert_close(y1, y2)


GRAD_BACKENDS = ["reference"] + (["cpp"] if _ext.load() is not None else [])
PARAM_NAMES = ("weight", "bias", "rho", "in_weight", "in_bias")


def grad_check(backend, x, p, running, mode, fast_mode=False):
    """gradcheck + gradgradcheck (second order: MetaBIN's meta-gradient) of bin_norm in `mode`
    w.r.t. x and every parameter. Each call gets fresh copies of the running statistics, so the
    repeated calls see the same function (train mode updates them in place; its output does not
    depend on them, eval's does). fast_mode: compare random projections of the Jacobians (still
    fails on any wrong entry with probability 1), not every entry."""
    names = [k for k in PARAM_NAMES if k in p]
    inputs = [x.detach().requires_grad_()] + [p[k].detach().clone().requires_grad_() for k in names]
    rm, rv = running

    def f(x, *params):
        y = bin_norm(x, running_mean=rm.clone(), running_var=rv.clone(), mode=mode, backend=backend,
                     **dict(zip(names, params)))
        assert last_choice("bin_norm").backend == backend
        return y

    assert torch.autograd.gradcheck(f, inputs, fast_mode=fast_mode)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=fast_mode)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("affine", ["shared", "separate", "none"])
@pytest.mark.parametrize("mode", ["train", "hold", "eval"])
def test_gradcheck_and_gradgradcheck_float64(backend, affine, mode):
    x, p, running = make((2, 3, 3, 4), affine=affine, seed=5)
    # Every Jacobian entry once (hold, separate affine: all five parameters); projections elsewhere.
    grad_check(backend, x, p, running, mode, fast_mode=(mode, affine) != ("hold", "separate"))


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "sliced"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradgradcheck_non_contiguous_input(backend, view, mode):
    """x neither NCHW- nor channels_last-contiguous: forward works on a contiguous copy, and the
    double backward must still differentiate through the caller's x (a saved copy has no graph)."""
    base, p, running = make((2, 3, 4, 6), sep=True, seed=6)
    x = base.transpose(2, 3) if view == "transposed" else base[:, :, 1:, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    grad_check(backend, x, p, running, mode, fast_mode=True)


# ---- every fast path against the reference ------------------------------------------------

SHAPES = [(4, 5, 7, 9), (1, 3, 5, 5), (3, 70, 1, 3), (2, 2, 64, 65)]
BACKENDS = ["torch-kernels"] + (["cpp"] if _ext.load() is not None else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", ["shared", "separate", "none"])
@pytest.mark.parametrize("mode", ["train", "hold", "eval"])
def test_backend_matches_reference_float64(backend, shape, channels_last, affine, mode):
    if mode == "train" and shape[0] * shape[2] * shape[3] < 2:
        pytest.skip("train mode needs more than one value per channel")
    x, p, running = make(shape, channels_last=channels_last, affine=affine, seed=sum(shape) + len(affine))
    dy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    if channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    y, g, rm, rv = run(backend, x, p, running, mode, dy)
    y_r, g_r, rm_r, rv_r = run("reference", x, p, running, mode, dy)
    assert rel(y, y_r) < 1e-12
    for k in g_r:
        assert rel(g[k], g_r[k]) < 1e-10, k
    assert rel(rm, rm_r) < 1e-13 and rel(rv, rv_r) < 1e-13
    if channels_last and backend != "torch-kernels":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert g["x"].is_contiguous(memory_format=torch.channels_last)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["train", "hold", "eval"])
@pytest.mark.parametrize("affine", ["shared", "separate", "none"])
@pytest.mark.parametrize("shape", [(4, 6, 9, 11), (2, 3, 40, 41)])
def test_cpp_low_precision_within_twice_the_reference_error(dtype, channels_last, mode, affine, shape):
    """Half precision passes when its error is within 2x of the reference's own in that precision:
    y, every gradient and the running statistics (updated in train, untouched otherwise)."""
    x64, p, running = make(shape, channels_last=channels_last, seed=4, affine=affine)
    dy64 = torch.randn(x64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = run("reference", x64, p, running, mode, dy64)
    x, dy = x64.to(dtype), dy64.to(dtype)
    pl = {k: v.float() for k, v in p.items()}
    running_l = tuple(t.float() for t in running)
    run_l = []
    for backend in ("cpp", "reference"):
        run_l.append(run(backend, x, pl, running_l, mode, dy))
        assert last_choice("bin_norm").backend == backend
    (y_c, g_c, rm_c, rv_c), (y_r, g_r, rm_r, rv_r) = run_l
    assert y_c.dtype == dtype and torch.isfinite(y_c).all()
    assert rel(y_c, exact[0]) <= 2 * rel(y_r, exact[0]) + 1e-6
    assert set(g_c) == set(exact[1])
    for k in g_r:
        assert g_c[k].dtype == pl[k].dtype if k != "x" else g_c[k].dtype == dtype, k
        assert rel(g_c[k], exact[1][k]) <= 2 * rel(g_r[k], exact[1][k]) + 1e-6, k
    assert rm_c.dtype == rv_c.dtype == torch.float32
    assert rel(rm_c, exact[2]) <= 2 * rel(rm_r, exact[2]) + 1e-7
    assert rel(rv_c, exact[3]) <= 2 * rel(rv_r, exact[3]) + 1e-7
    if mode == "train":  # the update happened (a skipped update would be ~1e-1 off)
        assert not torch.equal(rm_c, running_l[0]) and not torch.equal(rv_c, running_l[1])
    else:
        assert torch.equal(rm_c, running_l[0]) and torch.equal(rv_c, running_l[1])


@needs_ext
def test_cpp_kernels_write_every_element_and_pass_opcheck():
    x, _, _ = make((3, 4, 5, 7), dtype=torch.float32)
    mean, var = torch.ops.fastdg.bin_stats(x)
    v_ref, m_ref = torch.var_mean(x.double(), dim=(2, 3), unbiased=False)
    assert rel(mean, m_ref) < 1e-6 and rel(var, v_ref) < 1e-6
    scale, shift = torch.rand(3, 4) + 0.5, torch.randn(3, 4)
    y = torch.ops.fastdg.bin_apply(x, scale, shift)
    assert torch.isfinite(y).all()  # empty_like output: garbage would show up as a mismatch
    torch.testing.assert_close(y, x * scale[..., None, None] + shift[..., None, None])
    dy = torch.randn_like(x)
    for x_ in (x, x.contiguous(memory_format=torch.channels_last)):
        fmt = torch.contiguous_format if x_.is_contiguous() else torch.channels_last
        dy_ = dy.contiguous(memory_format=fmt)
        args = {
            "bin_stats": (x_,),
            "bin_apply": (x_, scale, shift),
            "bin_bwd_reduce": (dy_, x_, mean),
            "bin_bwd_apply": (dy_, x_, scale, shift, torch.randn(3, 4)),
        }
        for op, a in args.items():
            torch.library.opcheck(getattr(torch.ops.fastdg, op).default, a,
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---- bad input ---------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    x, p, (rm, rv) = make((2, 3, 4, 4), dtype=torch.float32)
    p = {k: v.float() for k, v in p.items()}
    with pytest.raises(ValueError, match="x must be 4-D"):
        bin_norm(x[0], **p)
    with pytest.raises(ValueError, match=r"rho must have shape \(3,\)"):
        bin_norm(x, p["weight"], p["bias"], torch.rand(4))
    with pytest.raises(TypeError, match="x must have dtype"):
        bin_norm(x.long(), **p)
    with pytest.raises(ValueError, match="mode must be one of"):
        bin_norm(x, **p, mode="test")
    with pytest.raises(ValueError, match="needs running_mean"):
        bin_norm(x, **p, mode="eval")
    with pytest.raises(ValueError, match="weight and bias must be given together"):
        bin_norm(x, p["weight"], None, p["rho"])
    with pytest.raises(ValueError, match="more than one value per channel"):
        bin_norm(x[:1, :, :1, :1], **p, running_mean=rm.float(), running_var=rv.float())
    with pytest.raises(TypeError, match="rho must be a torch.Tensor"):
        bin_norm(x, p["weight"], p["bias"], None)


@needs_ext
@pytest.mark.parametrize("shape", [(8, 64, 28, 28), (4, 8, 56, 56)])
def test_fp32_gradients_as_accurate_as_reference_when_statistics_agree(shape):
    """When every sample of a channel has about the batch's statistics, xb ~ xi and rho's
    gradient is a small difference of large sums: the fused algebra and the kernels' sums must
    stay within 2x of the error the reference itself makes in fp32."""
    g = torch.Generator().manual_seed(1)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) + torch.randn(1, C, 1, 1, generator=g,
                                                                            dtype=torch.float64) * 3
    params = [torch.rand(C, generator=g, dtype=torch.float64) + 0.5, torch.randn(C, generator=g, dtype=torch.float64),
              torch.rand(C, generator=g, dtype=torch.float64)]
    dy = torch.randn(shape, generator=g, dtype=torch.float64)

    def grads(backend, dtype):
        ins = [t.to(dtype).requires_grad_() for t in [x] + params]
        return torch.autograd.grad(bin_norm(*ins, mode="hold", backend=backend), ins, dy.to(dtype))

    truth = grads("reference", torch.float64)
    ref32, cpp32 = grads("reference", torch.float32), grads("cpp", torch.float32)
    for name, t, r, c in zip(["x", "weight", "bias", "rho"], truth, ref32, cpp32):
        assert rel(c, t) <= 2 * rel(r, t) + 1e-7, (name, rel(c, t), rel(r, t))


# ---- rho and momentum values --------------------------------------------------------------

PUBLIC_BACKENDS = ["reference"] + (["cpp"] if _ext.load() is not None else [])


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS)
@pytest.mark.parametrize("bad", [1.5, -0.25, float("nan")])
def test_rho_outside_unit_interval_is_refused_on_cpu(backend, bad):
    """DESIGN.md: rho outside [0, 1] raises at the public boundary (rho on the CPU: one cheap
    read); check_inputs=False skips the read and computes the extrapolation."""
    x, p, (rm, rv) = make((2, 3, 4, 4), dtype=torch.float32)
    p = {k: v.float() for k, v in p.items()}
    rho = p["rho"].clone()
    rho[1] = bad
    for mode in ("train", "hold", "eval"):
        for check in (None, True):
            with pytest.raises(ValueError, match=r"rho must be in \[0, 1\]"):
                bin_norm(x, p["weight"], p["bias"], rho, rm.float(), rv.float(), mode=mode, backend=backend,
                         check_inputs=check)
    y = bin_norm(x, p["weight"], p["bias"], rho, mode="hold", backend=backend, check_inputs=False)
    torch.testing.assert_close(y, bin_norm_ref(x, p["weight"], p["bias"], rho, mode="hold"), equal_nan=True)


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS)
def test_rho_at_the_bounds_and_meta_learning_rho_are_accepted(backend):
    """0 and 1 are valid; so is MetaBIN's rho' = lin + (clamp(lin, 0, 1) - lin).detach() (a
    non-leaf tensor with a graph, exactly in [0, 1] even where lin is not), and gradients
    flow back to rho through it."""
    x, p, _ = make((3, 4, 5, 5))
    rho = torch.tensor([0.0, 1.0, 0.3, 0.9], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([2.0, -3.0, 0.1, -0.3], dtype=torch.float64)
    lin = rho - 0.7 * g  # [-1.4, 3.1, 0.23, 1.11]: two values outside [0, 1]
    fast = lin + (lin.clamp(0.0, 1.0) - lin).detach()
    y = bin_norm(x, p["weight"], p["bias"], fast, mode="hold", backend=backend)
    (gr,) = torch.autograd.grad(y.sin().sum(), rho)
    fast_r = fast.detach().clone().requires_grad_()
    (gr_ref,) = torch.autograd.grad(bin_norm_ref(x, p["weight"], p["bias"], fast_r, mode="hold").sin().sum(), fast_r)
    torch.testing.assert_close(gr, gr_ref)  # straight through: d rho' / d rho = 1
    assert gr.abs().min() > 0


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS)
def test_tensor_momentum_matches_float_momentum(backend):
    """momentum as a one-element tensor (no host read, e.g. BatchNorm's cumulative 1 / count)
    updates the running statistics as the same float does."""
    x, p, (rm, rv) = make((4, 5, 6, 7), seed=8)
    stats = []
    for momentum in (0.3, torch.tensor(0.3, dtype=torch.float64), torch.tensor([0.3], dtype=torch.float32)):
        rm_, rv_ = rm.clone(), rv.clone()
        y = bin_norm(x, **p, running_mean=rm_, running_var=rv_, mode="train", momentum=momentum, backend=backend)
        stats.append((y, rm_, rv_))
    assert not torch.equal(stats[0][1], rm) and not torch.equal(stats[0][2], rv)
    for y, rm_, rv_ in stats[1:2]:  # float64 tensor: the same number
        assert torch.equal(y, stats[0][0]) and torch.equal(rm_, stats[0][1]) and torch.equal(rv_, stats[0][2])
    y, rm_, rv_ = stats[2]  # 0.3 rounded to float32
    assert rel(rm_, stats[0][1]) < 1e-7 and rel(rv_, stats[0][2]) < 1e-7 and torch.equal(y, stats[0][0])


def test_bad_momentum_is_refused():
    x, p, (rm, rv) = make((2, 3, 4, 4))
    kw = dict(running_mean=rm, running_var=rv, mode="train")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        bin_norm(x, **p, **kw, momentum=1.5)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        bin_norm(x, **p, **kw, momentum=torch.tensor(-0.1))
    with pytest.raises(ValueError, match="momentum must be a number or a one-element tensor"):
        bin_norm(x, **p, **kw, momentum=torch.full((2,), 0.1))
    with pytest.raises(TypeError, match="momentum must have dtype"):
        bin_norm(x, **p, **kw, momentum=torch.tensor(1))
    assert torch.equal(rm, make((2, 3, 4, 4))[2][0])  # nothing was updated


@needs_ext
def test_cpp_dy_layout_may_differ_in_size_one_strides():
    """A (N, C, 1, 1) x from a channels_last producer has strides (C, 1, C, C), its dy (C, 1, 1, 1):
    the same memory. The C++ backward takes it (as CUDA and Triton do) and refuses another layout."""
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(2, 3, 1, 1, generator=g, dtype=torch.float64)
    x = torch.empty_strided((2, 3, 1, 1), (3, 1, 3, 3), dtype=torch.float64).copy_(x64)
    dy = torch.randn(2, 3, 1, 1, generator=g, dtype=torch.float64)
    assert x.stride() != dy.stride()
    mean, _ = torch.ops.fastdg.bin_stats(x)
    s1, s2 = torch.ops.fastdg.bin_bwd_reduce(dy, x, mean)
    torch.testing.assert_close(s1, dy[:, :, 0, 0])
    torch.testing.assert_close(s2, (dy * (x64 - mean[:, :, None, None]))[:, :, 0, 0])
    ones = torch.ones(2, 3, dtype=torch.float64)
    dx = torch.ops.fastdg.bin_bwd_apply(dy, x, ones, ones, ones)
    torch.testing.assert_close(dx, dy + x64 + 1)
    # Through the public op and autograd, against the reference.
    w, b, rho = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64), torch.rand(3).double()
    xs = x.clone().requires_grad_()
    xr = x64.clone().requires_grad_()
    y = bin_norm(xs, w, b, rho, None, None, backend="cpp")
    (gx,) = torch.autograd.grad(y, xs, dy)
    (gr,) = torch.autograd.grad(bin_norm_ref(xr, w, b, rho, None, None), xr, dy)
    torch.testing.assert_close(gx, gr)
    x4 = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="dy must match x"):
        torch.ops.fastdg.bin_bwd_reduce(x4.contiguous(memory_format=torch.channels_last), x4,
                                        torch.ops.fastdg.bin_stats(x4)[0])
