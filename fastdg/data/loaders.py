"""DomainStreams (infinite training batches, one stream per domain or B per seed category)
and EvalLoader (every sample of one environment exactly once).

Backends (attribute `backend`):
- "tensor": tensor data sets. The selected samples are copied to `device` once and every
  batch is one gather there; indices come from device generators; no worker processes.
- "dali":   image data sets with NVIDIA DALI (GPU decoding when `device` is CUDA).
- "torch":  image data sets with torch's DataLoader + PIL (torchvision transforms when
  installed). Chosen automatically, with a warning, when DALI is not importable.
backend="auto" (default) picks "dali" when it imports, else "torch"; FASTDG_DATA_BACKEND
overrides "auto". Image batches are float32 NCHW in channels_last memory format.
"""
from __future__ import annotations

import collections
import os
import warnings

import torch

from .dali import dali_status, shard_range
from .datasets import _seed_int
from .samplers import StepSampler

_BACKENDS = ("auto", "dali", "torch")


def _as_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise TypeError(f"device must be a torch.device or a string such as 'cpu' or 'cuda:0', got {device!r}") from e


def choose_backend(ds, backend: str = "auto", paths: list | None = None) -> str:
    """The loader backend for data set `ds` ("tensor" for tensor sets). paths: the image files
    the loader will read; DALI cannot decode GIF, so with GIF files among them "auto" picks
    "torch" (with a warning) and "dali" raises, naming the files."""
    if not getattr(ds, "is_image", False):
        return "tensor"
    if backend == "auto":
        backend = os.environ.get("FASTDG_DATA_BACKEND", "auto") or "auto"
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    ok, why = dali_status()
    if backend == "dali" and not ok:
        raise RuntimeError(f"backend='dali' requested but {why}")
    gifs = _gif_files(ds, paths) if backend != "torch" and ok else []
    if gifs:
        shown = ", ".join(gifs[:3]) + (", ..." if len(gifs) > 3 else "")
        msg = f"DALI cannot decode GIF images and {len(gifs)} of the files to load are GIF ({shown})"
        if backend == "dali":
            raise ValueError(f"backend='dali': {msg}; convert them (e.g. to PNG) or use backend='torch'")
        warnings.warn(f"{msg}; loading images with torch's DataLoader + PIL instead", RuntimeWarning, stacklevel=3)
        return "torch"
    if backend == "auto":
        if ok:
            return "dali"
        warnings.warn(f"{why}; loading images with torch's DataLoader + PIL instead (slower)", RuntimeWarning,
                      stacklevel=3)
        return "torch"
    return backend


def _gif_files(ds, paths) -> list:
    """The GIF files (found by the folder scan) among `paths` (None: all of ds), in order."""
    gif = {p for env in getattr(ds, "datasets", ()) for p in getattr(env, "gif", ())}
    if not gif:
        return []
    if paths is None:
        paths = [p for env in ds.datasets for p in env.paths]
    return list(dict.fromkeys(p for p in paths if p in gif))


