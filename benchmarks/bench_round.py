"""A training round, paper 001's Table 5 (PERFORMANCE.md, "Training round"): time of a training
round (TTR) and peak memory, for fastdg's ERM, GroupDRO and SeedCategories (loss ranking and
k-means) against a DomainBed-style loop on the same model, measured side by side in one run.

A round is what DomainBed's train.py runs: N steps, an evaluation of every environment's "in"
and "out" split every F steps (results.jsonl written), and for SeedCategories a re-distribution
every t0 = N / 5 steps (the paper: 1000 of 5000). fastdg rounds are `Trainer.run()` (its
checkpoint.pt is written at every evaluation as well); the re-distributions at t0, 2 t0, ... fall
on evaluation steps and read the evaluation's forward pass, the one at step 0 makes its own.

The DomainBed-style loop is written here from DomainBed's description (domainbed/scripts/
train.py, algorithms.py, lib/fast_data_loader.py, lib/misc.py), not copied: one torch DataLoader
per training domain (random sampling with replacement, batches collated from single samples,
`num_workers` worker processes), batches moved to the device every step, `.item()` on the loss
every step, GroupDRO as a Python loop over domains with one forward pass and one in-place q
update per domain, evaluation by DataLoaders of batch 64 with `.item()` per batch. It gets the
same evaluation schedule as fastdg (after F, 2F, ..., N steps; DomainBed also evaluates after
the first step) and saves the model once at the end, as DomainBed does.

Memory: on a GPU, PCMA = torch.cuda.max_memory_allocated() over the round after
reset_peak_memory_stats() (what is resident at the start counts: fastdg keeps the tensor data
sets' training pool on the device, DomainBed's loop keeps it on the host). On a CPU: the peak
RSS growth over the round (fastdg.profile.RssPeak: /proc/self/statm sampled every 5 ms from a
thread after malloc_trim, minus the RSS at the start of the round), without tracemalloc.

Data: RotatedMNIST (DomainBed's MNIST CNN, Adam 1e-3) from FASTDG_DATA or ../shared/data
(skipped when absent); on a GPU also PACS with a randomly initialised ResNet-50 (no pretrained
weights here; timing only) at DomainBed's 32 images per domain.

  CPU (default): RotatedMNIST cut to 200 images per environment, 8 per domain per step,
      N = 100, F = 20, t0 = 20, DataLoader workers 0, 3 rounds per row: about four minutes on
      2 cores. TTR and the ratios use the fastest of the rounds (the least disturbed by other
      work on the machine); the median is in the pytest-benchmark table. Proportions differ from the paper's round (an evaluation and the
      step-0 pass are large next to 100 small steps), so the CPU ratios are a smoke test of
      the machinery more than a measurement of the targets; `phases_s` and `categories_s` in
      extra_info break each round down. On a shared 2-core machine rows differ by tens of
      per cent from run to run: compare rows of one run only.
  GPU: RotatedMNIST whole, 64 per domain, the paper's round N = 5000, F = 100, t0 = 1000;
      PACS N = 300, F = 100, t0 = 60, workers 8 (DomainBed's N_WORKERS).
  Environment overrides: FASTDG_BENCH_ROUND_STEPS, _FREQ, _PER_ENV, _BATCH, _WORKERS (the
  DomainBed-style loaders), _ROUNDS, and FASTDG_BENCH_ROUND_TABLE (write the Table-5 style
  markdown summary to this path; it is also printed, visible with -s).

Run: python -m pytest benchmarks/bench_round.py -q --benchmark-json=out.json
     (-k RotatedMNIST or -k PACS to split the GPU run under a 10-minute limit)
"""
import contextlib
import copy
import ctypes
import gc
import json
import os
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F

from fastdg.algorithms import get_algorithm
from fastdg.data import TensorEnvironment, get_dataset, split_holdout
from fastdg.profile import RssPeak
from fastdg.train import RunConfig, Trainer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_ENVS = (0,)


