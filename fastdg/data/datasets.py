"""DomainBed-style data sets (METHODS.md section 9).

Tensor data sets live in memory as float32 (n, C, H, W) tensors and are sampled on the
device (fastdg.data.loaders): RotatedDigits and ColoredDigits are built from scikit-learn's
bundled 8x8 digits (no download: the embedded default), RotatedMNIST and ColoredMNIST from an
MNIST raw folder (<data_dir>/MNIST/raw, the four IDX files).

RotatedX: all images shuffled by the seed, split into 6 environments by stride, environment i
rotated counter-clockwise by (0, 15, 30, 45, 60, 75)[i] degrees (bilinear, fill 0).
ColoredX: 3 environments by stride; y = (digit < 5) xor Bernoulli(0.25); colour =
y xor Bernoulli(e), e = (0.1, 0.2, 0.9); two channels, the other colour's channel zeroed.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_data_dir() -> str | None:
    """$FASTDG_DATA, else ../shared/data beside the repository if it exists, else None."""
    env = os.environ.get("FASTDG_DATA")
    if env:
        return env
    path = os.path.join(os.path.dirname(_REPO), "shared", "data")
    return path if os.path.isdir(path) else None


class TensorDomain:
    """One environment: x float32 (n, C, H, W) in [0, 1], y int64 (n,)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)


class MultiDomainDataset:
    name = ""
    environments: list = []
    num_classes = 0
    input_shape = ()
    is_image = False

    def __init__(self):
        self.domains: list = []

    def __len__(self):
        return len(self.domains)

    def __getitem__(self, i):
        return self.domains[i]


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate (n, C, H, W) images counter-clockwise about their centre, bilinear, fill 0."""
    if degrees == 0:
        return x.clone()
    a = math.radians(degrees)
    # affine_grid maps output to input coordinates with y pointing down, so this matrix
    # (a clockwise rotation in y-up terms) turns the picture counter-clockwise, as
    # torchvision's rotate does (checked against torch.rot90 in the tests).
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


ROTATIONS = (0, 15, 30, 45, 60, 75)
COLOR_NOISE = (0.1, 0.2, 0.9)


class _Rotated(MultiDomainDataset):
    environments = [str(a) for a in ROTATIONS]
    num_classes = 10

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int):
        super().__init__()
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        images, labels = images[perm], labels[perm]
        n_env = len(ROTATIONS)
        self.domains = [TensorDomain(rotate(images[i::n_env], a), labels[i::n_env]) for i, a in enumerate(ROTATIONS)]
        self.input_shape = tuple(images.shape[1:])


class _Colored(MultiDomainDataset):
    environments = ["+90%", "+80%", "-90%"]  # DomainBed's names: colour-label agreement
    num_classes = 2

    def __init__(self, images: torch.Tensor, digits: torch.Tensor, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(digits), generator=gen)
        images, digits = images[perm], digits[perm]
        n_env = len(COLOR_NOISE)
        self.domains = [self._colour(images[i::n_env], digits[i::n_env], e, gen) for i, e in enumerate(COLOR_NOISE)]
        self.input_shape = (2,) + tuple(images.shape[2:])

    @staticmethod
    def _colour(images, digits, e, gen):
        def flip(p, n):
            return (torch.rand(n, generator=gen) < p).long()

        y = (digits < 5).long() ^ flip(0.25, len(digits))   # 25% label noise
        colour = y ^ flip(e, len(digits))                      # agrees with y w.p. 1 - e
        x = images.expand(-1, 2, -1, -1).clone()
        x[torch.arange(len(x)), 1 - colour] = 0                # zero the other colour's channel
        return TensorDomain(x, y)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


def read_mnist(data_dir: str | None):
    """All 70,000 MNIST images (float32 (n, 1, 28, 28) in [0, 1]) and labels from the raw IDX files."""
    root = data_dir or default_data_dir()
    if root is None:
        raise ValueError("MNIST needs a data directory: pass data_dir or set FASTDG_DATA "
                         "(a folder holding MNIST/raw/train-images-idx3-ubyte, ...)")
    raw = os.path.join(root, "MNIST", "raw")
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    missing = [n for n in names if not os.path.exists(os.path.join(raw, n))]
    if missing:
        raise ValueError(f"MNIST raw files missing in {raw}: {missing}")

    def idx(path, ndim):
        data = np.fromfile(path, dtype=np.uint8)
        magic = int.from_bytes(data[:4].tobytes(), "big")
        if magic != 0x800 + ndim:
            raise ValueError(f"{path} is not an IDX file with {ndim} dims (magic {magic:#x})")
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i].tobytes(), "big") for i in range(ndim)]
        body = data[4 + 4 * ndim:]
        if body.size != int(np.prod(dims)):
            raise ValueError(f"{path} is truncated: {body.size} bytes for shape {dims}")
        return torch.from_numpy(body.reshape(dims).copy())

    xs = [idx(os.path.join(raw, names[0]), 3), idx(os.path.join(raw, names[2]), 3)]
    ys = [idx(os.path.join(raw, names[1]), 1), idx(os.path.join(raw, names[3]), 1)]
    return torch.cat(xs).float()[:, None] / 255.0, torch.cat(ys).long()


class RotatedDigits(_Rotated):
    name = "RotatedDigits"

    def __init__(self, data_dir=None, seed=0):
        super().__init__(*_digits(), seed)


class ColoredDigits(_Colored):
    name = "ColoredDigits"

    def __init__(self, data_dir=None, seed=0):
        super().__init__(*_digits(), seed)


class RotatedMNIST(_Rotated):
    name = "RotatedMNIST"

    def __init__(self, data_dir=None, seed=0):
        super().__init__(*read_mnist(data_dir), seed)


class ColoredMNIST(_Colored):
    name = "ColoredMNIST"

    def __init__(self, data_dir=None, seed=0):
        super().__init__(*read_mnist(data_dir), seed)


DATASETS = {c.name: c for c in (RotatedDigits, ColoredDigits, RotatedMNIST, ColoredMNIST)}


def get_dataset(name: str, data_dir: str | None = None, seed: int = 0) -> MultiDomainDataset:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](data_dir=data_dir, seed=seed)
