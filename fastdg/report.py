"""Model selection (DomainBed's three methods) and `fastdg report DIR`: every run under DIR as
markdown tables (accuracy under each selection method, time per round, peak memory, phase
breakdown) and, when matplotlib is installed (or --plots), DIR/report.png: test-domain accuracy
and training loss per step, and the phase breakdown per run.

Model selection follows DomainBed's domainbed/model_selection.py and collect_results.py,
applied to the records fastdg writes (results.jsonl: one line per evaluation, DomainBed's
field names: step, epoch, env{i}_in_acc, env{i}_out_acc, args, hparams, ...):

- Records are grouped by (trial_seed, dataset, algorithm, test environment) as DomainBed's
  get_grouped_records does: a run holding out two environments {t, v} belongs to the groups of
  t and of v.
- Inside a group, a "hyper-parameter configuration" (DomainBed: one args.hparams_seed) is, in
  fastdg, one value of the resolved hparams plus every run argument that is not a group key or
  a machine setting (seed, steps, checkpoint_freq, holdout_fraction, bf16, ...): `config_key`.
- run_acc, per configuration (a run's records, or for leave-one-domain-out the records of the
  runs of that configuration):
  * training_domain (IIDAccuracySelectionMethod): among the records of the run holding out
    only t, the checkpoint with the highest mean env{i}_out_acc over every i != t; its
    env{t}_in_acc is the test accuracy.
  * leave_one_domain_out (LeaveOneOutSelectionMethod): at each step, the run holding out only t
    gives the test accuracy env{t}_in_acc, and for every other environment v the run holding
    out {t, v} gives env{v}_in_acc (v was never trained on, so its whole "in" split validates);
    the validation accuracy is their mean over the n_envs - 1 environments v. A step lacking
    the single run or any pair run does not count; the best step wins. Without the pair runs
    the method has no answer, and the report says which runs are missing.
  * test_domain_oracle (OracleSelectionMethod): the LAST checkpoint of the run holding out only
    t (no early stopping); validation accuracy env{t}_out_acc, test accuracy env{t}_in_acc.
- sweep_acc: the configuration with the best validation accuracy gives the group's test
  accuracy (DomainBed sorts by val_acc and reverses, so among equal val_acc the configuration
  met last wins; so here). With one configuration the oracle is simply the last checkpoint.
- A table cell is the mean over trial seeds of sweep_acc (with the standard error when there
  are several), as collect_results prints it.

fastdg's `step` counts the updates done (DomainBed writes the 0-based index of the last
update and evaluates after the first update too); the methods only compare steps with each
other, so this changes no choice.
"""
from __future__ import annotations

import glob
import json
import math
import os
from collections import OrderedDict

SELECTION_METHODS = OrderedDict([
    ("training_domain", "training-domain validation set"),
    ("leave_one_domain_out", "leave-one-domain-out cross-validation"),
    ("test_domain_oracle", "test-domain validation set (oracle)"),
])

# Run arguments that identify a group (DomainBed's grouping keys) or only say where/how a run
# executed; everything else in `args` (plus the resolved hparams) defines a configuration.
_NOT_CONFIG = {"test_envs", "trial_seed", "dataset", "algorithm", "data_dir", "device", "num_workers",
               "profile_trace"}


class SelectionUnavailable(Exception):
    """A selection method has no answer for a group; str(exc) says which runs are missing."""


# ----------------------------------------------------------------------------- loading

def load_records(root) -> list:
    """Every record of every results.jsonl under `root` (recursively), in path then line order;
    each gets "_run" (its directory, relative to root)."""
    records = []
    for path in sorted(glob.glob(os.path.join(root, "**", "results.jsonl"), recursive=True)):
        run = os.path.relpath(os.path.dirname(path), root)
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    r["_run"] = run
                    records.append(r)
    return records


def load_runs(root) -> list:
    """The per-run summary.json files under `root` (the top-level one, which lists runs, is
    skipped), each with "path"."""
    runs = []
    for path in sorted(glob.glob(os.path.join(root, "**", "summary.json"), recursive=True)):
        with open(path) as f:
            s = json.load(f)
        if "config" in s:
            s["path"] = os.path.dirname(path)
            runs.append(s)
    return runs


# ----------------------------------------------------------------------------- selection

def config_key(record) -> str:
    args = {k: v for k, v in record["args"].items() if k not in _NOT_CONFIG}
    return json.dumps({"args": args, "hparams": record.get("hparams", {})}, sort_keys=True, default=str)


def num_envs(record) -> int:
    n = 0
    while f"env{n}_out_acc" in record:
        n += 1
    return n


