"""`python -m fastdg.info`: which backends work on this machine, and why not.

One row per backend: reference, C++ CPU, CUDA, Triton, DALI, GPU. Nothing is compiled or
installed; the answer is what fastdg itself would decide when an op is called.
"""
from __future__ import annotations

import importlib.util
import json
import platform
import sys

import torch

from . import _dispatch, _ext


def backend_rows() -> list[tuple[str, bool, str]]:
    rows = [("reference", True, f"pure PyTorch {torch.__version__}")]

    ext = _ext.load()
    if ext is None:
        rows.append(("cpp (C++ CPU)", False, _ext.why_not()))
    else:
        ops = [op for op in ("bin_stats", "group_loss_stats", "kmeans_assign") if _ext.has_kernel(op, "CPU")]
        rows.append(("cpp (C++ CPU)", bool(ops), f"fastdg._C CPU kernels: {', '.join(ops) or 'none'}"))

    info = _ext.build_info() or {}
    if ext is None:
        rows.append(("cuda (CUDA C++)", False, _ext.why_not()))
    elif not info.get("cuda_compiled"):
        rows.append(("cuda (CUDA C++)", False, f"fastdg._C built without CUDA ({info.get('cuda_reason', '?')})"))
    elif not torch.cuda.is_available():
        rows.append(("cuda (CUDA C++)", False,
                     f"kernels compiled for sm {info.get('cuda_archs')}, but no CUDA device is visible"))
    else:
        ops = [op for op in ("bin_stats", "group_loss_stats", "kmeans_assign") if _ext.has_kernel(op, "CUDA")]
        rows.append(("cuda (CUDA C++)", bool(ops), f"CUDA kernels: {', '.join(ops) or 'none'}"))

    why = _dispatch.triton_unavailable()
    if why is None:
        import triton

        where = "CUDA" if torch.cuda.is_available() else "CPU interpreter (TRITON_INTERPRET=1)"
        rows.append(("triton", True, f"triton {triton.__version__} on {where}"))
    else:
        rows.append(("triton", False, why))

    rows.append(dali_row())

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows.append(("gpu", True, f"{props.name}, sm_{props.major}{props.minor}, "
                                  f"{props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"))
    else:
        reason = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        rows.append(("gpu", False, reason))
    return rows


def dali_row() -> tuple[str, bool, str]:
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return ("dali", False, "nvidia-dali is not installed (pip install nvidia-dali-cuda130); "
                               "image loading falls back to torch DataLoader")
    try:
        import nvidia.dali as dali
    except Exception as exc:  # a broken install must not break `fastdg.info`
        return ("dali", False, f"nvidia.dali failed to import: {exc}")
    where = "GPU decoding" if torch.cuda.is_available() else "CPU pipelines only (no CUDA device)"
    return ("dali", True, f"nvidia-dali {dali.__version__}, {where}")


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastdg.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    rows = backend_rows()
    build = _ext.build_info()
    if args.json:
        print(json.dumps({"backends": [{"name": n, "available": a, "detail": d} for n, a, d in rows],
                          "build": build, "python": platform.python_version(), "torch": torch.__version__}, indent=1))
        return 0
    from . import __version__

    print(f"fastdg {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"({platform.system()} {platform.machine()})")
    if build:
        print(f"fastdg._C built with torch {build.get('torch')}, CUDA {build.get('torch_cuda')}, "
              f"CUDA kernels: {build.get('cuda_compiled')} (archs {build.get('cuda_archs')})")
    width = max(len(n) for n, _, _ in rows)
    for name, ok, detail in rows:
        print(f"  {name:<{width}}  {'yes' if ok else 'no ':<3}  {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
