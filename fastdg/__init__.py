"""fastdg: fused kernels and a thin training API for domain-generalization training.

Importing fastdg is cheap and never fails because an optional piece is missing: the
compiled extension, Triton, a GPU and DALI are all looked up lazily, the first time an
op or loader needs them. `python -m fastdg.info` says which backends work here.
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (pure Python; loads no extension)
from . import nn  # noqa: E402,F401  (modules on top of ops; loads nothing either)

__all__ = ["ops", "nn", "__version__"]