def _worker_context(num_workers):
    """Workers are spawned, not forked: a fork taken while DALI's or OpenMP's threads hold
    locks deadlocks the child (seen here: a test hung once a DALI pipeline had run)."""
    return "spawn" if num_workers > 0 else None


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _check_positive(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_subset(name, sub, n):
    if not isinstance(sub, torch.Tensor) or sub.dtype.is_floating_point or sub.dtype == torch.bool or sub.dim() != 1:
        raise TypeError(f"{name} must be a 1-D int64 tensor of positions in the environment, got "
                        f"{type(sub).__name__ if not isinstance(sub, torch.Tensor) else (sub.dtype, tuple(sub.shape))}")
    sub = sub.detach().to("cpu", torch.int64)
    if sub.numel() == 0:
        raise ValueError(f"{name} is empty")
    if int(sub.min()) < 0 or int(sub.max()) >= n:
        raise ValueError(f"{name} must hold positions in [0, {n}), got values in [{int(sub.min())}, {int(sub.max())}]")
    return sub


class _ImageFetcher:
    """Decodes the image batches of a StepSampler with DALI or a DataLoader. Both prefetch,
    so each drawn step is queued with the sampler state from just before it was drawn; steps
    drawn before a set_categories / load_state_dict are marked stale and dropped."""

    def __init__(self, streams, backend):
        self.s, self.backend = streams, backend
        self.pending = collections.deque()  # [state_before, positions (cpu), counts, stale]
        self._pipe = self._it = None
        self._max_batch = 0

    def _draw(self):
        snap = self.s.sampler.state_dict()
        pos, counts = self.s.sampler.next_step()
        pos = pos.cpu()
        self.pending.append([snap, pos, counts, False])
        return pos

    def _dali_source(self):
        import numpy as np
        paths = self.s._paths
        return [np.fromfile(paths[i], dtype=np.uint8) for i in self._draw().tolist()]

    def _batch_sampler(self):
        while True:
            yield self._draw().tolist()

    def _start(self, n):
        s = self.s
        if self.backend == "dali":
            from .dali import train_pipeline
            dev = s.device.index if s.device.type == "cuda" else None
            if s.device.type == "cuda" and dev is None:
                dev = torch.cuda.current_device()
            self._pipe = train_pipeline(self._dali_source, n, max(1, s.num_workers), dev, _seed_int((_seed_int(s.seed), s.shard_id)),
                                        train=s.train, size=s.image_size)
        else:
            from .pil import FileDataset, make_transform
            tf, s.transform_impl = make_transform(s.train, s.image_size, s.transforms)
            g = torch.Generator().manual_seed(_seed_int((_seed_int(s.seed), s.shard_id)) % (2 ** 31))
            loader = torch.utils.data.DataLoader(
                FileDataset(s._paths, tf), batch_sampler=self._batch_sampler(), num_workers=s.num_workers,
                pin_memory=s.device.type == "cuda", generator=g, persistent_workers=s.num_workers > 0,
                multiprocessing_context=_worker_context(s.num_workers))
            self._it = iter(loader)
        self._max_batch = n

    def restart(self):
        self.pending.clear()
        self._pipe = self._it = None

    def next_batch(self):
        while True:
            if self._pipe is None and self._it is None:
                self._start(sum(self.s.sampler.next_step_counts()))
            try:
                if self.backend == "dali":
                    from .dali import to_torch
                    x = to_torch(self._pipe.run()[0], self.s.device)
                else:
                    x = next(self._it)
            except Exception as e:
                bad = []
                from .pil import undecodable
                for entry in self.pending:
                    bad += undecodable([self.s._paths[i] for i in entry[1].tolist()])
                self.restart()
                if bad:
                    raise RuntimeError(f"{self.backend} loader failed; undecodable image file(s): {bad}") from e
                raise
            _, pos, counts, stale = self.pending.popleft()
            if not stale:
                return x, pos, counts

    def invalidate(self):
        for entry in self.pending:
            entry[3] = True
        n = sum(self.s.sampler.next_step_counts())
        if n > self._max_batch and self._pipe is not None:
            self.restart()  # the DALI pipeline was built for smaller batches

    def state_dict(self):
        for snap, _, _, stale in self.pending:
            if not stale:
                return snap
        return self.s.sampler.state_dict()


class DomainStreams:
    """Infinite training batches from several environments of a data set.

    ds: a data set from get_dataset; env_indices: environments to draw from; batch_size: B per
    environment; device: where batches land; seed: sampling seed; subsets: optional list (one
    per env) of int64 positions within that environment (e.g. split_holdout's train_idx);
    train: augment images (DomainBed training transform) or only resize them.

    Domain mode (default): each next() returns a list with one entry per environment,
    (x, y) or (x, y, idx) with return_index=True: x float32 (B, C, H, W) on device (channels_last
    for images), y int64 (B,), idx int64 (B,) = position within that environment's subset.

    Category mode (per_category=B, optional categories): `categories` is an int64 tensor of
    shape (sum of subset sizes,) giving a category id 0..C-1 to every position of the
    concatenated subsets (env k occupies offsets[k] .. offsets[k+1]-1; default: one category
    per environment). Each next() returns C entries, entry c = (x, y) or (x, y, idx) of B samples
    of category c, where idx is the position in the concatenated space (map back with
    `env_of(idx)` / `offsets`). set_categories(ids) swaps the assignment; the next batch uses it.

    shard_id / num_shards split every environment (or category) between data-parallel ranks.
    state_dict()/load_state_dict() save and restore the sampling position exactly (the random
    augmentation of images is reseeded, not restored). `backend` says what loads the data.
    """

    def __init__(self, ds, env_indices, batch_size, device, seed=0, subsets=None, train=True, categories=None,
                 per_category=None, return_index=False, backend="auto", num_workers=None, shard_id=0,
                 num_shards=1, image_size=224, transforms="auto"):
        if isinstance(env_indices, int) or not all(isinstance(e, int) and 0 <= e < len(ds) for e in env_indices) \
                or len(env_indices) == 0:
            raise ValueError(f"env_indices must be a non-empty list of ints in [0, {len(ds)}), got {env_indices!r}")
        _check_positive("batch_size", batch_size)
        _check_positive("num_shards", num_shards)
        if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be an int in [0, num_shards={num_shards}), got {shard_id!r}")
        if subsets is not None and (not isinstance(subsets, (list, tuple)) or len(subsets) != len(env_indices)):
            raise ValueError("subsets must be a list with one index tensor per entry of env_indices")
        self.ds, self.env_indices = ds, list(env_indices)
        self.batch_size, self.device, self.seed = batch_size, _as_device(device), seed
        self.train, self.return_index = train, return_index
        self.shard_id, self.num_shards, self.image_size, self.transforms = shard_id, num_shards, image_size, transforms
        self.num_workers = _default_workers() if num_workers is None else num_workers
        envs = [ds[e] for e in self.env_indices]
        self.subsets = [torch.arange(len(env)) if subsets is None else _check_subset(f"subsets[{k}]", subsets[k], len(env))
                        for k, env in enumerate(envs)]
        self.sizes = [int(s.numel()) for s in self.subsets]
        paths = None
        if getattr(ds, "is_image", False):
            paths = [env.paths[i] for env, s in zip(envs, self.subsets) for i in s.tolist()]
        self.backend = choose_backend(ds, backend, paths)
        self.transform_impl = "dali" if self.backend == "dali" else None
        if self.backend == "tensor":
            self._x = torch.cat([env.x[s] for env, s in zip(envs, self.subsets)]).to(self.device)
        else:
            self._paths = paths
        self._y = torch.cat([env.y[s] for env, s in zip(envs, self.subsets)]).to(self.device)
        sampler_dev = self.device if self.backend == "tensor" else torch.device("cpu")
        self.sampler = StepSampler(self.sizes, batch_size, sampler_dev, seed, categories, per_category,
                                   shard_id, num_shards)
        self.offsets = torch.tensor(self.sampler.offsets, dtype=torch.int64, device=self.device)
        self._fetch = None if self.backend == "tensor" else _ImageFetcher(self, self.backend)

    # ---------------------------------------------------------------- iteration
    def __iter__(self):
        return self

    def __next__(self) -> list:
        if self._fetch is None:
            pos, counts = self.sampler.next_step()
            x = self._x[pos]
        else:
            x, pos, counts = self._fetch.next_batch()
            x = x.to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2) if self.backend == "dali" else x.contiguous(memory_format=torch.channels_last)
            pos = pos.to(self.device, non_blocking=True)
        y = self._y[pos]
        out, start = [], 0
        for k, c in enumerate(counts):
            sl = slice(start, start + c)
            start += c
            if not self.return_index:
                out.append((x[sl], y[sl]))
            else:
                idx = pos[sl] if self.category_mode else pos[sl] - self.sampler.offsets[k]
                out.append((x[sl], y[sl], idx))
        return out

    # ---------------------------------------------------------------- categories
    @property
    def category_mode(self) -> bool:
        return self.sampler.category_mode

    @property
    def num_categories(self) -> int | None:
        return self.sampler.num_categories if self.category_mode else None

    @property
    def total(self) -> int:
        """Number of positions in the concatenated subsets (the length `categories` must have)."""
        return self.sampler.total

    def set_categories(self, ids: torch.Tensor) -> None:
        """New category ids, int64 (total,), values 0..C-1 (C may change); no pipeline rebuild
        unless C x per_category outgrows the DALI batch it was built for."""
        self.sampler.set_categories(ids)
        if self._fetch is not None:
            self._fetch.invalidate()

    def env_of(self, idx: torch.Tensor) -> torch.Tensor:
        """Position in env_indices of each concatenated position idx (int64, same device)."""
        return torch.searchsorted(self.offsets[1:], idx, right=True)

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        return self.sampler.state_dict() if self._fetch is None else self._fetch.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        if self._fetch is not None:
            self._fetch.invalidate()



