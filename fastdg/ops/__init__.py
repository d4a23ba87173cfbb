"""Functional ops. Each picks a backend per call (see fastdg._dispatch); the pure-PyTorch
references in fastdg.reference are the specification and the fallback.
`last_choice(op)` says which backend the latest call of `op` used and why others were not."""
from .._dispatch import last_choice  # noqa: F401
from .bin_norm import bin_norm  # noqa: F401
from .group_loss import group_loss  # noqa: F401
from .kmeans import kmeans, kmeans_predict  # noqa: F401
from .seed_assign import seed_assign_by_loss  # noqa: F401

__all__ = ["bin_norm", "group_loss", "kmeans", "kmeans_predict", "seed_assign_by_loss", "last_choice"]
