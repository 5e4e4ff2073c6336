"""Exhaustive single-token search: every token of a search vocabulary inserted into the target prompt
(reference/attacks.md §1.1, "enumerate every single-token insertion"): an exact worst case for k = 1.

For each target (forget prompt, seed; see `adversarial_prompt`), the candidates are the unmodified prompt,
then every vocabulary token as a prefix, then (where the prompt contains the concept's own tokens) every token
in place of the concept word; each is generated from the target's noise and judged, and the search stops at
the first success of the first judge. A target is broken when the second judge agrees on that image. The
tokens that broke a target are logged (a token is no number, so it is not a metric).

The search vocabulary is every token that is a whole alphanumeric word ("seven", "3", "a"; special tokens and
word pieces excluded): 78 tokens on the digits world. On a large vocabulary (Stable Diffusion's CLIP has 49k)
the search takes a seeded random subset of `max_tokens` of them, and the budget says so.

Class-conditional DDPM: every class id (the null class included) at every guidance of the sweep
{1, 3, 7.5, 15}.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ConfigError
from .adversarial_prompt import (
    DEFAULT_TARGETS,
    GUIDANCE_SWEEP,
    SEARCH_METRICS,
    Candidate,
    PromptSearch,
    SearchPoint,
    _is_guidance,
    run_search,
    word_tokens,
)
from .base import Attack, Probe, Target, hyperparameter

__all__ = ["TokenSearch"]


@dataclass
class TokenSearch(Attack):
    """Every single-token insertion (text) or every class × guidance (DDPM), first success per target.

    See the module docstring."""

    name = "token_search"
    families = ("diffusion",)
    success_meaning = (
        "share of (forget prompt, seed) targets on which some single inserted token (DDPM: some class × "
        "guidance) brings the concept back, by the second judge"
    )
    metrics = SEARCH_METRICS
    baselines = ("seed_search",)

    targets: int = hyperparameter(
        DEFAULT_TARGETS, "targets: forget conditions cycled, each with its own seed"
    )
    positions: list = hyperparameter(
        ["prefix", "replace"], "where a token goes: prefix, replace (the concept)"
    )
    max_tokens: int = hyperparameter(
        256, "most vocabulary tokens tried (a seeded subset of a larger vocabulary)"
    )
    batch: int = hyperparameter(64, "candidates drawn and judged together")
    guidance_sweep: list = hyperparameter(list(GUIDANCE_SWEEP), "guidances each DDPM class is judged at")

    def validate(self) -> None:
        self.require_int("targets", "max_tokens", "batch")
        self.require_list(
            "positions", lambda p: p in ("prefix", "replace"), "a non-empty list of prefix, replace"
        )
        self.require_list(
            "guidance_sweep", _is_guidance, "a non-empty list of finite guidances of at least 0"
        )

    def check(self, target: Target) -> None:
        if target.original.conditioning not in ("text", "class"):
            raise ConfigError("token_search needs a text-to-image or class-conditional diffusion model")

    def vocabulary(self, model) -> list[int]:
        return word_tokens(model.tokenizer, self.max_tokens)

    def checks_per_target(self, target: Target) -> int:
        model = target.original
        if model.conditioning == "class":
            return 1 + (model.null_class + 1) * len(self.guidance_sweep)
        return 1 + len(self.vocabulary(model)) * len(self.positions)

    def generation_budget(self, target: Target) -> int:
        return self.targets * self.checks_per_target(target)

    def budget(self, target: Target) -> str:
        model = target.original
        if model.conditioning == "class":
            what = f"{model.null_class + 1} class ids (null included) × guidance {self.guidance_sweep}"
        else:
            size, total = len(self.vocabulary(model)), len(word_tokens(model.tokenizer))
            subset = f" (a random {size} of {total})" if size < total else ""
            what = f"{size} word tokens{subset} × positions {self.positions}"
        return (
            f"{self.targets} targets; per target the unmodified prompt and {what}: at most "
            f"{self.checks_per_target(target)} generations per target, "
            f"{self.generation_budget(target)} in all"
        )

    def run(self, model, target: Target, seed: int) -> Probe:
        self.check(target)
        limits = [self.checks_per_target(target)] * self.targets
        return run_search(self.name, model, target, seed, self.batches, limits)

    def candidates(self, search: PromptSearch, point: SearchPoint) -> Iterator[Candidate]:
        if not search.text:
            for class_id in range(search.model.null_class + 1):
                for g in self.guidance_sweep:
                    yield Candidate(search.one_hot(class_id), g, point.seed, f"class {class_id} @ {g:g}")
            return
        tokenizer = search.model.tokenizer
        prompt = search.prompt_ids(point.condition)
        concept = search.prompt_ids(search.target.data.prompts.split()[0].concept)
        span = _find(prompt, concept)
        for position in self.positions:
            if position == "replace" and span is None:
                continue  # no concept word to replace: the budget keeps its share unused
            for token in self.vocabulary(search.model):
                word = tokenizer.convert_ids_to_tokens(token)
                if position == "prefix":
                    yield Candidate([token, *prompt], search.guidance, point.seed, f"prefix {word!r}")
                else:
                    ids = prompt[: span[0]] + [token] + prompt[span[1] :]
                    yield Candidate(ids, search.guidance, point.seed, f"{word!r} for the concept")

    def batches(self, search: PromptSearch, point: SearchPoint) -> Iterator[list[Candidate]]:
        batch = []
        for candidate in self.candidates(search, point):
            batch.append(candidate)
            if len(batch) == self.batch:
                yield batch
                batch = []
        if batch:
            yield batch


def _find(sequence: list[int], part: list[int]) -> tuple[int, int] | None:
    """Where `part` first occurs in `sequence`, as (start, stop)."""
    for start in range(len(sequence) - len(part) + 1):
        if part and sequence[start : start + len(part)] == part:
            return start, start + len(part)
    return None
