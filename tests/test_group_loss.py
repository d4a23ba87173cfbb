"""group_loss: the reference against a plain per-group loop, and every backend against the reference."""
import pytest
import torch
import torch.nn.functional as F

from fastdg import _ext
from fastdg.ops import group_loss, last_choice
from fastdg.ops.group_loss import TorchKernels, _CompiledKernels, _FromLogits
from fastdg.reference.group_loss import group_loss_ref

HAS_CPP = _ext.has_kernel("group_loss_stats", "CPU")
BACKENDS = ["reference"] + (["cpp"] if HAS_CPP else [])


def make(n, k, G, seed=0, dtype=torch.float64, empty=()):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64).mul(3).to(dtype)
    y = torch.randint(0, k, (n,), generator=g)
    allowed = torch.tensor([i for i in range(G) if i not in empty])
    grp = allowed[torch.randint(0, len(allowed), (n,), generator=g)]
    q = torch.rand(G, generator=g, dtype=torch.float64) + 0.1
    return z, y, grp, (q / q.sum()).float()


def loop_oracle(z, y, grp, q, eta, ls):
    """DomainBed style: a Python loop over groups (an empty group keeps its weight)."""
    G = len(q)
    losses = [F.cross_entropy(z[grp == i], y[grp == i], label_smoothing=ls) if (grp == i).any()
              else torch.zeros((), dtype=z.dtype) for i in range(G)]
    L = torch.stack(losses)
    q2 = q.double() * torch.exp(eta * L.detach())
    q2 = q2 / q2.sum()
    return (q2 * L).sum(), q2, L


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_per_group_loop(backend, ls):
    z, y, grp, q = make(97, 13, 7, empty=(3,))
    z.requires_grad_()
    out = group_loss(z, y, grp, q, eta=0.3, label_smoothing=ls, backend=backend)
    assert last_choice("group_loss").backend == backend
    zl = z.detach().clone().requires_grad_()
    loss, q2, L = loop_oracle(zl, y, grp, q, 0.3, ls)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.q.double(), q2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.group_loss, L.detach())
    # the empty group 3 keeps its weight: its ratio is the normaliser alone
    ratio = (out.q.double() / q.double()).detach()
    assert ratio[3] == pytest.approx(float(ratio[0] / torch.exp(0.3 * L[0].detach())), rel=1e-5)
    assert torch.equal(out.group_count, torch.bincount(grp, minlength=7).double())
    g1, = torch.autograd.grad(out.loss, z)
    g2, = torch.autograd.grad(loss, zl)  # d/dz with q held at its updated value in both
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["one_group", "all_in_one", "single_sample", "many_groups", "wide"])
def test_backend_matches_reference_edge_cases(backend, case):
    n, k, G, empty = {"one_group": (40, 5, 1, ()), "all_in_one": (40, 5, 6, (0, 1, 2, 4, 5)),
                      "single_sample": (1, 3, 4, ()), "many_groups": (600, 4, 4096, ()),
                      "wide": (9, 32768, 3, ())}[case]
    z, y, grp, q = make(n, k, G, seed=len(case), empty=empty)
    z.requires_grad_()
    adj = torch.rand(G, dtype=torch.float64) * 0.5
    ref = group_loss_ref(z, y, grp, q, eta=0.05, label_smoothing=0.05, adjustment=adj)
    out = group_loss(z, y, grp, q, eta=0.05, label_smoothing=0.05, adjustment=adj, backend=backend)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.q, ref.q)
    g_ref, = torch.autograd.grad(ref.loss, z)
    g, = torch.autograd.grad(out.loss, z)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_per_sample_losses(backend):
    g = torch.Generator().manual_seed(1)
    losses = (torch.rand(50, generator=g, dtype=torch.float64) * 2).requires_grad_()
    grp = torch.randint(0, 5, (50,), generator=g)
    q = torch.full((5,), 0.2)
    out = group_loss(losses, None, grp, q, eta=0.1, backend=backend)
    ref = group_loss_ref(losses, None, grp, q, eta=0.1)
    torch.testing.assert_close(out.loss, ref.loss)
    gl, = torch.autograd.grad(out.loss, losses)
    counts = torch.bincount(grp, minlength=5).double()
    torch.testing.assert_close(gl, (out.q.double() / counts)[grp])  # d loss / d l_i = q_g / n_g