def _env_int(name, default):
    v = os.environ.get(f"FASTDG_BENCH_ROUND_{name}")
    return int(v) if v else default


def data_dir():
    env = os.environ.get("FASTDG_DATA")
    if env:
        return env
    cand = os.path.join(os.path.dirname(REPO), "shared", "data")
    return cand if os.path.isdir(cand) else None


# per data set: steps N, evaluation every F, re-distribution every t0, batch per domain, images
# per environment (None: all), DataLoader workers of the DomainBed-style loop, hparams
SETTINGS = {
    "RotatedMNIST": dict(steps=_env_int("STEPS", 5000 if CUDA else 100), freq=_env_int("FREQ", 100 if CUDA else 20),
                         batch=_env_int("BATCH", 64 if CUDA else 8), per_env=_env_int("PER_ENV", 0 if CUDA else 200),
                         workers=_env_int("WORKERS", 4 if CUDA else 0), hparams={}),
    "PACS": dict(steps=_env_int("STEPS", 300), freq=_env_int("FREQ", 100), batch=_env_int("BATCH", 32), per_env=0,
                 workers=_env_int("WORKERS", 8), hparams={"resnet_depth": 50, "lr": 5e-5}),
}
for s in SETTINGS.values():
    s["t0"] = max(1, s["steps"] // 5)
ROUNDS = _env_int("ROUNDS", 1 if CUDA else 3)
VARIANTS = ["domainbed_erm", "domainbed_groupdro", "fastdg_erm", "fastdg_groupdro", "fastdg_seedcat_loss_rank",
            "fastdg_seedcat_kmeans"]
CASES = [("RotatedMNIST", v) for v in VARIANTS] + [
    pytest.param("PACS", v, marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="PACS / ResNet-50 "
                                                                       "rounds run on a CUDA device only")])
    for v in VARIANTS]
_RESULTS = {}


# ----------------------------------------------------------------------------- data

_DATA = {}


def load(name):
    if name in _DATA:
        return _DATA[name]
    root = data_dir()
    if root is None:
        pytest.skip("real data not found: set FASTDG_DATA or put shared/data beside the repo")
    try:
        ds = get_dataset(name, root)
    except (FileNotFoundError, ValueError) as exc:
        pytest.skip(f"{name} not available: {exc}")
    per_env = SETTINGS[name]["per_env"]
    if per_env and not ds.is_image:  # a cut of every environment (they are shuffled already)
        ds = copy.copy(ds)
        ds.datasets = [TensorEnvironment(e.name, e.x[:per_env].clone(), e.y[:per_env].clone()) for e in ds.datasets]
    _DATA[name] = ds
    return ds


def _release():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS growth is the round's own
    except OSError:
        pass
    if CUDA:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- DomainBed-style loop

class _Infinite(torch.utils.data.Sampler):
    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler

    def __iter__(self):
        while True:
            yield from self.batch_sampler


class _Labeled(torch.utils.data.Dataset):
    """(x, y) per sample: a tensor environment's rows, or decoded image files."""

    def __init__(self, ds, env, idx, train):
        e = ds[env]
        self.y = e.y[idx]
        if ds.is_image:
            from fastdg.data.pil import FileDataset, make_transform

            self.files = FileDataset([e.paths[i] for i in idx.tolist()], make_transform(train, 224, "auto")[0])
            self.x = None
        else:
            self.x = e.x[idx]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.files[i] if self.x is None else self.x[i]), self.y[i]


def _loader(data, batch, workers, infinite):
    if infinite:  # DomainBed's InfiniteDataLoader: with replacement, drop_last, endless
        sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data, replacement=True), batch,
                                                drop_last=True)
        return iter(torch.utils.data.DataLoader(data, batch_sampler=_Infinite(sampler), num_workers=workers,
                                                pin_memory=CUDA))
    # DomainBed's FastDataLoader keeps its workers between passes
    return torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers, pin_memory=CUDA,
                                       persistent_workers=workers > 0)


