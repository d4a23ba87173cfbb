"""The `fastdg` command.

    fastdg train [--dataset RotatedDigits] [--algorithm ERM GroupDRO] [--test-envs all|0 1 ..]
                 [--steps N] [--hparams JSON] --output-dir DIR
    fastdg report DIR
    fastdg info

`fastdg train` with no other arguments runs the main job: leave-one-domain-out training of ERM
and GroupDRO on RotatedDigits (scikit-learn's bundled digits in six rotation domains, so it
needs no download), printing per-domain accuracy, time per round and peak memory, and writing
DIR/summary.json beside one run directory per (algorithm, test environment).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__


def _parse_envs(values):
    if values == ["all"]:
        return "all"
    try:
        return [int(v) for v in values]
    except ValueError:
        raise SystemExit(f"fastdg: --test-envs takes 'all' or environment indices, got {values}") from None


def build_parser():
    p = argparse.ArgumentParser(prog="fastdg", description="fast domain-generalization training")
    p.add_argument("--version", action="version", version=f"fastdg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train and evaluate (leave-one-domain-out by default)")
    t.add_argument("--dataset", default="RotatedDigits")
    t.add_argument("--data-dir", default=None, help="data root (default: $FASTDG_DATA or ../shared/data)")
    t.add_argument("--algorithm", nargs="+", default=["ERM", "GroupDRO"])
    t.add_argument("--test-envs", nargs="+", default=["all"],
                   help="'all' (each environment in turn) or the indices held out together")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--checkpoint-freq", type=int, default=50)
    t.add_argument("--hparams", default="{}", help="JSON object of hyper-parameters")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--trial-seed", type=int, default=0)
    t.add_argument("--holdout-fraction", type=float, default=0.2)
    t.add_argument("--device", default="auto")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast")
    t.add_argument("--channels-last", action="store_true")
    t.add_argument("--compile", action="store_true", help="torch.compile the update step")
    t.add_argument("--deterministic", action="store_true")
    t.add_argument("--profile-trace", default=None, help="write a torch.profiler trace to this path")
    t.add_argument("--output-dir", default="runs/fastdg")

    r = sub.add_parser("report", help="markdown table (and plots) of the runs under a directory")
    r.add_argument("dir")
    r.add_argument("--plots", action="store_true", help="also write accuracy and loss plots (matplotlib)")

    sub.add_parser("info", help="which backends work here (python -m fastdg.info)")
    return p


def cmd_train(args) -> int:
    from . import data as fdata
    from .train import RunConfig, Trainer, check_config

    try:
        hparams = json.loads(args.hparams)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"fastdg: --hparams is not valid JSON: {exc}") from None
    if not isinstance(hparams, dict):
        raise SystemExit("fastdg: --hparams must be a JSON object")
    envs = _parse_envs(args.test_envs)
    try:
        dataset = fdata.get_dataset(args.dataset, args.data_dir, seed=args.seed)
        env_sets = [(i,) for i in range(len(dataset.environments))] if envs == "all" else [tuple(envs)]
        configs = []
        for alg in args.algorithm:
            for env_set in env_sets:
                cfg = RunConfig(dataset=args.dataset, algorithm=alg, test_envs=env_set, data_dir=args.data_dir,
                                steps=args.steps, hparams=hparams, seed=args.seed, trial_seed=args.trial_seed,
                                holdout_fraction=args.holdout_fraction, checkpoint_freq=args.checkpoint_freq,
                                device=args.device, bf16=args.bf16, channels_last=args.channels_last,
                                compile=args.compile, deterministic=args.deterministic,
                                profile_trace=args.profile_trace)
                check_config(cfg, dataset)  # every error before any work
                configs.append(cfg)
    except ValueError as exc:
        raise SystemExit(f"fastdg: {exc}") from None

    print(f"fastdg train: {args.dataset} ({len(dataset.environments)} environments: "
          f"{', '.join(dataset.environments)}), algorithms {args.algorithm}, {args.steps} steps", file=sys.stderr)
    summaries = []
    for cfg in configs:
        run_dir = os.path.join(args.output_dir, cfg.algorithm, "test" + "_".join(map(str, cfg.test_envs)))
        try:
            trainer = Trainer(cfg, run_dir, dataset=dataset)
        except ValueError as exc:
            raise SystemExit(f"fastdg: {exc}") from None
        summaries.append(trainer.run())
    table = results_table(summaries, dataset.environments)
    print(table)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump({"dataset": args.dataset, "runs": summaries}, f, indent=1)
    print(f"results: {os.path.join(args.output_dir, 'summary.json')}", file=sys.stderr)
    return 0


def results_table(summaries, env_names) -> str:
    """Markdown: per algorithm, the test accuracy of each held-out domain (training-domain
    validation selection), their mean, time per round and peak memory."""
    by_alg = {}
    for s in summaries:
        by_alg.setdefault(s["config"]["algorithm"], []).append(s)
    singles = all(len(s["config"]["test_envs"]) == 1 for s in summaries)
    cols = list(env_names) if singles else sorted({str(s["config"]["test_envs"]) for s in summaries})
    lines = ["| algorithm | " + " | ".join(cols) + " | avg | TTR (s) | peak mem (MiB) |",
             "|---" * (len(cols) + 4) + "|"]
    for alg, runs in by_alg.items():
        accs = {}
        for s in runs:
            key = env_names[s["config"]["test_envs"][0]] if singles else str(s["config"]["test_envs"])
            accs[key] = 100 * s["selection"]["training_domain"]["test_acc"]
        row = [f"{accs[c]:.1f}" if c in accs else "-" for c in cols]
        avg = sum(accs.values()) / len(accs)
        ttr = sum(s["profile"]["ttr_s"] for s in runs) / len(runs)
        mem = max(s["profile"]["peak_memory_bytes"] for s in runs) / 2**20
        lines.append(f"| {alg} | " + " | ".join(row) + f" | {avg:.1f} | {ttr:.1f} | {mem:.0f} |")
    kind = summaries[0]["profile"]["peak_memory_kind"] if summaries else ""
    lines.append(f"\ntest accuracy (%) of each held-out domain, training-domain validation; TTR = time per "
                 f"run of {summaries[0]['profile']['steps'] if summaries else 0} steps (mean); memory: {kind}")
    return "\n".join(lines)


def cmd_report(args) -> int:
    from .report import report

    print(report(args.dir, plots=args.plots))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "report":
        return cmd_report(args)
    from .info import main as info_main

    return info_main([])


if __name__ == "__main__":
    sys.exit(main())
