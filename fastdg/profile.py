"""Per-round profiling: time of a training round (TTR), peak memory (PCMA on a GPU: peak CUDA
memory allocated; peak resident set size on a CPU), a per-phase breakdown and step-time
percentiles, as paper 001's Table 5 reports them.

On a GPU, phases and steps are timed with CUDA events recorded into the stream: nothing
synchronises until `fold()` / `summary()` read them (the trainer calls them only where it
synchronises anyway: after an evaluation and at the end of the round).

Phases nest. `phase("forward")` opened while `phase("update")` is open is recorded under the
path "update/forward"; the trainer opens "data", "update", "categories" and "eval", the
algorithms open "forward", "backward" and "optimizer" inside whatever is open (fastdg.profile.
phase reports to the profiler made active with `RoundProfiler.activate()`). A parent's time
includes its children's; `phase_tree` in the summary gives each phase's children and the time
of the parent not covered by them ("self_s").
"""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time
import warnings
from collections import defaultdict

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc/self/statm; elsewhere the peak, the best available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


class RssPeak:
    """Peak RSS growth over a block of code on a CPU, without tracemalloc: a thread samples
    /proc/self/statm every `interval` s; `delta_bytes` = max sample - RSS at entry. Unlike
    ru_maxrss (a lifetime maximum) this measures each block on its own, so several variants
    can be compared in one process. Spikes shorter than the interval can be missed.

        with RssPeak() as m: work()
        m.delta_bytes, m.peak_bytes
    """

    def __init__(self, interval: float = 5e-4):
        self.interval = interval
        self.base_bytes = self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.base_bytes = self.peak_bytes = current_rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
        return False

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.base_bytes


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
    """Time the enclosed code as phase `name` of the active RoundProfiler (nested under the
    phases open around it); a no-op when none is active or while torch.compile traces (an
    event record would break the graph). Algorithms mark "forward", "backward" and
    "optimizer" with it; the trainer marks "data", "update", "categories" and "eval"."""
    prof = _active
    if prof is None or torch.compiler.is_compiling():
        yield
        return
    with prof.phase(name):
        yield


def active_profiler():
    """The RoundProfiler that `phase` reports to, or None."""
    return _active


class RoundProfiler:
    """Usage:
        prof = RoundProfiler(device)
        with prof.activate():                  # algorithms' phase() calls report here
            for step ...:
                prof.step_start()
                with prof.phase("data"): batch = next(it)
                with prof.phase("update"): alg.update(batch)   # forward/backward/optimizer inside
                prof.step_done()
        prof.summary()  # dict, JSON-ready

    Step times are step_start -> step_done (without a step_start, from the previous
    step_done), so work between steps (evaluation, checkpoints) stays out of the step-time
    percentiles but inside the round time (ttr_s).
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.timer = _Timer(self.device)
        self.totals = defaultdict(float)   # phase path -> seconds (folded)
        self.counts = defaultdict(int)     # phase path -> number of spans
        self.order = []                    # phase paths in first-seen order
        self.durations = []                # folded step times (s)
        self._pending = []                 # (path, start mark, end mark) not yet read
        self._pending_steps = []           # (start mark, end mark)
        self._stack = []
        if self.timer.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.wall_start = time.perf_counter()
        self._open = None
        self._last = self.timer.mark()

    @contextlib.contextmanager
    def phase(self, name):
        if not name or "/" in name:
            raise ValueError(f"phase names are non-empty and hold no '/', got {name!r}")
        self._stack.append(name)
        path = "/".join(self._stack)
        if path not in self.counts:
            self.order.append(path)
            self.counts[path] = 0
        a = self.timer.mark()
        try:
            yield
        finally:
            self._pending.append((path, a, self.timer.mark()))
            self._stack.pop()

    @contextlib.contextmanager
    def activate(self):
        """Make this the profiler that fastdg.profile.phase() reports to."""
        global _active
        prev, _active = _active, self
        try:
            yield self
        finally:
            _active = prev

    def step_start(self):
        self._open = self.timer.mark()

    def step_done(self):
        end = self.timer.mark()
        self._pending_steps.append((self._open if self._open is not None else self._last, end))
        self._last, self._open = end, None

    def fold(self):
        """Read the recorded marks into totals (synchronises on a GPU: call it where the loop
        synchronises anyway) and drop them, so a long round holds no growing list of events."""
        if self.timer.cuda:
            torch.cuda.synchronize(self.device)
        for path, a, b in self._pending:
            self.totals[path] += self.timer.elapsed(a, b)
            self.counts[path] += 1
        self.durations += [self.timer.elapsed(a, b) for a, b in self._pending_steps]
        self._pending, self._pending_steps = [], []

    def peak_memory_bytes(self) -> int:
        """PCMA on a GPU (no synchronisation); the process's peak RSS on a CPU."""
        if self.timer.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss_bytes()

    def summary(self) -> dict:
        self.fold()
        wall = time.perf_counter() - self.wall_start
        phases = {p: self.totals[p] for p in self.order}
        out = {
            "ttr_s": wall,
            "steps": len(self.durations),
            "train_s": float(sum(self.durations)),
            "phases_s": phases,
            "phase_counts": {p: self.counts[p] for p in self.order},
            "phase_tree": _tree(phases, self.counts),
            "phase_nesting": "keys of phases_s are paths: 'update/forward' is the forward pass timed inside the "
                             "'update' phase; a phase's time includes its children's (phase_tree: self_s = "
                             "time not in any child)",
            "step_time_s": _percentiles(self.durations),
            "peak_memory_bytes": self.peak_memory_bytes(),
        }
        out["peak_memory_kind"] = ("cuda_max_memory_allocated (PCMA)" if self.timer.cuda
                                   else "cpu_peak_rss (whole process, ru_maxrss)")
        return out