class DomainBedRound:
    """The DomainBed-style round (see the module docstring) on fastdg's ERM network."""

    def __init__(self, name, algorithm, out_dir):
        ds, st = load(name), SETTINGS[name]
        self.st, self.out_dir, self.algorithm = st, out_dir, algorithm
        torch.manual_seed(0)
        n_env = len(ds)
        train_envs = [i for i in range(n_env) if i not in TEST_ENVS]
        splits = [split_holdout(len(ds[i]), 0.2, seed=(0, i)) for i in range(n_env)]
        self.alg = get_algorithm("ERM")(ds.input_shape, ds.num_classes, len(train_envs),
                                        {"batch_size": st["batch"], **st["hparams"]}).to(DEVICE)
        self.train = [_loader(_Labeled(ds, i, splits[i][0], True), st["batch"], st["workers"], True)
                      for i in train_envs]
        self.evals = [(f"env{i}_{part}", _loader(_Labeled(ds, i, splits[i][k], False), 64, st["workers"], False))
                      for k, part in ((0, "in"), (1, "out")) for i in range(n_env)]
        self.q = torch.ones(len(train_envs), device=DEVICE)

    def update_erm(self, minibatches):
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.alg.predict(x), y)
        self.alg.optimizer.zero_grad()
        loss.backward()
        self.alg.optimizer.step()
        return {"loss": loss.item()}

    def update_groupdro(self, minibatches):
        losses = torch.zeros(len(minibatches), device=DEVICE)
        for m, (x, y) in enumerate(minibatches):  # one forward pass per domain
            losses[m] = F.cross_entropy(self.alg.predict(x), y)
            self.q[m] *= (self.alg.hparams.get("groupdro_eta", 1e-2) * losses[m].data).exp()
        self.q /= self.q.sum()
        loss = torch.dot(losses, self.q)
        self.alg.optimizer.zero_grad()
        loss.backward()
        self.alg.optimizer.step()
        return {"loss": loss.item()}

    @torch.no_grad()
    def accuracy(self, loader):
        self.alg.eval()
        correct = total = 0
        for x, y in loader:
            x, y = x.to(DEVICE), y.to(DEVICE)
            correct += (self.alg.predict(x).argmax(1).eq(y).float()).sum().item()
            total += len(x)
        self.alg.train()
        return correct / total

    def run(self):
        st, update = self.st, self.update_groupdro if self.algorithm == "GroupDRO" else self.update_erm
        vals = {}
        for step in range(st["steps"]):
            t = time.time()
            minibatches = [(x.to(DEVICE), y.to(DEVICE)) for x, y in (next(it) for it in self.train)]
            for k, v in update(minibatches).items():
                vals.setdefault(k, []).append(v)
            vals.setdefault("step_time", []).append(time.time() - t)
            if (step + 1) % st["freq"] == 0 or step + 1 == st["steps"]:
                results = {"step": step, **{k: sum(v) / len(v) for k, v in vals.items()}}
                for name, loader in self.evals:
                    results[name + "_acc"] = self.accuracy(loader)
                results["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0
                with open(os.path.join(self.out_dir, "results.jsonl"), "a") as f:
                    f.write(json.dumps(results, sort_keys=True) + "\n")
                vals = {}
        torch.save({"model_dict": self.alg.state_dict()}, os.path.join(self.out_dir, "model.pkl"))
        return {}


# ----------------------------------------------------------------------------- fastdg rounds

def fastdg_config(name, variant):
    st = SETTINGS[name]
    alg = {"fastdg_erm": "ERM", "fastdg_groupdro": "GroupDRO"}.get(variant, "SeedCategories")
    hp = {"batch_size": st["batch"], **st["hparams"]}
    if alg == "SeedCategories":
        hp.update(seed_t0=st["t0"], seed_method="kmeans" if variant.endswith("kmeans") else "loss_rank")
    return RunConfig(dataset=name, algorithm=alg, test_envs=TEST_ENVS, steps=st["steps"], checkpoint_freq=st["freq"],
                     hparams=hp, device=str(DEVICE), num_workers=st["workers"] if name == "PACS" else None)


class FastdgRound:
    def __init__(self, name, variant, out_dir):
        torch.manual_seed(0)
        self.trainer = Trainer(fastdg_config(name, variant), out_dir, dataset=load(name), progress="none")

    def run(self):
        return self.trainer.run()


# ----------------------------------------------------------------------------- the benchmark

@pytest.fixture(scope="module", autouse=True)
def warm_up():
    """First-call costs (oneDNN / cuDNN kernel selection, the extension's load) out of the rows."""
    if data_dir() is None:
        return
    ds = load("RotatedMNIST")
    with tempfile.TemporaryDirectory() as d:
        cfg = RunConfig(dataset="RotatedMNIST", algorithm="SeedCategories", test_envs=TEST_ENVS, steps=2,
                        checkpoint_freq=2, device=str(DEVICE), hparams={"batch_size": 8, "seed_method": "kmeans"})
        Trainer(cfg, d, dataset=ds, progress="none").run()
    yield
    table = table5()
    if table:
        print("\n" + table)
        path = os.environ.get("FASTDG_BENCH_ROUND_TABLE")
        if path:
            with open(path, "w") as f:
                f.write(table + "\n")


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{c[0]}-{c[1]}" if isinstance(c, tuple) else
                                                     f"{c.values[0]}-{c.values[1]}" for c in CASES])
