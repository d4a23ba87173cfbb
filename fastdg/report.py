"""`fastdg report DIR`: every run under DIR as a markdown table (accuracy under each selection
method, time per round, peak memory, phase breakdown), and optional matplotlib plots."""
from __future__ import annotations

import glob
import json
import os


def load_runs(root):
    runs = []
    for path in sorted(glob.glob(os.path.join(root, "**", "summary.json"), recursive=True)):
        with open(path) as f:
            s = json.load(f)
        if "config" in s:  # per-run summaries (the top-level one lists runs)
            s["path"] = os.path.dirname(path)
            runs.append(s)
    return runs


def report(root, plots=False) -> str:
    runs = load_runs(root)
    if not runs:
        raise SystemExit(f"fastdg report: no finished runs (summary.json) under {root}")
    lines = ["| algorithm | test envs | steps | acc (train-domain val) | acc (oracle) | TTR (s) | "
             "step p50 (ms) | peak mem (MiB) | phases (s) |", "|---" * 9 + "|"]
    for s in runs:
        c, p, sel = s["config"], s["profile"], s["selection"]
        phases = ", ".join(f"{k} {v:.2f}" for k, v in sorted(p["phases_s"].items()))
        lines.append(f"| {c['algorithm']} | {c['test_envs']} | {p['steps']} | "
                     f"{100 * sel['training_domain']['test_acc']:.1f} | {100 * sel['test_domain_oracle']['test_acc']:.1f} | "
                     f"{p['ttr_s']:.1f} | {1e3 * p['step_time_s'].get('p50', float('nan')):.1f} | "
                     f"{p['peak_memory_bytes'] / 2**20:.0f} | {phases} |")
    if plots:
        lines.append(_plots(runs, root))
    return "\n".join(lines)


def _plots(runs, root) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "\n(plots skipped: matplotlib is not installed; pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in runs:
        recs = [json.loads(line) for line in open(os.path.join(s["path"], "results.jsonl"))]
        envs = s["config"]["test_envs"]
        ax.plot([r["step"] for r in recs], [sum(r[f"env{e}_in_acc"] for e in envs) / len(envs) for r in recs],
                label=f"{s['config']['algorithm']} test {envs}")
    ax.set_xlabel("step")
    ax.set_ylabel("test-domain accuracy")
    ax.legend(fontsize=6)
    out = os.path.join(root, "accuracy.png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return f"\nplot: {out}"
