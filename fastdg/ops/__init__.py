"""Functional ops. Each picks a backend per call (see fastdg._dispatch); the pure-PyTorch
references in fastdg.reference are the specification and the fallback."""
from .._dispatch import last_choice  # noqa: F401
