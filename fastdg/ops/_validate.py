"""Argument checks shared by the public ops: errors name the argument and the expected form."""
from __future__ import annotations

import torch


def tensor(name, t, *, dim=None, dtypes=None, device=None, allow_none=False):
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}; put them on one device")


def shape(name, t, expected):
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def finite(name, t):
    if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def ids_in_range(name, t, upper):
    """Integer ids in [0, upper). One device->host read on CUDA; callers may skip it."""
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must hold ids in [0, {upper}), got values in [{lo}, {hi}]")


FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INTS = (torch.int64, torch.int32)
