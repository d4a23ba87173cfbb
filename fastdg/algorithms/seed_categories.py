"""Seed categories with a dynamic distribution (paper 001, Algorithm 1; METHODS.md section 3).

Every `seed_t0` steps the training pool of each domain is split into K seed categories, by
per-sample loss ranking (quantile bins, the paper's default) or by k-means on the features,
and the weights q over categories are reset to 1/|C|. Each step the trainer draws
`per_category` samples from every category (fastdg.data.DomainStreams in category mode, for
tensor and image data sets alike), and the robust loss sum_c q_c L_c is minimised with q
updated exactly as GroupDRO's (eta = 0.01), fused.

The total batch stays batch_size x domains (METHODS.md section 3): per_category =
floor(batch_size x domains / |C|), so a step holds the largest multiple of |C| not above it
(exactly batch_size x domains when |C| divides it). A total batch smaller than |C| (one
sample per category would already exceed it; e.g. seed_per_class with many classes) is
refused by check_hparams.

DomainBed's update(minibatches) (one batch per domain) cannot run this algorithm: the
samples' categories are unknown there. It raises NotImplementedError; use fastdg's trainer,
or recompute_categories + sample_categories + update_categories on a pool held in memory.

The pool statistics (per-sample loss, features for k-means) come from an eval-mode forward
pass over the pool: `pool_statistics` on each batch, then `assign_categories`. The trainer
takes them from the evaluation pass it runs anyway when a re-distribution falls on an
evaluation step, so most re-distributions cost no extra pass over the data.
"""
from __future__ import annotations

import torch

from ..ops import seed_assign_by_loss
from ..profile import phase
from .base import check_bool, check_choice, check_int
from .group_dro import GroupDRO


