"""Shared test set-up: Triton in interpreter mode without a GPU; the gpu marker skips (with its reason) where no CUDA device exists,
and `data_dir` finds the real data sets (FASTDG_DATA, else ../shared/data beside the repo)."""
import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter. Triton reads this variable when a
# kernel module is imported, so it is set here, before any test module imports fastdg.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def find_data_dir():
    env = os.environ.get("FASTDG_DATA")
    if env:
        return env
    candidate = os.path.join(os.path.dirname(REPO), "shared", "data")
    return candidate if os.path.isdir(candidate) else None


@pytest.fixture(scope="session")
def data_dir():
    path = find_data_dir()
    if path is None:
        pytest.skip("real data not found: set FASTDG_DATA or put shared/data beside the repo")
    return path
