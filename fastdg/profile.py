"""Per-round profiling: time of a training round (TTR), peak memory (PCMA on a GPU: peak CUDA
memory allocated; peak resident set size on a CPU), a per-phase breakdown and step-time
percentiles, as paper 001's Table 5 reports them.

On a GPU, phases and steps are timed with CUDA events recorded into the stream: nothing
synchronises until `summary()` reads them once at the end of the round.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections import defaultdict

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _Timer:
    """Wall clock on the CPU; CUDA events on a GPU (resolved lazily)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


_active = None  # the RoundProfiler that `phase` reports to (RoundProfiler.activate)


@contextlib.contextmanager
def phase(name: str):
    """Time the enclosed code as phase `name` of the active RoundProfiler; a no-op when none is
    active or while torch.compile traces (an event record would break the graph). Algorithms
    mark "forward", "backward" and "optimizer" with it; the trainer marks "data", "update",
    "categories" and "eval"."""
    prof = _active
    if prof is None or torch.compiler.is_compiling():
        yield
        return
    with prof.phase(name):
        yield


class RoundProfiler:
    """Usage:
        prof = RoundProfiler(device)
        for step ...:
            with prof.phase("data"): batch = next(it)
            with prof.phase("step"): alg.update(batch)
            prof.step_done()
        prof.summary()  # dict, JSON-ready
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.timer = _Timer(device)
        self.spans = defaultdict(list)   # phase -> [(start, end)]
        self.steps = []                  # step boundaries
        if self.timer.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = self.timer.mark()
        self.wall_start = time.perf_counter()
        self.steps.append(self.start)

    @contextlib.contextmanager
    def phase(self, name):
        a = self.timer.mark()
        try:
            yield
        finally:
            self.spans[name].append((a, self.timer.mark()))

    @contextlib.contextmanager
    def activate(self):
        """Make this the profiler that fastdg.profile.phase() reports to."""
        global _active
        prev, _active = _active, self
        try:
            yield self
        finally:
            _active = prev

    def step_done(self):
        self.steps.append(self.timer.mark())

    def summary(self) -> dict:
        if self.timer.cuda:
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.wall_start
        durations = [self.timer.elapsed(a, b) for a, b in zip(self.steps, self.steps[1:])]
        phases = {k: sum(self.timer.elapsed(a, b) for a, b in v) for k, v in self.spans.items()}
        out = {
            "ttr_s": wall,
            "steps": len(durations),
            "phases_s": phases,
            "step_time_s": _percentiles(durations),
        }
        if self.timer.cuda:
            out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            out["peak_memory_kind"] = "cuda_max_memory_allocated (PCMA)"
        else:
            out["peak_memory_bytes"] = peak_rss_bytes()
            out["peak_memory_kind"] = "cpu_peak_rss (whole process)"
        return out


def _percentiles(values):
    if not values:
        return {}
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"mean": float(t.mean()), "p50": q[0], "p90": q[1], "p99": q[2], "max": float(t.max())}


@contextlib.contextmanager
def torch_trace(path: str | None, device="cpu"):
    """Export a torch.profiler (Chrome) trace of the enclosed steps to `path`, if given."""
    if not path:
        yield None
        return
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, record_shapes=True, profile_memory=True) as prof:
        yield prof
    prof.export_chrome_trace(path)
