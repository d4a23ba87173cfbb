"""Domain-generalization data sets: the registry, the tensor sets and held-out splits.

A data set is a list of environments (domains). Tensor sets (RotatedMNIST, ColoredMNIST and
their small scikit-learn "digits" twins) hold every image in memory as float32 (n, C, H, W)
in [0, 1]; image sets (PACS, VLCS, ...; see `fastdg.data.images`) hold file paths and are
decoded by a loader. Both expose the same interface:

    ds.name, ds.environments (list[str]), ds.num_classes, ds.input_shape (C, H, W),
    ds.is_image, len(ds) == number of environments, ds[i] -> environment

The constructions follow DomainBed (METHODS.md section 9): all images are shuffled by the
data-set seed, then split into environments by stride (environment i takes samples
i, i + E, i + 2E, ...), then each environment is transformed.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

DATASETS: dict[str, type] = {}


def register(cls):
    """Class decorator: add a data set class to DATASETS under its `NAME`."""
    DATASETS[cls.NAME] = cls
    return cls


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A data set's folder or files are missing. Both a FileNotFoundError and a ValueError,
    so callers can catch either."""


def default_data_dir() -> str | None:
    """$FASTDG_DATA if set, else `<repo root>/../shared/data` if that folder exists, else None."""
    env = os.environ.get("FASTDG_DATA")
    if env:
        return env
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cand = os.path.normpath(os.path.join(here, "..", "shared", "data"))
    return cand if os.path.isdir(cand) else None


