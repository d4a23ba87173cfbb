"""Fused per-group loss against the code users would otherwise run (PERFORMANCE.md, group loss).

Forward+backward at (1024, 65, 16 groups) and (8192, 1000, 64 groups), timed in one run:
  loop:       DomainBed style: a Python loop over groups, a cross-entropy per group, the q
              update on the host side of the loop,
  vectorised: per-sample CE, index_add per-group sums, bincount, q update with torch ops,
  plain_ce:   F.cross_entropy alone (what the fused op should cost about as much as),
  fastdg:     fastdg.ops.group_loss (C++ on CPU, Triton on GPU).
CPU targets at (1024, 65, 16): fastdg >= 20x the loop and >= 3x the vectorised version.
"""
import pytest
import torch
import torch.nn.functional as F

from fastdg.ops import group_loss, last_choice

SHAPES = [(1024, 65, 16), (8192, 1000, 64)]
_TIMES = {}


def loop(z, y, g, q, eta=0.01):
    losses = []
    for i in range(len(q)):
        m = g == i
        losses.append(F.cross_entropy(z[m], y[m]) if m.any() else z.sum() * 0)
    L = torch.stack(losses)
    q = q * torch.exp(eta * L.detach())
    q = q / q.sum()
    return (q * L).sum(), q


def vectorised(z, y, g, q, eta=0.01):
    l = F.cross_entropy(z, y, reduction="none")
    G = len(q)
    sums = torch.zeros(G, device=z.device).index_add(0, g, l)
    counts = torch.bincount(g, minlength=G).float()
    L = sums / counts.clamp_min(1)
    q = q * torch.exp(eta * L.detach())
    q = q / q.sum()
    return (q * L).sum(), q


def fused(z, y, g, q, eta=0.01):
    out = group_loss(z, y, g, q, eta=eta, check_inputs=False)
    return out.loss, out.q


def plain_ce(z, y, g, q, eta=0.01):
    return F.cross_entropy(z, y), q


IMPLS = {"loop": loop, "vectorised": vectorised, "plain_ce": plain_ce, "fastdg": fused}


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_group_loss(benchmark, device, shape, impl):
    n, k, G = shape
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, k, generator=gen).to(device).requires_grad_()
    y = torch.randint(0, k, (n,), generator=gen).to(device)
    g = torch.randint(0, G, (n,), generator=gen).to(device)
    q = torch.full((G,), 1.0 / G, device=device)
    fn = IMPLS[impl]

    def step():
        loss, _ = fn(z, y, g, q)
        torch.autograd.grad(loss, z)  # no accumulation into z.grad
        if device == "cuda":
            torch.cuda.synchronize()

    # 10 calls a round: a microsecond op timed one call a round measures pytest-benchmark's own
    # bookkeeping between calls too, and lets the thread pool fall asleep, so that every
    # parallel region pays a wake-up a training loop (ops back to back) does not.
    iters = 10 if device == "cpu" else 1
    benchmark.pedantic(step, rounds=30 if device == "cpu" else 50, warmup_rounds=3, iterations=iters)
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, nothing to record
        return
    key = (device, shape)
    _TIMES.setdefault(key, {})[impl] = benchmark.stats["median"]
    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", shape=list(shape),
                threads=torch.get_num_threads())
    if impl == "fastdg":
        info["backend"] = last_choice("group_loss").backend
        t = _TIMES[key]
        for base in ("loop", "vectorised"):
            if base in t:
                info[f"speedup_vs_{base}"] = t[base] / t["fastdg"]
        if "plain_ce" in t:
            info["time_vs_plain_ce"] = t["fastdg"] / t["plain_ce"]
