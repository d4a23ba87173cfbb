"""Use fastdg algorithms from a DomainBed checkout (facebookresearch/DomainBed).

    from domainbed import algorithms, hparams_registry
    from fastdg.algorithms.domainbed import register
    register(algorithms, hparams_registry, names=["MetaBIN", "SelfBalanced"])
    # then DomainBed's own code finds them:
    cls = algorithms.get_algorithm_class("MetaBIN")
    hp = hparams_registry.default_hparams("MetaBIN", "RotatedMNIST")

DomainBed's scripts/train.py reads `--algorithm` and calls get_algorithm_class itself, so run
it from a small launcher that calls register() first, e.g.
    python -c "import runpy, sys; from domainbed import algorithms, hparams_registry; \
from fastdg.algorithms.domainbed import register; register(algorithms, hparams_registry); \
sys.argv = ['train'] + sys.argv[1:]; runpy.run_module('domainbed.scripts.train', run_name='__main__')" \
        --algorithm MetaBIN --dataset RotatedMNIST ...

What register() does, against DomainBed's real interface:
- algorithms module: `ALGORITHMS` is a list of names and `get_algorithm_class(name)` looks the
  name up in the module's globals(); register() appends the name and sets the module
  attribute to a wrapper class.
- hparams_registry module: `_hparams(algorithm, dataset, random_seed)` returns
  {name: (default, random)}, and `default_hparams` / `random_hparams` call it through the
  module's globals at call time; register() replaces `_hparams` by a function that adds the
  fastdg defaults of a registered algorithm (the same value as default and as random draw:
  fastdg has no search distributions) for the names DomainBed does not define itself, so
  DomainBed's lr / batch_size / weight_decay / nonlinear_classifier keep DomainBed's values.
- the wrapper subclasses the fastdg class. Its constructor maps DomainBed's hparams to
  fastdg's (`resnet18: True` -> resnet_depth 18; keys fastdg does not know, e.g.
  data_augmentation, resnet_dropout, class_balanced, are dropped and listed in
  `ignored_hparams`), and its update() converts the statistics to Python floats (DomainBed's
  contract; one host synchronisation per step, at this boundary only).
Notes: fastdg's ResNets never download weights (DomainBed starts from ImageNet weights): give
`pretrained_path` for a comparable run. Algorithms that sample by seed category
(samples_by_category) need fastdg's trainer and cannot be registered.
"""
from __future__ import annotations

import torch

from . import ALGORITHMS as FASTDG_ALGORITHMS
from .base import default_hparams

_NOT_IN_REGISTRY = {"resnet_depth"}  # DomainBed chooses the depth with its own 'resnet18'


def translate_hparams(cls, hparams: dict):
    """DomainBed hparams -> (fastdg hparams for cls, sorted list of the ignored names)."""
    known = default_hparams(cls)
    out, ignored = {}, []
    for k, v in hparams.items():
        if k in known:
            out[k] = v
        elif k != "resnet18":
            ignored.append(k)
    if hparams.get("resnet18"):
        out["resnet_depth"] = 18
    return out, sorted(ignored)


def stats_to_floats(stats: dict) -> dict:
    """{name: tensor} -> {name: float} (the mean of a non-scalar tensor), with one transfer."""
    keys = [k for k, v in stats.items() if isinstance(v, torch.Tensor)]
    out = {k: v for k, v in stats.items() if k not in keys}
    if keys:
        values = torch.stack([stats[k].detach().float().mean().cpu() for k in keys]).tolist()
        out.update(zip(keys, values))
    return out


