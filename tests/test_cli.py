"""The `fastdg` command end to end on RotatedDigits: every algorithm through `fastdg train`,
clean errors before any work, one invocation per output directory, per-run profiler traces,
and the --bf16 / --channels-last / --deterministic flags as short CPU runs."""
import json
import os

import pytest
import torch

from fastdg.algorithms import ALGORITHMS
from fastdg.cli import main


def _records(path):
    return [json.loads(line) for line in open(path)]


def _train(out, *extra, algorithms=("ERM",), steps=2, freq=1, hparams='{"batch_size": 8}'):
    return main(["train", "--algorithm", *algorithms, "--test-envs", "1", "--steps", str(steps), "--checkpoint-freq",
                 str(freq), "--hparams", hparams, "--progress", "none", "--output-dir", str(out), *extra])


def test_every_algorithm_through_the_command(tmp_path, capsys):
    """One `fastdg train` invocation of every algorithm (the README's command, few steps):
    each run's records and the invocation's summary."""
    out = tmp_path / "all"
    names = list(ALGORITHMS)
    assert _train(out, algorithms=names, steps=4, freq=2) == 0
    printed = capsys.readouterr().out
    summary = json.load(open(out / "summary.json"))
    assert [r["config"]["algorithm"] for r in summary["runs"]] == names
    cells = {m: {c["algorithm"]: c for c in summary["selection"][m]} for m in ("training_domain", "test_domain_oracle")}
    for name in names:
        recs = _records(out / name / "test1" / "results.jsonl")
        assert [r["step"] for r in recs] == [2, 4], name
        last = recs[-1]
        assert last["args"]["algorithm"] == name and last["args"]["test_envs"] == [1]
        assert last["hparams"]["batch_size"] == 8 and last["args"]["hparams_seed"] != 0  # not the defaults (16)
        assert all(0.0 <= last[f"env{i}_{p}_acc"] <= 1.0 for i in range(6) for p in ("in", "out")), name
        assert torch.isfinite(torch.tensor(last["loss"])) and last["step_time"] > 0, name
        for m, by_alg in cells.items():
            assert by_alg[name]["test_env"] == 1 and 0.0 <= by_alg[name]["test_acc"] <= 1.0, (m, name)
        assert f"| {name} |" in printed
    run = next(r for r in summary["runs"] if r["config"]["algorithm"] == "SeedCategories")
    assert "categories" in run["profile"]["phases_s"]
    assert len(json.load(open(out / "invocation.json"))["runs"]) == len(names)