def test_round(benchmark, name, variant):
    st = SETTINGS[name]
    load(name)
    made = {}

    def setup():
        made.pop("round", None)
        _release()
        d = tempfile.mkdtemp(prefix=f"bench_round_{variant}_")
        made["round"] = (DomainBedRound(name, "GroupDRO" if variant.endswith("groupdro") else "ERM", d)
                         if variant.startswith("domainbed") else FastdgRound(name, variant, d))
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return (), {}

    def one_round():
        rss = RssPeak(interval=5e-3)
        t = time.perf_counter()
        with (contextlib.nullcontext() if CUDA else rss):
            out = made["round"].run()
        if CUDA:
            torch.cuda.synchronize()
        mem = torch.cuda.max_memory_allocated() if CUDA else rss.delta_bytes
        made.setdefault("rounds", []).append((time.perf_counter() - t, out, mem))

    benchmark.group = f"round-{name}"
    benchmark.pedantic(one_round, setup=setup, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    if benchmark.stats is None:
        return
    t = benchmark.stats.stats.min  # the least disturbed round (the median is in the table beside it)
    _, summary, mem = min(made["rounds"], key=lambda r: r[0])  # its memory and phases
    _RESULTS[(name, variant)] = (t, mem, summary.get("profile"))
    info = benchmark.extra_info
    ds = load(name)
    info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", threads=torch.get_num_threads(),
                dataset=name, variant=variant, input_shape=list(ds.input_shape), domains=len(ds) - len(TEST_ENVS),
                batch_per_domain=st["batch"], steps=st["steps"], eval_every=st["freq"], seed_t0=st["t0"],
                images_per_env=[len(e) for e in ds.datasets], domainbed_workers=st["workers"],
                ttr_s=t, ttr_median_s=benchmark.stats.stats.median, rounds=ROUNDS, s_per_step=t / st["steps"],
                peak_memory_bytes=mem,
                memory_kind="cuda_max_memory_allocated (PCMA)" if CUDA else "cpu_peak_rss_growth (RssPeak, 5 ms)")
    prof = summary.get("profile")
    if prof:
        info.update(train_s=prof["train_s"], phases_s=prof["phases_s"], step_time_p50_s=prof["step_time_s"]["p50"])
        info["categories_s"] = prof["phases_s"].get("categories", 0.0)
    ratios = {"fastdg_erm": [("domainbed_erm", "vs_domainbed_erm")],
              "fastdg_groupdro": [("domainbed_groupdro", "vs_domainbed_groupdro"), ("fastdg_erm", "vs_fastdg_erm")],
              "fastdg_seedcat_loss_rank": [("fastdg_erm", "vs_fastdg_erm")],
              "fastdg_seedcat_kmeans": [("fastdg_erm", "vs_fastdg_erm")]}
    for base, label in ratios.get(variant, []):
        if (name, base) in _RESULTS:
            tb, mb, _ = _RESULTS[(name, base)]
            info[f"time_{label}"] = t / tb
            info[f"memory_{label}"] = mem / mb if mb else None


