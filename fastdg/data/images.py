"""DomainBed-style image-folder data sets: <root>/<domain>/<class>/<image files>.

Scanning is strict where a silent mistake would skew results and lenient where a file can
simply be left out:
- a missing or empty root, no domain folders, a registered domain missing, a domain with no
  class folders, or a class missing from some domain -> DatasetNotFoundError / ValueError
  (DomainBed's per-domain ImageFolder would silently renumber the classes instead);
- an empty class folder -> ValueError (a class with no images cannot be learnt or tested);
- a file that is empty, unreadable, or whose first bytes are not a known image format
  (JPEG, PNG, BMP, GIF, TIFF, WebP) -> left out, counted in `ds.skipped` / `env.skipped`,
  and reported once with a warning (a dangling symlink counts as unreadable). Files that
  look like images but fail to decode are caught by the loaders, which raise an error
  naming the file;
- GIF files are kept and listed in `env.gif`: DALI's decoder cannot read GIF, so the loaders
  use the torch backend for them (backend="auto") or refuse backend="dali", naming the files.
Classes are numbered by their sorted folder names, domains listed in sorted folder order.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch

from .datasets import DatasetNotFoundError, DomainDataset, ImageEnvironment, register

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"), (b"GIF87a", "gif"),
          (b"GIF89a", "gif"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))


def sniff_format(path: str) -> tuple[str | None, str | None]:
    """(format, None) when `path` starts like an image file ("jpeg", "png", "bmp", "gif",
    "tiff", "webp"), else (None, why it is left out)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    if not head:
        return None, "empty file"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt, None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp", None
    return None, "not a recognised image format (bad magic bytes)"


def sniff_image(path: str) -> str | None:
    """None if `path` starts like an image file, else why it is left out."""
    return sniff_format(path)[1]


def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))


def scan_image_folder(root: str, environments: list[str] | None = None):
    """Scan <root>/<domain>/<class>/* and return (domains, classes, envs) where envs is a list
    of ImageEnvironment (paths sorted, y = class index). `environments`, when given, are the
    domain folder names that must all be present (in this order)."""
    if root is None or not os.path.isdir(root):
        raise DatasetNotFoundError(f"image data set folder {root!r} does not exist")
    found = _subdirs(root)
    if not found:
        raise DatasetNotFoundError(f"image data set folder {root!r} has no domain sub-folders "
                                   "(expected <root>/<domain>/<class>/<images>)")
    if environments is not None:
        missing = [e for e in environments if e not in found]
        if missing:
            raise DatasetNotFoundError(f"{root!r} lacks the domain folder(s) {missing}; found {found}")
        domains = list(environments)
    else:
        domains = found
    per_domain = {}
    for d in domains:
        classes = _subdirs(os.path.join(root, d))
        if not classes:
            raise ValueError(f"domain folder {os.path.join(root, d)!r} has no class sub-folders")
        per_domain[d] = classes
    classes = sorted(set().union(*per_domain.values()))
    for d, cs in per_domain.items():
        lacking = [c for c in classes if c not in cs]
        if lacking:
            raise ValueError(f"domain {d!r} in {root!r} lacks the class folder(s) {lacking}; every domain "
                             "must hold every class so that labels mean the same thing in all domains")
    envs = []
    for d in domains:
        paths, ys, skipped, gif = [], [], [], []
        for ci, c in enumerate(classes):
            cdir = os.path.join(root, d, c)
            names = sorted(f for f in os.listdir(cdir) if not f.startswith("."))
            kept = 0
            for f in names:
                p = os.path.join(cdir, f)
                # A dangling symlink is an unreadable file (sniffing reports it); other
                # non-files (folders, FIFOs) are not images and are passed over.
                if not os.path.isfile(p) and not (os.path.islink(p) and not os.path.exists(p)):
                    continue
                if not f.lower().endswith(IMAGE_EXTENSIONS):
                    skipped.append((p, "not an image file extension"))
                    continue
                fmt, why = sniff_format(p)
                if why is not None:
                    skipped.append((p, why))
                    continue
                paths.append(p)
                ys.append(ci)
                if fmt == "gif":
                    gif.append(p)
                kept += 1
            if kept == 0:
                raise ValueError(f"class folder {cdir!r} holds no readable image files")
        envs.append(ImageEnvironment(d, paths, torch.tensor(ys, dtype=torch.int64), skipped, gif))
    n_skip = sum(len(e.skipped) for e in envs)
    if n_skip:
        first = next(s for e in envs for s in e.skipped)
        msg = f"{root}: left out {n_skip} file(s) that are not readable images (first: {first[0]}: {first[1]})"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return domains, classes, envs


