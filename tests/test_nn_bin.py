"""fastdg.nn BIN layers: a drop-in for BatchNorm2d, conversion, rho helpers, meta-learning,
torch.compile and autocast."""
import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fastdg import _ext
from fastdg.nn import (BatchInstanceNorm2d, bin_param_groups, clamp_rho_, convert_bin, hold_running_stats,
                       rho_parameters)

torchvision = pytest.importorskip("torchvision")


def bns(model):
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, BatchInstanceNorm2d))]


def perturb_bn(model, seed=0):
    """Non-trivial BN parameters and running statistics, so equality checks can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bns(model):
            C = m.num_features
            m.weight.copy_(torch.rand(C, generator=g) + 0.5)
            m.bias.copy_(torch.randn(C, generator=g))
            m.running_mean.copy_(torch.randn(C, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("training", [True, False])
def test_convert_resnet_at_rho_one_equals_batchnorm(training):
    torch.manual_seed(0)
    ref = perturb_bn(torchvision.models.resnet18(num_classes=7))
    conv = convert_bin(copy.deepcopy(ref))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in conv.modules())
    assert len([m for m in conv.modules() if isinstance(m, BatchInstanceNorm2d)]) == 20
    ref.train(training)
    conv.train(training)
    x = torch.randn(3, 3, 40, 40)
    y_ref, y = ref(x), conv(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), ((n, p) for n, p in conv.named_parameters()
                                                              if not n.endswith(".rho"))):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-4, msg=name)
    for a, b in zip(bns(ref), bns(conv)):
        torch.testing.assert_close(b.running_mean, a.running_mean)
        torch.testing.assert_close(b.running_var, a.running_var)
        assert int(b.num_batches_tracked) == int(a.num_batches_tracked)


def test_convert_keeps_state_device_flags_and_adds_rho():
    ref = perturb_bn(torchvision.models.resnet18())
    ref.bn1.weight.requires_grad_(False)
    ref.eval()
    conv = convert_bin(copy.deepcopy(ref), rho_init=0.25)
    sd_ref, sd = ref.state_dict(), conv.state_dict()
    assert set(sd) - set(sd_ref) == {k for k in sd if k.endswith(".rho")}
    assert set(sd_ref) <= set(sd)
    for k, v in sd_ref.items():
        assert torch.equal(sd[k], v), k
    assert not conv.bn1.weight.requires_grad and conv.bn1.bias.requires_grad
    assert not conv.bn1.training
    assert all(torch.all(m.rho == 0.25) for m in bns(conv))
    layer = convert_bin(nn.BatchNorm2d(5))  # a bare BatchNorm2d is converted too
    assert isinstance(layer, BatchInstanceNorm2d)


@pytest.mark.skipif("bias" not in inspect.signature(nn.BatchNorm2d).parameters,
                    reason="this torch's BatchNorm2d has no bias=False option")
def test_convert_batchnorm_without_bias():
    bn = nn.BatchNorm2d(4, bias=False)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 5, 5)
    layer = convert_bin(copy.deepcopy(bn))
    assert torch.all(layer.bias == 0) and not layer.bias.requires_grad and layer.weight.requires_grad
    torch.testing.assert_close(layer(x), bn(x))


def test_convert_warns_and_skips_batchnorm_subclasses():
    class BNAct(nn.BatchNorm2d):  # like timm's BatchNormAct2d: a forward with extra behaviour
        def forward(self, x):
            return F.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BNAct(4), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match="BNAct"):
        convert_bin(model)
    assert type(model[1]) is BNAct and isinstance(model[2], BatchInstanceNorm2d)


@pytest.mark.parametrize("momentum, track", [(None, True), (0.3, False)])
def test_momentum_none_and_untracked_match_batchnorm(momentum, track):
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(6, momentum=momentum, track_running_stats=track)
    b = convert_bin(copy.deepcopy(bn))
    for step in range(3):
        x = torch.randn(4, 6, 5, 7) * (step + 1) + step
        torch.testing.assert_close(b(x), bn(x), rtol=1e-4, atol=1e-5)
    if track:
        torch.testing.assert_close(b.running_mean, bn.running_mean)
        torch.testing.assert_close(b.running_var, bn.running_var)
    bn.eval()
    b.eval()
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(b(x), bn(x), rtol=1e-4, atol=1e-5)


def test_positional_arguments_are_batchnorm2d_s_and_bin_ones_keyword_only():
    """A drop-in: BatchNorm2d(*args) -> BatchInstanceNorm2d(*args) means the same (the 5th
    positional is track_running_stats); separate_affine, rho_init and backend are keyword-only,
    so a positional call cannot set one of them by mistake."""
    def positional(cls):
        return [n for n, q in inspect.signature(cls.__init__).parameters.items()
                if q.kind == q.POSITIONAL_OR_KEYWORD][1:]

    assert positional(BatchInstanceNorm2d) == positional(nn.BatchNorm2d)
    kw_only = {n for n, q in inspect.signature(BatchInstanceNorm2d.__init__).parameters.items()
               if q.kind == q.KEYWORD_ONLY}
    assert {"separate_affine", "rho_init", "backend"} <= kw_only
    args = (6, 1e-3, 0.3, False, False)  # eps, momentum, affine=False, track_running_stats=False
    bn, b = nn.BatchNorm2d(*args), BatchInstanceNorm2d(*args)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(b, attr) == getattr(bn, attr), attr
    assert b.weight is None and b.running_mean is None and not b.separate_affine and torch.all(b.rho == 1)
    torch.manual_seed(6)
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    torch.testing.assert_close(b(x), bn(x), rtol=1e-4, atol=1e-5)
    b = BatchInstanceNorm2d(6, 1e-3, 0.3, True, True, "cpu", torch.float64)  # BatchNorm2d's device, dtype
    assert b.weight.dtype == b.running_var.dtype == torch.float64 and b.track_running_stats
    with pytest.raises(TypeError):
        BatchInstanceNorm2d(6, 1e-5, 0.1, True, True, None, None, True)  # separate_affine positionally


def test_momentum_none_compiles_fullgraph_and_matches_batchnorm():
    """The cumulative-average factor 1 / num_batches_tracked stays a tensor (no host read), so
    a fullgraph compile works; running statistics and counter match BatchNorm2d's after 3 steps."""
    torch.manual_seed(7)
    bn = nn.BatchNorm2d(5, momentum=None)
    b = BatchInstanceNorm2d(5, momentum=None)
    compiled = torch.compile(b, fullgraph=True)
    for step in range(3):
        x = torch.randn(4, 5, 6, 5) * (step + 1) + step
        torch.testing.assert_close(compiled(x), bn(x), rtol=1e-4, atol=1e-5)
    assert int(b.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    torch.testing.assert_close(b.running_mean, bn.running_mean)
    torch.testing.assert_close(b.running_var, bn.running_var)


@pytest.mark.gpu
@pytest.mark.parametrize("momentum", [None, 0.1])
def test_cuda_layer_step_has_no_host_sync(momentum):
    """Training step of the layer on a GPU (momentum=None included, default checks): no host sync."""
    m = BatchInstanceNorm2d(16, momentum=momentum, separate_affine=True, rho_init=0.5).cuda()
    x = torch.randn(8, 16, 14, 14, device="cuda") * 2 + 1
    m(x).square().mean().backward()  # warm-up: loads the extension / compiles kernels
    bn = nn.BatchNorm2d(16, momentum=momentum).cuda()
    bn(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m(x).square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bn(x)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    assert int(m.num_batches_tracked) == 2


def test_rho_zero_is_instance_norm_and_separate_affine_mixes_branches():
    torch.manual_seed(2)
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    m = BatchInstanceNorm2d(4, rho_init=0.0, dtype=torch.float64)
    torch.testing.assert_close(m(x), F.instance_norm(x, eps=1e-5))
    s = BatchInstanceNorm2d(4, separate_affine=True, rho_init=0.5, dtype=torch.float64).train()
    with torch.no_grad():
        s.weight.uniform_(0.5, 1.5)
        s.bias.uniform_(-1, 1)
        s.in_weight.uniform_(0.5, 1.5)
        s.in_bias.uniform_(-1, 1)
    y = s(x)
    xb = F.batch_norm(x, None, None, training=True, eps=1e-5)
    xi = F.instance_norm(x, eps=1e-5)
    c = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    torch.testing.assert_close(y, 0.5 * (c(s.weight) * xb + c(s.bias)) + 0.5 * (c(s.in_weight) * xi + c(s.in_bias)))


def test_hold_running_stats_uses_batch_stats_without_updating():
    m = BatchInstanceNorm2d(3, rho_init=0.7).train()
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    y_train = m(x)
    rm, rv, n = m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)
    with hold_running_stats(m):
        y_hold = m(x)
    assert torch.equal(m.running_mean, rm) and torch.equal(m.running_var, rv) and int(m.num_batches_tracked) == n
    torch.testing.assert_close(y_hold, y_train)
    assert m.hold is False


def test_channels_last_kept_and_bad_input():
    m = BatchInstanceNorm2d(8)
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    assert m(x).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="channels|shape"):
        m(torch.randn(2, 7, 5, 5))
    with pytest.raises(ValueError, match="rho_init"):
        BatchInstanceNorm2d(4, rho_init=1.5)
    with pytest.raises(ValueError, match="affine"):
        BatchInstanceNorm2d(4, affine=False, separate_affine=True)
    with pytest.raises(ValueError, match="num_features"):
        BatchInstanceNorm2d(0)


