"""Fused BIN against the code users would otherwise run (PERFORMANCE.md, BIN rows).

Rows, forward and forward+backward, timed side by side in one run:
  composite:  BIN as its authors wrote it in PyTorch (F.batch_norm + F.instance_norm through a
              reshape to (1, N*C, H, W) + the rho mixing),
  batchnorm:  torch.nn.functional.batch_norm on the same input (the cost BIN can reach),
  fastdg-<b>: fastdg.ops.bin_norm forced to backend b, for every backend that runs here
              (cpp on the CPU; cuda and triton on a GPU).
Gradients are taken with torch.autograd.grad (no accumulation into .grad, which would add a
read and a write of |x| to every row).
CPU target: fastdg-cpp >= 2x the composite at (32, 64, 56, 56) fp32, forward+backward.
GPU targets (shapes of PERFORMANCE.md, NCHW and channels_last): >= 80% of the HBM floor
(3 |x| bytes forward, 8 |x| forward+backward, at 3.0 TB/s on H100 and 4.8 TB/s on H200),
<= 1.1x batchnorm, >= 3x composite; recorded in extra_info of each fastdg row.
Every row records bytes_moved (that floor's traffic: 3 |x| or 8 |x| bytes, the same for every
implementation) and the bandwidth it implies (bytes_moved / median), plus torch/CUDA versions.
CPU: 15 rounds per row (medians of a shared machine need them), NCHW and channels_last.
Run: python -m pytest benchmarks/bench_bin.py --benchmark-json=out.json
"""
import pytest
import torch
import torch.nn.functional as F

from fastdg.ops import bin_norm, last_choice

CPU_CASES = [((32, 64, 56, 56), torch.float32, lay) for lay in ("nchw", "channels_last")]
CPU_ROUNDS, CPU_WARMUP, GPU_ROUNDS, GPU_WARMUP = 15, 2, 50, 5
GPU_CASES = [(s, d, lay) for s, d in [((256, 64, 56, 56), torch.bfloat16), ((256, 64, 56, 56), torch.float32),
                                      ((256, 256, 56, 56), torch.bfloat16)] for lay in ("nchw", "channels_last")]
_TIMES = {}


def composite_bin(x, w, b, rho, rm, rv):
    N, C, H, W = x.shape
    xb = F.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
    xi = F.batch_norm(x.reshape(1, N * C, H, W), None, None, None, None, True, 0.0, 1e-5).view(N, C, H, W)
    r = rho.view(1, C, 1, 1).to(x.dtype)
    return (r * xb + (1 - r) * xi) * w.view(1, C, 1, 1).to(x.dtype) + b.view(1, C, 1, 1).to(x.dtype)


def batchnorm(x, w, b, rho, rm, rv):
    return F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)


def fused(backend):
    def f(x, w, b, rho, rm, rv):
        return bin_norm(x, w, b, rho, rm, rv, backend=backend)
    return f


def cases():
    out = [("cpu",) + c for c in CPU_CASES]
    if torch.cuda.is_available():
        out += [("cuda",) + c for c in GPU_CASES]
    return out


IMPLS = ["composite", "batchnorm", "fastdg-cpp", "fastdg-cuda", "fastdg-triton"]


def bytes_moved(shape, dtype, direction):
    """The floor's traffic: read x, write y (and read x again for the statistics) = 3 |x| forward;
    + read dy and x twice, write dx = 8 |x| forward+backward (PERFORMANCE.md)."""
    n = 1
    for s in shape:
        n *= s
    return (3 if direction == "fwd" else 8) * n * torch.finfo(dtype).bits // 8


def floor_s(shape, dtype, direction):
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    bw = 4.8e12 if "H200" in name else 3.0e12
    return bytes_moved(shape, dtype, direction) / bw


@pytest.mark.parametrize("device, shape, dtype, layout", cases(), ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bin(benchmark, device, shape, dtype, layout, direction, impl):
    torch.manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = direction != "fwd"
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    rho = torch.rand(C, device=device)
    inputs = [t.requires_grad_(grad) for t in (x, w, b, rho)]
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    dy = torch.randn_like(x)
    if impl.startswith("fastdg-"):
        fn = fused(impl.split("-", 1)[1])
        try:
            fn(x, w, b, rho, rm, rv)
        except RuntimeError as exc:
            pytest.skip(f"{impl} does not run here: {exc}")
    else:
        fn = {"composite": composite_bin, "batchnorm": batchnorm}[impl]

    def step():
        y = fn(x, w, b, rho, rm, rv)
        if grad:
            torch.autograd.grad(y, inputs, dy, allow_unused=True)  # batchnorm has no rho
        if device == "cuda":
            torch.cuda.synchronize()

    cpu = device == "cpu"
    benchmark.pedantic(step, rounds=CPU_ROUNDS if cpu else GPU_ROUNDS, warmup_rounds=CPU_WARMUP if cpu else GPU_WARMUP)
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, nothing to record
        return
    key = (device, shape, dtype, layout, direction)
    _TIMES.setdefault(key, {})[impl] = benchmark.stats["median"]
    info = benchmark.extra_info
    moved = bytes_moved(shape, dtype, direction)
    info.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", shape=list(shape),
                dtype=str(dtype), layout=layout, direction=direction, threads=torch.get_num_threads(),
                torch=torch.__version__, torch_cuda=torch.version.cuda, bytes_moved=moved,
                gb_per_s=moved / benchmark.stats["median"] / 1e9)
    if impl.startswith("fastdg-"):
        info["backend"] = last_choice("bin_norm").backend
        t = _TIMES[key]
        if "composite" in t:
            info["speedup_vs_composite"] = t["composite"] / t[impl]
        if "batchnorm" in t:
            info["time_vs_batchnorm"] = t[impl] / t["batchnorm"]
        if device == "cuda":
            info["pct_of_hbm_floor"] = 100 * floor_s(shape, dtype, direction) / t[impl]
