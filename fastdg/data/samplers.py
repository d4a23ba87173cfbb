"""Index sampling for DomainStreams: one stream per domain, or B samples per seed category.

Everything here works on positions in the *concatenated* index space: the subsets of the
selected environments laid end to end (env j owns positions offsets[j] .. offsets[j+1]-1).
Sampling runs on `device` with torch generators and never synchronises with the host in
`next_step`, so a GPU training loop over tensor data sets stays asynchronous.

- Domain mode: each environment has its own generator (seeded by (seed, env position)) and
  walks through random permutations of its positions, B per step; when a permutation runs out
  the step takes the tail and the head of a fresh one (every sample is seen once per epoch).
- Category mode (METHODS.md section 3): given category ids over the concatenated positions,
  each step draws B positions from every category, without replacement within the step when
  the category holds at least B members (a category smaller than B repeats members). Ids can be
  swapped at any time with `set_categories` without touching the loaders.

Sharding (data parallel): rank `shard_id` of `num_shards` owns every num_shards-th position of
each environment (domain mode) or of each category (category mode), so ranks never overlap.
"""
from __future__ import annotations

import torch

from .datasets import _seed_int


def _gen(device: torch.device, seed) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed_int(seed))


class StepSampler:
    """Draws the concatenated positions of one training step.

    sizes: list of subset sizes per environment; batch_size: B per environment (domain mode);
    categories: optional int64 (sum(sizes),) ids; per_category: B per category (category mode).
    `next_step()` returns (positions int64 (N,) on device, counts: list[int]) where the
    positions are grouped: counts[k] consecutive entries for environment / category k.
    """

    def __init__(self, sizes, batch_size, device, seed=0, categories=None, per_category=None,
                 shard_id=0, num_shards=1):
        self.device = torch.device(device)
        self.sizes = [int(s) for s in sizes]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.total = self.offsets[-1]
        self.batch_size = int(batch_size)
        self.seed = seed
        self.shard_id, self.num_shards = int(shard_id), int(num_shards)
        self._own = []
        for j, n in enumerate(self.sizes):
            own = torch.arange(self.shard_id, n, self.num_shards, dtype=torch.int64, device=self.device)
            if own.numel() == 0:
                raise ValueError(f"environment {j} has {n} samples: nothing left for shard {shard_id} of {num_shards}")
            self._own.append(own)
        self._gens = [_gen(self.device, (_seed_int(seed), j, self.shard_id)) for j in range(len(self.sizes))]
        self._perm = [None] * len(self.sizes)
        self._pos = [0] * len(self.sizes)
        self._cat_gen = _gen(self.device, (_seed_int(seed), -1, self.shard_id))
        self.per_category = None
        self.categories = None
        if categories is not None or per_category is not None:
            if per_category is None:
                per_category = self.batch_size
            if isinstance(per_category, bool) or not isinstance(per_category, int) or per_category < 1:
                raise ValueError(f"per_category must be a positive int (B samples per category), got {per_category!r}")
            self.per_category = per_category
            if categories is None:  # start with one category per environment
                categories = torch.cat([torch.full((n,), j, dtype=torch.int64) for j, n in enumerate(self.sizes)])
            self.set_categories(categories)

    # ------------------------------------------------------------------ categories
    def set_categories(self, ids) -> None:
        """Replace the category ids: int (sum of subset sizes,) tensor, values 0..C-1, every
        category non-empty (for this shard). Synchronises once (to count the categories)."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"categories must be an int64 tensor of shape ({self.total},), got {type(ids).__name__}")
        if ids.dtype in (torch.bool,) or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise TypeError(f"categories must be an integer tensor of shape ({self.total},), got dtype {ids.dtype}")
        if ids.dim() != 1 or ids.shape[0] != self.total:
            raise ValueError(f"categories must have shape ({self.total},) (one id per position of the concatenated "
                             f"subsets), got {tuple(ids.shape)}")
        if self.per_category is None:
            raise ValueError("set_categories needs category mode: build DomainStreams with per_category=B")
        ids = ids.detach().to("cpu", torch.int64).clone()  # ours: callers may reuse their tensor
        if int(ids.min()) < 0:
            raise ValueError(f"categories must be >= 0, got min {int(ids.min())}")
        n_cat = int(ids.max()) + 1
        order = torch.argsort(ids, stable=True)
        counts_all = torch.bincount(ids, minlength=n_cat)
        starts = torch.cumsum(counts_all, 0) - counts_all
        rank = torch.arange(self.total) - starts[ids[order]]
        keep = rank % self.num_shards == self.shard_id
        order, cat_of = order[keep], ids[order][keep]
        counts = torch.bincount(cat_of, minlength=n_cat)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"categories {empty[:10]} have no samples (for shard {self.shard_id}); "
                             f"ids must cover 0..{n_cat - 1} without gaps")
        width = max(int(counts.max()), self.per_category)
        table = torch.zeros(n_cat, width, dtype=torch.int64)
        col = torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[cat_of]
        table[cat_of, col] = order
        self.categories = ids
        self._table = table.to(self.device)
        self._counts = counts.to(self.device)
        # Invalid slots get key 2 (> any rand) so topk(smallest) picks real members first.
        self._pad_mask = (torch.arange(width)[None, :] >= counts[:, None]).to(self.device)
        self.num_categories = n_cat

    @property
    def category_mode(self) -> bool:
        return self.per_category is not None

    # ------------------------------------------------------------------ sampling
    def _env_take(self, j: int, b: int) -> torch.Tensor:
        parts, need = [], b
        while need > 0:
            if self._perm[j] is None or self._pos[j] >= self._perm[j].numel():
                own = self._own[j]
                self._perm[j] = own[torch.randperm(own.numel(), generator=self._gens[j], device=self.device)]
                self._pos[j] = 0
            take = min(need, self._perm[j].numel() - self._pos[j])
            parts.append(self._perm[j][self._pos[j]:self._pos[j] + take])
            self._pos[j] += take
            need -= take
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out + self.offsets[j]

    def next_step_counts(self) -> list:
        """The `counts` the next step will have, without drawing it."""
        if self.category_mode:
            return [self.per_category] * self.num_categories
        return [self.batch_size] * len(self.sizes)

    def next_step(self) -> tuple[torch.Tensor, list]:
        if not self.category_mode:
            pos = torch.cat([self._env_take(j, self.batch_size) for j in range(len(self.sizes))])
            return pos, [self.batch_size] * len(self.sizes)
        b = self.per_category
        keys = torch.rand(self._table.shape, generator=self._cat_gen, device=self.device)
        keys.masked_fill_(self._pad_mask, 2.0)
        pick = keys.topk(b, dim=1, largest=False).indices
        pick = pick % self._counts[:, None]  # only matters for categories with fewer than b members
        return torch.gather(self._table, 1, pick).flatten(), [b] * self.num_categories

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Generator states and stream positions (CPU tensors / ints); enough to resume exactly."""
        return {"env_gens": [g.get_state() for g in self._gens],
                "perms": [None if p is None else p.cpu() for p in self._perm],
                "pos": list(self._pos),
                "cat_gen": self._cat_gen.get_state(),
                "categories": self.categories,  # never modified in place, replaced by set_categories
                "sizes": list(self.sizes), "shard": (self.shard_id, self.num_shards)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["sizes"]) != self.sizes or tuple(state["shard"]) != (self.shard_id, self.num_shards):
            raise ValueError(f"state was saved for subset sizes {state['sizes']} and shard {state['shard']}, "
                             f"these streams have {self.sizes} and {(self.shard_id, self.num_shards)}")
        for g, s in zip(self._gens, state["env_gens"]):
            g.set_state(s)
        self._perm = [None if p is None else p.to(self.device) for p in state["perms"]]
        self._pos = list(state["pos"])
        self._cat_gen.set_state(state["cat_gen"])
        if state.get("categories") is not None and self.category_mode:
            self.set_categories(state["categories"])