def test_clamp_and_param_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchInstanceNorm2d(4), nn.Conv2d(4, 4, 1), BatchInstanceNorm2d(4))
    with torch.no_grad():
        model[1].rho.copy_(torch.tensor([-0.5, 0.2, 1.3, 0.9]))
    clamp_rho_(model)
    assert torch.equal(model[1].rho, torch.tensor([0.0, 0.2, 1.0, 0.9]))
    groups = bin_param_groups(model, lr=0.01, weight_decay=5e-4)
    rho_ids = {id(model[1].rho), id(model[3].rho)}
    assert {id(p) for p in groups[1]["params"]} == rho_ids
    assert groups[1]["lr"] == pytest.approx(0.1) and groups[1]["weight_decay"] == 0.0
    assert groups[0]["lr"] == 0.01 and groups[0]["weight_decay"] == 5e-4
    assert len(groups[0]["params"]) == len(list(model.parameters())) - 2
    assert [n for n, _ in rho_parameters(model)] == ["1.rho", "3.rho"]
    torch.optim.SGD(groups, lr=0.01)  # valid optimizer groups


def _meta_rho_grad(backend):
    """MetaBIN's second-order meta-gradient: d L_test(rho - a * dL_train/drho) / d rho."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), BatchInstanceNorm2d(4, separate_affine=True, rho_init=0.6,
                                                                   backend=backend)).double()
    x_tr, x_te = torch.randn(3, 2, 7, 6, dtype=torch.float64), torch.randn(3, 2, 7, 6, dtype=torch.float64)
    rho = model[1].rho
    with hold_running_stats(model):
        l_tr = model(x_tr).sin().mean()
        (g,) = torch.autograd.grad(l_tr, rho, create_graph=True)
        rho_new = rho - 0.5 * g
        l_te = functional_call(model, {"1.rho": rho_new}, (x_te,)).cos().mean()
        return torch.autograd.grad(l_te, rho)[0]


def test_meta_gradient_through_functional_call_matches_reference():
    ref = _meta_rho_grad("reference")
    assert ref.abs().sum() > 0
    if _ext.load() is not None:
        torch.testing.assert_close(_meta_rho_grad("cpp"), ref)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), BatchInstanceNorm2d(6, separate_affine=True, rho_init=0.4), nn.ReLU())
    eager, comp = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(4, 3, 9, 8)

    def loss(m, x):
        return m(x).square().mean()

    compiled = torch.compile(loss, fullgraph=True)
    l_e, l_c = loss(eager, x), compiled(comp, x)
    l_e.backward()
    l_c.backward()
    torch.testing.assert_close(l_c, l_e)
    for (n, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)
    torch.testing.assert_close(comp[1].running_mean, eager[1].running_mean)
    torch.testing.assert_close(comp[1].running_var, eager[1].running_var)


def test_autocast_bf16_runs_and_tracks_float32():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchInstanceNorm2d(8, rho_init=0.5))
    x = torch.randn(2, 3, 12, 12)
    y32 = copy.deepcopy(model)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - y32).norm() / y32.norm()) < 2e-2
    y.float().sum().backward()
    assert model[1].rho.grad is not None and model[1].rho.grad.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()(x)
