"""Data sets and loaders (DomainBed constructions, METHODS.md section 9)."""
from .datasets import (DATASETS, ColoredDigits, ColoredMNIST, MultiDomainDataset, RotatedDigits,  # noqa: F401
                       RotatedMNIST, TensorDomain, default_data_dir, get_dataset, read_mnist, rotate)
from .loaders import DomainStreams, EvalLoader, split_holdout  # noqa: F401
