"""The trainer: one DomainBed-style run (an algorithm, a data set, test environments), with
evaluation, model selection, profiling, a progress bar and checkpoint/resume of the whole state.

A run directory holds run.json (its arguments), results.jsonl (one line per evaluation, with
DomainBed's field names: step, epoch, the algorithm's statistics averaged over the steps since
the last evaluation (loss, ...), step_time, env{i}_in_acc, env{i}_out_acc, mem_gb, args,
hparams), checkpoint.pt (the latest state) and, when finished, summary.json (the profile of
the round and the per-run model selection). `step` is the number of updates done.
A killed run started again with the same arguments resumes from checkpoint.pt and reaches the
same final weights as an uninterrupted run (sampling, torch, CUDA, Python `random` and numpy
RNG states are saved). On resume results.jsonl is rewritten from the checkpoint's records, so
a kill between writing a record and saving the checkpoint leaves no duplicate line; a run
killed before its first checkpoint starts again from scratch with an empty results.jsonl.
Records carry DomainBed's args.hparams_seed (0: the default hyper-parameters; otherwise a
stable hash of the values that differ from the defaults) so that DomainBed's
collect_results can group them.

Algorithms that sample by seed category (SeedCategories) draw their batches from
DomainStreams in category mode, for tensor and image data sets alike. Their re-distribution
needs the per-sample loss (and for k-means the features) of the whole training pool under the
current model; when it falls on an evaluation step (seed_t0 a multiple of checkpoint_freq)
those come from the evaluation's own forward pass over the training domains' "in" splits, so
the re-distribution costs no extra pass over the data (only the first one, at step 0, does).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import algorithms as algs
from .profile import RoundProfiler, phase, torch_trace
from .report import SELECTION_METHODS, run_selection

__all__ = ["RunConfig", "Trainer", "check_config", "check_device", "check_run_dir", "hparams_seed", "prepare_run_dir",
           "Progress", "run_hparams", "select", "SELECTION_METHODS"]

# Per-data-set defaults under the user's hyper-parameters. The digit sets have 1,797 images
# in all: 16 per domain per step keeps a 2-core CPU demo near a minute.
DATASET_HPARAMS = {"RotatedDigits": {"batch_size": 16}, "ColoredDigits": {"batch_size": 16}}
EVAL_BATCH = {"cuda": 256, "cpu": 64}  # per device type; on a CPU smaller batches stay in cache (DomainBed: 64)


@dataclass
class RunConfig:
    dataset: str = "RotatedDigits"
    algorithm: str = "ERM"
    test_envs: tuple = (0,)
    data_dir: str | None = None
    steps: int = 60
    hparams: dict = field(default_factory=dict)
    seed: int = 0
    trial_seed: int = 0
    holdout_fraction: float = 0.2
    checkpoint_freq: int = 30
    device: str = "auto"
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    profile_trace: str | None = None
    image_size: int = 224            # image data sets: side of the (square) network input
    num_workers: int | None = None   # image data sets: loader workers (None: the loader's default)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def run_hparams(cfg: RunConfig, dataset=None) -> dict:
    """The hyper-parameters the run's algorithm gets (data-set defaults under the user's),
    resolved against the algorithm's names and defaults."""
    cls = algs.get_algorithm(cfg.algorithm)
    given = {**DATASET_HPARAMS.get(dataset.name if dataset is not None else cfg.dataset, {}), **cfg.hparams}
    return algs.base.resolve_hparams(cls, given)


def hparams_seed(cfg: RunConfig, hparams: dict, dataset=None) -> int:
    """DomainBed's args.hparams_seed for the records: 0 when `hparams` (resolved) are the
    defaults of the algorithm on this data set (DomainBed: 0 means the default hparams), else a
    stable 31-bit hash of the values that differ, so that records of different
    configurations fall into different DomainBed groups."""
    defaults = run_hparams(RunConfig(dataset=cfg.dataset, algorithm=cfg.algorithm), dataset)
    diff = {k: v for k, v in hparams.items() if defaults.get(k) != v}
    if not diff:
        return 0
    return zlib.crc32(json.dumps(diff, sort_keys=True, default=str).encode()) % (2**31 - 1) + 1


