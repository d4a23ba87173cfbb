"""The foundation: lazy extension load, backend dispatch, `python -m fastdg.info`."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastdg
from fastdg import _dispatch, _ext
from fastdg.ops import bin_norm, last_choice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    full = dict(os.environ, PYTHONPATH=REPO, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=REPO)


def test_import_loads_nothing_heavy():
    out = _run("import sys, fastdg; print(sorted(m for m in ('fastdg._C', 'triton', 'nvidia.dali') if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_import_survives_missing_extension():
    # FASTDG_NO_EXT hides the extension; the ops must still run through the reference.
    code = ("import torch, fastdg; x = torch.randn(2, 3, 4, 5); r = torch.rand(3);"
            "fastdg.ops.bin_norm(x, None, None, r); print(fastdg.ops.last_choice('bin_norm').backend)")
    out = _run(code, FASTDG_NO_EXT="1", TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_extension_builds_and_registers_cpu_kernels():
    assert _ext.load() is not None, _ext.why_not()
    info = _ext.build_info()
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    for op in ("bin_stats", "bin_apply", "bin_bwd_reduce", "bin_bwd_apply"):
        assert _ext.has_kernel(op, "CPU"), op


def test_dispatch_picks_cpp_on_cpu_and_explains():
    x = torch.randn(2, 3, 5, 7)
    bin_norm(x, None, None, torch.rand(3))
    choice = last_choice("bin_norm")
    assert choice.backend == "cpp" and not choice.forced
    assert "cuda" in choice.rejected and "not on a CUDA device" in choice.rejected["cuda"]
    assert "using cpp" in choice.explain()


def test_forced_backend_argument_and_env(monkeypatch):
    x = torch.randn(2, 3, 5, 7)
    bin_norm(x, None, None, torch.rand(3), backend="reference")
    assert last_choice("bin_norm").backend == "reference" and last_choice("bin_norm").forced
    monkeypatch.setenv("FASTDG_BACKEND", "bin_norm=reference,group_loss=cpp")
    bin_norm(x, None, None, torch.rand(3))
    assert last_choice("bin_norm").backend == "reference"
    monkeypatch.setenv("FASTDG_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="requested but cannot run"):
        bin_norm(x, None, None, torch.rand(3))
    with pytest.raises(ValueError, match="not a backend"):
        bin_norm(x, None, None, torch.rand(3), backend="fortran")


def test_forced_triton_without_gpu_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: triton can run")
    with pytest.raises(RuntimeError, match="no CUDA device|not importable"):
        bin_norm(torch.randn(2, 3, 4, 4), None, None, torch.rand(3), backend="triton")


def test_env_parsing():
    os.environ.pop("FASTDG_BACKEND", None)
    assert _dispatch.forced_backend("bin_norm", None) is None
    assert _dispatch.forced_backend("bin_norm", "cpp") == "cpp"


def test_info_command_tells_the_truth():
    out = subprocess.run([sys.executable, "-m", "fastdg.info", "--json"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)["backends"]}
    assert set(rows) == {"reference", "cpp (C++ CPU)", "cuda (CUDA C++)", "triton", "dali", "gpu"}
    assert rows["reference"]["available"]
    assert rows["gpu"]["available"] == torch.cuda.is_available()
    assert rows["cpp (C++ CPU)"]["available"] == (_ext.load() is not None)
    if not torch.cuda.is_available():
        assert not rows["cuda (CUDA C++)"]["available"] and rows["cuda (CUDA C++)"]["detail"]
    try:
        import nvidia.dali  # noqa: F401
        have_dali = True
    except ImportError:
        have_dali = False
    assert rows["dali"]["available"] == have_dali


def test_version():
    assert fastdg.__version__


def test_mismatched_build_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(_ext, "build_info", lambda: {"torch": "1.0.0", "cuda_compiled": False})
    with pytest.warns(RuntimeWarning, match="built for torch 1.0.0"):
        module, why = _ext._load.__wrapped__()
    assert module is None and "rebuild" in why
