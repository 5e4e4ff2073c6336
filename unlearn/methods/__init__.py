"""The method registry."""

from __future__ import annotations

import difflib

from ..errors import ConfigError
from .adapt_then_unlearn import AdaptThenUnlearn
from .ant import ANT
from .base import Method
from .baselines import (
    FineTune,
    GradAscent,
    GradAscentDiffusion,
    RandomLabel,
    Retrain,
    RetrainDiffusion,
    RetrainGAN,
)
from .doco import DoCo
from .esd import ESD
from .l1_sparse import L1Sparse
from .laf import LAF
from .realera import RealEra
from .salun import SalUn, SalUnDiffusion
from .uce import UCE

# name -> its implementations, one per model family (a method's objective differs by family, so do its
# hyperparameters: SalUn trains a classifier in epochs with SGD, a diffusion model in steps with Adam).
METHODS: dict[str, tuple[type[Method], ...]] = {
    "retrain": (Retrain, RetrainDiffusion, RetrainGAN),
    "finetune": (FineTune,),
    "grad_ascent": (GradAscent, GradAscentDiffusion),
    "random_label": (RandomLabel,),
    "salun": (SalUn, SalUnDiffusion),
    "l1_sparse": (L1Sparse,),
    "laf": (LAF,),
    "esd": (ESD,),
    "doco": (DoCo,),
    "ant": (ANT,),
    "uce": (UCE,),
    "realera": (RealEra,),
    "adapt_then_unlearn": (AdaptThenUnlearn,),
}

for (
    _name,
    _variants,
) in METHODS.items():  # each class knows its name and variants (a refusal names the variant)
    for _cls in _variants:
        _cls.registered_as, _cls.variants = _name, _variants


def families(name: str) -> tuple[str, ...]:
    """The model families a registered method supports."""
    return tuple(family for cls in METHODS[name] for family in cls.families)


def get_method(name: str, family: str | None = None) -> type[Method]:
    """The method class registered as `name`; refuses unknown names and unsupported families in one sentence."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown method {name!r}; {hint}known methods: {', '.join(METHODS)}")
    if family is None:
        return METHODS[name][0]
    for cls in METHODS[name]:
        if family in cls.families:
            return cls
    raise ConfigError(
        f"method {name!r} does not support the {family} family; it supports: {', '.join(families(name))}"
    )


__all__ = ["METHODS", "Method", "families", "get_method"]