def get_dataset(name: str, data_dir: str | None = None, seed: int = 0, **kwargs):
    """Build the data set registered as `name` (see DATASETS).

    data_dir: the folder holding the data sets (e.g. <data_dir>/PACS, <data_dir>/MNIST/raw);
    default `default_data_dir()`. seed: the data-set seed (DomainBed's hparams seed) that
    shuffles the tensor sets. Extra keyword arguments go to the class (e.g. download=True for
    the MNIST sets). Raises ValueError for an unknown name (listing the known ones) and
    DatasetNotFoundError (a ValueError) when the data is missing.
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(sorted(DATASETS))}")
    cls = DATASETS[name]
    if data_dir is None and getattr(cls, "NEEDS_DATA_DIR", True):
        data_dir = default_data_dir()
        if data_dir is None:
            raise DatasetNotFoundError(
                f"data set {name!r} needs a data directory: pass data_dir= or set FASTDG_DATA")
    return cls(data_dir, seed=seed, **kwargs)


def _seed_int(seed) -> int:
    """An int seed from an int or a tuple such as (trial_seed, env_index); tuples are hashed
    (md5 of their repr, as DomainBed's seed_hash) so neighbouring tuples give unrelated streams."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return int(seed)
    if isinstance(seed, tuple) and all(isinstance(s, (int, np.integer)) for s in seed):
        return int(hashlib.md5(str(tuple(int(s) for s in seed)).encode()).hexdigest(), 16) % (2 ** 31)
    raise TypeError(f"seed must be an int or a tuple of ints such as (trial_seed, env_index), got {seed!r}")


def split_holdout(n: int, holdout_fraction: float = 0.2, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions 0..n-1 into (train_idx, hold_idx), both sorted int64 CPU tensors.

    int(n * holdout_fraction) positions, drawn uniformly without replacement by a generator
    seeded from `seed` (an int, or a tuple such as (trial_seed, env_index) so that every
    environment of every trial gets its own split), go to hold_idx; the rest to train_idx.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int (the environment size), got {n!r}")
    if not isinstance(holdout_fraction, (float, int)) or not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be a float in [0, 1), got {holdout_fraction!r}")
    g = torch.Generator().manual_seed(_seed_int(seed))
    perm = torch.randperm(int(n), generator=g)
    n_hold = int(n * holdout_fraction)
    return perm[n_hold:].sort().values, perm[:n_hold].sort().values


# ----------------------------------------------------------------------------- environments

@dataclass
class TensorEnvironment:
    """One environment of a tensor data set: x float32 (n, C, H, W) in [0, 1], y int64 (n,)."""
    name: str
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class ImageEnvironment:
    """One environment of an image data set: paths list[str] (n,), y int64 (n,)."""
    name: str
    paths: list
    y: torch.Tensor
    skipped: list = field(default_factory=list)  # (path, reason) of files left out at scan time
    gif: list = field(default_factory=list)      # paths (kept) whose bytes are GIF: DALI cannot decode them

    def __len__(self) -> int:
        return len(self.paths)


class DomainDataset:
    """Base class: a list of environments plus the metadata every loader needs."""
    NAME = "base"
    ENVIRONMENTS: list = []
    NUM_CLASSES = 0
    INPUT_SHAPE: tuple = ()
    is_image = False

    def __init__(self):
        self.name = self.NAME
        self.environments: list[str] = list(self.ENVIRONMENTS)
        self.num_classes = self.NUM_CLASSES
        self.input_shape = tuple(self.INPUT_SHAPE)
        self.datasets: list = []

    def __len__(self) -> int:
        return len(self.datasets)

    def __getitem__(self, i: int):
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -len(self) <= i < len(self):
            raise IndexError(f"environment index must be an int in [0, {len(self)}), got {i!r}")
        return self.datasets[i]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{e}={len(d)}" for e, d in zip(self.environments, self.datasets))
        return f"{type(self).__name__}({sizes}; {self.num_classes} classes, input {self.input_shape})"


# ----------------------------------------------------------------------------- transforms

def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate float images (n, C, H, W) counter-clockwise by `degrees` about the image centre,
    bilinear, zero fill: the convention of torchvision's `rotate(img, angle, fill=0)`.

    Output pixel p samples the input at R(-angle) p (centre at ((W-1)/2, (H-1)/2)), so
    a feature at the top moves to the left for positive angles.
    """
    if degrees == 0:
        return images.clone()
    n, _, h, w = images.shape
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    # affine_grid works in normalised coordinates ([-1, 1] per axis); for non-square images the
    # rotation must be done in pixel units, hence the aspect factors. y points down in images,
    # so a counter-clockwise turn on screen is a clockwise one in (x, y) maths coordinates.
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=images.dtype)
    grid = F.affine_grid(theta.expand(n, 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _bernoulli(p: float, n: int, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=g) < p).long()


def color_environment(images: torch.Tensor, digits: torch.Tensor, e: float, g: torch.Generator):
    """DomainBed's ColoredMNIST transform of one environment.

    images float (n, 1, H, W) in [0, 1]; digits int64 (n,). label = (digit < 5) xor
    Bernoulli(0.25); colour = label xor Bernoulli(e); the image is stacked into 2 channels and
    the channel (1 - colour) zeroed. Returns x float32 (n, 2, H, W), y int64 (n,), colour (n,).
    DomainBed also subsamples the images 2x (14 x 14); METHODS.md keeps the full size.
    """
    n = digits.shape[0]
    y = (digits < 5).long() ^ _bernoulli(0.25, n, g)
    colour = y ^ _bernoulli(e, n, g)
    x = images.expand(n, 2, *images.shape[2:]).clone()
    x[torch.arange(n), 1 - colour] = 0
    return x.float(), y, colour


class _ShuffledStrideDataset(DomainDataset):
    """Shuffle all (image, digit) pairs by the seed, split into environments by stride and
    transform each environment (`_make_env`)."""
    NEEDS_DATA_DIR = True

    def __init__(self, images: torch.Tensor, digits: torch.Tensor, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(_seed_int(seed))
        perm = torch.randperm(images.shape[0], generator=g)
        images, digits = images[perm], digits[perm]
        n_env = len(self.ENVIRONMENTS)
        for i, name in enumerate(self.ENVIRONMENTS):
            self.datasets.append(self._make_env(i, name, images[i::n_env], digits[i::n_env], g))

    def _make_env(self, i, name, images, digits, g):
        raise NotImplementedError


class _Rotated(_ShuffledStrideDataset):
    ANGLES = (0, 15, 30, 45, 60, 75)
    ENVIRONMENTS = [str(a) for a in ANGLES]
    NUM_CLASSES = 10

    def _make_env(self, i, name, images, digits, g):
        return TensorEnvironment(name, rotate(images, self.ANGLES[i]).contiguous(), digits.long())


class _Colored(_ShuffledStrideDataset):
    E = (0.1, 0.2, 0.9)
    ENVIRONMENTS = ["+90%", "+80%", "-90%"]  # DomainBed's names: P(colour == label) per env
    NUM_CLASSES = 2

    def _make_env(self, i, name, images, digits, g):
        x, y, colour = color_environment(images, digits, self.E[i], g)
        env = TensorEnvironment(name, x, y)
        env.colour = colour  # kept for checks: P(colour == y) ~ 1 - e
        env.digits = digits  # the original digit, so the 25% label noise can be checked
        return env


# ----------------------------------------------------------------------------- sources

def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # values 0..16
    return x, torch.from_numpy(d.target.astype(np.int64))


_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally .gz): big-endian magic (0, 0, dtype 0x08, ndim), dims, data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    count = int(np.prod(dims))
    if len(raw) != 4 + 4 * ndim + count:
        raise ValueError(f"{path} is truncated or corrupt: expected {count} values for shape {tuple(dims)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims))


def _find_mnist_raw(data_dir: str) -> str | None:
    for cand in (os.path.join(data_dir, "MNIST", "raw"), os.path.join(data_dir, "raw"), data_dir):
        if all(os.path.exists(os.path.join(cand, f)) or os.path.exists(os.path.join(cand, f + ".gz"))
               for pair in _MNIST_FILES.values() for f in pair):
            return cand
    return None


def load_mnist(data_dir: str, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All 70000 MNIST images as float32 (70000, 1, 28, 28) in [0, 1] and digits int64, train
    then test, from the raw IDX files in <data_dir>/MNIST/raw (torchvision's layout).

    download=True fetches them with torchvision (if installed) when they are missing.
    """
    if data_dir is None or not os.path.isdir(data_dir):
        raise DatasetNotFoundError(f"MNIST data directory {data_dir!r} does not exist")
    raw = _find_mnist_raw(data_dir)
    if raw is None and download:
        try:
            import torchvision
        except ImportError as e:
            raise DatasetNotFoundError("download=True needs torchvision (pip install torchvision)") from e
        for train in (True, False):
            torchvision.datasets.MNIST(root=data_dir, train=train, download=True)
        raw = _find_mnist_raw(data_dir)
    if raw is None:
        raise DatasetNotFoundError(
            f"MNIST raw IDX files not found under {os.path.join(data_dir, 'MNIST', 'raw')} (expected "
            + ", ".join(f for pair in _MNIST_FILES.values() for f in pair)
            + "); pass download=True to fetch them with torchvision")
    xs, ys = [], []
    for img_file, lab_file in _MNIST_FILES.values():
        paths = [os.path.join(raw, f) if os.path.exists(os.path.join(raw, f)) else os.path.join(raw, f + ".gz")
                 for f in (img_file, lab_file)]
        x, y = _read_idx(paths[0]), _read_idx(paths[1])
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"MNIST files {paths} disagree: images {x.shape}, labels {y.shape}")
        xs.append(torch.from_numpy(x.copy()))
        ys.append(torch.from_numpy(y.astype(np.int64)))
    return torch.cat(xs).unsqueeze(1).float().div_(255.0), torch.cat(ys)


@register
class RotatedMNIST(_Rotated):
    """70000 MNIST digits in 6 environments rotated by 0..75 degrees; 10 classes; 1x28x28."""
    NAME = "RotatedMNIST"
    INPUT_SHAPE = (1, 28, 28)

    def __init__(self, data_dir, seed: int = 0, download: bool = False):
        super().__init__(*load_mnist(data_dir, download), seed)


@register
class ColoredMNIST(_Colored):
    """70000 MNIST digits in 3 environments whose colour agrees with the (25%-noisy) label
    with probability 0.9, 0.8, 0.1; 2 classes; 2x28x28."""
    NAME = "ColoredMNIST"
    INPUT_SHAPE = (2, 28, 28)

    def __init__(self, data_dir, seed: int = 0, download: bool = False):
        super().__init__(*load_mnist(data_dir, download), seed)


@register
class RotatedDigits(_Rotated):
    """RotatedMNIST built from scikit-learn's bundled 1797 8x8 digits (no files needed)."""
    NAME = "RotatedDigits"
    INPUT_SHAPE = (1, 8, 8)
    NEEDS_DATA_DIR = False

    def __init__(self, data_dir=None, seed: int = 0):
        super().__init__(*_load_digits(), seed)


@register
class ColoredDigits(_Colored):
    """ColoredMNIST built from scikit-learn's bundled 1797 8x8 digits (no files needed)."""
    NAME = "ColoredDigits"
    INPUT_SHAPE = (2, 8, 8)
    NEEDS_DATA_DIR = False

    def __init__(self, data_dir=None, seed: int = 0):
        super().__init__(*_load_digits(), seed)