class SeedCategories(GroupDRO):
    HPARAMS = {
        "seed_k": 4,                 # categories per domain (the paper's best)
        "seed_t0": 1000,             # steps between re-distributions (paper: 1000 of 5000)
        "seed_method": "loss_rank",  # loss_rank | kmeans
        "seed_per_class": False,     # split each domain x class instead of each domain
    }
    samples_by_category = True

    @classmethod
    def num_categories_for(cls, hparams, num_classes, num_domains) -> int:
        """|C|: seed_k categories in each domain (each domain x class with seed_per_class)."""
        return num_domains * (num_classes if hparams["seed_per_class"] else 1) * hparams["seed_k"]

    @classmethod
    def check_hparams(cls, hparams, num_classes=None, num_domains=None):
        super().check_hparams(hparams, num_classes, num_domains)
        check_choice(hparams, "seed_method", ("loss_rank", "kmeans"))
        check_int(hparams, "seed_k", low=1)
        check_int(hparams, "seed_t0", low=1)
        check_bool(hparams, "seed_per_class")
        if num_classes is None or num_domains is None:
            return
        n_cat, total = cls.num_categories_for(hparams, num_classes, num_domains), hparams["batch_size"] * num_domains
        if total < n_cat:
            per = (f"seed_k={hparams['seed_k']} x {num_classes} classes x {num_domains} domains"
                   if hparams["seed_per_class"] else f"seed_k={hparams['seed_k']} x {num_domains} domains")
            raise ValueError(f"SeedCategories: {per} = {n_cat} categories, but the total batch batch_size x "
                             f"domains = {hparams['batch_size']} x {num_domains} = {total} cannot hold one sample "
                             f"of each; raise batch_size to >= {-(-n_cat // num_domains)} or lower seed_k")

    def __init__(self, input_shape, num_classes, num_domains, hparams=None):
        super().__init__(input_shape, num_classes, num_domains, hparams)  # checks the hparams
        self.num_categories = self.num_categories_for(self.hparams, num_classes, num_domains)
        self.register_buffer("q", torch.full((self.num_categories,), 1.0 / self.num_categories))
        self.register_buffer("categories", torch.zeros(0, dtype=torch.int64))

    def per_category(self) -> int:
        """Samples per category: the total batch stays batch_size x domains (rounded down to a
        multiple of |C|; check_hparams refuses a total smaller than |C|)."""
        return self.hparams["batch_size"] * self.num_domains // self.num_categories

    def update(self, minibatches, unlabeled=None):
        raise NotImplementedError(
            "SeedCategories cannot train from DomainBed's update(minibatches): its batches are drawn per seed "
            "category and the rows' categories are unknown there (GroupDRO's update would silently run instead). "
            "Use fastdg's trainer (`fastdg train --algorithm SeedCategories`, fastdg.train.Trainer), or on a pool "
            "held in memory: recompute_categories(x, y, domain), then per step sample_categories(generator) "
            "and update_categories(x[idx], y[idx], category)")

    def due(self, step: int) -> bool:
        return self.categories.numel() == 0 or step % self.hparams["seed_t0"] == 0

    @property
    def needs_features(self) -> bool:
        return self.hparams["seed_method"] == "kmeans"

    @torch.no_grad()
    def pool_statistics(self, x, y):
        """One eval-mode batch of the pool: (logits (b, classes), per-sample loss (b,) float32,
        features (b, d) or None when the method does not use them)."""
        f = self.featurizer(x)
        logits = self.classifier(f)
        loss = torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")
        return logits, loss, (f.float() if self.needs_features else None)

    @torch.no_grad()
    def assign_categories(self, losses, feats, y, domain):
        """Categories from the statistics of the whole pool (concatenated training subsets):
        losses (N,), feats (N, d) or None, y (N,), domain (N,) int64. Resets q to 1/|C|."""
        with phase("assign"):
            k = self.hparams["seed_k"]
            classes = y if self.hparams["seed_per_class"] else None
            ncls = self.num_classes if classes is not None else None
            if self.hparams["seed_method"] == "loss_rank":
                cats = seed_assign_by_loss(losses, domain, k, classes=classes, num_classes=ncls)
            else:
                from ..cluster import seed_categories  # batched k-means per domain (x class)

                cats = seed_categories("kmeans", embeddings=feats, domain=domain, classes=classes, k=k,
                                       seed=int(self.q.numel()))
            self.categories = cats
            self.q.fill_(1.0 / self.num_categories)
        return cats

    @torch.no_grad()
    def recompute_categories(self, x, y, domain, chunk=1024):
        """Assign every pool sample (x, y, domain: the concatenated training subsets) a category."""
        was_training = self.training
        self.eval()
        losses, feats = [], []
        with phase("forward"):
            for s in range(0, len(y), chunk):
                _, loss, f = self.pool_statistics(x[s:s + chunk], y[s:s + chunk])
                losses.append(loss)
                feats.append(f)
        self.train(was_training)
        return self.assign_categories(torch.cat(losses), torch.cat(feats) if self.needs_features else None, y, domain)

    def sample_categories(self, generator):
        """Pool indices: `per_category` drawn uniformly (with replacement) from every category.
        Returns (indices (|C| * B,), category of each). On the pool's device, no host sync.
        (A sampler for a pool held in memory; the trainer uses DomainStreams' category mode,
        which draws without replacement within a step.)"""
        cats = self.categories
        B = self.per_category()
        order = torch.argsort(cats, stable=True)
        counts = torch.bincount(cats, minlength=self.num_categories)
        starts = torch.cumsum(counts, 0) - counts
        u = torch.rand(self.num_categories, B, generator=generator, device=generator.device)
        # Empty categories (possible with k-means) draw nothing useful: clamp to one slot and mask.
        pick = starts[:, None] + (u * counts.clamp_min(1)[:, None]).long()
        pick = pick.clamp_max(max(len(order) - 1, 0))
        valid = (counts > 0)[:, None].expand(-1, B).reshape(-1)
        idx = order[pick.reshape(-1)]
        cat_of = torch.arange(self.num_categories, device=cats.device).repeat_interleave(B)
        return idx[valid], cat_of[valid]

    def update_categories(self, x, y, category):
        """One step on a per-category batch (x, y, category id per row)."""
        return self.robust_step([(x, y)], category, self.q)