def _single(records, test_env):
    return [r for r in records if list(r["args"]["test_envs"]) == [test_env]]


def _by_step(records):
    return sorted(records, key=lambda r: r["step"])


def _argmax(items):
    best = None
    for it in items:  # first maximum, as Python's max (DomainBed's Q.argmax)
        if best is None or it["val_acc"] > best["val_acc"]:
            best = it
    return best


def iid_run_acc(records, test_env) -> dict:
    """training_domain for one configuration's records (see the module docstring)."""
    recs = _by_step(_single(records, test_env))
    if not recs:
        raise SelectionUnavailable(f"no run holds out only environment {test_env}")
    steps = []
    for r in recs:
        vals = [r[f"env{i}_out_acc"] for i in range(num_envs(r)) if i != test_env]
        steps.append({"val_acc": sum(vals) / len(vals), "test_acc": r[f"env{test_env}_in_acc"], "step": r["step"],
                      "run": r.get("_run")})
    return _argmax(steps)


def oracle_run_acc(records, test_env) -> dict:
    """test_domain_oracle for one configuration's records: the last checkpoint."""
    recs = _by_step(_single(records, test_env))
    if not recs:
        raise SelectionUnavailable(f"no run holds out only environment {test_env}")
    last = recs[-1]
    return {"val_acc": last[f"env{test_env}_out_acc"], "test_acc": last[f"env{test_env}_in_acc"],
            "step": last["step"], "run": last.get("_run")}


def loo_run_acc(records, test_env) -> dict:
    """leave_one_domain_out for one configuration's records (the run holding out test_env and
    the runs holding out {test_env, v})."""
    singles = _single(records, test_env)
    if not singles:
        raise SelectionUnavailable(f"no run holds out only environment {test_env}")
    n = num_envs(singles[0])
    need = [v for v in range(n) if v != test_env]
    have = {v for r in records if len(r["args"]["test_envs"]) == 2
            for v in set(r["args"]["test_envs"]) - {test_env}}
    missing = [v for v in need if v not in have]
    if missing:
        raise SelectionUnavailable(
            "needs the runs that hold out one more training domain, test_envs "
            + ", ".join(str(sorted([test_env, v])) for v in missing) + " (fastdg train --leave-one-out)")
    steps = {}
    for r in records:
        steps.setdefault(r["step"], []).append(r)
    out = []
    for step in sorted(steps):
        recs = steps[step]
        single = _single(recs, test_env)
        if len(single) != 1:
            continue
        val = {}
        for r in recs:
            if len(r["args"]["test_envs"]) == 2:
                v = (set(r["args"]["test_envs"]) - {test_env}).pop()
                val[v] = r[f"env{v}_in_acc"]
        if any(v not in val for v in need):
            continue
        out.append({"val_acc": sum(val[v] for v in need) / (n - 1), "test_acc": single[0][f"env{test_env}_in_acc"],
                    "step": step, "run": single[0].get("_run")})
    if not out:
        raise SelectionUnavailable("the single and pair runs share no evaluation step (different steps or "
                                   "checkpoint_freq?)")
    return _argmax(out)


RUN_ACC = {"training_domain": iid_run_acc, "leave_one_domain_out": loo_run_acc,
           "test_domain_oracle": oracle_run_acc}


def sweep_acc(method, records, test_env) -> dict:
    """The best configuration's run_acc (DomainBed's sweep_acc) over the records of one
    (trial_seed, dataset, algorithm, test_env) group, with "configurations" (how many gave an
    answer). Raises SelectionUnavailable (with the reason of the last configuration) if none."""
    configs = OrderedDict()
    for r in records:
        configs.setdefault(config_key(r), []).append(r)
    best, why, n = None, None, 0
    for recs in configs.values():
        try:
            acc = RUN_ACC[method](recs, test_env)
        except SelectionUnavailable as exc:
            why = exc
            continue
        n += 1
        if best is None or acc["val_acc"] >= best["val_acc"]:  # ties: the later one, as DomainBed's sort
            best = acc
    if best is None:
        raise why
    return {**best, "configurations": n}


def group_records(records) -> OrderedDict:
    """(trial_seed, dataset, algorithm, test_env) -> records; a record with several test
    environments is in the group of each."""
    groups = OrderedDict()
    for r in records:
        a = r["args"]
        for t in a["test_envs"]:
            groups.setdefault((a.get("trial_seed", 0), a["dataset"], a["algorithm"], t), []).append(r)
    return groups


