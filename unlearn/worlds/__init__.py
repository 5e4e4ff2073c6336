"""Embedded testbeds that ship inside installed packages, trained once and cached."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError

WORLDS = ("digits",)
CACHE_ENV = "UNLEARN_CACHE"


def cache_dir() -> Path:
    """Where worlds are cached: `$UNLEARN_CACHE`, else `~/.cache/unlearn-toolkit`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "unlearn-toolkit")


def prepare(world: str, verbose: bool = True, families: Sequence[str] | str | None = None) -> dict[str, Path]:
    """Build (once) and return the checkpoints of a world, by family.

    Args:
        world: one of `WORLDS`.
        verbose: print what is trained and how well.
        families: which models to build: None for the quick default (the classifier only), "all", or names
            such as ("classifier", "ddpm", "t2i"). Models already cached are returned as well.
    """
    if world not in WORLDS:
        raise ConfigError(f"unknown world {world!r}; known worlds: {', '.join(WORLDS)}")
    from .digits import prepare_digits

    return prepare_digits(verbose=verbose, families=families)


def resolve(checkpoint: str) -> Path:
    """Turn `world:<name>[/<family>]` into the cached checkpoint path, building the world if needed."""
    name = checkpoint.split(":", 1)[1]
    world, _, family = name.partition("/")
    family = family or "classifier"
    if world in WORLDS:
        from .digits import FAMILIES

        if family not in FAMILIES:
            raise ConfigError(f"world {world!r} has no {family!r} model; it has: {', '.join(FAMILIES)}")
    paths = prepare(world, verbose=True, families=(family,))
    if family not in paths:
        raise ConfigError(f"world {world!r} has no {family!r} model; it has: {', '.join(paths)}")
    return paths[family]
