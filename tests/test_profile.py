"""RoundProfiler: nested phases, step times, folding, the phase() hook the algorithms call,
torch.compile, the CPU memory probe, and bounded torch.profiler traces."""
import json
import os
import time

import pytest
import torch

from fastdg.algorithms import get_algorithm
from fastdg.profile import RoundProfiler, RssPeak, active_profiler, phase, torch_trace, trace_schedule


def test_phases_nest_under_the_open_phase_and_the_tree_adds_up():
    prof = RoundProfiler("cpu")
    with prof.activate():
        for _ in range(3):
            prof.step_start()
            with prof.phase("data"):
                time.sleep(0.001)
            with prof.phase("update"):
                with phase("forward"):
                    time.sleep(0.002)
                with phase("backward"):
                    time.sleep(0.002)
                with phase("optimizer"):
                    pass
            prof.step_done()
    s = prof.summary()
    assert list(s["phases_s"]) == ["data", "update", "update/forward", "update/backward", "update/optimizer"]
    assert s["phase_counts"] == {"data": 3, "update": 3, "update/forward": 3, "update/backward": 3,
                                 "update/optimizer": 3}
    tree = s["phase_tree"]
    assert set(tree) == {"data", "update"} and set(tree["update"]["children"]) == {"forward", "backward", "optimizer"}
    up = tree["update"]
    kids = sum(c["s"] for c in up["children"].values())
    assert up["s"] >= kids > 0.012 and up["self_s"] == pytest.approx(up["s"] - kids)
    assert "update/forward" in s["phase_nesting"]
    assert s["steps"] == 3 and s["step_time_s"]["p50"] > 0.005 and s["train_s"] <= s["ttr_s"]
    assert s["peak_memory_bytes"] > 0 and "rss" in s["peak_memory_kind"]


def test_phase_is_a_noop_without_an_active_profiler_and_activation_nests():
    assert active_profiler() is None
    with phase("forward"):  # nothing to report to: must not fail
        pass
    outer, inner = RoundProfiler("cpu"), RoundProfiler("cpu")
    with outer.activate():
        with inner.activate():
            with phase("a"):
                pass
        with phase("b"):
            pass
    assert active_profiler() is None
    assert list(inner.summary()["phases_s"]) == ["a"] and list(outer.summary()["phases_s"]) == ["b"]
    with pytest.raises(ValueError, match="no '/'"):
        with outer.phase("a/b"):
            pass


def test_step_times_leave_out_work_between_steps_and_fold_keeps_totals():
    prof = RoundProfiler("cpu")
    for _ in range(2):
        prof.step_start()
        time.sleep(0.002)
        prof.step_done()
        time.sleep(0.03)  # an evaluation between steps: in ttr_s, not in the step times
    prof.fold()
    assert prof._pending_steps == [] and len(prof.durations) == 2
    with prof.phase("eval"):
        pass
    prof.fold()
    with prof.phase("eval"):
        pass
    s = prof.summary()
    assert s["step_time_s"]["max"] < 0.025 and s["ttr_s"] > 0.06 and s["phase_counts"]["eval"] == 2


def test_algorithms_report_their_phases_inside_update():
    alg = get_algorithm("ERM")((1, 8, 8), 10, 2, {})
    mb = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    prof = RoundProfiler("cpu")
    with prof.activate(), prof.phase("update"):
        alg.update(mb)
    assert set(prof.summary()["phases_s"]) == {"update", "update/forward", "update/backward", "update/optimizer"}


def test_phase_under_torch_compile_records_nothing_and_breaks_no_graph():
    def f(x):
        with phase("inner"):
            y = x.sin() * 2
        return y.cos()

    prof = RoundProfiler("cpu")
    x = torch.randn(5)
    with prof.activate(), prof.phase("update"):
        out = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(out, (x.sin() * 2).cos())
    assert list(prof.summary()["phases_s"]) == ["update"]


def test_rss_peak_sees_a_temporary_allocation():
    with RssPeak() as m:
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        # hold it until the sampler thread has run (it may wait for a core on a loaded machine)
        for _ in range(500):
            if m.peak_bytes - m.base_bytes > 48 * 2**20:
                break
            time.sleep(0.01)
        del t
    assert m.delta_bytes > 48 * 2**20 and m.peak_bytes >= m.base_bytes


def _trace_steps(path):
    events = json.load(open(path))["traceEvents"]  # Chrome trace JSON
    return sorted(int(e["name"].split("#")[1]) for e in events if e.get("name", "").startswith("ProfilerStep#")
                  and e.get("ph") == "X")


def test_torch_trace_records_a_bounded_window_of_steps(tmp_path):
    """However long the loop, the trace holds 3 steps (after 1 skipped, 1 warm-up); shorter
    loops shrink the skipped and warm-up steps first; nothing is written without a path."""
    assert trace_schedule(100) == {"wait": 1, "warmup": 1, "active": 3, "repeat": 1}
    assert trace_schedule(2) == {"wait": 0, "warmup": 1, "active": 1, "repeat": 1}
    assert trace_schedule(1) == {"wait": 0, "warmup": 0, "active": 1, "repeat": 1}
    for n, want in ((20, [2, 3, 4]), (4, [2, 3]), (1, [0])):
        path = tmp_path / f"sub{n}" / "trace.json"  # the folder is made
        with torch_trace(str(path), steps=n) as prof:
            for _ in range(n):
                torch.randn(32, 32) @ torch.randn(32, 32)
                prof.step()
        assert _trace_steps(path) == want, n
    with torch_trace(None) as prof:
        assert prof is None


def test_trainer_writes_its_trace(tmp_path):
    from fastdg.train import RunConfig, Trainer

    path = tmp_path / "trace.json"
    cfg = RunConfig(algorithm="GroupDRO", steps=8, checkpoint_freq=4, hparams={"batch_size": 8},
                    profile_trace=str(path))
    Trainer(cfg, str(tmp_path / "run"), progress="none").run()
    assert os.path.getsize(path) > 0 and _trace_steps(path) == [2, 3, 4]
    names = {e.get("name") for e in json.load(open(path))["traceEvents"]}
    assert "aten::convolution" in names or any("conv" in str(n) for n in names)


@pytest.mark.gpu
def test_cuda_phases_record_events_without_synchronising():
    alg = get_algorithm("ERM")((1, 8, 8), 10, 2, {}).cuda()
    mb = [(torch.randn(4, 1, 8, 8, device="cuda"), torch.randint(0, 10, (4,), device="cuda")) for _ in range(2)]
    alg.update(mb)
    prof = RoundProfiler("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with prof.activate():
            for _ in range(3):
                prof.step_start()
                with prof.phase("update"):
                    alg.update(mb)
                prof.step_done()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s = prof.summary()
    assert s["phase_counts"]["update/forward"] == 3 and s["peak_memory_kind"].startswith("cuda")