def check_device(cfg: RunConfig) -> torch.device:
    try:
        dev = cfg.resolved_device()
    except RuntimeError as exc:
        raise ValueError(f"device {cfg.device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r}: no CUDA device is available here (torch.cuda.is_available() "
                             "is False); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {cfg.device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ValueError(f"device {cfg.device!r}: fastdg trains on 'cpu' or 'cuda' (or 'auto')")
    return dev


def check_pool_sizes(cfg: RunConfig, dataset, hparams) -> None:
    """Seed categories: every domain (every domain x class with seed_per_class) of the training
    pool needs at least seed_k samples, or some of its categories would be empty."""
    from . import data as fdata

    k, per_class = hparams["seed_k"], hparams["seed_per_class"]
    small = []
    for i, name in enumerate(dataset.environments):
        if i in cfg.test_envs:
            continue
        idx = fdata.split_holdout(len(dataset[i]), cfg.holdout_fraction, seed=(cfg.trial_seed, i))[0]
        if not per_class:
            if len(idx) < k:
                small.append(f"{name}: {len(idx)}")
            continue
        counts = torch.bincount(dataset[i].y[idx], minlength=dataset.num_classes)
        small += [f"{name} class {c}: {int(n)}" for c, n in enumerate(counts.tolist()) if n < k]
    if small:
        cell = "domain x class" if per_class else "domain"
        raise ValueError(f"seed_k={k} categories per {cell} need at least {k} training samples in each; "
                         f"too few in {small[:8]}{' ...' if len(small) > 8 else ''}")


def check_config(cfg: RunConfig, dataset=None):
    """Every error that can be found before any work: unknown names, bad values (ValueError or
    TypeError naming the hyper-parameter; FileNotFoundError for a missing pretrained_path), a
    device that is not there, bad environments, a seed-category split the data cannot fill."""
    cls = algs.get_algorithm(cfg.algorithm)
    hp = run_hparams(cfg, dataset)
    cls.check_hparams(hp)
    if isinstance(cfg.steps, bool) or not isinstance(cfg.steps, int) or cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if isinstance(cfg.checkpoint_freq, bool) or not isinstance(cfg.checkpoint_freq, int) or cfg.checkpoint_freq < 1:
        raise ValueError(f"checkpoint_freq must be >= 1, got {cfg.checkpoint_freq}")
    if not 0.0 < cfg.holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {cfg.holdout_fraction}")
    if not isinstance(cfg.image_size, int) or cfg.image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {cfg.image_size!r}")
    if cfg.num_workers is not None and (not isinstance(cfg.num_workers, int) or cfg.num_workers < 0):
        raise ValueError(f"num_workers must be a non-negative int, got {cfg.num_workers!r}")
    if not cfg.test_envs:
        raise ValueError("at least one test environment is needed")
    if cfg.profile_trace and os.path.isdir(cfg.profile_trace):
        raise ValueError(f"profile trace {cfg.profile_trace!r} is a directory; give a file path")
    check_device(cfg)
    if dataset is not None:
        n = len(dataset.environments)
        bad = [e for e in cfg.test_envs if not 0 <= e < n]
        if bad:
            raise ValueError(f"test environment(s) {bad} do not exist: {dataset.name} has {n} "
                             f"environments {list(dataset.environments)} (0..{n - 1})")
        if len(set(cfg.test_envs)) >= n:
            raise ValueError("at least one environment must remain for training")
        cls.check_hparams(hp, dataset.num_classes, n - len(set(cfg.test_envs)))
        if getattr(cls, "samples_by_category", False):
            check_pool_sizes(cfg, dataset, hp)


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _config_key(cfg: RunConfig) -> dict:
    d = asdict(cfg)
    d["test_envs"] = list(cfg.test_envs)
    d.pop("profile_trace")
    return d


def check_run_dir(out_dir: str, cfg: RunConfig) -> str:
    """What `out_dir` holds for this run: "new" (absent or empty), "resume" (this very run, a
    checkpoint or a finished summary in it). Raises ValueError when it holds another run or
    other files. Writes nothing."""
    meta = os.path.join(out_dir, "run.json")
    if os.path.exists(meta):
        with open(meta) as f:
            old = json.load(f)
        key = _config_key(cfg)
        if old != key:
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            raise ValueError(f"output directory {out_dir} holds another run (differs in {diff}); "
                             "choose another --output-dir or delete it")
        return "resume"
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"output directory {out_dir} is not empty and holds no fastdg run: "
                         f"{sorted(os.listdir(out_dir))[:5]}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output directory {out_dir} is a file")
    return "new"


