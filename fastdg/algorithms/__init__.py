"""DG algorithms with a DomainBed-compatible interface (see base.py).

    from fastdg.algorithms import get_algorithm
    alg = get_algorithm("GroupDRO")(input_shape, num_classes, num_domains, hparams)
"""
from .base import ERM, Algorithm, default_hparams
from .group_dro import GroupDRO
from .metabin import MetaBIN
from .mldg import MLDG
from .penalties import IRM, VREx
from .sagnet import SagNet
from .seed_categories import SeedCategories
from .self_balanced import SelfBalanced

ALGORITHMS = {cls.__name__: cls for cls in (ERM, GroupDRO, SeedCategories, IRM, VREx, MLDG, SagNet, MetaBIN,
                                            SelfBalanced)}


def get_algorithm(name: str):
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}") from None


__all__ = ["ALGORITHMS", "Algorithm", "default_hparams", "get_algorithm"] + sorted(ALGORITHMS)
