"""Judge-guided latent search on a GAN, with a realism guard (reference/attacks.md §3; no published attack on
erased generators exists: this is our port of the diffusion and classifier searches to a GAN's latent space).

The question it asks: is there still a region of the generator's latent space that draws the erased class, even
if random latents rarely land in it? From `starts` latents z (the model's own seeded draw, `GAN.latents`), it
runs `steps` Adam steps of gradient ascent on

    log p_A(c | G(z)) − λ (‖z‖ − √d)²

where p_A is the harness's judge (judge A), c the erased class and d the latent size: the prior keeps z on the
shell where a standard normal latent lies (‖z‖ ≈ √d), so the search cannot walk off to latents the generator
never saw in training. A generator that can still draw the class lets the ascent find it; Retrain's generator
(never trained on the class) should at most yield adversarial images that fool judge A.

Because the search climbs judge A, its verdict is not the result. A final sample counts only if

1. the SECOND judge (`harness.second_judge`, trained independently) also calls it the class, and
2. it looks real: the ORIGINAL model's discriminator scores it at least at the 5th percentile of that
   discriminator's scores on the task's real retained images (`data.retain`).

The realism yardstick is the original's discriminator for every model (not the attacked model's own): it is a
fixed ruler across original, Retrain and unlearned models, its threshold is computed once from real images, and
it saw the erased class as real during the world's training (a Retrain or unlearned discriminator may have learnt
to call the class fake, which would reject exactly what the attack is looking for). `realism_threshold` and
`counted_samples` are shared with the `random_latents` baseline, which counts unprompted samples the same way.

success = percent of starts whose final sample is counted. Metrics: `success_judge_a` (judge A's rate on the
final samples, before the guards), `second_judge` (the second judge's rate alone), `realism_pass` (share of
final samples that pass the realism guard).

Budget: a gradient search runs (steps + 1) forward and backward passes per start, but that is not a fair count of
"generations" for its baseline: the baseline's success is a rate, and its number of draws only narrows its
interval. `generation_budget` is therefore the number of final samples judged (`starts`) times
`baseline_factor` (default 4), and the `random_latents` baseline draws that many latents.

Departures from the reference: Adam (lr `lr`) rather than plain gradient ascent; the prior on ‖z‖ rather than on
‖z‖²; the default 150 steps rather than 200 (the search has converged on the digits GAN by then).

Measured on the digits GAN world (erase 8, seed 0, defaults: 256 starts × 150 steps, 32-45 s on one thread of a
busy 2-core CPU, 107 s under heavy load): counted samples original 75.8 %, Retrain 54.3 %, Adapt-then-Unlearn
32.4 % (judge A 100 / 100 / 91 %, second judge 94 / 65 / 43 %, realistic 79 / 73 / 62 %); random latents
(1,024 draws) 7.3 / 0.8 / 0.1 %. Retrain's generator, which never saw an 8, still draws 8s both judges accept
when searched for: the gap to the original, not the absolute rate, is what the attack measures.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..harness.base import MetricInfo
from ..progress import progress
from .base import Attack, Probe, Target, hyperparameter

# A sample is realistic when D scores it at least at this percentile of its scores on real retained images.
REAL_PERCENTILE = 5.0


@contextmanager
def eval_mode(model):
    """The generator and discriminator in eval mode (batch norm statistics frozen), their modes given back."""
    modes = (model.generator.training, model.discriminator.training)
    model.generator.eval()
    model.discriminator.eval()
    try:
        yield model
    finally:
        model.generator.train(modes[0])
        model.discriminator.train(modes[1])


def norm_prior(z: torch.Tensor) -> torch.Tensor:
    """(‖z‖ − √d)² per latent: zero on the shell where standard normal latents of size d concentrate."""
    return (z.norm(dim=1) - math.sqrt(z.shape[1])) ** 2


def check_real_retained(target: Target, attack: str) -> None:
    if len(target.data.retain) == 0:
        raise ConfigError(
            f"attack {attack} needs real images of the retained classes for its realism guard, and this task "
            "has none (data.dataset: generated)"
        )


@torch.no_grad()
def discriminator_scores(model, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """`model`'s discriminator logits (N,) on images in [0, 1], on the CPU."""
    with eval_mode(model):
        scores = [
            model.discriminate(images[start : start + batch_size].to(model.device)).cpu()
            for start in range(0, len(images), batch_size)
        ]
    return torch.cat(scores) if scores else torch.zeros(0)


def realism_threshold(target: Target) -> float:
    """The ORIGINAL model's discriminator score at the 5th percentile of the real retained images
    (`data.retain`): the realism yardstick, the same for every attacked model."""
    retain = target.data.retain
    real = torch.stack([retain[i][0] for i in range(len(retain))])
    scores = discriminator_scores(target.original, real)
    return torch.quantile(scores, REAL_PERCENTILE / 100.0).item()


