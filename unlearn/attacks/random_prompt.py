"""Random prompts: the same-budget baseline of `adversarial_prompt` (reference/attacks.md §0, rule 2).

The same targets (forget prompt, seed) as the search attack; `generations` candidates per model, spread evenly
over the targets; each target tries its unmodified prompt first, then random candidates until the first judge
recognizes the concept: k random prefix tokens (drawn uniformly from the vocabulary the optimizer searches,
special tokens excluded) before the target prompt (text), or a random point of the simplex of class embeddings
(uniform, Dirichlet(1)) at a guidance drawn from the sweep {1, 3, 7.5, 15} (class-conditional). A target is
broken when the second judge agrees on the image that stopped its search.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .adversarial_prompt import (
    DEFAULT_TARGETS,
    GUIDANCE_SWEEP,
    SEARCH_METRICS,
    VOCABULARIES,
    Candidate,
    PromptSearch,
    SearchPoint,
    _is_guidance,
    run_search,
)
from .base import Attack, Probe, Target, hyperparameter

__all__ = ["RandomPrompt", "spread"]


def spread(total: int, parts: int) -> list[int]:
    """`total` split over `parts` as evenly as possible (the first ones get the remainder)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


@dataclass
class RandomPrompt(Attack):
    """Random prefix tokens (text) or class mixtures (DDPM): adversarial_prompt's same-budget baseline.

    Best of `generations`; see the module docstring."""

    name = "random_prompt"
    families = ("diffusion",)
    success_meaning = (
        "share of (forget prompt, seed) targets on which random prefix tokens (DDPM: random class mixtures × "
        "guidance) bring the concept back, by the second judge, with the search attack's budget"
    )
    metrics = SEARCH_METRICS

    generations: int = hyperparameter(7 * DEFAULT_TARGETS, "generations per model, spread over the targets")
    targets: int = hyperparameter(
        DEFAULT_TARGETS, "targets: forget conditions cycled, each with its own seed"
    )
    tokens: int = hyperparameter(2, "random prefix tokens (text-to-image)")
    vocabulary: str = hyperparameter("all", "prefix tokens from: all (special tokens excluded) or words")
    batch: int = hyperparameter(16, "candidates drawn and judged together")
    guidance_sweep: list = hyperparameter(list(GUIDANCE_SWEEP), "guidances a DDPM mixture is drawn at")

    def validate(self) -> None:
        self.require_int("generations", "targets", "tokens", "batch")
        if self.generations < self.targets:
            raise ConfigError(
                f"random_prompt needs at least one generation per target: generations {self.generations} < "
                f"targets {self.targets}; raise generations or lower targets"
            )
        self.require_choice("vocabulary", VOCABULARIES)
        self.require_list(
            "guidance_sweep", _is_guidance, "a non-empty list of finite guidances of at least 0"
        )

    def check(self, target: Target) -> None:
        if target.original.conditioning not in ("text", "class"):
            raise ConfigError("random_prompt needs a text-to-image or class-conditional diffusion model")

    def budget(self, target: Target) -> str:
        what = (
            f"{self.tokens} random prefix tokens"
            if target.original.conditioning == "text"
            else (f"random class mixtures × guidance {self.guidance_sweep}")
        )
        return f"{self.generations} generations over {self.targets} targets (unmodified first, then {what})"

    def run(self, model, target: Target, seed: int) -> Probe:
        self.check(target)
        generator = torch.Generator().manual_seed(seed)
        limits = spread(self.generations, self.targets)

        def batches(search, point):
            return self.batches(search, point, generator)

        return run_search(self.name, model, target, seed, batches, limits)

    def batches(self, search: PromptSearch, point: SearchPoint, generator) -> Iterator[list[Candidate]]:
        if search.text:
            vocabulary = search.vocabulary(self.vocabulary)
            prompt = search.prompt_ids(point.condition)
            tokenizer = search.model.tokenizer
        while True:
            batch = []
            for _ in range(self.batch):
                if search.text:
                    picks = torch.randint(len(vocabulary), (self.tokens,), generator=generator).tolist()
                    prefix = [vocabulary[i] for i in picks]
                    words = tokenizer.convert_ids_to_tokens(prefix)
                    batch.append(Candidate(prefix + prompt, search.guidance, point.seed, f"prefix {words}"))
                else:
                    weights = -torch.rand(search.model.null_class + 1, generator=generator).log()
                    weights = weights / weights.sum()  # Dirichlet(1): uniform on the simplex
                    g = self.guidance_sweep[
                        int(torch.randint(len(self.guidance_sweep), (), generator=generator))
                    ]
                    batch.append(Candidate(weights, g, point.seed, f"random mixture @ {g:g}"))
            yield batch
