"""Featurizers: DomainBed's MNIST CNN layout, ResNet-18/50 with BIN (convert_bin), and
pretrained weights read from a local file only."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdg.networks import MNISTCNN, ResNet, featurizer
from fastdg.nn import BatchInstanceNorm2d

torchvision = pytest.importorskip("torchvision")


def test_mnist_cnn_is_domainbeds_layout():
    """domainbed/networks.py MNIST_CNN: conv1 (C->64, 3x3, stride 1, pad 1), conv2 (64->128,
    stride 2), conv3 and conv4 (128->128, stride 1), each conv -> ReLU -> GroupNorm(8), then
    global average pooling to 128 features."""
    net = featurizer((2, 28, 28), {"norm": "group"})
    assert isinstance(net, MNISTCNN) and net.n_outputs == 128
    layers = list(net.body)
    assert [type(m) for m in layers] == [nn.Conv2d, nn.ReLU, nn.GroupNorm] * 4
    convs, norms = layers[0::3], layers[2::3]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (2, 64, (3, 3), (1, 1), (1, 1)), (64, 128, (3, 3), (2, 2), (1, 1)),
        (128, 128, (3, 3), (1, 1), (1, 1)), (128, 128, (3, 3), (1, 1), (1, 1))]
    assert all(c.bias is not None for c in convs)
    assert [(g.num_groups, g.num_channels, g.affine) for g in norms] == [(8, 64, True)] + [(8, 128, True)] * 3
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == (2 * 9 * 64 + 64) + (64 * 9 * 128 + 128) + 2 * (128 * 9 * 128 + 128) + 2 * 64 + 3 * 2 * 128
    # DomainBed's forward, written out with the same weights
    x = torch.randn(3, 2, 28, 28)
    h = x
    for c, g in zip(convs, norms):
        h = F.group_norm(F.relu(F.conv2d(h, c.weight, c.bias, c.stride, c.padding)), 8, g.weight, g.bias, g.eps)
    torch.testing.assert_close(net(x), h.mean((2, 3)))
    assert net.feature_maps(x).shape == (3, 128, 14, 14)
    assert featurizer((1, 8, 8), {})(torch.randn(2, 1, 8, 8)).shape == (2, 128)  # digits: the same CNN


def test_mnist_cnn_norm_options():
    assert sum(isinstance(m, nn.BatchNorm2d) for m in MNISTCNN((1, 8, 8), norm="batch").modules()) == 4
    bins = [m for m in MNISTCNN((1, 8, 8), norm="bin", bin_separate_affine=True, bin_rho_init=0.5).modules()
            if isinstance(m, BatchInstanceNorm2d)]
    assert len(bins) == 4 and all(m.separate_affine and torch.all(m.rho == 0.5) for m in bins)
    with pytest.raises(ValueError, match="norm must be 'group', 'batch' or 'bin'"):
        MNISTCNN((1, 8, 8), norm="layer")


@pytest.mark.parametrize("depth, n_bn, n_out", [(18, 20, 512), (50, 53, 2048)])
def test_resnet_with_bin_converts_every_batchnorm(depth, n_bn, n_out):
    torch.manual_seed(0)
    net = featurizer((3, 64, 64), {"resnet_depth": depth, "norm": "bin", "bin_rho_init": 1.0})
    assert isinstance(net, ResNet) and net.n_outputs == n_out
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
    assert sum(isinstance(m, BatchInstanceNorm2d) for m in net.modules()) == n_bn
    net.train()
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, n_out)


def _saved_resnet18(path, with_fc=True):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # BatchNorm statistics that differ from a fresh model's
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = ref.state_dict()
    if not with_fc:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.save(state, path)
    return ref.eval()


@pytest.mark.parametrize("with_fc", [True, False])
def test_pretrained_path_loads_a_local_state_dict(tmp_path, with_fc):
    path = tmp_path / "r18.pt"
    ref = _saved_resnet18(path, with_fc)
    net = featurizer((3, 64, 64), {"resnet_depth": 18, "pretrained_path": str(path)})
    mine = net.net.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(mine[k], v), k
    x = torch.randn(2, 3, 64, 64)
    ref.fc = nn.Identity()
    net.eval()
    torch.testing.assert_close(net(x), ref(x))
    # BIN starting at rho = 1 from the same weights computes what the BatchNorm model did
    bin_net = featurizer((3, 64, 64), {"resnet_depth": 18, "pretrained_path": str(path), "norm": "bin"}).eval()
    torch.testing.assert_close(bin_net(x), ref(x), rtol=1e-4, atol=1e-5)


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file .*never downloads"):
        featurizer((3, 64, 64), {"resnet_depth": 18, "pretrained_path": str(tmp_path / "missing.pt")})
    _saved_resnet18(tmp_path / "r18.pt")
    with pytest.raises(ValueError, match="do not fit torchvision's resnet50"):
        featurizer((3, 64, 64), {"resnet_depth": 50, "pretrained_path": str(tmp_path / "r18.pt")})
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="expected a state_dict"):
        featurizer((3, 64, 64), {"resnet_depth": 18, "pretrained_path": str(tmp_path / "tensor.pt")})