def table5() -> str:
    """Paper 001's Table 5 layout: per data set, TTR and peak memory of each variant and the
    ratios the targets speak of."""
    if not _RESULTS:
        return ""
    kind = "PCMA (MiB)" if CUDA else "peak RSS growth (MiB)"
    lines = [f"| data set | variant | TTR (s) | s/step | {kind} | time / fastdg ERM | memory / fastdg ERM | "
             "time / DomainBed-style same algorithm |", "|---" * 8 + "|"]
    for (name, variant), (t, mem, _) in _RESULTS.items():
        st = SETTINGS[name]
        erm = _RESULTS.get((name, "fastdg_erm"))
        db = _RESULTS.get((name, "domainbed_groupdro" if variant.endswith("groupdro") else "domainbed_erm"))
        r_t = f"{t / erm[0]:.3f}" if erm and variant.startswith("fastdg") else ""
        r_m = f"{mem / erm[1]:.3f}" if erm and erm[1] and variant.startswith("fastdg") else ""
        r_db = f"{t / db[0]:.3f}" if db and variant in ("fastdg_erm", "fastdg_groupdro") else ""
        lines.append(f"| {name} | {variant} | {t:.2f} | {t / st['steps']:.4f} | {mem / 2**20:.1f} | {r_t} | {r_m} | "
                     f"{r_db} |")
    dev = torch.cuda.get_device_name() if CUDA else f"cpu ({torch.get_num_threads()} threads)"
    lines.append(f"\ndevice: {dev}; rounds: " + "; ".join(
        f"{n}: {s['steps']} steps, eval every {s['freq']}, t0 {s['t0']}, {s['batch']}/domain" for n, s in
        SETTINGS.items() if any(k[0] == n for k in _RESULTS)))
    return "\n".join(lines)


def test_domainbed_style_groupdro_matches_fastdg():
    """The baseline computes what fastdg computes (a broken baseline must not look slow or fast):
    one DomainBed-style GroupDRO step against fastdg's, same weights, same batches."""
    ds = load("RotatedMNIST")
    with tempfile.TemporaryDirectory() as d:
        db = DomainBedRound("RotatedMNIST", "GroupDRO", d)
    ours = get_algorithm("GroupDRO")(ds.input_shape, ds.num_classes, len(db.train), dict(db.alg.hparams)).to(DEVICE)
    ours.network.load_state_dict(db.alg.network.state_dict())
    before = [p.detach().clone() for p in ours.network.parameters()]
    # plain SGD with lr 1 so the weight change is the gradient (Adam's g / |g| would amplify
    # round-off on gradients near zero into whole steps)
    db.alg.optimizer = torch.optim.SGD(db.alg.network.parameters(), lr=1.0)
    ours.optimizer = torch.optim.SGD(ours.network.parameters(), lr=1.0)
    minibatches = [(x.to(DEVICE), y.to(DEVICE)) for x, y in (next(it) for it in db.train)]
    loss_db = db.update_groupdro(minibatches)["loss"]
    loss_ours = float(ours.update(minibatches)["loss"])
    assert abs(loss_db - loss_ours) < 1e-4 * max(1.0, abs(loss_db))
    torch.testing.assert_close(db.q, ours.q, rtol=1e-5, atol=1e-7)
    for a, b, w in zip(db.alg.network.parameters(), ours.network.parameters(), before):
        torch.testing.assert_close(a - w, b - w, rtol=1e-3, atol=1e-6)
