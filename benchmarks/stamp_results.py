"""Stamp a pytest-benchmark JSON with what makes a GPU figure checkable: device name, torch,
Triton and CUDA versions, the fastdg build, the git commit and the exact command.

    python benchmarks/stamp_results.py RESULT.json "COMMAND"
"""
import json
import os
import subprocess
import sys


def provenance(command: str) -> dict:
    import torch

    out = {"command": command, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, sm=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
    else:
        out["device"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        if os.environ.get("FASTDG_COMMIT"):  # a copy of the tree without .git (the GPU machine)
            raise OSError("commit given")
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                       check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        out["worktree_clean"] = not dirty
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = os.environ.get("FASTDG_COMMIT", "unknown")
    from fastdg import _ext

    out["fastdg_build"] = _ext.build_info()
    return out


def main(path: str, command: str) -> None:
    with open(path) as f:
        data = json.load(f)
    data["fastdg_provenance"] = provenance(command)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "unknown")
