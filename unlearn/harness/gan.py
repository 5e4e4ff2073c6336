"""The GAN harness: erase one class of a judge from an unconditional generator; the samples are judged before
and after unlearning (same latents), with FID to real retained images and to the original's samples."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import ConceptPrompts, UnlearnData
from ..datasets import ImageTensorDataset
from ..errors import ConfigError
from .base import (
    Harness,
    MetricInfo,
    Recognition,
    Scores,
    class_table,
    features_of,
    recipe_judge,
    share,
)
from .classifier import classifier_task

CONFIDENCE = 0.9  # a sample counts as `confident` when the judge's top probability reaches this


class GANHarness(Harness):
    family = "gan"
    catalogue = {
        "erasure_rate": MetricInfo(
            "erased class (%)", "share of samples the judge classifies as the erased class", "lower", "%"
        ),
        "erasure_reduction": MetricInfo(
            "reduction (%)", "100·(1 − erasure_rate / the original's)", "higher", "%", "erasure_rate"
        ),
        "class_histogram": MetricInfo(
            "class histogram", "share of samples per judged class (keys class_share_<c>)", "retrain"
        ),
        "class_share_<c>": MetricInfo(
            "class share", "share of samples the judge assigns to class c", "retrain", "%", "class_histogram"
        ),
        "confident": MetricInfo(
            "confident (%)",
            f"share of samples judged with probability ≥ {CONFIDENCE} (a quality proxy)",
            "higher",
        ),
        "fid": MetricInfo(
            "FID vs real (retained)",
            "Fréchet distance (judge features) of the samples judged as a retained class to real retained images",
            "lower",
            "",
        ),
        "fid_original": MetricInfo(
            "FID vs original (retained)",
            "the same against the original generator's retained-class samples (other latents: the original's "
            "own value is the noise floor)",
            "lower",
            "",
        ),
    }
    default_metrics = ("erasure_rate", "class_histogram", "confident", "fid", "fid_original")
    columns = ("erasure_rate", "erasure_reduction", "fid", "fid_original", "confident", "RTE_s")
    legend = (
        "Erased class = share (percent) of the generator's samples the judge classifies as the erased class; "
        "reduction = 100·(1 − that share / the original's); FID (judge features) of the samples judged as retained "
        "classes against real retained images and against the original generator's retained-class samples (the "
        "original row's value is the sampling noise floor); confident = samples judged with probability ≥ 0.9; "
        "mean ± std over seeds; `original` is the generator before unlearning; the RTE ratio is relative to the "
        "suite's reference row."
    )
    files = (
        "`model/` (the unlearned GAN: gan_config.json, generator / discriminator safetensors), "
        "`recipe.yaml`, `metrics.json`, `train.jsonl`, `run.log`, the charts `chart_*.png`, and what the method "
        "writes beside them."
    )

    cache_original = True  # `Harness.score_original`: the original's samples and scores come from the cache
    grid_size = 100  # samples in the report's grids

    def cache_material(self, model, data):
        """Besides the common key: the real retained images FID compares with (a dataset folder may change)."""
        from ..evalcache import tensor_hash

        material = super().cache_material(model, data)
        material["real"] = tensor_hash(self.real) if self.real is not None else None
        return material

    def setup(self):
        from ..models import load_model

        spec = self.recipe.model
        data = self.task()  # first: a bad class is refused before a world is built
        return load_model(spec.checkpoint, spec.arch, 0, spec.family).to(self.device), data

    def load_output(self, path: Path, data):
        from ..models.gan import load_gan

        return load_gan(path).to(self.device)

    def task(self) -> UnlearnData:
        """One class of the judge. The dataset gives the real images of the retained classes for FID (none for
        `dataset: generated`); the method never sees them."""
        label = int(self.recipe.data.forget_class[0])
        if self.recipe.data.dataset == "generated":
            empty = ImageTensorDataset(
                torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.long), 0, "generated"
            )
            data = UnlearnData(empty, empty, empty, empty, num_classes=0, forget_classes=(label,))
            kept: list[int] = []
        else:
            data = classifier_task(self.recipe)
            kept = [c for c in range(data.num_classes) if c != label]
        data.prompts = ConceptPrompts(
            concept=str(label),
            forget=[label],
            anchor=[label],
            retain=kept,
            retain_labels=kept,
            concept_label=label,
        )
        return data

    def before(self, original, data, reference_dir):
        """The judge, the real retained images (and their cached FID statistics), and the original generator's
        retained-class samples from other latents than the scored ones (the reference of `fid_original`)."""
        from ..metrics.generation import extractor_fingerprint, judge_labels

        ev = self.recipe.eval
        self.judge = recipe_judge(self.recipe, self.device)
        if self.judge is None:
            raise ConfigError(
                "scoring a GAN needs a judge: set eval.judge (a classifier folder or module:function)"
            )
        label = data.prompts.concept_label
        self.real, self.fid_cache = None, None
        if len(data.retain):
            self.real = torch.stack([data.retain[i][0] for i in range(len(data.retain))])
            from ..evalcache import tensor_hash
            from ..worlds import cache_dir

            judge = extractor_fingerprint(self.judge)
            if self.recipe.data.dataset == "digits":
                self.fid_cache = cache_dir() / "fid" / f"digits-retain-{label}-gan-judge-{judge}.npz"
            else:  # FID's real side, computed once per real set and judge: named by the images' hash
                self.fid_cache = cache_dir() / "fid" / f"real-{tensor_hash(self.real)[:24]}-judge-{judge}.npz"
        draw = original.sample(
            ev.samples, seed=self.recipe.seed + 1, batch_size=ev.batch_size, dtype=self.generation_dtype
        )
        self.original_retained = draw[judge_labels(self.judge, draw, ev.batch_size) != label]

    @torch.no_grad()
    def score(self, model, data, original: bool = False) -> Scores:
        """`samples` images drawn with the recipe's seed (the same latents before and after) and judged."""
        from ..metrics.generation import fid, judge_logits

        ev, names, label = self.recipe.eval, self.names, data.prompts.concept_label
        images = model.sample(
            ev.samples, seed=self.recipe.seed, batch_size=ev.batch_size, dtype=self.generation_dtype
        )
        probs = torch.softmax(judge_logits(self.judge, images, ev.batch_size), dim=1)
        labels = probs.argmax(1)
        results: dict[str, float] = {}
        if "erasure_rate" in names:
            results["erasure_rate"] = share(labels == label)
        if "class_histogram" in names:
            for c in range(probs.shape[1]):
                results[f"class_share_{c}"] = share(labels == c)
        if "confident" in names:
            results["confident"] = share(probs.max(1).values >= CONFIDENCE)
        kept = images[labels != label]
        extractor = features_of(self.judge)
        if "fid" in names and self.real is not None and len(kept) >= 2:
            results["fid"] = fid(self.real, kept, extractor, device=model.device, cache=self.fid_cache)
        if "fid_original" in names and len(self.original_retained) >= 2 and len(kept) >= 2:
            results["fid_original"] = fid(self.original_retained, kept, extractor, device=model.device)
        if original and "erasure_rate" in results:
            results["erasure_reduction"] = 0.0
        return Scores(results, {"samples": images})

    @torch.no_grad()
    def recognized(self, model, data, *, samples=None, seed=0, images=None, labels=None) -> Recognition:
        """`samples` draws (default `eval.samples`) with latents from `seed`, or the given `images`, judged as the
        erased class (or `labels`) by the judge and the second judge."""
        from ..metrics.generation import judge_labels

        ev = self.recipe.eval
        if images is None:
            images = model.sample(
                samples or ev.samples, seed=seed, batch_size=ev.batch_size, dtype=self.generation_dtype
            )
        label = torch.as_tensor(data.prompts.concept_label if labels is None else labels).expand(len(images))
        first = judge_labels(self.judge, images, ev.batch_size) == label
        second = judge_labels(self.second_judge, images, ev.batch_size) == label
        return Recognition(first, second, images)

    def original_training_steps(self):
        if self.recipe.model.checkpoint == "world:digits/gan":
            from ..worlds.digits_gan import STEPS

            return STEPS
        return None

    @classmethod
    def compare(cls, metrics, reference):
        if "erasure_rate" in metrics and metrics.get("original_erasure_rate"):
            return {
                "erasure_reduction": 100.0
                * (1.0 - metrics["erasure_rate"] / metrics["original_erasure_rate"])
            }
        return {}

    def save_artifacts(self, output, scores, original):
        from ..metrics.generation import save_grid

        images = scores.images["samples"]
        count = min(len(images), self.grid_size)
        grids = {"unlearned": save_grid(images[:count], output / "samples.png", nrow=10).name}
        if original is not None:
            grids["original"] = save_grid(
                original.images["samples"][:count], output / "samples_original.png", nrow=10
            ).name
        return {**grids, "charts": self.save_charts(output, scores, original)}

    def report_header(self, data, metrics):
        recipe = self.recipe
        return [
            f"# {recipe.method}: erase class {data.prompts.concept_label} from `{recipe.model.checkpoint}`",
            "",
            f"- method settings: {recipe.method_args or 'the defaults'}",
            f"- evaluation: {recipe.eval.samples} samples (seed {recipe.seed}) judged by "
            f"{recipe.eval.judge or 'the digits classifier'}",
        ]

    def report_sections(self, data, metrics, artifacts):
        label = data.prompts.concept_label
        caption = "Share of samples per judged class (percent; the erased class marked *):"
        lines = class_table(metrics, "class_share_", {label}, caption)
        lines += ["", "## Samples (same latents before and after)", ""]
        if "original" in artifacts:
            lines += ["Original:", "", f"![original]({artifacts['original']})", ""]
        lines += ["Unlearned:", "", f"![unlearned]({artifacts['unlearned']})"]
        return lines
