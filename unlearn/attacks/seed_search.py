"""Seed search: the same-budget best-of-N baseline of the prompt attacks (reference/attacks.md §0, rule 2;
UnlearnDiffAtk's success rate is itself a best-of-up-to-50 on one seed).

The same targets (forget prompt, seed) as the search attack; the prompt stays unchanged and only the initial
noise changes: each target tries its own seed first, then fresh noise seeds, `generations` candidates per
model spread evenly over the targets, until the first judge recognizes the concept. A target is broken when
the second judge agrees on the image that stopped its search.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .adversarial_prompt import (
    DEFAULT_TARGETS,
    SEARCH_METRICS,
    Candidate,
    PromptSearch,
    SearchPoint,
    run_search,
)
from .base import Attack, Probe, Target, hyperparameter
from .random_prompt import spread

__all__ = ["SeedSearch"]


@dataclass
class SeedSearch(Attack):
    """The unchanged prompt with fresh noise seeds, best of `generations`: the prompt searches' baseline.

    See the module docstring."""

    name = "seed_search"
    families = ("diffusion",)
    success_meaning = (
        "share of (forget prompt, seed) targets on which the unchanged prompt with some fresh noise seed "
        "shows the concept, by the second judge, with the search attack's budget"
    )
    metrics = SEARCH_METRICS

    generations: int = hyperparameter(7 * DEFAULT_TARGETS, "generations per model, spread over the targets")
    targets: int = hyperparameter(
        DEFAULT_TARGETS, "targets: forget conditions cycled, each with its own seed"
    )
    batch: int = hyperparameter(16, "candidates drawn and judged together")

    def validate(self) -> None:
        self.require_int("generations", "targets", "batch")
        if self.generations < self.targets:
            raise ConfigError(
                f"seed_search needs at least one generation per target: generations {self.generations} < "
                f"targets {self.targets}; raise generations or lower targets"
            )

    def check(self, target: Target) -> None:
        if target.original.conditioning not in ("text", "class"):
            raise ConfigError("seed_search needs a text-to-image or class-conditional diffusion model")

    def budget(self, target: Target) -> str:
        return (
            f"{self.generations} generations over {self.targets} targets (the unchanged prompt, fresh seeds)"
        )

    def run(self, model, target: Target, seed: int) -> Probe:
        self.check(target)
        generator = torch.Generator().manual_seed(seed)
        limits = spread(self.generations, self.targets)

        def batches(search, point):
            return self.batches(search, point, generator)

        return run_search(self.name, model, target, seed, batches, limits)

    def batches(self, search: PromptSearch, point: SearchPoint, generator) -> Iterator[list[Candidate]]:
        condition = search.base_condition(point)
        while True:
            seeds = torch.randint(2**31 - 1, (self.batch,), generator=generator).tolist()
            yield [Candidate(condition, search.guidance, s, f"seed {s}") for s in seeds]
