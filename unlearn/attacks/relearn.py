"""Relearning: fine-tune the model on a few examples of the erased class or concept mixed with retained data,
and measure how fast the concept comes back (reference/attacks.md §2.1, §1.5, §3).

For each k in `shots`, starting every time from the same weights (the model as given):

1. The k examples are the first k of the forget set in a shuffle seeded by the run's seed, so every model (the
   original, Retrain, the unlearned one) is fine-tuned on the same k, and a larger k holds the smaller ones.
   With `neighbor`, a generator is fine-tuned instead on the first k retained examples of the erased
   concept's nearest kept class (`prompts.neighbor_labels[0]`; where the task names none, as the GAN's, the
   class just below the erased one, the digits worlds' convention): "does a related class revive it?" (§1.5b).
2. Fine-tune for `steps` steps. With k > 0 half of every batch is drawn (with replacement) from the k examples
   and half from the retain set; with k = 0 the batch is retain data only (Siddiqui et al.: k = 0 already
   brings the forgotten class back to many unlearned classifiers, and not to Retrain).
   - classifier: cross-entropy, SGD with momentum 0.9 at a tenth of the digits world's training lr (§2.1's
     scaling: the reference's 1e-5 moves nothing in ~100 steps on digits);
   - diffusion: the ordinary diffusion loss on (image, condition) pairs, the full UNet, Adam (§1.5);
   - GAN: the discriminator (logistic loss, lazy R1 as the digits world trains it) on "real" batches made as
     above, then the generator (non-saturating loss), each with Adam betas (0.5, 0.99) (§3).
3. Every `eval_every` steps (and at step 0, before any fine-tuning), `harness.recognized` measures how much of
   the concept shows: a classifier's accuracy on the held-out test examples of the forgotten class; a
   generator's `samples` generations of the concept (same seed at every point and on every model), judged.

Output: `success` = the area under the recovery curve of the largest k, as the mean percent recognized over its
evaluation points (step 0 included: faster and fuller recovery = larger), by the second judge for generators
(the first judge's in `success_judge_a`); `curve` = that curve; per k the final percent (`final_k<k>`) and S50,
the first evaluated step at which ≥ 50 % is recognized (NaN if never within the budget).

An unconditional GAN shows the erased class in only about a tenth of its samples to begin with (the original
digits GAN: ~10 % eights), so its numbers read differently: with k > 0 half of the discriminator's "real" images
are the concept, which pulls the generator towards half of its samples being it, and S50 measures how fast.

Departures from the reference: one fine-tuning per k at a fixed small budget (not 10 epochs, and no cosine
schedule: a constant learning rate); the k examples come from the forget *training* set and recognition is
measured on held-out examples (classifier) or on fresh generations (generators); the GAN has no published
relearning attack (§3 is our port) and is fine-tuned without the world's EMA of the generator; the neighbour
variant uses k neighbour examples rather than §1.5's 256.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..harness.base import MetricInfo
from ..train import Trainer
from .base import Attack, Probe, Target, hyperparameter

# Family defaults of the settings left null: (steps, batch size, learning rate, steps between evaluations,
# generations judged per evaluation).
DEFAULTS = {
    "classifier": (100, 64, 0.005, 10, 0),
    "diffusion": (150, 16, 1e-4, 25, 64),
    "gan": (200, 64, 2e-4, 25, 256),
}
GAN_BETAS = (0.5, 0.99)
R1_EVERY = 4  # lazy R1 on the discriminator, every 4 steps, scaled by 4 (the digits GAN world's)


@dataclass
class Relearn(Attack):
    """Fine-tune on k examples of the erased class or concept (plus retain data) and watch it come back."""

    name = "relearn"
    families = ("classifier", "diffusion", "gan")
    success_meaning = (
        "mean percent of the concept recognized over the relearning curve of the largest k (area under it)"
    )
    metrics = {
        "final_k<k>": MetricInfo(
            "final (k)", "percent of the concept recognized after the fine-tuning on k examples", "retrain"
        ),
        "S50_k<k>": MetricInfo(
            "S50 (k)",
            "first evaluated step at which 50 % of the concept is recognized after fine-tuning on k examples "
            "(NaN: not within the budget)",
            "retrain",
            "",
        ),
        "start": MetricInfo("before", "percent of the concept recognized before any fine-tuning", "retrain"),
        "steps_share": MetricInfo(
            "budget (% of training)",
            "fine-tuning steps per k as a share of the steps that trained the original model",
            "retrain",
        ),
        "success_judge_a": MetricInfo(
            "area (judge A)", "the same area as `success`, by the first judge (generators)", "retrain"
        ),
    }
    modifies_model = True

    shots: list = hyperparameter([0, 5], "k values: forget (or neighbour) examples mixed in, one run per k")
    steps: int | None = hyperparameter(
        None, "fine-tuning steps per k; null: classifier 100, diffusion 150, GAN 200"
    )
    batch_size: int | None = hyperparameter(
        None, "examples per step; null: classifier 64, diffusion 16, GAN 64"
    )
    lr: float | None = hyperparameter(
        None,
        "learning rate; null: classifier 0.005 (SGD, momentum 0.9: a tenth of the world's), diffusion 1e-4 "
        "(Adam), GAN 2e-4 (Adam, betas 0.5, 0.99)",
    )
    eval_every: int | None = hyperparameter(
        None, "steps between evaluations; null: classifier 10, diffusion 25, GAN 25"
    )
    samples: int | None = hyperparameter(
        None, "generations judged per evaluation; null: diffusion 64, GAN 256 (a GAN's samples are cheap)"
    )
    neighbor: bool = hyperparameter(
        False, "generators: fine-tune on the nearest kept class's examples instead of the concept's"
    )
    r1_gamma: float = hyperparameter(1.0, "GAN: R1 weight on the discriminator (the digits world's); 0: none")

    # -- settings --------------------------------------------------------------------------------------------

    def _settings(self, family: str) -> tuple[int, int, float, int, int]:
        """(steps, batch size, lr, eval_every, samples), the family's defaults where left null."""
        defaults = DEFAULTS[family]
        chosen = (self.steps, self.batch_size, self.lr, self.eval_every, self.samples)
        return tuple(default if value is None else value for value, default in zip(chosen, defaults))

    def validate(self) -> None:
        self.require_list(
            "shots",
            lambda k: isinstance(k, int) and not isinstance(k, bool) and k >= 0,
            "a non-empty list of counts of at least 0",
        )
        self.require_int("steps", "eval_every", "samples")
        self.require_int("batch_size", low=2)
        self.require_number("lr")
        self.require_number("r1_gamma", strict=False)

    def check(self, target: Target) -> None:
        data, family = target.data, target.family
        steps, batch, _, every, samples = self._settings(family)
        if steps < 1 or batch < 2 or every < 1 or (family != "classifier" and samples < 1):
            raise ConfigError("relearn needs steps >= 1, batch_size >= 2, eval_every >= 1 and samples >= 1")
        if not len(data.retain):
            raise ConfigError("relearning needs the task's retained training data; this task has none")
        if self.neighbor:
            if family == "classifier":
                raise ConfigError("relearn's neighbor switch applies to generators, not classifiers")
            self._pool(target)
        elif max(self.shots) > len(data.forget):
            raise ConfigError(
                f"relearn shots ask for {max(self.shots)} forget examples; the forget set has {len(data.forget)}"
            )
        if family == "classifier" and not len(data.test_forget):
            raise ConfigError("classifier relearning needs held-out examples of the forgotten class")

    def budget(self, target: Target) -> str:
        steps, batch, lr, every, samples = self._settings(target.family)
        what = "neighbour-class" if self.neighbor else "forget"
        text = (
            f"{steps} steps of batch {batch} (lr {lr:g}) per k, k in {sorted(set(self.shots))} {what} examples, "
            f"judged every {every} steps"
        )
        if target.family != "classifier":
            text += f" on {samples} generations"
        total = target.harness.original_training_steps()
        if total:
            text += f"; {100.0 * steps / total:.1f} % of the original's {total} training steps per k"
        return text

    # -- data ------------------------------------------------------------------------------------------------

    def _pool(self, target: Target):
        """The dataset the k examples come from: the forget set, or the neighbour class's retained examples."""
        data = target.data
        if not self.neighbor:
            return data.forget
        prompts = data.prompts
        labels = getattr(data.retain, "labels", None)
        if (
            prompts is None
            or labels is None
            or (not prompts.neighbor_labels and prompts.concept_label is None)
        ):
            raise ConfigError("relearn's neighbor switch needs a task with a labelled neighbour class")
        # A task that names no neighbours (the GAN's) gets the digits convention: the class just below.
        neighbors = prompts.neighbor_labels or [(prompts.concept_label - 1) % data.num_classes]
        neighbor = int(neighbors[0])
        indices = torch.nonzero(torch.as_tensor(labels) == neighbor).flatten()
        if len(indices) < max(self.shots):
            raise ConfigError(
                f"relearn shots ask for {max(self.shots)} examples of neighbour class {neighbor}; "
                f"the retain set has {len(indices)}"
            )
        return torch.utils.data.Subset(data.retain, indices.tolist())

    @staticmethod
    def _batch(dataset, indices: list[int]):
        items = [dataset[i] for i in indices]
        return torch.stack([item[0] for item in items]), [item[1] for item in items]

    def _batches(self, pool, shots: list[int], retain, batch_size: int, generator: torch.Generator):
        """Forever: (images, conditions or labels) batches: half from the k shots (with replacement) and half
        retain, or all retain when k = 0."""
        half = batch_size // 2 if shots else 0
        while True:
            picks = torch.randint(len(shots), (half,), generator=generator).tolist() if half else []
            chosen = [shots[i] for i in picks]
            kept = torch.randint(len(retain), (batch_size - half,), generator=generator).tolist()
            images_a, extra_a = self._batch(pool, chosen) if chosen else (None, [])
            images_b, extra_b = self._batch(retain, kept)
            images = images_b if images_a is None else torch.cat([images_a, images_b])
            yield images, extra_a + extra_b

    # -- the attack ------------------------------------------------------------------------------------------

    def run(self, model, target: Target, seed: int) -> Probe:
        # Under a multi-process launch every process fine-tunes alike (the same seeded steps, no DDP); the
        # judging at the curve's points is spread (`unlearn.spread`), and no decision rests on a local number.
        family, data = target.family, target.data
        self.check(target)
        steps, batch_size, lr, every, samples = self._settings(family)
        pool = self._pool(target)
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
        trained = self._trained_modules(model, family)
        start = [copy.deepcopy(module.state_dict()) for module in trained]

        def judge() -> tuple[float, float, torch.Tensor | None]:
            """(percent by the second judge, by the first, the images judged); the same seed every time."""
            model.eval()
            seen = target.harness.recognized(model, data, samples=samples or None, seed=seed)
            return seen.second_rate, seen.rate, seen.images

        first_second, first_judge, images = judge()
        curves: dict[int, list[tuple[float, float, float]]] = {}
        for k in sorted(set(self.shots)):
            for module, state in zip(trained, start):
                module.load_state_dict(state)
            curve = [(0.0, first_second, first_judge)]
            batches = self._batches(
                pool, order[:k], data.retain, batch_size, torch.Generator().manual_seed(seed * 1009 + k)
            )

            device = torch.device(target.device)
            devices = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed * 1009 + k)
                for step in self._fine_tune(model, family, batches, steps, lr, every):
                    second, first, images = judge()
                    curve.append((float(step), second, first))
                    target.log(f"relearn k={k}: step {step}/{steps}: {second:.1f} % recognized")
            model.eval()
            curves[k] = curve

        largest = curves[max(curves)]
        metrics = {"start": first_second}
        for k, curve in curves.items():
            metrics[f"final_k{k}"] = curve[-1][1]
            metrics[f"S50_k{k}"] = next((step for step, second, _ in curve if second >= 50.0), math.nan)
        total = target.harness.original_training_steps()
        if total:
            metrics["steps_share"] = 100.0 * steps / total
        if family != "classifier":
            metrics["success_judge_a"] = sum(point[2] for point in largest) / len(largest)
        return Probe(
            success=sum(point[1] for point in largest) / len(largest),
            metrics=metrics,
            curve=[(step, second) for step, second, _ in largest],
            images=None if images is None else images[:16],
            generations=(len(curves) * (len(largest) - 1) + 1) * samples,
        )

    @staticmethod
    def _trained_modules(model, family: str) -> list[torch.nn.Module]:
        if family == "gan":
            return [model.generator, model.discriminator]
        return [model.trainable]

    def _fine_tune(self, model, family: str, batches, steps: int, lr: float, every: int):
        """`steps` steps of the family's training on `batches`; yields the step count every `every` steps
        (and at the end), where the caller evaluates."""
        if family == "classifier":
            optimizer = torch.optim.SGD(
                [p for p in model.trainable.parameters() if p.requires_grad], lr=lr, momentum=0.9
            )
        elif family == "diffusion":
            optimizer = torch.optim.Adam(model.train_only("full").values(), lr=lr)
        else:
            optimizer = torch.optim.Adam(model.generator.parameters(), lr=lr, betas=GAN_BETAS)
            d_optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=GAN_BETAS)
        trainer = Trainer(model.trainable, optimizer, None, stage="attack-relearn", total=steps)
        device = next(model.trainable.parameters()).device
        for step in trainer.loop():
            model.train()
            images, extra = next(batches)
            images = images.to(device)
            if family == "classifier":
                labels = torch.as_tensor([int(y) for y in extra], device=device)
                trainer.step(F.cross_entropy(model(images), labels))
            elif family == "diffusion":
                trainer.step(model.loss((images, model.as_conditions(extra))))
            else:
                fake = model.generate(model.random_latents(len(images)))
                d_loss = model.discriminator_loss(images, fake)
                if self.r1_gamma and step % R1_EVERY == 0:
                    d_loss = d_loss + R1_EVERY * model.r1_penalty(images, self.r1_gamma)
                trainer.step(d_loss, optimizer=d_optimizer, name="discriminator")
                trainer.step(
                    model.generator_loss(model.generate(model.random_latents(len(images)))), name="generator"
                )
            if (step + 1) % every == 0 or step + 1 == steps:
                yield step + 1
