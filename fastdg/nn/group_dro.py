"""GroupDROLoss: the robust per-group loss as a module holding its weights q.

    loss_fn = fastdg.nn.GroupDROLoss(num_groups=3, eta=0.01).to(device)
    loss = loss_fn(logits, target, group)            # or loss_fn(per_sample_losses, group=group)
    loss.backward()
    loss_fn.group_loss, loss_fn.group_count           # (G,) tensors for logging: no host sync

q is a buffer (in state_dict, so checkpoints keep it), starts at 1/G (METHODS.md section 2) and
is updated on the device by every training-mode call; eval-mode calls use q without updating it.
Under torch.distributed, per-group sums and counts are all-reduced before the update, so every
rank holds the same q; see `forward` for the gradient scaling that DDP's averaging needs.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.group_loss import group_loss


def _distributed_world() -> int:
    """World size when torch.distributed is initialised, else 1."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sums(sums: torch.Tensor, counts: torch.Tensor):
    """Sum per-group sums and counts over every rank in one collective."""
    both = torch.stack([sums, counts.to(sums.dtype)])
    torch.distributed.all_reduce(both)
    return both[0], both[1].to(counts.dtype)


class GroupDROLoss(nn.Module):
    """Robust loss sum_g q_g L_g with q <- normalise(q * exp(eta * (L_g + adj_g))) each call.

    num_groups: G (domains, seed categories, domain x class groups, ...).
    eta: step size of the exponential update (default 0.01, DomainBed's groupdro_eta).
    label_smoothing: for logits input.
    generalization_adjustment, group_sizes: Sagawa's adjustment C / sqrt(N_g) (N_g = group
        size in the training set) added to L_g in the q update only (never to the loss).
    all_reduce: "auto" (when torch.distributed is initialised), True or False.
    ddp_average: when reducing across W ranks, scale this rank's gradient by W (the loss value
        is unchanged) so that DDP's gradient averaging yields the exact gradient of the global
        robust loss. Set False when you sum gradients yourself.
    check_inputs: "auto" validates ids and finiteness on CPU tensors only (on a GPU the checks
        would read device values, a host sync per step); True / False force it. Unchecked, a
        non-finite loss leaves q unchanged and makes the returned loss non-finite.
    """

    def __init__(self, num_groups: int, eta: float = 0.01, label_smoothing: float = 0.0,
                 generalization_adjustment: float = 0.0, group_sizes=None, all_reduce="auto",
                 ddp_average: bool = True, check_inputs="auto", backend: str | None = None):
        super().__init__()
        if int(num_groups) < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        if not 0 <= eta < float("inf"):  # inf * 0 (an empty group) would be NaN in every weight
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        if all_reduce not in ("auto", True, False):
            raise ValueError(f"all_reduce must be 'auto', True or False, got {all_reduce!r}")
        self.num_groups, self.eta, self.label_smoothing = int(num_groups), float(eta), float(label_smoothing)
        self.all_reduce, self.ddp_average, self.check_inputs, self.backend = all_reduce, ddp_average, check_inputs, backend
        self.register_buffer("q", torch.full((self.num_groups,), 1.0 / self.num_groups))
        self.register_buffer("group_loss", torch.zeros(self.num_groups), persistent=False)
        self.register_buffer("group_count", torch.zeros(self.num_groups), persistent=False)
        self.register_buffer("adjustment", self._adjustment(generalization_adjustment, group_sizes))

    def _adjustment(self, c, group_sizes):
        if group_sizes is None:
            if c:
                raise ValueError("generalization_adjustment needs group_sizes (training-set size of each group)")
            return None
        sizes = torch.as_tensor(group_sizes, dtype=torch.float32)
        if sizes.shape != (self.num_groups,):
            raise ValueError(f"group_sizes must have shape ({self.num_groups},), got {tuple(sizes.shape)}")
        if bool((sizes <= 0).any()):
            raise ValueError("group_sizes must be positive")
        return float(c) / sizes.sqrt()

    @torch.no_grad()
    def reset(self, num_groups: int | None = None, group_sizes=None, generalization_adjustment: float = 0.0) -> None:
        """Back to q = 1/G, e.g. when seed categories are recomputed; optionally with a new G."""
        dev = self.q.device
        if num_groups is not None and int(num_groups) != self.num_groups:
            if int(num_groups) < 1:
                raise ValueError(f"num_groups must be >= 1, got {num_groups}")
            self.num_groups = int(num_groups)
            self.q = torch.empty(self.num_groups, device=dev)
            self.group_loss = torch.zeros(self.num_groups, device=dev)
            self.group_count = torch.zeros(self.num_groups, device=dev)
            if group_sizes is None:
                self.adjustment = None
        if group_sizes is not None:
            self.adjustment = self._adjustment(generalization_adjustment, group_sizes).to(dev)
        self.q.fill_(1.0 / self.num_groups)

    def _world(self) -> int:
        if self.all_reduce is False:
            return 1
        world = _distributed_world()
        if self.all_reduce is True and world == 1 and not torch.distributed.is_initialized():
            raise RuntimeError("GroupDROLoss(all_reduce=True) needs torch.distributed to be initialised")
        return world

    def forward(self, input: torch.Tensor, target: torch.Tensor | None = None,
                group: torch.Tensor | None = None) -> torch.Tensor:
        """input: logits (N, K) with target (N,), or per-sample losses (N,) with target=None;
        group (N,) int64 ids in [0, G). Returns the robust loss (a differentiable scalar)."""
        if group is None:
            raise TypeError("GroupDROLoss needs group ids: loss_fn(logits, target, group) or "
                            "loss_fn(losses, group=group)")
        check = self.check_inputs
        if check == "auto":
            check = input.device.type == "cpu"
        world = self._world()
        out = group_loss(input, target, group, self.q, eta=self.eta if self.training else 0.0,
                         label_smoothing=self.label_smoothing, adjustment=self.adjustment,
                         reduce_fn=all_reduce_sums if world > 1 else None, check_inputs=check,
                         backend=self.backend)
        with torch.no_grad():
            if self.training:
                self.q.copy_(out.q)
            self.group_loss.copy_(out.group_loss)
            self.group_count.copy_(out.group_count)
        loss = out.loss
        if world > 1 and self.ddp_average:
            # Same value; gradient x W, undone by DDP's mean over W ranks.
            loss = loss + (world - 1) * (loss - loss.detach())
        return loss

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, eta={self.eta}, label_smoothing={self.label_smoothing}"
