"""The DALI-free path for image data sets: PIL decoding in torch DataLoader workers, with
torchvision's transforms when torchvision is installed and a plain PIL + numpy version of the
same DomainBed augmentation otherwise (METHODS.md section 9):

    train: RandomResizedCrop(224, scale (0.7, 1), ratio (3/4, 4/3)), horizontal flip p=0.5,
           ColorJitter(0.3, 0.3, 0.3, 0.3) in random order, RandomGrayscale(0.1)
    eval:  resize to 224 x 224
    both:  to float in [0, 1], ImageNet mean/std normalisation -> float32 (3, 224, 224)

The plain version follows torchvision's PIL code paths (ImageEnhance for brightness, contrast
and saturation; a uint8 shift of the HSV hue channel), so both give the same distribution.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from .dali import MEAN, STD

_RNGS: dict = {}


def _rng() -> np.random.Generator:
    """A numpy generator per process, seeded from torch's seed for this process: DataLoader
    gives each worker its own (base seed + worker id), so runs are reproducible."""
    info = torch.utils.data.get_worker_info()
    seed = info.seed if info is not None else torch.initial_seed()
    key = (os.getpid(), seed)
    if key not in _RNGS:
        _RNGS.clear()
        _RNGS[key] = np.random.default_rng(seed % (2 ** 63))
    return _RNGS[key]


def _to_tensor(img) -> torch.Tensor:
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = (a - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


class PilTrainTransform:
    """DomainBed's training augmentation on a PIL RGB image, without torchvision."""

    def __init__(self, size: int = 224, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3), jitter=0.3, gray_p=0.1):
        self.size, self.scale, self.ratio, self.jitter, self.gray_p = size, scale, ratio, jitter, gray_p

    def _crop_box(self, w: int, h: int, rng) -> tuple[int, int, int, int]:
        area = w * h
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_r))
            cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                return left, top, left + cw, top + ch
        # Fallback as torchvision: the largest centred crop whose ratio is within bounds.
        r = w / h
        if r < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif r > self.ratio[1]:
            ch, cw = h, int(round(h * self.ratio[1]))
        else:
            cw, ch = w, h
        left, top = (w - cw) // 2, (h - ch) // 2
        return left, top, left + cw, top + ch

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image, ImageEnhance
        rng = _rng()
        img = img.crop(self._crop_box(*img.size, rng)).resize((self.size, self.size), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        j = self.jitter
        factors = [rng.uniform(1 - j, 1 + j) for _ in range(3)] + [rng.uniform(-j, j)]
        for op in rng.permutation(4):
            if op == 0:
                img = ImageEnhance.Brightness(img).enhance(factors[0])
            elif op == 1:
                img = ImageEnhance.Contrast(img).enhance(factors[1])
            elif op == 2:
                img = ImageEnhance.Color(img).enhance(factors[2])
            else:
                h, s, v = img.convert("HSV").split()
                hue = np.asarray(h, dtype=np.uint8)
                # uint8 arithmetic wraps around, which is the rotation of the hue circle.
                hue = (hue.astype(np.int16) + int(round(factors[3] * 255))) % 256
                img = Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8), "L"), s, v)).convert("RGB")
        if rng.random() < self.gray_p:
            img = img.convert("L").convert("RGB")
        return _to_tensor(img)


class PilEvalTransform:
    """Resize to size x size (bilinear) and normalise."""

    def __init__(self, size: int = 224):
        self.size = size

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image
        return _to_tensor(img.resize((self.size, self.size), Image.BILINEAR))


def make_transform(train: bool, size: int = 224, impl: str = "auto"):
    """(transform, impl name): torchvision's transforms for impl "torchvision" (or "auto" when
    torchvision imports), else the plain PIL + numpy ones ("pil")."""
    if impl not in ("auto", "torchvision", "pil"):
        raise ValueError(f"transforms must be 'auto', 'torchvision' or 'pil', got {impl!r}")
    if impl in ("auto", "torchvision"):
        try:
            from torchvision import transforms as T
        except ImportError:
            if impl == "torchvision":
                raise
        else:
            norm = [T.ToTensor(), T.Normalize(MEAN, STD)]
            if train:
                return T.Compose([T.RandomResizedCrop(size, scale=(0.7, 1.0)), T.RandomHorizontalFlip(),
                                  T.ColorJitter(0.3, 0.3, 0.3, 0.3), T.RandomGrayscale(0.1)] + norm), "torchvision"
            return T.Compose([T.Resize((size, size))] + norm), "torchvision"
    return (PilTrainTransform(size) if train else PilEvalTransform(size)), "pil"


class FileDataset(torch.utils.data.Dataset):
    """paths[i] -> transform(PIL RGB image); a file that cannot be opened or decoded raises
    a RuntimeError naming it (DataLoader re-raises it in the main process)."""

    def __init__(self, paths: list, transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")  # forces the full decode, so truncation shows here
        except Exception as e:
            raise RuntimeError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from e
        return self.transform(img)


def undecodable(paths) -> list:
    """The subset of `paths` that PIL cannot fully decode (used to name the culprit when a
    DALI batch fails); empty when PIL is missing."""
    try:
        from PIL import Image
    except ImportError:
        return []
    bad = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.convert("RGB")
        except Exception as e:
            bad.append(f"{p} ({type(e).__name__}: {e})")
    return bad
