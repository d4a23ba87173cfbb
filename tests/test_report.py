"""Model selection (DomainBed's three methods) on hand-made records with known answers, and
`fastdg report` over a directory of runs."""
import json
import os

import pytest

from fastdg import report as R

N_ENV = 3


def rec(test_envs, step, accs=None, *, lr=1e-3, trial=0, alg="ERM", dataset="Toy"):
    """One evaluation record as fastdg writes it; every accuracy not in `accs` is 0.5.
    accs keys: "0in", "2out", ..."""
    accs = accs or {}
    r = {"step": step, "epoch": step / 10, "loss": 1.0, "step_time": 0.01, "mem_gb": 0.1,
         "args": {"dataset": dataset, "algorithm": alg, "test_envs": list(test_envs), "trial_seed": trial, "seed": 0,
                  "steps": 3, "checkpoint_freq": 1, "hparams": {"lr": lr}, "data_dir": None, "device": "cpu"},
         "hparams": {"lr": lr, "batch_size": 8}}
    for i in range(N_ENV):
        for part in ("in", "out"):
            r[f"env{i}_{part}_acc"] = accs.get(f"{i}{part}", 0.5)
    return r


def config_a(lr=1e-3, pairs=True, test=(0.70, 0.72, 0.80)):
    """Held out: env 0. training-domain val best at step 2 (0.85, test 0.72); oracle: step 3
    (val 0.60, test 0.80); leave-one-out val 0.5, 0.7, 0.8: step 3 (test 0.80)."""
    single = [rec([0], 1, {"1out": .6, "2out": .6, "0in": test[0], "0out": .50}, lr=lr),
              rec([0], 2, {"1out": .9, "2out": .8, "0in": test[1], "0out": .55}, lr=lr),
              rec([0], 3, {"1out": .7, "2out": .7, "0in": test[2], "0out": .60}, lr=lr)]
    if not pairs:
        return single
    p01 = [rec([0, 1], s, {"1in": v}, lr=lr) for s, v in zip((1, 2, 3), (.5, .6, .9))]
    p02 = [rec([0, 2], s, {"2in": v}, lr=lr) for s, v in zip((1, 2, 3), (.5, .8, .7))]
    return single + p01 + p02


def config_b(lr=1e-2, drop_pair_step=None):
    """Held out: env 0. training-domain val best at step 2 (0.82 < A's 0.85); oracle: val 0.62
    (> A's 0.60), test 0.66; leave-one-out val 0.9, 0.925, 0.9: step 2 (test 0.65, beats A)."""
    single = [rec([0], 1, {"1out": .8, "2out": .8, "0in": .60, "0out": .70}, lr=lr),
              rec([0], 2, {"1out": .84, "2out": .80, "0in": .65, "0out": .65}, lr=lr),
              rec([0], 3, {"1out": .5, "2out": .5, "0in": .66, "0out": .62}, lr=lr)]
    p01 = [rec([0, 1], s, {"1in": .9}, lr=lr) for s in (1, 2, 3)]
    p02 = [rec([0, 2], s, {"2in": v}, lr=lr) for s, v in zip((1, 2, 3), (.9, .95, .9)) if s != drop_pair_step]
    return single + p01 + p02


def cell(records, method, test_env=0, alg="ERM"):
    return R.selection_results(records)[method][("Toy", alg, test_env)]


def test_each_method_on_one_configuration():
    recs = config_a()
    assert R.iid_run_acc(recs, 0) == {"val_acc": pytest.approx(.85), "test_acc": .72, "step": 2, "run": None}
    assert R.oracle_run_acc(recs, 0)["test_acc"] == .80 and R.oracle_run_acc(recs, 0)["val_acc"] == .60
    loo = R.loo_run_acc(recs, 0)
    assert loo["step"] == 3 and loo["val_acc"] == pytest.approx(.8) and loo["test_acc"] == .80


def test_sweep_picks_the_configuration_with_the_best_validation_accuracy():
    recs = config_a() + config_b()
    iid, loo, oracle = (cell(recs, m) for m in R.SELECTION_METHODS)
    assert iid["test_acc"] == .72 and iid["per_trial"][0]["step"] == 2 and iid["per_trial"][0]["configurations"] == 2
    assert loo["test_acc"] == .65 and loo["per_trial"][0]["step"] == 2
    assert loo["per_trial"][0]["val_acc"] == pytest.approx(.925)
    assert oracle["test_acc"] == .66 and oracle["per_trial"][0]["step"] == 3  # last checkpoint only


def test_leave_one_out_skips_steps_a_pair_run_lacks():
    recs = config_a() + config_b(drop_pair_step=2)
    loo = cell(recs, "leave_one_domain_out")
    # B: steps 1 and 3 remain (val 0.9 both; the first wins), still above A's 0.8
    assert loo["test_acc"] == .60 and loo["per_trial"][0]["step"] == 1


