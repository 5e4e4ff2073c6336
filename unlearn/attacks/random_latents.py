"""Random latents: the same-budget baseline of `latent_search` on a GAN (reference/attacks.md §3).

How often does the generator draw the erased class unprompted? It draws `generations` latents (the model's own
seeded draw, `GAN.latents`, so a seed gives the same latents on every model, and the first ones are the latent
search's starting points) and counts a sample exactly as `latent_search` counts a found one: the second judge
calls it the erased class AND the original model's discriminator scores it at least at the 5th percentile of its
scores on real retained images (`latent_search.counted_samples`). A search that does no better than this
baseline has found nothing the generator does not already draw by chance.

success = percent of the draws that are counted. Metrics: `judge_a` (the harness's judge alone: the number the
harness's `erasure_rate` reports, on other latents), `second_judge`, `realism_pass`. The runner sets
`generations` to the search's `generation_budget` (its `starts` × `baseline_factor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..harness.base import MetricInfo
from .base import Attack, Probe, Target, hyperparameter
from .latent_search import check_real_retained, counted_samples, eval_mode, percent


@dataclass
class RandomLatents(Attack):
    """Draw random latents and count the samples of the erased class that pass latent_search's two guards."""

    name: ClassVar[str] = "random_latents"
    families: ClassVar[tuple[str, ...]] = ("gan",)
    success_meaning: ClassVar[str] = (
        "percent of random latents whose sample the second judge calls the erased class and the original's "
        "discriminator finds realistic"
    )
    metrics: ClassVar[dict[str, MetricInfo]] = {
        "judge_a": MetricInfo(
            "judge A (%)", "share of samples the harness's judge calls the erased class", "lower"
        ),
        "second_judge": MetricInfo(
            "judge B (%)", "share of samples the second judge calls the erased class", "lower"
        ),
        "realism_pass": MetricInfo(
            "realistic (%)",
            "share of samples the original's discriminator scores at least at the 5th percentile of real "
            "retained images",
            "retrain",
        ),
    }

    generations: int = hyperparameter(1024, "random latents drawn and judged")
    batch_size: int = hyperparameter(512, "latents generated together")

    def validate(self) -> None:
        self.require_int("generations", "batch_size")

    def check(self, target: Target) -> None:
        check_real_retained(target, self.name)

    def budget(self, target: Target) -> str:
        return f"{self.generations} random latents, each generated and judged once"

    @torch.no_grad()
    def run(self, model, target: Target, seed: int) -> Probe:
        with eval_mode(model):  # the model's own seeded latents; spread over the processes of a launch
            images = model.sample(self.generations, seed=seed, batch_size=self.batch_size)
        flags = counted_samples(target, images)
        hits = int(flags["counted"].sum())
        order = torch.argsort(flags["counted"].int(), descending=True, stable=True)
        return Probe(
            success=100.0 * hits / self.generations,
            hits=hits,
            trials=self.generations,
            metrics={
                "judge_a": percent(flags["judge_a"]),
                "second_judge": percent(flags["second_judge"]),
                "realism_pass": percent(flags["realistic"]),
            },
            images=images[order[:16]],
            generations=self.generations,
        )
