"""Networks: DomainBed's MNIST CNN (with a BIN option) and torchvision ResNets.

Pretrained weights are read only from a local path: nothing is downloaded at run time.
"""
from __future__ import annotations

import os

import torch
from torch import nn


def _norm(kind: str, channels: int, bin_separate_affine: bool = False, bin_rho_init: float = 1.0) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(8, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "bin":
        from .nn import BatchInstanceNorm2d  # the fused BIN layer

        return BatchInstanceNorm2d(channels, separate_affine=bin_separate_affine, rho_init=bin_rho_init)
    raise ValueError(f"norm must be 'group', 'batch' or 'bin', got {kind!r}")


class MNISTCNN(nn.Module):
    """DomainBed's MNIST_CNN: four 3x3 convs (64, 128, 128, 128; the second strided), each
    followed by ReLU and a normalisation (GroupNorm(8) as DomainBed; BatchNorm or BIN on
    request; BIN with separate BN/IN affine parameters (MetaBIN "ver2") when
    bin_separate_affine, rho initialised to bin_rho_init), then global average pooling to a
    128-d feature."""

    n_outputs = 128

    def __init__(self, input_shape, norm: str = "group", bin_separate_affine: bool = False,
                 bin_rho_init: float = 1.0):
        super().__init__()
        c = input_shape[0]
        widths = [(c, 64, 1), (64, 128, 2), (128, 128, 1), (128, 128, 1)]
        layers = []
        for cin, cout, stride in widths:
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(inplace=True), _norm(norm, cout, bin_separate_affine, bin_rho_init)]
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def feature_maps(self, x):
        return self.body(x)

    def forward(self, x):
        return self.pool(self.body(x)).flatten(1)


class ResNet(nn.Module):
    """torchvision ResNet-18/50 as a featurizer (the final fc removed), optionally with every
    BatchNorm2d converted to BIN (separate BN/IN affine when bin_separate_affine, rho starting
    at bin_rho_init). `weights` is a local state_dict path or None."""

    def __init__(self, input_shape, depth: int = 50, weights: str | None = None, bin: bool = False,
                 freeze_bn: bool = False, bin_separate_affine: bool = False, bin_rho_init: float = 1.0):
        super().__init__()
        try:
            import torchvision
        except ImportError as exc:
            raise ImportError("ResNet featurizers need torchvision (pip install torchvision)") from exc
        if depth not in (18, 50):
            raise ValueError(f"resnet depth must be 18 or 50, got {depth}")
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        if weights:
            _load_weights(net, weights, depth)
        if input_shape[0] != 3:
            net.conv1 = nn.Conv2d(input_shape[0], 64, 7, 2, 3, bias=False)
        self.n_outputs = net.fc.in_features
        net.fc = nn.Identity()
        if bin:
            from .nn import convert_bin

            net = convert_bin(net, separate_affine=bin_separate_affine, rho_init=bin_rho_init)
        self.net = net
        self.freeze_bn = freeze_bn

    def feature_maps(self, x):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def forward(self, x):
        return self.net(x)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:  # DomainBed keeps BatchNorm statistics frozen for ResNets
            for m in self.net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self


def _load_weights(net, path, depth):
    """A torchvision resnet state_dict from a local file, with or without its fc layer (the
    featurizer drops fc anyway)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights: no such file {os.fspath(path)!r} (a local state_dict; "
                                "fastdg never downloads weights)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"pretrained weights {os.fspath(path)!r}: expected a state_dict, got {type(state).__name__}")
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"pretrained weights {os.fspath(path)!r} do not fit torchvision's resnet{depth}: "
                         f"{exc}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"pretrained weights {os.fspath(path)!r} do not fit torchvision's resnet{depth}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def featurizer(input_shape, hparams) -> nn.Module:
    """MNISTCNN for small inputs (<= 32 px), ResNet otherwise (DomainBed's rule).
    BIN options (used when norm == "bin"): bin_separate_affine (default False: the original
    shared-affine BIN; True: MetaBIN's separate BN/IN affine) and bin_rho_init (default 1.0)."""
    sep = bool(hparams.get("bin_separate_affine", False))
    rho0 = float(hparams.get("bin_rho_init", 1.0))
    if input_shape[1] <= 32:
        return MNISTCNN(input_shape, norm=hparams.get("norm", "group"), bin_separate_affine=sep, bin_rho_init=rho0)
    return ResNet(input_shape, depth=hparams.get("resnet_depth", 50), weights=hparams.get("pretrained_path"),
                  bin=hparams.get("norm") == "bin", freeze_bn=hparams.get("freeze_bn", True),
                  bin_separate_affine=sep, bin_rho_init=rho0)
