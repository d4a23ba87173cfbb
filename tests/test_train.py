"""The trainer and the `fastdg` command on RotatedDigits (sklearn's bundled digits)."""
import json
import os

import pytest
import torch

from fastdg.algorithms import ALGORITHMS
from fastdg.cli import main
from fastdg.train import RunConfig, Trainer


@pytest.fixture(scope="module")
def digits():
    from fastdg.data import get_dataset

    return get_dataset("RotatedDigits")


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.alg.state_dict().items()}


QUICK = {"batch_size": 8, "seed_t0": 4}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_trains_and_reports(name, digits, tmp_path):
    hp = {k: v for k, v in QUICK.items() if k != "seed_t0" or name == "SeedCategories"}
    cfg = RunConfig(algorithm=name, test_envs=(1,), steps=6, checkpoint_freq=3, hparams=hp)
    summary = Trainer(cfg, str(tmp_path / name), dataset=digits).run()
    recs = [json.loads(line) for line in open(tmp_path / name / "results.jsonl")]
    assert [r["step"] for r in recs] == [3, 6]
    for key in ("env0_in_acc", "env1_out_acc", "env5_in_acc", "loss", "step_time", "mem_gb", "epoch"):
        assert key in recs[-1], key
    assert all(0.0 <= recs[-1][f"env{i}_in_acc"] <= 1.0 for i in range(6))
    prof = summary["profile"]
    assert prof["steps"] == 6 and prof["ttr_s"] > 0 and prof["peak_memory_bytes"] > 0
    assert set(prof["step_time_s"]) >= {"p50", "p90", "p99"}
    assert "update" in prof["phases_s"] and "data" in prof["phases_s"]
    if name == "SeedCategories":
        assert "categories" in prof["phases_s"]
    assert summary["selection"]["training_domain"]["step"] in (3, 6)


@pytest.mark.parametrize("name", ["GroupDRO", "SeedCategories", "MLDG"])
def test_killed_run_resumes_to_the_same_weights(name, digits, tmp_path, monkeypatch):
    cfg = RunConfig(algorithm=name, test_envs=(0,), steps=8, checkpoint_freq=4, hparams=QUICK if name ==
                    "SeedCategories" else {"batch_size": 8})
    straight = Trainer(cfg, str(tmp_path / "a"), dataset=digits)
    straight.run()

    victim = Trainer(cfg, str(tmp_path / "b"), dataset=digits)
    calls = {"n": 0}
    real = type(victim.alg).update_categories if name == "SeedCategories" else type(victim.alg).update

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # after the checkpoint at step 4
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(victim.alg), "update_categories" if name == "SeedCategories" else "update", dying)
    with pytest.raises(KeyboardInterrupt):
        victim.run()
    monkeypatch.undo()
    resumed = Trainer(cfg, str(tmp_path / "b"), dataset=digits)
    assert resumed.start_step == 4
    resumed.run()
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    recs = [json.loads(line)["step"] for line in open(tmp_path / "b" / "results.jsonl")]
    assert recs == [4, 8]


def test_refuses_another_runs_directory_and_bad_envs(digits, tmp_path):
    Trainer(RunConfig(steps=2, checkpoint_freq=2, test_envs=(0,)), str(tmp_path), dataset=digits).run()
    with pytest.raises(ValueError, match="holds another run"):
        Trainer(RunConfig(steps=3, checkpoint_freq=3, test_envs=(0,)), str(tmp_path), dataset=digits)
    with pytest.raises(ValueError, match=r"test environment\(s\) \[7\] do not exist"):
        Trainer(RunConfig(test_envs=(7,)), str(tmp_path / "x"), dataset=digits)
    assert not os.path.exists(tmp_path / "x")  # nothing written before the error


def test_cli_train_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["train", "--algorithm", "ERM", "GroupDRO", "--test-envs", "2", "--steps", "4",
                 "--checkpoint-freq", "2", "--hparams", '{"batch_size": 8}', "--output-dir", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| ERM |" in table and "| GroupDRO |" in table and "peak mem" in table
    summary = json.load(open(out / "summary.json"))
    assert len(summary["runs"]) == 2
    assert main(["report", str(out)]) == 0
    assert "| GroupDRO | [2] | 4 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--algorithm", "Nope"], "unknown algorithm"),
    (["train", "--dataset", "NoSuchSet"], "NoSuchSet"),
    (["train", "--hparams", '{"lrr": 1}'], "unknown hyper-parameter"),
    (["train", "--hparams", "{bad json"], "not valid JSON"),
    (["train", "--test-envs", "9"], "do not exist"),
])
def test_cli_bad_input_fails_before_work(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(argv + ["--output-dir", str(tmp_path / "o")])
    assert not os.path.exists(tmp_path / "o")
