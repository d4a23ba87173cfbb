"""Lazy, never-raising access to the compiled extension fastdg._C.

`load()` imports the extension the first time it is asked for and remembers why it could
not (not built, built for another torch, broken binary). Importing fastdg never loads it.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import warnings

import torch

_BUILD_INFO = os.path.join(os.path.dirname(__file__), "_build_info.json")


def build_info() -> dict | None:
    """What setup.py recorded when it built fastdg._C (torch, CUDA, archs), or None."""
    try:
        with open(_BUILD_INFO) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _same_torch(built: str, running: str) -> bool:
    # The C++ ABI of torch changes between releases; the local tag (+cu130) does not matter.
    return built.split("+")[0] == running.split("+")[0]


@functools.lru_cache(maxsize=None)
def _load() -> tuple[object | None, str]:
    if os.environ.get("FASTDG_NO_EXT", "") == "1":
        return None, "disabled by FASTDG_NO_EXT=1"
    info = build_info()
    if info is not None and not _same_torch(info.get("torch", ""), torch.__version__):
        msg = (f"fastdg._C was built for torch {info.get('torch')} but torch {torch.__version__} is running; "
               "using the fallback backends (rebuild with `pip install --no-build-isolation -e .`)")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return None, msg
    try:
        module = importlib.import_module("fastdg._C")
    except ImportError as exc:
        text = str(exc)
        if "No module named" in text:
            return None, "fastdg._C is not built (pip install --no-build-isolation -e .)"
        warnings.warn(f"fastdg._C failed to load, using the fallback backends: {text}", RuntimeWarning, stacklevel=3)
        return None, f"fastdg._C failed to load: {text}"
    from .ops import _fake

    _fake.register()
    return module, "loaded"


def load():
    """The extension module, or None (see `why_not()`)."""
    return _load()[0]


def why_not() -> str:
    return _load()[1]


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when fastdg::<op> has a kernel for `dispatch_key` ("CPU" or "CUDA")."""
    if load() is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdg::{op}", dispatch_key)
    except RuntimeError:
        return False


def cuda_compiled() -> bool:
    info = build_info() or {}
    return bool(info.get("cuda_compiled")) and load() is not None
