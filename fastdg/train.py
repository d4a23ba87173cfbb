"""The trainer: one DomainBed-style run (an algorithm, a data set, test environments), with
evaluation, model selection, profiling and checkpoint/resume of the whole state.

A run directory holds run.json (its arguments), results.jsonl (one line per evaluation, with
DomainBed's field names), checkpoint.pt (the latest state) and, when finished, summary.json.
A killed run started again with the same arguments resumes from checkpoint.pt and reaches the
same final weights as an uninterrupted run (sampling generators and RNG states are saved).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import algorithms as algs
from .profile import RoundProfiler, torch_trace

SELECTION_METHODS = ("training_domain", "test_domain_oracle")


@dataclass
class RunConfig:
    dataset: str = "RotatedDigits"
    algorithm: str = "ERM"
    test_envs: tuple = (0,)
    data_dir: str | None = None
    steps: int = 100
    hparams: dict = field(default_factory=dict)
    seed: int = 0
    trial_seed: int = 0
    holdout_fraction: float = 0.2
    checkpoint_freq: int = 50
    device: str = "auto"
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    profile_trace: str | None = None

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def check_config(cfg: RunConfig, dataset=None):
    """Every error that can be found before any work: unknown names, bad environments."""
    cls = algs.get_algorithm(cfg.algorithm)
    algs.base.resolve_hparams(cls, cfg.hparams)
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.checkpoint_freq < 1:
        raise ValueError(f"checkpoint_freq must be >= 1, got {cfg.checkpoint_freq}")
    if not 0.0 < cfg.holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {cfg.holdout_fraction}")
    if dataset is not None:
        n = len(dataset.environments)
        bad = [e for e in cfg.test_envs if not 0 <= e < n]
        if bad:
            raise ValueError(f"test environment(s) {bad} do not exist: {dataset.name} has {n} "
                             f"environments {list(dataset.environments)} (0..{n - 1})")
        if len(set(cfg.test_envs)) >= n:
            raise ValueError("at least one environment must remain for training")


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _config_key(cfg: RunConfig) -> dict:
    d = asdict(cfg)
    d["test_envs"] = list(cfg.test_envs)
    d.pop("profile_trace")
    return d


def prepare_run_dir(out_dir: str, cfg: RunConfig) -> bool:
    """Create the run directory, or accept it when it holds this very run (resume).
    Returns True when a checkpoint to resume from exists. Refuses a directory holding
    another run, before any work."""
    os.makedirs(out_dir, exist_ok=True)
    meta = os.path.join(out_dir, "run.json")
    key = _config_key(cfg)
    if os.path.exists(meta):
        with open(meta) as f:
            old = json.load(f)
        if old != key:
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            raise ValueError(f"output directory {out_dir} holds another run (differs in {diff}); "
                             "choose another --output-dir or delete it")
        return os.path.exists(os.path.join(out_dir, "checkpoint.pt"))
    others = [n for n in os.listdir(out_dir) if n not in ("run.json",)]
    if others:
        raise ValueError(f"output directory {out_dir} is not empty and holds no fastdg run: {others[:5]}")
    with open(meta, "w") as f:
        json.dump(key, f, indent=1)
    return False


@torch.no_grad()
def accuracy(alg, loader, autocast) -> torch.Tensor:
    """Accuracy over every sample of an evaluation loader, as a device tensor (no sync)."""
    correct, total = None, 0
    for x, y in loader:
        with autocast():
            logits = alg.predict(x)
        c = (logits.argmax(1) == y).sum()
        correct = c if correct is None else correct + c
        total += len(y)
    return correct.double() / max(total, 1)


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: str, dataset=None, log=sys.stderr):
        from . import data as fdata

        self.cfg, self.out_dir, self.log = cfg, out_dir, log
        check_config(cfg)
        self.device = cfg.resolved_device()
        self.dataset = dataset if dataset is not None else fdata.get_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
        check_config(cfg, self.dataset)
        self.resume = prepare_run_dir(out_dir, cfg)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        _seed_everything(cfg.seed)
        ds = self.dataset
        n_env = len(ds.environments)
        self.train_envs = [i for i in range(n_env) if i not in cfg.test_envs]
        self.splits = [fdata.split_holdout(len(ds[i]), cfg.holdout_fraction, seed=(cfg.trial_seed, i))
                       for i in range(n_env)]
        cls = algs.get_algorithm(cfg.algorithm)
        self.alg = cls(ds.input_shape, ds.num_classes, len(self.train_envs), cfg.hparams).to(self.device)
        if cfg.channels_last:
            self.alg = self.alg.to(memory_format=torch.channels_last)
        self.batch_size = self.alg.hparams["batch_size"]
        self.streams = fdata.DomainStreams(ds, self.train_envs, self.batch_size, self.device, seed=cfg.seed,
                                           subsets=[self.splits[i][0] for i in self.train_envs])
        self.by_category = getattr(self.alg, "samples_by_category", False)
        if self.by_category:
            self._build_pool()
        self.sample_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 7)
        self.records, self.start_step = [], 0
        if self.resume:
            self._load_checkpoint()

    # ---- seed-category pool (tensor data sets) ----
    def _build_pool(self):
        ds = self.dataset
        if ds.is_image:
            raise ValueError(f"{self.cfg.algorithm} samples by category and needs a tensor data set "
                             f"(the image pipeline has no category sampler yet); got {ds.name}")
        xs, ys, doms = [], [], []
        for d, i in enumerate(self.train_envs):
            idx = self.splits[i][0]
            xs.append(ds[i].x[idx])
            ys.append(ds[i].y[idx])
            doms.append(torch.full((len(idx),), d, dtype=torch.int64))
        self.pool = (torch.cat(xs).to(self.device), torch.cat(ys).to(self.device), torch.cat(doms).to(self.device))

    # ---- checkpoints ----
    def _checkpoint_path(self):
        return os.path.join(self.out_dir, "checkpoint.pt")

    def save_checkpoint(self, step):
        state = {
            "step": step,
            "algorithm": self.alg.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.alg.optimizers().items()},
            "extra": self.alg.extra_checkpoint_state(),
            "streams": self.streams.state_dict(),
            "sample_gen": self.sample_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "records": self.records,
        }
        tmp = self._checkpoint_path() + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self._checkpoint_path())  # atomic: a kill never leaves a torn checkpoint

    def _load_checkpoint(self):
        state = torch.load(self._checkpoint_path(), map_location=self.device, weights_only=False)
        if "categories" in state["algorithm"]:  # its size is set by the first re-distribution
            self.alg.categories = state["algorithm"]["categories"].clone()
        self.alg.load_state_dict(state["algorithm"])
        for k, o in self.alg.optimizers().items():
            o.load_state_dict(state["optimizers"][k])
        self.alg.load_extra_checkpoint_state(state["extra"])
        self.streams.load_state_dict(state["streams"])
        self.sample_gen.set_state(state["sample_gen"].cpu() if self.device.type == "cpu" else state["sample_gen"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.records = state["records"]
        self.start_step = state["step"]
        print(f"resuming {self.out_dir} from step {self.start_step}", file=self.log)

    # ---- evaluation ----
    def autocast(self):
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def evaluate(self):
        from . import data as fdata

        self.alg.eval()
        accs = {}
        for i in range(len(self.dataset.environments)):
            for part, idx in (("in", self.splits[i][0]), ("out", self.splits[i][1])):
                loader = fdata.EvalLoader(self.dataset, i, 256, self.device, subset=idx)
                accs[f"env{i}_{part}_acc"] = accuracy(self.alg, loader, self.autocast)
        self.alg.train()
        return {k: float(v) for k, v in accs.items()}  # one sync per evaluation, not per step

    # ---- the loop ----
    def run(self):
        cfg, alg = self.cfg, self.alg
        alg.train()
        update = torch.compile(alg.update) if cfg.compile else alg.update
        prof = RoundProfiler(self.device)
        it = iter(self.streams)
        last_stats, t_last = {}, time.perf_counter()
        with torch_trace(cfg.profile_trace, self.device):
            for step in range(self.start_step, cfg.steps):
                if self.by_category and alg.due(step):
                    with prof.phase("categories"):
                        alg.recompute_categories(*self.pool)
                with prof.phase("data"):
                    if self.by_category:
                        idx, cat = alg.sample_categories(self.sample_gen)
                        x, y = self.pool[0][idx], self.pool[1][idx]
                    else:
                        minibatches = next(it)
                with prof.phase("update"), self.autocast():
                    if self.by_category:
                        last_stats = alg.update_categories(x, y, cat)
                    else:
                        last_stats = update(minibatches)
                prof.step_done()
                done = step + 1
                if done % cfg.checkpoint_freq == 0 or done == cfg.steps:
                    rec = {"step": done, "epoch": done * self.batch_size / min(len(s[0]) for s in self.splits)}
                    rec.update({k: float(v.float().mean()) for k, v in last_stats.items()})
                    rec["step_time"] = (time.perf_counter() - t_last) / cfg.checkpoint_freq
                    rec.update(self.evaluate())
                    rec["mem_gb"] = prof.summary()["peak_memory_bytes"] / 2**30
                    rec["args"] = _config_key(cfg)
                    rec["hparams"] = alg.hparams
                    self.records.append(rec)
                    with open(os.path.join(self.out_dir, "results.jsonl"), "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    self.save_checkpoint(done)
                    print(f"  [{cfg.algorithm} test={list(cfg.test_envs)}] step {done}/{cfg.steps} "
                          f"loss {rec.get('loss', float('nan')):.3f}", file=self.log)
                    t_last = time.perf_counter()
        profile = prof.summary()
        summary = {"config": _config_key(cfg), "profile": profile, "selection": select(self.records, cfg.test_envs,
                                                                                      self.train_envs),
                   "final": self.records[-1] if self.records else None}
        with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        return summary


def select(records, test_envs, train_envs) -> dict:
    """Model selection over the evaluation records of one run (DomainBed's definitions):
    training_domain: the checkpoint with the best mean held-out accuracy on the training
    domains; test_domain_oracle: the last checkpoint (its test-domain held-out accuracy is
    the validation score). Reports the test domains' accuracy on their "in" split."""
    if not records:
        return {}

    def test_acc(r):
        return float(np.mean([r[f"env{e}_in_acc"] for e in test_envs]))

    best = max(records, key=lambda r: np.mean([r[f"env{e}_out_acc"] for e in train_envs]))
    last = records[-1]
    return {
        "training_domain": {"step": best["step"], "test_acc": test_acc(best),
                            "val_acc": float(np.mean([best[f"env{e}_out_acc"] for e in train_envs]))},
        "test_domain_oracle": {"step": last["step"], "test_acc": test_acc(last),
                               "val_acc": float(np.mean([last[f"env{e}_out_acc"] for e in test_envs]))},
    }

