"""The method registry."""

from __future__ import annotations

import difflib

from ..errors import ConfigError
from .base import Method
from .baselines import FineTune, GradAscent, RandomLabel, Retrain
from .l1_sparse import L1Sparse
from .laf import LAF
from .salun import SalUn

METHODS: dict[str, type[Method]] = {
    "retrain": Retrain,
    "finetune": FineTune,
    "grad_ascent": GradAscent,
    "random_label": RandomLabel,
    "salun": SalUn,
    "l1_sparse": L1Sparse,
    "laf": LAF,
}


def get_method(name: str, family: str | None = None) -> type[Method]:
    """The method class registered as `name`; refuses unknown names and unsupported families in one sentence."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown method {name!r}; {hint}known methods: {', '.join(METHODS)}")
    cls = METHODS[name]
    if family is not None and family not in cls.families:
        raise ConfigError(
            f"method {name!r} does not support the {family} family; it supports: {', '.join(cls.families)}"
        )
    return cls


__all__ = ["METHODS", "Method", "get_method"]