def test_gradcheck_float64():
    z, y, grp, q = make(12, 5, 3)
    z.requires_grad_()
    # eta = 0: the q update is detached by definition, so only then is the loss a plain
    # differentiable function of the logits that finite differences can check.
    for backend in BACKENDS:
        assert torch.autograd.gradcheck(lambda z: group_loss(z, y, grp, q.double(), eta=0.0, label_smoothing=0.1,
                                                             backend=backend).loss, (z,))
    assert torch.autograd.gradcheck(lambda z: _FromLogits.apply(z, y, grp, q.double(), 0.0, 0.1, None, TorchKernels,
                                                                None)[0], (z,))


def _kernel_set_paths():
    """Every way a loss from logits is computed: the public op per backend, and the autograd.Function
    over each kernel set (what torch.compile and the all-reduce path run)."""
    paths = {f"op-{b}": (lambda b: lambda z, y, g, q, eta, ls: group_loss(z, y, g, q, eta=eta, label_smoothing=ls,
                                                                         backend=b).loss)(b) for b in BACKENDS}
    sets = {"torch": TorchKernels, **({"cpp": _CompiledKernels} if HAS_CPP else {})}
    for name, ks in sets.items():
        paths[f"function-{name}"] = (lambda ks: lambda z, y, g, q, eta, ls: _FromLogits.apply(
            z, y, g, q, eta, ls, None, ks, None)[0])(ks)
    return paths


@pytest.mark.parametrize("path", list(_kernel_set_paths()))
def test_gradgradcheck_float64(path):
    """Second derivatives (create_graph): the softmax Jacobian must be part of the Hessian. eta = 0
    keeps q' constant, as the maths treats it (L_g is detached in the q update)."""
    fn = _kernel_set_paths()[path]
    z, y, grp, q = make(12, 5, 3, seed=4)
    z.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda z: fn(z, y, grp, q.double(), 0.0, 0.1), (z,))
    # and the Hessian-vector product against the reference's
    v = torch.randn_like(z)
    (g1,) = torch.autograd.grad(fn(z, y, grp, q.double(), 0.0, 0.1), z, create_graph=True)
    (h1,) = torch.autograd.grad((g1 * v).sum(), z)
    ref = group_loss_ref(z, y, grp, q.double(), eta=0.0, label_smoothing=0.1).loss
    (g2,) = torch.autograd.grad(ref, z, create_graph=True)
    (h2,) = torch.autograd.grad((g2 * v).sum(), z)
    torch.testing.assert_close(h1, h2)


@pytest.mark.skipif(not HAS_CPP, reason="fastdg._C has no CPU group-loss kernels")
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_cpp_kernel_set_path_matches_reference(ls):
    """The autograd.Function over the C++ kernel set (torch.compile, all-reduce) = the fused op = reference."""
    z, y, grp, q = make(61, 9, 5, seed=7, empty=(2,))
    z.requires_grad_()
    adj = torch.rand(5, dtype=torch.float64)
    ref = group_loss_ref(z, y, grp, q, eta=0.2, label_smoothing=ls, adjustment=adj)
    loss, q_new, mean, counts = _FromLogits.apply(z, y, grp, q, 0.2, ls, adj, _CompiledKernels, None)
    fused = group_loss(z, y, grp, q, eta=0.2, label_smoothing=ls, adjustment=adj, backend="cpp")
    for out in ((loss, q_new, mean), (fused.loss, fused.q, fused.group_loss)):
        torch.testing.assert_close(out[0], ref.loss)
        torch.testing.assert_close(out[1].to(ref.q.dtype), ref.q)
        torch.testing.assert_close(out[2], ref.group_loss)
    gref, = torch.autograd.grad(ref.loss * 1.7, z)  # a non-unit upstream gradient
    for l in (loss, fused.loss):
        g, = torch.autograd.grad(l * 1.7, z)
        torch.testing.assert_close(g, gref)