def selection_results(records) -> dict:
    """{method: {(dataset, algorithm, test_env): cell}} where a cell is {"test_acc": mean over
    trial seeds, "stderr", "trials", "per_trial": [sweep_acc dicts]} or {"unavailable": reason}."""
    groups = group_records(records)
    out = {}
    for method in SELECTION_METHODS:
        cells = OrderedDict()
        for (trial, dataset, alg, t), recs in groups.items():
            cell = cells.setdefault((dataset, alg, t), {"per_trial": [], "reasons": []})
            try:
                cell["per_trial"].append({**sweep_acc(method, recs, t), "trial_seed": trial})
            except SelectionUnavailable as exc:
                cell["reasons"].append(str(exc))
        for cell in cells.values():
            accs = [p["test_acc"] for p in cell["per_trial"]]
            if accs:
                m = sum(accs) / len(accs)
                sd = math.sqrt(sum((a - m) ** 2 for a in accs) / len(accs))
                cell.update(test_acc=m, stderr=sd / math.sqrt(len(accs)), trials=len(accs))
            else:
                cell["unavailable"] = cell["reasons"][0] if cell["reasons"] else "no records"
        out[method] = cells
    return out


def run_selection(records, test_envs, train_envs) -> dict:
    """Selection within one run (its summary.json): training_domain and test_domain_oracle as
    DomainBed's run_acc for a single held-out environment; with several held-out environments
    the test accuracy is their mean and the validation of the oracle the mean of their "out"
    accuracies (a fastdg extension: DomainBed uses such runs only for leave-one-domain-out).
    leave_one_domain_out needs other runs: see `fastdg report`."""
    if not records:
        return {}
    test_envs, train_envs = list(test_envs), list(train_envs)
    recs = _by_step(records)

    def mean(r, keys):
        return sum(r[k] for k in keys) / len(keys)

    test_keys = [f"env{e}_in_acc" for e in test_envs]
    steps = [{"val_acc": mean(r, [f"env{e}_out_acc" for e in train_envs]), "test_acc": mean(r, test_keys),
              "step": r["step"]} for r in recs]
    last = recs[-1]
    return {
        "training_domain": _argmax(steps),
        "test_domain_oracle": {"val_acc": mean(last, [f"env{e}_out_acc" for e in test_envs]),
                               "test_acc": mean(last, test_keys), "step": last["step"]},
        "leave_one_domain_out": {"unavailable": "needs the runs holding out one more training domain; "
                                                "`fastdg report` selects over all runs of a directory"},
    }


# ----------------------------------------------------------------------------- markdown

def _env_names(runs, dataset, n):
    for s in runs:
        if s["config"]["dataset"] == dataset and s.get("environments"):
            return list(s["environments"])
    return [f"env{i}" for i in range(n)]


def selection_tables(records, runs=()) -> str:
    """One markdown table per (selection method, data set): algorithms x held-out environment,
    test accuracy (%) and the average; unavailable cells are "X" with the reason below."""
    if not records:
        return "(no evaluation records)"
    results = selection_results(records)
    datasets = list(OrderedDict.fromkeys(r["args"]["dataset"] for r in records))
    lines = []
    for method, title in SELECTION_METHODS.items():
        cells = results[method]
        for ds in datasets:
            n = max(num_envs(r) for r in records if r["args"]["dataset"] == ds)
            # columns: the environments some run held out alone (pair runs, made for
            # leave-one-domain-out, add groups for their second environment that nobody asked for)
            envs = sorted({r["args"]["test_envs"][0] for r in records
                           if r["args"]["dataset"] == ds and len(r["args"]["test_envs"]) == 1}) \
                or sorted({t for (d, _, t) in cells if d == ds})
            names = _env_names(runs, ds, n)
            algs = list(OrderedDict.fromkeys(a for (d, a, _) in cells if d == ds))
            lines += [f"### {ds}: {title}", "",
                      "| algorithm | " + " | ".join(names[t] for t in envs) + " | avg |",
                      "|---" * (len(envs) + 2) + "|"]
            notes = []
            for alg in algs:
                row, vals = [], []
                for t in envs:
                    c = cells.get((ds, alg, t))
                    if c is None or "unavailable" in c:
                        row.append("X")
                        if c is not None:
                            notes.append(f"{alg}, held out {names[t]}: {c['unavailable']}")
                        continue
                    vals.append(c["test_acc"])
                    pm = f" ± {100 * c['stderr']:.1f}" if c["trials"] > 1 else ""
                    row.append(f"{100 * c['test_acc']:.1f}{pm}")
                avg = f"{100 * sum(vals) / len(vals):.1f}" if vals and len(vals) == len(envs) else "X"
                lines.append(f"| {alg} | " + " | ".join(row) + f" | {avg} |")
            configs = sorted({p["configurations"] for (d, _, t), c in cells.items() if d == ds and t in envs
                              for p in c["per_trial"]})
            lines.append("\navg: mean over the held-out environments shown (X if one is missing)")
            if configs:
                lines.append(f"hyper-parameter configurations per cell: {', '.join(map(str, configs))}"
                             + (" (no sweep: a single configuration, so the oracle is its last checkpoint)"
                                if configs == [1] else ""))
            for note in notes:
                lines.append(f"- not available: {note}")
            lines.append("")
    return "\n".join(lines)


