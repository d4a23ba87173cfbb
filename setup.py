"""Builds fastdg._C: the C++ CPU kernels always, the CUDA kernels when nvcc is found.

Environment switches
  FASTDG_CUDA=1   compile the CUDA sources, and fail loudly if that is impossible
  FASTDG_CUDA=0   never compile the CUDA sources
  (unset)         compile them when nvcc is found (CUDA_HOME or PATH)
  TORCH_CUDA_ARCH_LIST   defaults to "8.0;9.0" (A100 and H100/H200), not to the local GPU
  MAX_JOBS        parallel compile jobs, defaults to 2 (the CI machine has 2 cores)

The build writes fastdg/_build_info.json beside the extension (torch and CUDA versions,
architectures) so that fastdg._ext can refuse a mismatched binary instead of crashing.
"""
import glob
import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _find_cuda_home():
    """Point CUDA_HOME at a real toolkit before torch's cpp_extension reads it: torch guesses
    it from `which nvcc`, which is wrong when nvcc is a wrapper script (/usr/local/bin/nvcc
    exec'ing /usr/local/cuda-13.0/bin/nvcc): it then links against a libcudart that is not there."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = root
            return


_find_cuda_home()


def _cuda_wanted():
    flag = os.environ.get("FASTDG_CUDA", "").strip()
    if flag == "0":
        return False, "FASTDG_CUDA=0"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    have = bool(nvcc and os.path.exists(nvcc))
    if flag == "1" and not have:
        sys.exit("FASTDG_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if flag == "1":
        return True, "FASTDG_CUDA=1"
    return have, ("nvcc found" if have else "nvcc not found")


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", "2")
    use_cuda, why = _cuda_wanted()
    sources = ["csrc/fastdg.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: torch adds the standard its headers need (C++17 for 2.11, C++20 for 2.14).
    cxx = ["-O3", "-fopenmp", "-DFASTDG_EXT"]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-DFASTDG_EXT"]
    macros = []
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("FASTDG_WITH_CUDA", None))
        ext = CUDAExtension(
            "fastdg._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fastdg._C", sources, define_macros=macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_compiled": bool(use_cuda),
        "cuda_reason": why,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if use_cuda else None,
        "nvcc": _nvcc_version() if use_cuda else None,
    }
    with open(os.path.join(ROOT, "fastdg", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return [ext]


def _nvcc_version():
    import subprocess
    from torch.utils.cpp_extension import CUDA_HOME

    try:
        out = subprocess.run([os.path.join(CUDA_HOME or "", "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[-1]
    except Exception as exc:  # the version is informative only
        return f"unknown ({exc})"


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    package_data={"fastdg": ["_build_info.json"]},
)