@pytest.mark.parametrize("argv, message", [
    (["--hparams", '{"lr": "fast"}'], "hyper-parameter lr must be a number"),
    (["--hparams", '{"lr": 0}'], "hyper-parameter lr must be a finite number > 0"),
    (["--hparams", '{"batch_size": 0}'], "hyper-parameter batch_size must be an int >= 1"),
    (["--hparams", '{"batch_size": 8.5}'], "hyper-parameter batch_size must be an int"),
    (["--hparams", '{"weight_decay": -1}'], "hyper-parameter weight_decay"),
    (["--hparams", '{"norm": "layer"}'], "hyper-parameter norm must be one of"),
    (["--hparams", '{"resnet_depth": 34}'], "hyper-parameter resnet_depth must be one of"),
    (["--hparams", '{"nonlinear_classifier": "yes"}'], "nonlinear_classifier must be true or false"),
    (["--hparams", '{"pretrained_path": "/nonexistent/fastdg/w.pt"}'], "pretrained_path: no such file"),
    (["--hparams", '{"pretrained_path": 7}'], "pretrained_path must be a file path"),
    (["--algorithm", "GroupDRO", "--hparams", '{"groupdro_eta": -0.1}'], "groupdro_eta"),
    (["--algorithm", "IRM", "--hparams", '{"irm_penalty_anneal_iters": 2.5}'],
     "irm_penalty_anneal_iters must be an int"),
    (["--algorithm", "VREx", "--hparams", '{"vrex_lambda": -1}'], "vrex_lambda"),
    (["--algorithm", "MLDG", "--hparams", '{"mldg_inner_lr": 0}'], "mldg_inner_lr"),
    (["--algorithm", "SagNet", "--hparams", '{"sag_clip_adv": 0}'], "sag_clip_adv"),
    (["--algorithm", "SelfBalanced", "--hparams", '{"sb_meta_per_cell": -1}'], "sb_meta_per_cell"),
    (["--algorithm", "MetaBIN", "--hparams", '{"norm": "group"}'], "MetaBIN needs BIN"),
    (["--algorithm", "MetaBIN", "--hparams", '{"metabin_momentum": 1.5}'], "metabin_momentum"),
    (["--algorithm", "SeedCategories", "--hparams", '{"seed_k": 0}'], "seed_k must be an int >= 1"),
    # 10 classes x 5 training domains x 4 = 200 categories > 8 x 5 rows per step
    (["--algorithm", "SeedCategories", "--hparams", '{"seed_per_class": true, "batch_size": 8}'],
     "200 categories, but the total batch"),
    # each (domain, class) cell of RotatedDigits holds about 24 training samples, fewer than 30
    (["--algorithm", "SeedCategories", "--hparams", '{"seed_per_class": true, "seed_k": 30, "batch_size": 300}'],
     "need at least 30 training samples in each"),
    (["--device", "mps"], "fastdg trains on 'cpu' or 'cuda'"),
    (["--device", "nonsense"], "device 'nonsense'"),
])
def test_bad_input_fails_cleanly_before_work(argv, message, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(SystemExit, match=message):
        main(["train", "--test-envs", "1", *argv, "--output-dir", str(out)])
    assert not os.path.exists(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU exists")
def test_device_cuda_without_a_gpu_fails_before_work(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device is available"):
        main(["train", "--device", "cuda", "--output-dir", str(tmp_path / "o")])
    assert not os.path.exists(tmp_path / "o")


def test_profile_trace_is_a_directory_fails_before_work(tmp_path):
    with pytest.raises(SystemExit, match="is a directory"):
        _train(tmp_path / "o", "--profile-trace", str(tmp_path))
    assert not os.path.exists(tmp_path / "o")


def test_an_output_dir_of_another_invocation_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    assert _train(out, steps=1) == 0
    before = open(out / "summary.json").read()
    with pytest.raises(SystemExit, match="another `fastdg train` invocation"):
        _train(out, algorithms=("GroupDRO",), steps=1)  # its summary.json would replace ERM's
    assert not os.path.exists(out / "GroupDRO") and open(out / "summary.json").read() == before
    assert _train(out, steps=1) == 0  # the same command again: the finished run is read back
    assert json.load(open(out / "summary.json"))["runs"][0]["config"]["algorithm"] == "ERM"
    os.remove(out / "invocation.json")  # a directory written before invocation.json existed
    with pytest.raises(SystemExit, match=r"differs in .*arguments \['algorithm'\]"):
        _train(out, algorithms=("GroupDRO",), steps=1)
    capsys.readouterr()


def test_one_bounded_trace_per_run(tmp_path):
    trace = tmp_path / "traces" / "t.json"
    assert _train(tmp_path / "o", "--profile-trace", str(trace), algorithms=("ERM", "GroupDRO"), steps=6, freq=3) == 0
    assert sorted(os.listdir(tmp_path / "traces")) == ["t.ERM_test1.json", "t.GroupDRO_test1.json"]
    for name in ("ERM", "GroupDRO"):
        events = json.load(open(tmp_path / "traces" / f"t.{name}_test1.json"))["traceEvents"]
        steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
        assert steps == {"ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"}, name  # 1 skipped, 1 warm-up, 3


def _weights(run):
    return torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)["algorithm"]


def test_bf16_channels_last_and_deterministic_flags(tmp_path, monkeypatch):
    from fastdg.algorithms import ERM

    runs = {}
    for flag in ("plain", "again", "--bf16", "--channels-last"):
        out = tmp_path / flag.strip("-")
        assert _train(out, *([flag] if flag.startswith("--") else [])) == 0
        runs[flag] = out / "ERM" / "test1"
    plain, again, bf16, cl = (_weights(runs[k]) for k in ("plain", "again", "--bf16", "--channels-last"))
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # CPU runs repeat exactly...
    assert any(not torch.equal(plain[k], bf16[k]) for k in plain)  # ...so bf16 autocast changed the arithmetic
    assert _records(runs["--bf16"] / "results.jsonl")[-1]["args"]["bf16"] is True
    convs = [k for k, v in cl.items() if v.dim() == 4]
    assert convs and all(cl[k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    assert not plain[convs[1]].is_contiguous(memory_format=torch.channels_last)
    # same maths, another memory layout: the first step's loss (initial weights) agrees closely;
    # after two Adam steps (each moves a weight by about lr = 1e-3, whatever its gradient's
    # size) weights agree within the steps' reach
    first = [_records(runs[k] / "results.jsonl")[0]["loss"] for k in ("plain", "--channels-last")]
    assert first[0] == pytest.approx(first[1], rel=1e-5)
    for k in plain:
        torch.testing.assert_close(cl[k], plain[k], rtol=0, atol=4e-3)

    seen = []
    real = ERM.update

    def spy(self, minibatches, unlabeled=None):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(self, minibatches, unlabeled)

    monkeypatch.setattr(ERM, "update", spy)
    assert not torch.are_deterministic_algorithms_enabled()
    assert _train(tmp_path / "det", "--deterministic") == 0
    assert seen == [True, True]  # on during the steps, ...
    assert not torch.are_deterministic_algorithms_enabled()  # ... and switched back after the run
    det = _weights(tmp_path / "det" / "ERM" / "test1")
    assert all(torch.equal(plain[k], det[k]) for k in plain)