def prepare_run_dir(out_dir: str, cfg: RunConfig) -> bool:
    """Create the run directory, or accept it when it holds this very run (resume).
    Returns True when a checkpoint to resume from exists. Refuses a directory holding
    another run, before any work."""
    if check_run_dir(out_dir, cfg) == "resume":
        return os.path.exists(os.path.join(out_dir, "checkpoint.pt"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump(_config_key(cfg), f, indent=1)
    return False


class Progress:
    """Progress of a run on `stream` (stderr). mode "bar": one line redrawn in place (at most
    every `min_interval` s) with steps, rate, time left and the latest evaluated loss;
    "lines": no redrawing, one line per evaluation (what a log file or a pipe should get);
    "none": silent; "auto": "bar" when the stream is a terminal, else "lines". It reads no
    device value: the loss shown is the one the last evaluation already brought to the host."""

    def __init__(self, total, desc="", stream=None, mode="auto", start=0, min_interval=0.1, width=24):
        self.stream = sys.stderr if stream is None else stream
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "lines"
        if mode not in ("bar", "lines", "none"):
            raise ValueError(f"progress mode must be 'auto', 'bar', 'lines' or 'none', got {mode!r}")
        self.mode, self.total, self.desc, self.start = mode, total, desc, start
        self.n, self.width, self.min_interval = start, width, min_interval
        self.t0 = self._last_draw = time.perf_counter()
        self.postfix = ""
        self._drawn = False

    @staticmethod
    def _clock(s):
        s = int(max(s, 0))
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"

    def line(self) -> str:
        frac = self.n / self.total if self.total else 1.0
        fill = int(frac * self.width)
        el = time.perf_counter() - self.t0
        rate = (self.n - self.start) / el if el > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else 0.0
        bar = "#" * fill + "-" * (self.width - fill)
        return (f"{self.desc} {100 * frac:3.0f}% [{bar}] {self.n}/{self.total} "
                f"[{self._clock(el)}<{self._clock(left)}, {rate:.2f} step/s]{self.postfix}")

    def _draw(self):
        self.stream.write("\r\033[K" + self.line())
        self.stream.flush()
        self._drawn = True
        self._last_draw = time.perf_counter()

    def update(self, n):
        self.n = n
        if self.mode == "bar" and (n >= self.total or time.perf_counter() - self._last_draw >= self.min_interval):
            self._draw()

    def note(self, text, postfix=None):
        """A message (an evaluation's summary): its own line, above the bar."""
        if postfix is not None:
            self.postfix = postfix
        if self.mode == "none":
            return
        if self.mode == "bar":
            self.stream.write("\r\033[K" + text + "\n")
            self._draw()
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self):
        if self.mode == "bar" and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


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
    """One run. `progress` is a Progress mode ("auto", "bar", "lines", "none")."""

    def __init__(self, cfg: RunConfig, out_dir: str, dataset=None, log=None, progress="auto"):
        from . import data as fdata

        log = sys.stderr if log is None else log  # looked up now: callers (and pytest) may swap sys.stderr
        self.cfg, self.out_dir, self.log, self.progress_mode = cfg, out_dir, log, progress
        check_config(cfg)
        self.device = cfg.resolved_device()
        self.dataset = dataset if dataset is not None else fdata.get_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
        check_config(cfg, self.dataset)
        self.resume = prepare_run_dir(out_dir, cfg)
        _seed_everything(cfg.seed)
        ds = self.dataset
        n_env = len(ds.environments)
        self.train_envs = [i for i in range(n_env) if i not in cfg.test_envs]
        self.splits = [fdata.split_holdout(len(ds[i]), cfg.holdout_fraction, seed=(cfg.trial_seed, i))
                       for i in range(n_env)]
        cls = algs.get_algorithm(cfg.algorithm)
        hparams = {**DATASET_HPARAMS.get(ds.name, {}), **cfg.hparams}
        self.alg = cls(ds.input_shape, ds.num_classes, len(self.train_envs), hparams).to(self.device)
        if cfg.channels_last:
            self.alg = self.alg.to(memory_format=torch.channels_last)
        self.batch_size = self.alg.hparams["batch_size"]
        self.by_category = getattr(self.alg, "samples_by_category", False)
        self._loader_kw = {"image_size": cfg.image_size}
        if cfg.num_workers is not None:
            self._loader_kw["num_workers"] = cfg.num_workers
        subsets = [self.splits[i][0] for i in self.train_envs]
        extra = {"per_category": self.alg.per_category()} if self.by_category else {}
        self.streams = fdata.DomainStreams(ds, self.train_envs, self.batch_size, self.device, seed=cfg.seed,
                                           subsets=subsets, **extra, **self._loader_kw)
        if self.by_category:
            self.pool_y = torch.cat([ds[i].y[s] for i, s in zip(self.train_envs, subsets)]).to(self.device)
            self.pool_domain = torch.cat([torch.full((len(s),), d, dtype=torch.int64)
                                          for d, s in enumerate(subsets)]).to(self.device)
            self.categories_step = None  # the step whose re-distribution is done (when fused into an eval)
        self._eval_loaders = {}
        self.records, self.start_step = [], 0
        self._window = {}  # statistic -> device sum over the steps since the last evaluation
        self._window_steps = 0
        self.hparams_seed = hparams_seed(cfg, self.alg.hparams, ds)
        if self.resume:
            self._load_checkpoint()
        # results.jsonl holds exactly the records of the state we start from: the checkpoint's
        # (a kill after a record was written but before its checkpoint was saved left one more
        # line), or none when starting from scratch (a kill before the first checkpoint)
        self._write_results()

    def _results_path(self):
        return os.path.join(self.out_dir, "results.jsonl")

    def _write_results(self):
        path = self._results_path()
        if not self.records and not os.path.exists(path):
            return
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        os.replace(tmp, path)

    # ---- seed categories ----
    def _set_stream_categories(self):
        """Give the streams the algorithm's categories, renumbered without gaps (k-means may
        leave a category empty); `step_categories` maps each row of a step back to the
        algorithm's category id. Synchronises once (at a re-distribution)."""
        used, compact = torch.unique(self.alg.categories, return_inverse=True)
        self.streams.set_categories(compact)
        self.step_categories = used.repeat_interleave(self.streams.sampler.per_category)

    @torch.no_grad()
    def pool_pass(self):
        """Per-sample loss (and features) of the whole training pool, eval mode, no evaluation
        attached: the re-distributions that do not fall on an evaluation."""
        stats = self._pool_buffers()
        self.alg.eval()
        with phase("forward"):
            for d, i in enumerate(self.train_envs):
                loader = self._eval_loader(i, "in", return_index=True)
                for x, y, idx in loader:
                    with self.autocast():
                        out = self.alg.pool_statistics(x, y)
                    self._pool_store(stats, d, idx, out)
        self.alg.train()
        return stats

    def _eval_loader(self, env, part, return_index=False):
        """An EvalLoader over environment `env`'s "in" or "out" split. Image loaders are kept
        (a DALI pipeline is costly to build, and they hold only paths); tensor ones are made per
        pass so that no second device copy of the data stays resident."""
        from . import data as fdata

        key = (env, part, return_index)
        if key in self._eval_loaders:
            return self._eval_loaders[key]
        loader = fdata.EvalLoader(self.dataset, env, EVAL_BATCH.get(self.device.type, 256), self.device, subset=self.splits[env][part == "out"],
                                  return_index=return_index, **self._loader_kw)
        if self.dataset.is_image:
            self._eval_loaders[key] = loader
        return loader

    def _pool_buffers(self):
        n = self.streams.total
        feats = None if not self.alg.needs_features else []
        return {"loss": torch.empty(n, device=self.device), "feats": feats, "offsets": self.streams.sampler.offsets}

    def _pool_store(self, stats, d, idx, out):
        _, loss, f = out
        pos = idx + stats["offsets"][d]
        stats["loss"][pos] = loss
        if f is not None:
            if not isinstance(stats["feats"], torch.Tensor):
                stats["feats"] = torch.empty(self.streams.total, f.shape[1], device=self.device)
            stats["feats"][pos] = f

    def redistribute(self, stats=None):
        """Re-distribute the seed categories (from `stats` of an evaluation, or a pool pass)."""
        with phase("categories"):
            if stats is None:
                stats = self.pool_pass()
            self.alg.assign_categories(stats["loss"], stats["feats"], self.pool_y, self.pool_domain)
            self._set_stream_categories()

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
            "categories_step": getattr(self, "categories_step", None),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),  # fastdg draws nothing from these; user data code may
            "numpy_rng": np.random.get_state(),
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
        if self.by_category:
            self.categories_step = state.get("categories_step")
            if self.alg.categories.numel():
                self._set_stream_categories()
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if "python_rng" in state:
            random.setstate(state["python_rng"])
            np.random.set_state(state["numpy_rng"])
        self.records = state["records"]
        self.start_step = state["step"]
        print(f"resuming {self.out_dir} from step {self.start_step}", file=self.log)

    # ---- evaluation ----
    def autocast(self):
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, pool_stats=None):
        """Accuracy of every environment's "in" and "out" split. With `pool_stats` (buffers from
        _pool_buffers), the training domains' "in" splits (the pool) are evaluated with
        alg.pool_statistics, filling the buffers from the same forward pass."""
        self.alg.eval()
        accs = {}
        with phase("eval"):
            for i in range(len(self.dataset.environments)):
                for part, idx in (("in", self.splits[i][0]), ("out", self.splits[i][1])):
                    pool = pool_stats is not None and part == "in" and i in self.train_envs
                    loader = self._eval_loader(i, part, return_index=pool)
                    if not pool:
                        accs[f"env{i}_{part}_acc"] = accuracy(self.alg, loader, self.autocast)
                        continue
                    d, correct = self.train_envs.index(i), 0
                    for x, y, pos in loader:
                        with self.autocast():
                            out = self.alg.pool_statistics(x, y)
                        self._pool_store(pool_stats, d, pos, out)
                        correct = correct + (out[0].argmax(1) == y).sum()
                    accs[f"env{i}_{part}_acc"] = correct.double() / len(idx)
            result = {k: float(v) for k, v in accs.items()}  # one sync per evaluation, not per step
        self.alg.train()
        return result

    # ---- the loop ----
    def train_step(self, step, update=None, update_categories=None):
        """One training step (re-distribution when due, data, update). Returns the algorithm's
        statistics (device tensors). `update` / `update_categories`: replacements for the
        algorithm's own (the compiled ones under --compile)."""
        alg = self.alg
        if self.by_category and alg.due(step) and self.categories_step != step:
            self.redistribute()
            self.categories_step = step
        with phase("data"):
            batches = next(self.streams)
            if self.by_category:
                x = torch.cat([b[0] for b in batches])
                y = torch.cat([b[1] for b in batches])
        with phase("update"), self.autocast():
            if self.by_category:
                return (update_categories or alg.update_categories)(x, y, self.step_categories)
            return (update or alg.update)(batches)

    def _accumulate(self, stats):
        for k, v in stats.items():
            v = v.detach().float().mean()
            self._window[k] = v if k not in self._window else self._window[k] + v
        self._window_steps += 1

    def _record(self, done, prof, durations):
        rec = {"step": done, "epoch": done * self.batch_size / min(len(s[0]) for s in self.splits)}
        # DomainBed's fields: the statistics averaged over the steps since the last evaluation
        rec.update({k: float(v) / max(self._window_steps, 1) for k, v in self._window.items()})
        self._window, self._window_steps = {}, 0
        fuse = self.by_category and done < self.cfg.steps and self.alg.due(done)
        pool_stats = self._pool_buffers() if fuse else None
        rec.update(self.evaluate(pool_stats))
        if fuse:
            self.redistribute(pool_stats)
            self.categories_step = done
        prof.fold()  # the evaluation synchronised already: reading the events costs nothing more
        rec["step_time"] = float(np.mean(prof.durations[durations:])) if len(prof.durations) > durations else 0.0
        rec["mem_gb"] = prof.peak_memory_bytes() / 2**30
        rec["args"] = {**_config_key(self.cfg), "hparams_seed": self.hparams_seed}
        rec["hparams"] = self.alg.hparams
        return rec

    def run(self):
        cfg, alg = self.cfg, self.alg
        done_path = os.path.join(self.out_dir, "summary.json")
        if self.start_step >= cfg.steps and os.path.exists(done_path):
            print(f"{self.out_dir}: finished already; reading its summary", file=self.log)
            with open(done_path) as f:
                return json.load(f)
        alg.train()
        # --compile: the step's update (update_categories for seed categories; their
        # re-distribution, an eval-mode pass every seed_t0 steps, stays eager)
        update = update_cat = None
        if cfg.compile:
            if self.by_category:
                update_cat = torch.compile(alg.update_categories)
            else:
                update = torch.compile(alg.update)
        prof = RoundProfiler(self.device)
        desc = f"{cfg.algorithm} test={list(cfg.test_envs)}"
        bar = Progress(cfg.steps, desc, stream=self.log, mode=self.progress_mode, start=self.start_step)
        seen = 0  # step durations already reported in a record
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        if cfg.deterministic:
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            trace_ctx = torch_trace(cfg.profile_trace, self.device, steps=cfg.steps - self.start_step)
            with prof.activate(), trace_ctx as trace:
                for step in range(self.start_step, cfg.steps):
                    prof.step_start()
                    stats = self.train_step(step, update, update_cat)
                    self._accumulate(stats)
                    prof.step_done()
                    done = step + 1
                    bar.update(done)
                    if done % cfg.checkpoint_freq == 0 or done == cfg.steps:
                        rec = self._record(done, prof, seen)
                        seen = len(prof.durations)
                        self.records.append(rec)
                        with open(self._results_path(), "a") as f:
                            f.write(json.dumps(rec, sort_keys=True) + "\n")
                        self.save_checkpoint(done)
                        tests = ", ".join(f"{self.dataset.environments[e]} {100 * rec[f'env{e}_in_acc']:.1f}%"
                                          for e in cfg.test_envs)
                        loss = rec.get("loss", float("nan"))
                        bar.note(f"  [{desc}] step {done}/{cfg.steps} loss {loss:.3f} test acc {tests}",
                                 postfix=f" loss {loss:.3f}")
                    if trace is not None:
                        trace.step()
        finally:
            bar.close()
            if cfg.deterministic:  # a process-wide switch: leave it as it was
                torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        profile = prof.summary()
        if self.start_step:
            profile["resumed_from_step"] = self.start_step
        summary = {"config": _config_key(cfg), "environments": list(self.dataset.environments),
                   "profile": profile, "selection": select(self.records, cfg.test_envs, self.train_envs),
                   "final": self.records[-1] if self.records else None}
        with open(done_path, "w") as f:
            json.dump(summary, f, indent=1)
        return summary


def select(records, test_envs, train_envs) -> dict:
    """Model selection over the evaluation records of one run: DomainBed's training-domain
    validation and test-domain oracle (see fastdg.report.run_selection; leave-one-domain-out
    needs the runs that hold out one more domain and is done by `fastdg report`)."""
    return run_selection(records, test_envs, train_envs)