def _tree(phases: dict, counts) -> dict:
    root = {}
    for path, s in phases.items():
        node, parts = root, path.split("/")
        for name in parts[:-1]:
            node = node.setdefault(name, {"s": 0.0, "count": 0, "children": {}})["children"]
        entry = node.setdefault(parts[-1], {"s": 0.0, "count": 0, "children": {}})
        entry["s"], entry["count"] = s, counts[path]

    def finish(node):
        for entry in node.values():
            finish(entry["children"])
            entry["self_s"] = entry["s"] - sum(c["s"] for c in entry["children"].values())
        return node

    return finish(root)


def _percentiles(values):
    if not values:
        return {}
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"mean": float(t.mean()), "p50": q[0], "p90": q[1], "p99": q[2], "max": float(t.max())}


TRACE_STEPS = 3  # steps a torch.profiler trace records (after one skipped step and one warm-up step)


def trace_schedule(steps: int, active: int = TRACE_STEPS) -> dict:
    """torch.profiler.schedule arguments for a run of `steps` steps: skip the first step (lazy
    initialisation), warm up one, record `active`, once; shorter runs shrink wait and warm-up
    first, so at least one step is always recorded."""
    steps = max(int(steps), 1)
    wait = 1 if steps >= 3 else 0
    warmup = 1 if steps >= 2 else 0
    return {"wait": wait, "warmup": warmup, "active": max(1, min(active, steps - wait - warmup)), "repeat": 1}


@contextlib.contextmanager
def torch_trace(path: str | None, device="cpu", steps: int = TRACE_STEPS + 2, active: int = TRACE_STEPS):
    """A torch.profiler (Chrome) trace of a few steps, written to `path` (if given) once they are
    recorded (or when the block ends first). Bounded: the caller calls .step() on the yielded
    profiler after every step, and only the steps of trace_schedule(steps, active) are
    recorded, whatever the run's length. Yields None without a path."""
    if not path:
        yield None
        return
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*won't be using warmup.*")  # one-step runs have none
        sched = torch.profiler.schedule(**trace_schedule(steps, active))
    with torch.profiler.profile(activities=acts, schedule=sched, record_shapes=True, profile_memory=True,
                                on_trace_ready=lambda p: p.export_chrome_trace(path)) as prof:
        yield prof