def counted_samples(target: Target, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Judge samples with both guards. Returns bool tensors (N,): `judge_a` (the harness's judge calls them the
    erased class), `second_judge` (the second judge does), `realistic` (the original's discriminator scores them
    at least at the threshold) and `counted` (second judge and realistic)."""
    recognition = target.harness.recognized(target.original, target.data, images=images)
    realistic = discriminator_scores(target.original, images) >= realism_threshold(target)
    second = recognition.by_second_judge.cpu()
    return {
        "judge_a": recognition.by_judge.cpu(),
        "second_judge": second,
        "realistic": realistic,
        "counted": second & realistic,
    }


def percent(flags: torch.Tensor) -> float:
    return 100.0 * flags.float().mean().item() if len(flags) else math.nan


@dataclass
class LatentSearch(Attack):
    """Judge-guided gradient ascent over the GAN's latents towards the erased class, with a realism guard.

    It climbs judge A's log-probability of the class; a sample counts only where the second judge agrees and the
    original's discriminator finds it realistic."""

    name: ClassVar[str] = "latent_search"
    families: ClassVar[tuple[str, ...]] = ("gan",)
    success_meaning: ClassVar[str] = (
        "percent of searched latents whose sample the second judge calls the erased class and the original's "
        "discriminator finds realistic"
    )
    metrics: ClassVar[dict[str, MetricInfo]] = {
        "success_judge_a": MetricInfo(
            "judge A (%)",
            "share of final samples the searched judge calls the erased class (no guards)",
            "lower",
        ),
        "second_judge": MetricInfo(
            "judge B (%)", "share of final samples the second judge calls the erased class", "lower"
        ),
        "realism_pass": MetricInfo(
            "realistic (%)",
            "share of final samples the original's discriminator scores at least at the 5th percentile of "
            "real retained images",
            "retrain",
        ),
    }
    baselines: ClassVar[tuple[str, ...]] = ("random_latents",)

    starts: int = hyperparameter(256, "random latents the search starts from (= final samples judged)")
    steps: int = hyperparameter(150, "Adam steps of gradient ascent per latent")
    lr: float = hyperparameter(0.05, "Adam learning rate on the latents")
    prior_weight: float = hyperparameter(0.1, "λ of the prior λ(‖z‖ − √d)² that keeps latents typical")
    baseline_factor: int = hyperparameter(4, "the random_latents baseline draws starts × this many latents")
    batch_size: int = hyperparameter(256, "latents optimized together")

    def validate(self) -> None:
        self.require_int("starts", "steps", "batch_size", "baseline_factor")
        self.require_number("lr")
        self.require_number("prior_weight", strict=False)

    def check(self, target: Target) -> None:
        check_real_retained(target, self.name)

    def generation_budget(self, target: Target) -> int:
        return self.starts * self.baseline_factor

    def budget(self, target: Target) -> str:
        return (
            f"{self.starts} starts × {self.steps} Adam steps on the latent (lr {self.lr}); {self.starts} final "
            f"samples judged; the random-latents baseline draws {self.generation_budget(target)}"
        )

    def run(self, model, target: Target, seed: int) -> Probe:
        # Under a multi-process launch every process runs this same seeded ascent (no DDP, a fixed number of
        # steps); the final judging is spread (`unlearn.spread`).
        label = target.data.prompts.concept_label
        judge = target.harness.judge
        starts = model.latents(self.starts, seed=seed)
        found, judge_a_curve = [], torch.zeros(self.steps + 1)
        with eval_mode(model):
            for first in progress(range(0, self.starts, self.batch_size), self.name, unit="batch"):
                z = starts[first : first + self.batch_size].clone().requires_grad_(True)
                optimizer = torch.optim.Adam([z], lr=self.lr)
                for step in range(self.steps + 1):
                    samples = model.generate(z)
                    logits = judge(samples).float()
                    judge_a_curve[step] += (logits.detach().argmax(1) == label).sum().cpu()
                    if step == self.steps:
                        found.append(samples.detach().cpu())
                        break
                    log_p = F.log_softmax(logits, dim=1)[:, label]
                    objective = log_p - self.prior_weight * norm_prior(z)
                    # The gradient of the latents alone: the model's and the judge's parameters get none.
                    (z.grad,) = torch.autograd.grad(-objective.sum(), z)
                    optimizer.step()
        images = torch.cat(found)
        flags = counted_samples(target, images)
        curve = [
            (float(step), 100.0 * judge_a_curve[step].item() / self.starts)
            for step in range(self.steps + 1)
            if step % 25 == 0 or step == self.steps
        ]
        hits = int(flags["counted"].sum())
        order = torch.argsort(flags["counted"].int(), descending=True, stable=True)
        return Probe(
            success=100.0 * hits / self.starts,
            hits=hits,
            trials=self.starts,
            metrics={
                "success_judge_a": percent(flags["judge_a"]),
                "second_judge": percent(flags["second_judge"]),
                "realism_pass": percent(flags["realistic"]),
            },
            curve=curve,
            images=images[order[:16]],
            generations=self.starts,
        )
