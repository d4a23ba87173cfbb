"""Backend choice for every fastdg op: one place, one rule.

Each op declares its candidate backends in order of preference, each with a check that
returns None when the backend can take these inputs or a reason why not. The first that
accepts wins, unless a backend is forced by the op's `backend=` argument or by the
FASTDG_BACKEND variable ("triton" for every op, or "bin_norm=cpp,group_loss=reference").
A forced backend that cannot take the inputs raises, naming the reason: silently running
something else would make benchmarks and bug reports lie.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

BACKENDS = ("reference", "cpp", "cuda", "triton")

Check = Callable[..., Optional[str]]


@dataclass
class Choice:
    op: str
    backend: str
    forced: bool
    rejected: dict = field(default_factory=dict)  # backend -> reason

    def explain(self) -> str:
        lines = [f"{self.op}: using {self.backend}" + (" (forced)" if self.forced else "")]
        lines += [f"  {name}: not used, {why}" for name, why in self.rejected.items()]
        return "\n".join(lines)


_last: dict[str, Choice] = {}
_forcing = False  # True while the checks of a forced choice run (see triton_device_reason)


def forced_backend(op: str, backend: str | None) -> str | None:
    if backend is not None:
        return backend
    env = os.environ.get("FASTDG_BACKEND", "").strip()
    if not env:
        return None
    if "=" not in env:
        return env
    for item in env.split(","):
        name, _, value = item.partition("=")
        if name.strip() == op:
            return value.strip()
    return None


def choose(op: str, candidates: list[tuple[str, Check]], backend: str | None, *args, **kwargs) -> Choice:
    """Pick a backend for `op`. `candidates` is [(name, check)] in order of preference.

    Under torch.compile the choice is made once, at trace time, and enters the graph as a
    constant (see `_choose_at_trace_time`): the checks read files, environment variables and
    the extension's registry, none of which belongs in a graph."""
    if _compiling():
        specs = tuple((str(a.device), a.dtype) if isinstance(a, torch.Tensor) else None for a in args)
        name = _choose_at_trace_time(op, tuple(candidates), backend, specs)
        return Choice(op, name, backend is not None)
    return _choose_eager(op, candidates, backend, *args, **kwargs)


# Every check reads only the device and dtype of the op's first tensor and process-wide state
# that does not change once the extension is loaded, apart from these variables: a choice is
# cached per (op, candidates, backend argument, variables, device, dtype).
_CACHE_ENV = ("FASTDG_BACKEND", "TRITON_INTERPRET")
_cache: dict = {}
# os.environ.get encodes and decodes on every call (~1.5 us each, a third of an op's eager cost at
# DomainBed sizes); CPython keeps the bytes mapping it wraps in os.environ._data, always current.
_ENV_DATA = getattr(os.environ, "_data", None)
_CACHE_ENV_KEYS = tuple(os.environ.encodekey(v) for v in _CACHE_ENV) if _ENV_DATA is not None else None


def _env_key() -> tuple:
    if _ENV_DATA is not None:
        return tuple(_ENV_DATA.get(k) for k in _CACHE_ENV_KEYS)
    return tuple(os.environ.get(v) for v in _CACHE_ENV)


def _choose_eager(op, candidates, backend, *args, **kwargs) -> Choice:
    t = args[0] if args and isinstance(args[0], torch.Tensor) else None
    key = None
    if t is not None and not kwargs:
        key = (op, tuple(name for name, _ in candidates), backend, _env_key(), t.device, t.dtype)
        hit = _cache.get(key)
        if hit is not None:
            _last[op] = hit
            return hit
    choice = _choose_uncached(op, candidates, backend, *args, **kwargs)
    if key is not None:
        _cache[key] = choice
    return choice


def _choose_uncached(op, candidates, backend, *args, **kwargs) -> Choice:
    want = forced_backend(op, backend)
    names = [name for name, _ in candidates]
    if want is not None and want not in names:
        raise ValueError(f"backend={want!r} is not a backend of {op}; choose one of {names}")
    global _forcing
    rejected = {}
    for name, check in candidates:
        if want is not None and name != want:
            continue
        _forcing = want is not None
        try:
            why = check(*args, **kwargs)
        finally:
            _forcing = False
        if why is None:
            choice = Choice(op, name, want is not None, rejected)
            _last[op] = choice
            return choice
        if want is not None:
            raise RuntimeError(f"{op}: backend {want!r} was requested but cannot run here: {why}")
        rejected[name] = why
    raise RuntimeError(f"{op}: no backend can run these inputs: {rejected}")  # reference accepts all


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result, without importing torch._dynamo (1.3 s) when
    fastdg is imported: the decorator only sets this flag (tests/test_nn_bin.py compiles
    through it, so a change in torch shows up there)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _choose_at_trace_time(op, candidates, backend, specs) -> str:
    """The eager choice for tensors of these (device, dtype): every check reads only those, so
    zero-size stand-ins (no memory, no data) give the same answer."""
    stand_ins = [None if s is None else torch.empty(0, device=s[0], dtype=s[1]) for s in specs]
    return _choose_eager(op, list(candidates), backend, *stand_ins).backend


def last_choice(op: str) -> Choice | None:
    """The backend decision of the latest call of `op` (for tests, logs and bug reports)."""
    return _last.get(op)


# ---- shared availability checks ----------------------------------------------------------

def triton_unavailable() -> str | None:
    """None when Triton kernels can run (a CUDA GPU, or TRITON_INTERPRET=1 on the CPU)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available() or interpreting():
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly)"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_device_reason(*tensors) -> str | None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter. The interpreter
    is a test device, thousands of times slower than any other backend: it is used only when
    Triton is forced (backend="triton" or FASTDG_BACKEND), never picked by preference."""
    why = triton_unavailable()
    if why:
        return why
    for t in tensors:
        if t is None:
            continue
        if t.is_cuda:
            continue
        if t.device.type == "cpu" and interpreting():
            if _forcing:
                continue
            return "CPU tensor: the Triton interpreter runs only when forced (backend='triton')"
        return f"tensor on {t.device} (Triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1)"
    return None


def compiled_reason(op: str, *tensors) -> str | None:
    """None when fastdg._C has a kernel for `op` on the tensors' device."""
    from . import _ext

    if _ext.load() is None:
        return _ext.why_not()
    dev = next((t.device.type for t in tensors if t is not None), "cpu")
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(dev)
    if key is None:
        return f"no compiled kernel for device type {dev}"
    if not _ext.has_kernel(op, key):
        if key == "CUDA" and not _ext.cuda_compiled():
            return "fastdg._C was built without CUDA kernels"
        return f"fastdg._C has no {key} kernel for {op}"
    return None


# ---- candidate checks shared by the ops (each takes the op's first tensor argument) -------

def compiled_check(kernel_op: str, device_type: str) -> Check:
    """A check accepting tensors on `device_type` when fastdg._C has a kernel for `kernel_op` there."""
    what = {"cpu": "C++ CPU", "cuda": "CUDA"}[device_type]

    def check(t, *_):
        if t.device.type != device_type:
            return f"input is on {t.device}, not on a {device_type.upper()} device (the {what} kernels take those)"
        return compiled_reason(kernel_op, t)
    return check


def triton_check(t, *_) -> str | None:
    """Triton kernels take fp32, fp16 and bf16 on a GPU (or on the CPU interpreter when forced)."""
    if t.dtype == torch.float64:
        return "float64 input (the Triton kernels take fp32, fp16 and bf16)"
    return triton_device_reason(t)


def always(*_) -> None:
    """The reference backend takes every input."""
    return None
