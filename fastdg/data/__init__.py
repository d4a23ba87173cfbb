"""Domain-generalization data: data sets, per-domain / per-seed-category training streams and
evaluation loaders (DALI for images when installed, torch's DataLoader otherwise).

    from fastdg.data import get_dataset, split_holdout, DomainStreams, EvalLoader
    ds = get_dataset("PACS")                        # or RotatedMNIST, ColoredDigits, ...
    tr, ho = split_holdout(len(ds[0]), 0.2, seed=(trial_seed, 0))
    streams = DomainStreams(ds, [0, 1, 2], batch_size=32, device="cuda", subsets=[...])
    for step, batches in zip(range(5000), streams): ...   # batches: [(x, y), ...] per domain

Importing this package imports neither DALI nor torchvision.
"""
from .datasets import (DATASETS, DatasetNotFoundError, DomainDataset, ImageEnvironment, TensorEnvironment,
                       default_data_dir, get_dataset, load_mnist, rotate, split_holdout)
from .images import ImageFolderDataset, scan_image_folder
from .dali import dali_status
from .loaders import DomainStreams, EvalLoader, choose_backend
from .samplers import StepSampler

__all__ = ["DATASETS", "DatasetNotFoundError", "DomainDataset", "ImageEnvironment", "TensorEnvironment",
           "default_data_dir", "get_dataset", "load_mnist", "rotate", "split_holdout", "ImageFolderDataset",
           "scan_image_folder", "dali_status", "DomainStreams", "EvalLoader", "choose_backend", "StepSampler"]