def _phases_text(p) -> str:
    tree = p.get("phase_tree")
    if not tree:  # summaries from before phase trees: flat totals
        return ", ".join(f"{k} {v:.2f}" for k, v in p.get("phases_s", {}).items())

    def fmt(node):
        parts = []
        for name, e in node.items():
            inner = f" ({fmt(e['children'])})" if e["children"] else ""
            parts.append(f"{name} {e['s']:.2f}{inner}")
        return ", ".join(parts)

    return fmt(tree)


def runs_table(runs) -> str:
    lines = ["| algorithm | test envs | steps | TTR (s) | train (s) | step p50 (ms) | peak mem (MiB) | "
             "phases (s; nested: inside the parent) |", "|---" * 8 + "|"]
    for s in runs:
        c, p = s["config"], s["profile"]
        lines.append(f"| {c['algorithm']} | {c['test_envs']} | {p['steps']} | {p['ttr_s']:.1f} | "
                     f"{p.get('train_s', float('nan')):.1f} | {1e3 * p['step_time_s'].get('p50', float('nan')):.1f} | "
                     f"{p['peak_memory_bytes'] / 2**20:.0f} | {_phases_text(p)} |")
    kinds = sorted({s["profile"].get("peak_memory_kind", "") for s in runs})
    lines.append(f"\nTTR: wall time of the round (steps, evaluations, checkpoints); train: the steps alone; "
                 f"memory: {'; '.join(kinds)}")
    return "\n".join(lines)


def _have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def report(root, plots=None) -> str:
    """Markdown tables of every run under `root`; plots: True writes root/report.png (a note
    when matplotlib is missing), False never, None (default) when matplotlib is installed."""
    if plots is None:
        plots = _have_matplotlib()
    runs = load_runs(root)
    records = load_records(root)
    if not runs and not records:
        raise SystemExit(f"fastdg report: no runs (results.jsonl or summary.json) under {root}")
    out = ["## Test accuracy (%) by model selection method (DomainBed's definitions)", "",
           selection_tables(records, runs), "## Runs: time of a training round, peak memory, phases", ""]
    out.append(runs_table(runs) if runs else "(no finished runs: summary.json is written at the end of a run)")
    if plots:
        out.append(_plots(runs, root))
    return "\n".join(out)


def _plots(runs, root) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "\n(plots skipped: matplotlib is not installed; pip install matplotlib)"
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    for s in runs:
        path = os.path.join(s["path"], "results.jsonl")
        if not os.path.exists(path):
            continue
        recs = [json.loads(line) for line in open(path) if line.strip()]
        envs = s["config"]["test_envs"]
        label = f"{s['config']['algorithm']} test {envs}"
        steps = [r["step"] for r in recs]
        ax.plot(steps, [sum(r[f"env{e}_in_acc"] for e in envs) / len(envs) for r in recs], label=label)
        if recs and "loss" in recs[0]:
            ax2.plot(steps, [r["loss"] for r in recs], label=label)
    ax.set(xlabel="step", ylabel="test-domain accuracy")
    ax2.set(xlabel="step", ylabel="training loss (mean over the checkpoint window)")
    ax.legend(fontsize=6)
    # phase breakdown: top-level phases stacked per run
    names = sorted({k for s in runs for k in s["profile"].get("phase_tree", {})})
    bottom = [0.0] * len(runs)
    for name in names:
        vals = [s["profile"].get("phase_tree", {}).get(name, {}).get("s", 0.0) for s in runs]
        ax3.bar(range(len(runs)), vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax3.set_xticks(range(len(runs)), [f"{s['config']['algorithm']}\n{s['config']['test_envs']}" for s in runs],
                   fontsize=6)
    ax3.set(ylabel="seconds per round")
    ax3.legend(fontsize=6)
    out = os.path.join(root, "report.png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"\nplot: {out}"