@pytest.mark.skipif(not HAS_CPP, reason="fastdg._C has no CPU group-loss kernels")
def test_cpp_fused_op_registration_and_inference():
    z, y, grp, q = make(40, 6, 4, seed=8, dtype=torch.float32)
    ops = torch.ops.fastdg
    args = (z, y, grp, q, 0.1, 0.1, None)
    for op, a in {"group_loss_fused": args, "group_loss_fused_fwd": args + (True,)}.items():
        torch.library.opcheck(getattr(ops, op).default, a,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    zr = z.clone().requires_grad_()
    torch.library.opcheck(ops.group_loss_fused.default, (zr,) + args[1:],
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_static"))
    robust, q_new, mean, counts, probs = ops.group_loss_fused_fwd(*args, True)
    torch.testing.assert_close(probs, torch.softmax(z, 1))
    grad = ops.group_loss_probs_bwd(probs, y, grp, torch.tensor(2.0), q_new, counts, 0.1, torch.bfloat16)
    ref = TorchKernels.bwd(z.double(), y, grp, torch.logsumexp(z.double(), 1),
                           2.0 * q_new.double() / counts.double().clamp_min(1), 0.1)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), ref, rtol=1e-2, atol=1e-3)
    torch.library.opcheck(ops.group_loss_probs_bwd.default,
                          (probs, y, grp, torch.tensor(2.0), q_new, counts, 0.1, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
    # No softmax is kept when nothing needs a backward (no_grad, inference mode, no requires_grad).
    with torch.inference_mode():
        out = group_loss(z, y, grp, q, eta=0.1, backend="cpp")
    torch.testing.assert_close(out.loss, group_loss_ref(z, y, grp, q, eta=0.1).loss)


@pytest.mark.skipif(not HAS_CPP, reason="fastdg._C has no CPU group-loss kernels")
def test_cpp_kernels_reject_bad_ids_on_direct_calls():
    z, y, grp, q = make(10, 4, 3, dtype=torch.float32)
    losses, lse, sums, counts = torch.ops.fastdg.group_loss_stats(z, y, grp, 3, 0.0)
    with pytest.raises(RuntimeError, match="group id 3 out of range"):
        torch.ops.fastdg.group_loss_bwd(z, y, grp.clamp_min(3), lse, torch.ones(3), 0.0)
    with pytest.raises(RuntimeError, match="target 4 out of range"):
        torch.ops.fastdg.group_loss_bwd(z, y.clamp_min(4), grp, lse, torch.ones(3), 0.0)
    probs = torch.softmax(z, 1)
    with pytest.raises(RuntimeError, match="group id 3 out of range"):
        torch.ops.fastdg.group_loss_probs_bwd(probs, y, grp.clamp_min(3), torch.tensor(1.0), q, counts, 0.0,
                                              torch.float32)


@pytest.mark.skipif(not HAS_CPP, reason="fastdg._C has no CPU group-loss kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_low_precision_and_opcheck(dtype):
    z64, y, grp, q = make(64, 10, 5, seed=3)
    ref = group_loss_ref(z64, y, grp, q, eta=0.01)
    out = group_loss(z64.to(dtype), y, grp, q, eta=0.01, backend="cpp")
    low = group_loss_ref(z64.to(dtype), y, grp, q, eta=0.01)
    assert abs(out.loss.double() - ref.loss).item() <= 2 * abs(low.loss.double() - ref.loss).item() + 1e-6
    z = z64.float()
    losses, lse, sums, counts = torch.ops.fastdg.group_loss_stats(z, y, grp, 5, 0.1)
    scale = torch.rand(5)
    for op, args in {"group_loss_stats": (z, y, grp, 5, 0.1), "group_loss_sums": (losses, grp, 5),
                     "group_q_update": (q, sums, counts, 0.01, None),
                     "group_loss_bwd": (z, y, grp, lse, scale, 0.1)}.items():
        torch.library.opcheck(getattr(torch.ops.fastdg, op).default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_loss_never_poisons_q(backend):
    z, y, grp, q = make(20, 4, 3)
    z[0, 0] = float("nan")
    with pytest.raises(ValueError, match="input contains NaN"):
        group_loss(z, y, grp, q, backend=backend)
    out = group_loss(z, y, grp, q, check_inputs=False, backend=backend)
    assert torch.equal(out.q, q) and not torch.isfinite(out.loss)
    # A non-finite adjustment (the q update alone) must not reach q either, nor all-zero weights.
    z, y, grp, q = make(20, 4, 3)
    for adj in (torch.tensor([0.0, float("inf"), 0.0]), torch.tensor([float("nan"), 0.0, 0.0])):
        out = group_loss(z, y, grp, q, adjustment=adj, check_inputs=False, backend=backend)
        assert torch.equal(out.q, q)
    zero = torch.zeros(3)
    out = group_loss(z, y, grp, zero, check_inputs=False, backend=backend)
    assert torch.equal(out.q, zero)
    # A zero weight is legal and stays zero (log 0 = -inf is not a poisoned weight).
    q0 = torch.tensor([0.0, 0.5, 0.5])
    out = group_loss(z, y, grp, q0, eta=0.1, backend=backend)
    assert out.q[0] == 0 and abs(float(out.q.sum()) - 1) < 1e-6


def test_q_stays_normalised_for_long_runs():
    z, y, grp, q = make(30, 4, 3)
    for _ in range(2000):  # unnormalised weights would overflow float32 long before this
        q = group_loss(z * 10, y, grp, q, eta=5.0).q
    assert torch.isfinite(q).all() and abs(float(q.sum()) - 1) < 1e-5


def test_bad_inputs():
    z, y, grp, q = make(10, 4, 3)
    with pytest.raises(ValueError, match=r"group must hold ids in \[0, 3\)"):
        group_loss(z, y, grp + 3, q)
    with pytest.raises(ValueError, match=r"target must hold ids in \[0, 4\)"):
        group_loss(z, y + 4, grp, q)
    with pytest.raises(ValueError, match=r"target must have shape \(10,\)"):
        group_loss(z, y[:5], grp, q)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        group_loss(z, y, grp, q, eta=-1.0)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        group_loss(z, y, grp, q, eta=float("inf"))  # inf * 0 (an empty group) is NaN
    with pytest.raises(ValueError, match="adjustment contains"):
        group_loss(z, y, grp, q, adjustment=torch.tensor([0.0, float("inf"), 0.0]))
    with pytest.raises(TypeError, match="group must have dtype"):
        group_loss(z, y, grp.float(), q)
    with pytest.raises(ValueError, match="per-sample losses"):
        group_loss(z, None, grp, q)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        group_loss(z, y, grp, q, label_smoothing=1.5)


# ---- the C++ float path: 8-wide loops with a polynomial exp -----------------------------------

def _float_path_case(K, dtype, seed=5, extreme=False, smoothing=False):
    g = torch.Generator().manual_seed(seed)
    n, G = 37, 4
    z = torch.randn(n, K, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, K, (n,), generator=g)
    if extreme:  # far below the row max (exp underflows to 0) and a masked -inf logit
        z[:, ::3] -= 120.0
        if K > 1 and not smoothing:  # smoothing puts target mass on it: the loss is then +inf
            z[0, K - 1] = float("-inf")
            y[0] = 0
    grp = torch.randint(0, G, (n,), generator=g)
    return z.to(dtype), y, grp, G


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_float_kernels(K, dtype, ls, extreme):
    """C++ kernels vs TorchKernels in float64: within 2x of the error TorchKernels itself makes in
    float32 (rows widened from half are exact in float32), and no element far off."""
    z, y, grp, G = _float_path_case(K, dtype, extreme=extreme, smoothing=ls > 0)
    zd, zf = z.double(), z.float()
    losses, lse, sums, counts = torch.ops.fastdg.group_loss_stats(z, y, grp, G, ls)
    r64 = TorchKernels.stats(zd, y, grp, G, ls)
    r32 = TorchKernels.stats(zf, y, grp, G, ls)
    for got, ref, low in zip((losses, lse, sums), r64[:3], r32[:3]):
        assert torch.isfinite(got).all()
        assert _rel(got, ref) <= 2 * _rel(low, ref) + 1e-7
    torch.testing.assert_close(counts.double(), r64[3])
    scale = torch.rand(G, generator=torch.Generator().manual_seed(1)) + 0.5
    grad = torch.ops.fastdg.group_loss_bwd(z, y, grp, lse, scale, ls)
    ref = TorchKernels.bwd(zd, y, grp, r64[1], scale.double(), ls)
    low = TorchKernels.bwd(zf, y, grp, r32[1], scale, ls).to(dtype)
    assert grad.dtype == z.dtype and torch.isfinite(grad).all()
    assert _rel(grad, ref) <= 2 * _rel(low, ref) + 1e-7
    err = (grad.double() - ref).abs()
    bound = 2 * (low.double() - ref).abs().max() + 1e-6
    assert (err <= bound).all(), (err.max().item(), bound.item())
    # The fused eager path: the forward's saved softmax and the backward that reads it.
    q = torch.full((G,), 1.0 / G)
    robust, q_new, mean, _, probs = torch.ops.fastdg.group_loss_fused_fwd(z, y, grp, q, 0.0, ls, None, True)
    p64, p32 = torch.softmax(zd, 1), torch.softmax(zf, 1)
    assert _rel(probs, p64) <= 2 * _rel(p32, p64) + 1e-7
    assert _rel(robust, (r64[2] / r64[3].clamp_min(1) / G).sum()) <= 1e-6
    counts = torch.bincount(grp, minlength=G).float()
    grad = torch.ops.fastdg.group_loss_probs_bwd(probs, y, grp, torch.tensor(1.5), q_new, counts, ls, z.dtype)
    scale = 1.5 * q / counts.clamp_min(1)
    ref = TorchKernels.bwd(zd, y, grp, r64[1], scale.double(), ls)
    low = TorchKernels.bwd(zf, y, grp, r32[1], scale, ls).to(dtype)
    assert grad.dtype == z.dtype and torch.isfinite(grad).all()
    assert _rel(grad, ref) <= 2 * _rel(low, ref) + 1e-7


@pytest.mark.skipif(not HAS_CPP, reason="fastdg._C has no CPU group-loss kernels")
@pytest.mark.parametrize("K, ls", [(K, ls) for K in (1, 7, 8, 9, 65, 1000) for ls in (0.0, 0.1)
                                   if K > 1 or ls == 0.0])  # smoothing needs two classes
@pytest.mark.parametrize("extreme", [False, True])
def test_cpp_float_path_matches_float64(K, ls, extreme):
    _check_float_kernels(K, torch.float32, ls, extreme)


@pytest.mark.skipif(not HAS_CPP, reason="fastdg._C has no CPU group-loss kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_float_path_half_rows(dtype):
    _check_float_kernels(65, dtype, 0.1, False)


@pytest.mark.skipif(not HAS_CPP, reason="fastdg._C has no CPU group-loss kernels")
def test_cpp_float_path_baseline_isa_loops():
    """The non-AVX2 build of the row loops (what a CPU without AVX2 runs), in a fresh process."""
    import os
    import subprocess
    import sys

    code = ("import torch, fastdg._ext as e; e.load()\n"
            "from tests.test_group_loss import _check_float_kernels\n"
            "for K in (7, 9, 65, 1000):\n"
            "    for extreme in (False, True):\n"
            "        _check_float_kernels(K, torch.float32, 0.1, extreme)\n"
            "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FASTDG_CPU_BASELINE="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
