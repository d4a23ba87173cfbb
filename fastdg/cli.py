"""The `fastdg` command.

    fastdg train [--dataset RotatedDigits] [--algorithm ERM GroupDRO] [--test-envs all|0 1 ..]
                 [--leave-one-out] [--steps N] [--hparams JSON] [--progress auto|bar|lines|none]
                 [--profile-trace PATH] --output-dir DIR
    fastdg report DIR [--plots | --no-plots]
    fastdg info

`fastdg train` with no other arguments runs the main job: leave-one-domain-out training of ERM
and GroupDRO on RotatedDigits (scikit-learn's bundled digits in six rotation domains, so it
needs no download), printing per-domain accuracy under DomainBed's model selection methods,
time per round, peak memory and the phase breakdown, and writing DIR/summary.json beside one
run directory per (algorithm, test environments): DIR/<algorithm>/test<e>[_<v>].

Every error that can be found before training (unknown algorithm, data set or
hyper-parameter, a bad value or type, a missing pretrained_path, a device that is not there,
a test environment that does not exist, an output directory holding another run or the
results of another invocation) stops the command before any run starts. DIR/invocation.json
records the runs an invocation trains: running the same command again resumes or re-reads
them; a different command into the same DIR is refused (its summary.json would replace
this one's). --profile-trace PATH writes one bounded torch.profiler trace per run: PATH
itself for a single run, else PATH with ".<algorithm>_test<envs>" before its extension. Progress goes to stderr (a
redrawn bar on a terminal, one line per evaluation otherwise); tables go to stdout.
--leave-one-out also trains the runs that hold out one more training domain, which DomainBed's
leave-one-domain-out cross-validation needs (N(N-1)/2 more runs for --test-envs all).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

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
    t.add_argument("--leave-one-out", action="store_true",
                   help="also train the runs holding out one more training domain (for leave-one-domain-out "
                        "cross-validation)")
    t.add_argument("--steps", type=int, default=60)
    t.add_argument("--checkpoint-freq", type=int, default=30)
    t.add_argument("--hparams", default="{}", help="JSON object of hyper-parameters")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--trial-seed", type=int, default=0)
    t.add_argument("--holdout-fraction", type=float, default=0.2)
    t.add_argument("--device", default="auto")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast")
    t.add_argument("--channels-last", action="store_true")
    t.add_argument("--compile", action="store_true", help="torch.compile the update step")
    t.add_argument("--deterministic", action="store_true")
    t.add_argument("--image-size", type=int, default=224, help="image data sets: network input side")
    t.add_argument("--num-workers", type=int, default=None, help="image data sets: loader worker processes")
    t.add_argument("--profile-trace", default=None,
                   help="write a torch.profiler (Chrome JSON) trace of a few steps of each run: this path for one "
                        "run, <stem>.<algorithm>_test<envs><ext> for several")
    t.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                   help="stderr progress: a bar on a terminal, lines otherwise (auto)")
    t.add_argument("--output-dir", default="runs/fastdg")

    r = sub.add_parser("report", help="markdown tables (and plots) of the runs under a directory")
    r.add_argument("dir")
    r.add_argument("--plots", action=argparse.BooleanOptionalAction, default=None,
                   help="write DIR/report.png (accuracy, loss and phase plots; matplotlib). Default: when "
                        "matplotlib is installed")

    sub.add_parser("info", help="which backends work here (python -m fastdg.info)")
    return p


def env_sets(envs, n_env, leave_one_out):
    """The test-environment tuples to train: each environment alone for 'all', else the given
    set; with leave_one_out also every pair {t, v} that leave-one-domain-out needs."""
    singles = [(i,) for i in range(n_env)] if envs == "all" else [tuple(envs)]
    if not leave_one_out:
        return singles
    if envs != "all" and len(envs) != 1:
        raise ValueError("--leave-one-out needs --test-envs all or a single test environment")
    pairs = []
    for (t,) in singles:
        for v in range(n_env):
            pair = tuple(sorted((t, v)))
            if v != t and pair not in pairs:
                pairs.append(pair)
    return singles + pairs


def run_dir(output_dir, cfg):
    return os.path.join(output_dir, cfg.algorithm, "test" + "_".join(map(str, cfg.test_envs)))


def trace_path(path, cfg, several):
    """The trace file of one run: `path` for a single run, else one file per run beside it."""
    if not path or not several:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{cfg.algorithm}_test{'_'.join(map(str, cfg.test_envs))}{ext or '.json'}"


INVOCATION = "invocation.json"


def invocation_key(output_dir, configs) -> dict:
    """What identifies one `fastdg train` invocation: its runs (directories and arguments)."""
    from .train import _config_key

    key = {"runs": [{"dir": os.path.relpath(run_dir(output_dir, c), output_dir), "config": _config_key(c)}
                    for c in configs]}
    return json.loads(json.dumps(key))  # tuples -> lists, as read back from the file


def check_invocation(output_dir, key) -> None:
    """Refuse an output directory written by a different invocation (its summary.json and
    run list would be replaced by this one's). Older directories without invocation.json are
    compared through the run configurations in their summary.json. Writes nothing."""
    path, summary = os.path.join(output_dir, INVOCATION), os.path.join(output_dir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    elif os.path.exists(summary):
        with open(summary) as f:
            runs = json.load(f).get("runs", [])
        old = {"runs": [{"config": r.get("config")} for r in runs]}
        key = {"runs": [{"config": r["config"]} for r in key["runs"]]}
    else:
        return
    if old == key:
        return
    o_runs, n_runs = old.get("runs", []), key["runs"]

    def names(runs):
        return [r.get("dir") or f"{r['config']['algorithm']} test {r['config']['test_envs']}" for r in runs][:6]

    why = []
    if [r.get("dir") for r in o_runs] != [r.get("dir") for r in n_runs] or len(o_runs) != len(n_runs):
        why.append(f"runs {names(o_runs)} -> {names(n_runs)}")
    fields = sorted({k for a, b in zip(o_runs, n_runs) for k in set(a["config"]) | set(b["config"])
                     if a["config"].get(k) != b["config"].get(k)})
    if fields:
        why.append(f"arguments {fields}")
    raise ValueError(f"output directory {output_dir} holds the results of another `fastdg train` invocation "
                     f"(differs in {'; '.join(why)}); choose another --output-dir or delete it")


def cmd_train(args) -> int:
    from . import data as fdata
    from .report import load_records, runs_table, selection_results, selection_tables
    from .train import RunConfig, Trainer, check_config, check_run_dir

    try:
        hparams = json.loads(args.hparams)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"fastdg: --hparams is not valid JSON: {exc}") from None
    if not isinstance(hparams, dict):
        raise SystemExit("fastdg: --hparams must be a JSON object")
    envs = _parse_envs(args.test_envs)
    try:
        if os.path.exists(os.path.join(args.output_dir, "run.json")):
            raise ValueError(f"output directory {args.output_dir} holds a single run (run.json); "
                             "choose another --output-dir")
        for alg in args.algorithm:  # names and hyper-parameters before loading any data
            check_config(RunConfig(dataset=args.dataset, algorithm=alg, hparams=hparams, steps=args.steps,
                                   checkpoint_freq=args.checkpoint_freq, holdout_fraction=args.holdout_fraction,
                                   image_size=args.image_size, num_workers=args.num_workers, device=args.device))
        dataset = fdata.get_dataset(args.dataset, args.data_dir, seed=args.seed)
        sets = env_sets(envs, len(dataset.environments), args.leave_one_out)
        configs = []
        for alg in args.algorithm:
            for env_set in sets:
                cfg = RunConfig(dataset=args.dataset, algorithm=alg, test_envs=env_set, data_dir=args.data_dir,
                                steps=args.steps, hparams=hparams, seed=args.seed, trial_seed=args.trial_seed,
                                holdout_fraction=args.holdout_fraction, checkpoint_freq=args.checkpoint_freq,
                                device=args.device, bf16=args.bf16, channels_last=args.channels_last,
                                compile=args.compile, deterministic=args.deterministic,
                                profile_trace=args.profile_trace, image_size=args.image_size,
                                num_workers=args.num_workers)
                configs.append(cfg)
        configs = [replace(c, profile_trace=trace_path(args.profile_trace, c, len(configs) > 1)) for c in configs]
        for cfg in configs:
            check_config(cfg, dataset)  # every error before any work
            check_run_dir(run_dir(args.output_dir, cfg), cfg)
        key = invocation_key(args.output_dir, configs)
        check_invocation(args.output_dir, key)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, INVOCATION), "w") as f:
            json.dump(key, f, indent=1)
    except (ValueError, TypeError, OSError) as exc:  # bad names, values, types, paths: a message, no traceback
        raise SystemExit(f"fastdg: {exc}") from None

    print(f"fastdg train: {args.dataset} ({len(dataset.environments)} environments: "
          f"{', '.join(dataset.environments)}), algorithms {args.algorithm}, {len(configs)} run(s) of "
          f"{args.steps} steps", file=sys.stderr)
    summaries, records = [], []
    for k, cfg in enumerate(configs):
        d = run_dir(args.output_dir, cfg)
        print(f"run {k + 1}/{len(configs)}: {d}", file=sys.stderr)
        try:
            trainer = Trainer(cfg, d, dataset=dataset, progress=args.progress)
        except (ValueError, TypeError, OSError) as exc:
            raise SystemExit(f"fastdg: {exc}") from None
        s = trainer.run()
        s["path"] = d
        summaries.append(s)
        records += load_records(d)
    print(selection_tables(records, summaries))
    print(runs_table(summaries))
    selection = {m: [{"dataset": ds, "algorithm": a, "test_env": t, **cell} for (ds, a, t), cell in cells.items()]
                 for m, cells in selection_results(records).items()}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump({"dataset": args.dataset, "environments": list(dataset.environments), "selection": selection,
                   "runs": summaries}, f, indent=1)
    print(f"results: {os.path.join(args.output_dir, 'summary.json')}", file=sys.stderr)
    return 0


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