class ImageFolderDataset(DomainDataset):
    """Any DomainBed-style image folder: one sub-folder per domain, one per class inside.

    ImageFolderDataset(root) takes every domain folder found; registered subclasses name the
    folder (DIR, relative to data_dir) and the domains they expect. Environments hold file
    paths; the loaders decode them. Attributes: classes (sorted class folder names),
    skipped (list of (path, reason) for files left out).
    """
    NAME = "ImageFolder"
    DIRS: tuple = ()          # candidate folder names under data_dir
    ENV_FOLDERS = None        # domain folder names, in DomainBed's order
    NUM_CLASSES = None
    INPUT_SHAPE = (3, 224, 224)
    is_image = True

    def __init__(self, data_dir, seed: int = 0, root: str | None = None):
        super().__init__()
        if root is None:
            root = self._locate(data_dir)
        self.root = root
        domains, classes, envs = scan_image_folder(root, self.ENV_FOLDERS)
        if self.NUM_CLASSES is not None and len(classes) != self.NUM_CLASSES:
            raise ValueError(f"{self.NAME} has {self.NUM_CLASSES} classes but {root!r} holds {len(classes)}: {classes}")
        self.environments = domains
        self.classes = classes
        self.num_classes = len(classes)
        self.datasets = envs
        self.skipped = [s for e in envs for s in e.skipped]

    def _locate(self, data_dir):
        if not self.DIRS:  # the generic folder: data_dir is the root itself
            return data_dir
        if data_dir is None or not os.path.isdir(data_dir):
            raise DatasetNotFoundError(f"data directory {data_dir!r} does not exist")
        for d in self.DIRS:
            if os.path.isdir(os.path.join(data_dir, d)):
                return os.path.join(data_dir, d)
        raise DatasetNotFoundError(f"{self.NAME} not found: none of {[os.path.join(data_dir, d) for d in self.DIRS]} exists")


register(ImageFolderDataset)


def _image_set(name, dirs, env_folders, num_classes, doc):
    cls = type(name, (ImageFolderDataset,), {"NAME": name, "DIRS": tuple(dirs), "ENV_FOLDERS": list(env_folders),
                                             "NUM_CLASSES": num_classes, "__doc__": doc})
    return register(cls)


PACS = _image_set("PACS", ["PACS"], ["art_painting", "cartoon", "photo", "sketch"], 7,
                  "PACS: 4 domains (art_painting, cartoon, photo, sketch), 7 classes, 9991 images.")
VLCS = _image_set("VLCS", ["VLCS"], ["Caltech101", "LabelMe", "SUN09", "VOC2007"], 5,
                  "VLCS: 4 domains (Caltech101, LabelMe, SUN09, VOC2007), 5 classes.")
OfficeHome = _image_set("OfficeHome", ["office_home", "OfficeHome"], ["Art", "Clipart", "Product", "Real World"], 65,
                        "OfficeHome: 4 domains (Art, Clipart, Product, Real World), 65 classes.")
TerraIncognita = _image_set("TerraIncognita", ["terra_incognita", "TerraIncognita"],
                            ["location_100", "location_38", "location_43", "location_46"], 10,
                            "TerraIncognita: 4 camera-trap locations, 10 classes.")
DomainNet = _image_set("DomainNet", ["domain_net", "DomainNet"],
                       ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"], 345,
                       "DomainNet: 6 domains, 345 classes.")