def wrap(cls, name: str | None = None, module: str | None = None) -> type:
    """A subclass of the fastdg algorithm `cls` with DomainBed's constructor and update()."""
    name = name or cls.__name__

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        fd_hparams, ignored = translate_hparams(cls, dict(hparams))
        cls.__init__(self, input_shape, num_classes, num_domains, fd_hparams)
        self.domainbed_hparams = dict(hparams)
        self.ignored_hparams = ignored

    def update(self, minibatches, unlabeled=None):
        return stats_to_floats(cls.update(self, minibatches, unlabeled))

    attrs = {"__init__": __init__, "update": update, "fastdg_class": cls,
             "__doc__": f"fastdg {cls.__name__} behind DomainBed's interface.\n\n{cls.__doc__ or ''}"}
    if module:
        attrs["__module__"] = module
    out = type(name, (cls,), attrs)
    out.__qualname__ = name
    return out


def _install_registry(registry, name: str, defaults: dict) -> None:
    extra = getattr(registry, "_fastdg_hparams", None)
    if extra is None:
        original = registry._hparams
        extra = {}

        def _hparams(algorithm, dataset, random_seed):
            hp = original(algorithm, dataset, random_seed)
            for k, v in extra.get(algorithm, {}).items():
                hp.setdefault(k, (v, v))
            return hp

        _hparams.__wrapped__ = original
        _hparams.__doc__ = original.__doc__
        registry._hparams = _hparams
        registry._fastdg_hparams = extra
    extra[name] = defaults


def register(algorithms_module, hparams_registry_module=None, names=None, prefix: str = "",
             replace: bool = False) -> dict:
    """Insert wrapped fastdg algorithms into a DomainBed `algorithms` module (and their default
    hyper-parameters into its `hparams_registry`). Registered as prefix + fastdg name.

    names: fastdg algorithm names (default: every fastdg algorithm that runs behind DomainBed's
    interface and whose registered name DomainBed does not already define; with the default
    prefix "" that skips DomainBed's own ERM, GroupDRO, IRM, ... -- use e.g.
    prefix="fastdg_" to add fastdg's versions beside them). An explicitly named algorithm
    whose registered name exists raises ValueError unless replace=True.
    Calling register() again is harmless. Returns {registered name: wrapper class}."""
    if not isinstance(getattr(algorithms_module, "ALGORITHMS", None), list) or \
            not callable(getattr(algorithms_module, "get_algorithm_class", None)):
        raise TypeError("algorithms_module must be DomainBed's algorithms module (a list ALGORITHMS and "
                        "get_algorithm_class)")
    if hparams_registry_module is not None and not callable(getattr(hparams_registry_module, "_hparams", None)):
        raise TypeError("hparams_registry_module must be DomainBed's hparams_registry (with _hparams)")
    explicit = names is not None
    if names is None:
        names = [n for n, c in FASTDG_ALGORITHMS.items() if not getattr(c, "samples_by_category", False)]
    elif isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in FASTDG_ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown fastdg algorithm(s) {unknown}; known: {sorted(FASTDG_ALGORITHMS)}")
    out = {}
    for n in names:
        cls = FASTDG_ALGORITHMS[n]
        if getattr(cls, "samples_by_category", False):
            raise ValueError(f"{n} samples by seed category and needs fastdg's trainer; it cannot run behind "
                             "DomainBed's update(minibatches)")
        reg_name = prefix + n
        existing = getattr(algorithms_module, reg_name, None)
        ours = getattr(existing, "fastdg_class", None) is not None
        if (existing is not None or reg_name in algorithms_module.ALGORITHMS) and not ours and not replace:
            if explicit:
                raise ValueError(f"DomainBed already defines {reg_name!r}; pass replace=True or a prefix")
            continue
        wrapper = wrap(cls, reg_name, algorithms_module.__name__)
        setattr(algorithms_module, reg_name, wrapper)
        if reg_name not in algorithms_module.ALGORITHMS:
            algorithms_module.ALGORITHMS.append(reg_name)
        if hparams_registry_module is not None:
            defaults = {k: v for k, v in default_hparams(cls).items() if k not in _NOT_IN_REGISTRY}
            _install_registry(hparams_registry_module, reg_name, defaults)
        out[reg_name] = wrapper
    return out
