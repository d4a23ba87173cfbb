"""Loaders for tensor data sets: the data live on the device and are sampled there with a
torch generator, so a step costs one gather per domain and no worker processes.

DomainStreams: one infinite stream per training domain, combined per step (DomainBed's
InfiniteDataLoader draws with replacement; so does this). EvalLoader: every sample once.
"""
from __future__ import annotations

import hashlib

import torch


def split_holdout(n: int, holdout_fraction: float = 0.2, seed=(0, 0)):
    """(train_idx, holdout_idx) int64: a random `holdout_fraction` of range(n) held out,
    seeded by `seed` (DomainBed seeds it per (trial seed, environment))."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    digest = hashlib.sha256(repr(tuple(seed) if isinstance(seed, (tuple, list)) else seed).encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
    perm = torch.randperm(n, generator=gen)
    k = int(n * holdout_fraction)
    return perm[k:], perm[:k]


def _tensor_env(ds, i, subset, device):
    if ds.is_image:
        raise NotImplementedError(f"{ds.name} is an image data set; this loader takes tensor data sets")
    env = ds[i]
    x, y = (env.x, env.y) if subset is None else (env.x[subset], env.y[subset])
    if len(y) == 0:
        raise ValueError(f"environment {i} of {ds.name} has no samples in the requested subset")
    return x.to(device), y.to(device)


class DomainStreams:
    """Iterating yields, every step, [(x, y)] with one batch of `batch_size` per environment in
    `env_indices` (optionally restricted to `subsets[k]`, e.g. the training split)."""

    def __init__(self, ds, env_indices, batch_size, device, seed=0, subsets=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        subsets = subsets or [None] * len(env_indices)
        self.data = [_tensor_env(ds, i, s, device) for i, s in zip(env_indices, subsets)]
        self.batch_size = batch_size
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self):
        out = []
        for x, y in self.data:
            idx = torch.randint(0, len(y), (self.batch_size,), generator=self.generator, device=y.device)
            out.append((x[idx], y[idx]))
        return out

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"].to("cpu") if self.generator.device.type == "cpu"
                                 else state["generator"])


class EvalLoader:
    """Every sample of one environment (or of `subset`) exactly once, in order, as (x, y)."""

    def __init__(self, ds, env_index, batch_size, device, subset=None):
        self.x, self.y = _tensor_env(ds, env_index, subset, device)
        self.batch_size = batch_size

    def __len__(self):
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for s in range(0, len(self.y), self.batch_size):
            yield self.x[s:s + self.batch_size], self.y[s:s + self.batch_size]