class EvalLoader:
    """Every sample of one environment (or of `subset`) exactly once, in order, in batches.

    Yields (x, y) or, with return_index=True, (x, y, idx): x float32 (b, C, H, W) on device
    (channels_last for images, resized to image_size x image_size and normalised, no
    augmentation), y int64 (b,), idx int64 (b,) positions within `subset` (or the environment).
    With num_shards > 1, rank shard_id sees the contiguous block floor(n*s/k) .. floor(n*(s+1)/k)-1
    (DALI's reader sharding), so the ranks together see every sample once. Iterating again
    starts a new pass; len() is the number of batches of a pass.
    """

    def __init__(self, ds, env_index, batch_size, device, subset=None, return_index=False, backend="auto",
                 num_workers=None, shard_id=0, num_shards=1, image_size=224, transforms="auto"):
        if isinstance(env_index, bool) or not isinstance(env_index, int) or not 0 <= env_index < len(ds):
            raise ValueError(f"env_index must be an int in [0, {len(ds)}), got {env_index!r}")
        _check_positive("batch_size", batch_size)
        _check_positive("num_shards", num_shards)
        if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be an int in [0, num_shards={num_shards}), got {shard_id!r}")
        env = ds[env_index]
        self.ds, self.env_index, self.batch_size, self.device = ds, env_index, batch_size, _as_device(device)
        self.return_index, self.image_size, self.transforms = return_index, image_size, transforms
        self.num_workers = _default_workers() if num_workers is None else num_workers
        self.subset = torch.arange(len(env)) if subset is None else _check_subset("subset", subset, len(env))
        self.shard_id, self.num_shards = shard_id, num_shards
        self.start, self.stop = shard_range(self.subset.numel(), shard_id, num_shards)
        if self.stop <= self.start:
            raise ValueError(f"subset of {self.subset.numel()} samples leaves shard {shard_id} of {num_shards} empty")
        paths = [env.paths[i] for i in self.subset.tolist()] if getattr(ds, "is_image", False) else None
        self.backend = choose_backend(ds, backend, None if paths is None else paths[self.start:self.stop])
        self._y = env.y[self.subset].to(self.device)
        if self.backend == "tensor":
            self._x = env.x[self.subset[self.start:self.stop]].to(self.device)
        else:
            self._paths = paths
        self._pipe = None
        self._clean = True  # the DALI reader sits at a pass boundary

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def _out(self, x, lo, hi):
        y = self._y[lo:hi]
        if not self.return_index:
            return x, y
        return x, y, torch.arange(lo, hi, dtype=torch.int64, device=self.device)

    def __iter__(self):
        if self.backend == "tensor":
            for lo in range(self.start, self.stop, self.batch_size):
                hi = min(lo + self.batch_size, self.stop)
                yield self._out(self._x[lo - self.start:hi - self.start], lo, hi)
        elif self.backend == "dali":
            yield from self._iter_dali()
        else:
            yield from self._iter_torch()

    def _iter_dali(self):
        from .dali import eval_pipeline, to_torch
        if self._pipe is None or not self._clean:
            dev = None
            if self.device.type == "cuda":
                dev = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._pipe = eval_pipeline(self._paths, self.batch_size, max(1, self.num_workers), dev, self.shard_id,
                                       self.num_shards, self.image_size)
        # With pad_last_batch DALI pads every shard to ceil(n / num_shards) samples, so a pass is
        # the same number of reader batches on every rank; the padded tail is read and dropped.
        per_shard = self._pipe.reader_meta("Reader")["epoch_size_padded"] // self.num_shards
        iters = -(-per_shard // self.batch_size)
        self._clean = False
        it = 0
        for lo in range(self.start, self.stop, self.batch_size):
            hi = min(lo + self.batch_size, self.stop)
            images, pos = self._run_checked(lo)
            it += 1
            x = to_torch(images, self.device)[:hi - lo]
            got = to_torch(pos, torch.device("cpu"), torch.int32).flatten()[:hi - lo]
            if not torch.equal(got.long(), torch.arange(lo, hi)):  # guards the reader's sharding contract
                self._pipe = None
                raise RuntimeError(f"DALI reader returned positions {got.tolist()[:8]}..., expected {lo}..{hi - 1}")
            if hi == self.stop:
                for _ in range(it, iters):
                    self._run_checked(hi)
                self._clean = True
            yield self._out(x.permute(0, 3, 1, 2), lo, hi)

    def _run_checked(self, lo):
        try:
            return self._pipe.run()
        except Exception as e:
            self._pipe = None
            from .pil import undecodable
            # DALI prefetches (queue depth 2), so the culprit is in this batch or the next two.
            bad = undecodable(self._paths[lo:min(lo + 3 * self.batch_size, self.stop)])
            if bad:
                raise RuntimeError(f"dali loader failed; undecodable image file(s): {bad}") from e
            raise

    def _iter_torch(self):
        from .pil import FileDataset, make_transform
        tf, self.transform_impl = make_transform(False, self.image_size, self.transforms)
        data = torch.utils.data.Subset(FileDataset(self._paths, tf), range(self.start, self.stop))
        loader = torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=False,
                                             num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                                             multiprocessing_context=_worker_context(self.num_workers))
        lo = self.start
        for x in loader:
            hi = lo + x.shape[0]
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield self._out(x, lo, hi)
            lo = hi