def test_leave_one_out_without_the_pair_runs_says_which_are_missing():
    recs = config_a(pairs=False) + [r for r in config_a() if r["args"]["test_envs"] == [0, 1]]
    loo = cell(recs, "leave_one_domain_out")
    assert "test_acc" not in loo and "[0, 2]" in loo["unavailable"] and "--leave-one-out" in loo["unavailable"]
    assert cell(recs, "training_domain")["test_acc"] == .72  # the other methods still answer
    # the pair run [0, 1] also belongs to environment 1's group, which has no single run
    assert "no run holds out only environment 1" in cell(recs, "training_domain", test_env=1)["unavailable"]


def test_ties_go_to_the_configuration_met_last_as_in_domainbed():
    recs = config_a(lr=1e-3, pairs=False) + config_a(lr=5e-4, pairs=False, test=(0.1, 0.2, 0.3))
    assert cell(recs, "training_domain")["test_acc"] == .2
    assert cell(recs, "test_domain_oracle")["test_acc"] == .3


def test_trial_seeds_are_averaged_with_a_standard_error():
    recs = config_a(pairs=False)
    for r in config_a(pairs=False, test=(0.6, 0.62, 0.7)):
        r["args"]["trial_seed"] = 1
        recs.append(r)
    c = cell(recs, "training_domain")
    assert c["trials"] == 2 and c["test_acc"] == pytest.approx(.67) and c["stderr"] == pytest.approx(.05 / 2 ** .5)


def test_run_selection_within_one_run():
    recs = [r for r in config_a(pairs=False)]
    sel = R.run_selection(recs, [0], [1, 2])
    assert sel["training_domain"]["step"] == 2 and sel["training_domain"]["test_acc"] == .72
    assert sel["test_domain_oracle"]["test_acc"] == .80
    assert "unavailable" in sel["leave_one_domain_out"]


def _write_runs(root, records):
    by_run = {}
    for r in records:
        name = os.path.join(r["args"]["algorithm"], "test" + "_".join(map(str, r["args"]["test_envs"])),
                            f"lr{r['hparams']['lr']}")
        by_run.setdefault(name, []).append(r)
    for name, recs in by_run.items():
        os.makedirs(root / name)
        with open(root / name / "results.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)


def test_report_over_a_directory(tmp_path):
    recs = config_a() + config_b()
    recs += [rec([0], s, {"1out": .9, "0in": .5}, alg="GroupDRO") for s in (1, 2, 3)]  # no pair runs
    _write_runs(tmp_path, recs)
    summary = {"config": {"algorithm": "ERM", "test_envs": [0], "dataset": "Toy"}, "environments": ["a", "b", "c"],
               "profile": {"steps": 3, "ttr_s": 1.5, "train_s": 1.0, "step_time_s": {"p50": 0.01},
                           "peak_memory_bytes": 2**20, "peak_memory_kind": "cpu_peak_rss",
                           "phase_tree": {"update": {"s": 0.8, "count": 3, "self_s": 0.1, "children": {
                               "forward": {"s": 0.7, "count": 3, "self_s": 0.7, "children": {}}}}}}}
    with open(tmp_path / "ERM" / "test0" / "lr0.001" / "summary.json", "w") as f:
        json.dump(summary, f)
    text = R.report(str(tmp_path), plots=False)
    sections = text.split("### ")
    iid = next(s for s in sections if s.startswith("Toy: training-domain"))
    loo = next(s for s in sections if s.startswith("Toy: leave-one-domain-out"))
    oracle = next(s for s in sections if s.startswith("Toy: test-domain"))
    assert "| algorithm | a | avg |" in iid  # environment names from the summary; columns: envs held out alone
    assert "| ERM | 72.0 |" in iid and "| ERM | 65.0 |" in loo and "| ERM | 66.0 |" in oracle
    assert "| GroupDRO | 50.0 |" in iid and "| GroupDRO | X |" in loo
    assert "not available: GroupDRO, held out a: needs the runs" in loo
    assert "update 0.80 (forward 0.70)" in text and "TTR (s)" in text
    assert not os.path.exists(tmp_path / "report.png")


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_plots(tmp_path, capsys):
    """matplotlib is in the test extra: `fastdg report` writes DIR/report.png by default,
    --no-plots does not, and the report names the file."""
    from fastdg.cli import main

    out = tmp_path / "runs"
    assert main(["train", "--algorithm", "ERM", "--test-envs", "1", "--steps", "2", "--checkpoint-freq", "1",
                 "--hparams", '{"batch_size": 8}', "--progress", "none", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--no-plots"]) == 0
    assert not os.path.exists(out / "report.png") and "plot:" not in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert f"plot: {out / 'report.png'}" in capsys.readouterr().out
    assert _png(out / "report.png") and os.path.getsize(out / "report.png") > 10_000
    os.remove(out / "report.png")
    assert "plot:" in R.report(str(out), plots=True) and _png(out / "report.png")


def test_report_on_an_empty_directory_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no runs"):
        R.report(str(tmp_path))
