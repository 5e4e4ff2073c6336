"""The diffusion harness: a class of a class-conditional DDPM or a concept of a text-to-image model, judged on
generations before and after unlearning (same seeds), with FID and CLIP score (reference/evals.md §2)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data import UnlearnData, forget_canvas_concept, forget_digits_concept, forget_generated_concept
from ..datasets import load_dataset
from ..errors import ConfigError
from .base import (
    Harness,
    MetricInfo,
    Recognition,
    Scores,
    features_of,
    recipe_cross_judge,
    recipe_judge,
    share,
)

JUDGED = ("erasure_rate", "erasure_rate_paraphrase", "retain_accuracy")


class DiffusionHarness(Harness):
    family = "diffusion"
    catalogue = {
        "erasure_rate": MetricInfo(
            "erasure (exact)",
            "share of generations from the erased concept's prompts (or class) the judge still calls it "
            "(several concepts: their mean; each one as erasure_rate:<concept>)",
            "lower",
        ),
        "erasure_rate:<concept>": MetricInfo(
            "erasure (exact)",
            "erasure_rate of one of several concepts erased together",
            "lower",
            "%",
            "erasure_rate",
        ),
        "erasure_rate_paraphrase": MetricInfo(
            "erasure (paraphrase)", "erasure_rate on paraphrases of the concept that no method saw", "lower"
        ),
        "erasure_rate_paraphrase:<concept>": MetricInfo(
            "erasure (paraphrase)",
            "erasure_rate_paraphrase of one of several concepts",
            "lower",
            "%",
            "erasure_rate_paraphrase",
        ),
        "retain_accuracy": MetricInfo(
            "retained acc.",
            "share of generations for the kept classes / prompts the judge calls the prompted one",
            "higher",
        ),
        "neighbor_accuracy": MetricInfo(
            "neighbours acc.",
            "retained accuracy on the classes next to an erased one (over-erasure shows there first)",
            "higher",
            "%",
            "retain_accuracy",
        ),
        "unrelated_accuracy": MetricInfo(
            "others acc.", "retained accuracy on the other kept classes", "higher", "%", "retain_accuracy"
        ),
        "cross_domain_accuracy": MetricInfo(
            "cross-domain acc.",
            "two-factor worlds (digits × styles): the other factor's judge on the retained generations, e.g. the "
            "digit accuracy when a style is erased (UnlearnCanvas' cross-domain retainability; retain_accuracy "
            "is then the in-domain one)",
            "higher",
        ),
        "fid": MetricInfo(
            "FID (retained)",
            "Fréchet distance of the retained generations to real retained images (judge features or Inception)",
            "lower",
            "",
        ),
        "fid_cross": MetricInfo(
            "FID (cross)",
            "two-factor worlds: FID of the retained generations in the other factor's judge features",
            "lower",
            "",
        ),
        "clip_score": MetricInfo(
            "CLIP score",
            "100 × mean cosine of CLIP image and prompt embeddings, retained prompts",
            "higher",
            "",
        ),
        "clip_score_forget": MetricInfo(
            "CLIP score (forget)", "CLIP score of the forget prompts' generations", "lower", "", "clip_score"
        ),
    }
    # cross_domain_accuracy and fid_cross: two-factor worlds only (dropped where there is no other factor)
    default_metrics = (
        "erasure_rate",
        "erasure_rate_paraphrase",
        "retain_accuracy",
        "cross_domain_accuracy",
        "fid",
        "fid_cross",
    )
    utility_keys = ("retain_accuracy",)  # the utility guard (`Harness.utility_guard`)
    columns = (
        "erasure_rate",
        "erasure_rate_paraphrase",
        "retain_accuracy",
        "neighbor_accuracy",
        "unrelated_accuracy",
        "cross_domain_accuracy",
        "fid",
        "fid_cross",
        "RTE_s",
    )
    row_extras = ("clip_score",)
    legend = (
        "Erasure = share (percent) of generations from the erased concept's prompts (exact / paraphrases no "
        "method saw) that the judge classifies as the concept (several concepts: the mean, and each concept's "
        "own column); retained acc. = the judge's accuracy on generations of the kept classes, split into the "
        "neighbours of the erased concepts (the digits next to them) and the others; FID between those "
        "generations and real images of the kept classes (judge features); in the digits × styles world "
        "retained acc. is the in-domain retainability (the erased concept's factor), cross-domain acc. the other "
        "factor's judge on the same generations and FID (cross) that judge's features; mean ± std over seeds; "
        "`original` is the model before unlearning."
    )
    files = (
        "`model/` (a diffusers pipeline folder), `edit.safetensors` (the changed UNet tensors only), "
        "`lora/pytorch_lora_weights.safetensors` (the edit as a diffusers LoRA: "
        "`pipe.load_lora_weights(run / 'lora')` on the original pipeline; text-to-image UNets), "
        "`recipe.yaml`, `metrics.json`, `train.jsonl`, `run.log`."
    )

    cache_original = True  # `Harness.score_original`: the original's generations are read from the cache
    grid_size = 40  # images per set in the report's sample grids

    def cache_material(self, model, data):
        """Besides the common key: what sampling reads outside the weights (the scheduler's configuration,
        the tokenizer's vocabulary), the diffusers version, and the CLIP model of `clip_score`."""
        import diffusers

        from ..runfolder import checkpoint_fingerprint

        material = super().cache_material(model, data)
        tokenizer = getattr(model, "tokenizer", None)
        vocab = tokenizer.get_vocab() if tokenizer is not None else None
        material.update(
            diffusers=diffusers.__version__,
            scheduler=dict(model.scheduler.config),
            tokenizer=json.dumps(vocab, sort_keys=True) if vocab is not None else None,
            clip=checkpoint_fingerprint(self.recipe.eval.clip_model) if self.recipe.eval.clip_model else None,
        )
        return material

    def setup(self):
        from ..models import load_model

        spec = self.recipe.model
        model = self.prepare(load_model(spec.checkpoint, spec.arch, 0, spec.family))
        return model, self.task(model)

    def prepare(self, model):
        """On the device; frozen parts in half precision where the recipe trains in mixed precision (the
        trainable UNet keeps fp32 weights), as in the run."""
        model.to(self.device)
        train = self.recipe.train
        if train.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if train.mixed_precision != "no":
            model.cast_frozen(torch.bfloat16 if train.mixed_precision == "bf16" else torch.float16)
        return model

    def load_output(self, path: Path, data):
        from ..models.diffusion import load_diffusion

        return self.prepare(load_diffusion(path))

    def task(self, model) -> UnlearnData:
        """The erasure task: a digits class or concept, or a concept whose images the original model draws."""
        recipe, spec = self.recipe, self.recipe.data
        if spec.dataset == "digits":
            train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
            return forget_digits_concept(
                train,
                test,
                model.conditioning,
                spec.concept,
                spec.forget_class,
                spec.anchor,
                seed=recipe.seed,
            )
        if model.conditioning != "text":
            raise ConfigError(
                f"dataset: {spec.dataset} erases a concept from a text-to-image model; this one takes no text"
            )
        if spec.dataset == "digits_canvas":
            if not spec.concept:
                raise ConfigError("the digits × styles world erases a concept: give data.concept (e.g. bold)")
            from ..worlds.digits_canvas import prepare_judges

            prepare_judges(verbose=False)  # here, in `setup`: trained once, by the first process of a launch
            train, test = load_dataset("digits_canvas", "train"), load_dataset("digits_canvas", "test")
            return forget_canvas_concept(train, test, spec.concept, spec.anchor, seed=recipe.seed)
        return forget_generated_concept(
            model,
            spec.concept,
            spec.forget_prompts,
            spec.paraphrases,
            spec.retain_prompts,
            spec.anchor,
            spec.num_images,
            concept_label=recipe.eval.concept_label,
            guidance=recipe.eval.guidance,
            steps=recipe.eval.steps,
            seed=recipe.seed,
        )

    def before(self, original, data, reference_dir):
        """The judge, the metrics it allows, FID's cached real statistics, and the UNet's weights (for the
        edit file)."""
        ev = self.recipe.eval
        self.judge = recipe_judge(self.recipe, self.device)
        if self.judge is None and set(JUDGED) & set(self.names):
            self.names = [n for n in self.names if n not in JUDGED]
            self.log("no judge (eval.judge): erasure rates and retained accuracy are not computed")
        if self.judge is None and ev.fid_features == "judge" and "fid" in self.names:
            self.names.remove("fid")
            self.log(
                "no judge to take FID features from: FID needs eval.judge or eval.fid_features: inception"
            )
        self.cross_judge = recipe_cross_judge(self.recipe, data.prompts, self.device)
        if self.cross_judge is None:
            self.names = [n for n in self.names if n not in ("cross_domain_accuracy", "fid_cross")]
        self.fid_cache, self.fid_cross_cache, self.real = None, None, None
        if {"fid", "fid_cross"} & set(self.names) and len(data.retain):
            # FID's real side, computed once per real set and feature extractor, then read from the cache
            self.real = torch.stack([data.retain[i][0] for i in range(len(data.retain))])
            judged = "inception" if ev.fid_features == "inception" else self.judge
            self.fid_cache = self._fid_cache(judged, data, original)
            if self.cross_judge is not None:
                self.fid_cross_cache = self._fid_cache(self.cross_judge, data, original)
        self.unet_before = {n: t.detach().cpu().clone() for n, t in original.unet.state_dict().items()}
        self.concept = data.prompts.concept  # named in the edit and LoRA files' metadata

    def _fid_cache(self, extractor, data, original) -> Path:
        """The cache file of FID's real statistics for this task's retained images in `extractor`'s features
        ("inception" or a judge)."""
        from ..evalcache import tensor_hash
        from ..metrics.generation import extractor_fingerprint
        from ..worlds import cache_dir

        features = "inception" if extractor == "inception" else f"judge-{extractor_fingerprint(extractor)}"
        dataset = self.recipe.data.dataset
        if dataset in ("digits", "digits_canvas"):
            name = f"{dataset}-retain-{data.prompts.concept}-{original.conditioning}-{features}.npz"
        else:  # images the original model generated (`dataset: generated`): named by their hash
            name = f"real-{tensor_hash(self.real)[:24]}-{features}.npz"
        return cache_dir() / "fid" / name

    @torch.no_grad()
    def score(self, model, data, original: bool = False) -> Scores:
        """Generate and judge (see the catalogue). Every set is generated from fixed seeds (image i of a set
        always starts from the same noise), so scores and sample grids before and after unlearning compare the
        same draws: `eval.samples` generations from the forget conditions and from the paraphrases (per concept
        when several are erased together, each judged against its own label), and `eval.samples` per retained
        class (text models: spread over that class's prompts). FID compares the retained generations with the
        real retained images (the retain set). The images come back by set: forget, paraphrase, retain."""
        from ..metrics.generation import clip_score, fid, judge_labels

        ev, names, judge, samples = self.recipe.eval, self.names, self.judge, self.recipe.eval.samples
        prompts = data.prompts
        parts = prompts.split()
        needs_judge = set(JUDGED) & set(names)
        if needs_judge and (judge is None or any(p.concept_label is None for p in parts)):
            raise ConfigError(
                f"metrics {sorted(needs_judge)} need a judge that knows each concept's label: set eval.judge and "
                "eval.concept_label (one label per concept when several are erased), or drop them from eval.metrics"
            )
        results: dict[str, float] = {}
        images: dict[str, torch.Tensor] = {}

        def draw(conditions: list, offset: int) -> torch.Tensor:
            conditions = model.as_conditions(conditions)
            seed = self.recipe.seed + offset
            return model.generate(
                conditions,
                steps=ev.steps,
                guidance=ev.guidance,
                seed=seed,
                batch_size=ev.batch_size,
                dtype=self.generation_dtype,
            )

        def erasure(key: str, kind: str, offset: int) -> list:
            """`samples` generations per concept from its conditions of `kind`, and the share judged as the
            concept; returns the conditions."""
            conditions, labels, spans = [], [], []
            for part in parts:
                own = getattr(part, kind)
                if own:
                    spans.append((part.concept, len(conditions), len(conditions) + samples))
                    conditions += [own[i % len(own)] for i in range(samples)]
                    labels += [part.concept_label] * samples
            metric = "erasure_rate" if key == "forget" else "erasure_rate_paraphrase"
            if not conditions:
                return conditions
            images[key] = draw(conditions, offset)
            if metric not in names:
                return conditions
            hits = judge_labels(judge, images[key], ev.batch_size) == torch.tensor(labels)
            results[metric] = share(hits)
            if len(parts) > 1:
                for concept, start, stop in spans:
                    results[f"{metric}:{concept}"] = share(hits[start:stop])
            return conditions

        forget = erasure("forget", "forget", 0)
        erasure("paraphrase", "paraphrases", 1)
        retain, labels, cross = _per_label(
            prompts.retain, prompts.retain_labels, samples, prompts.retain_cross_labels
        )
        if retain:
            images["retain"] = draw(retain, 2)
        if "cross_domain_accuracy" in names and cross:
            predicted = judge_labels(self.cross_judge, images["retain"], ev.batch_size)
            results["cross_domain_accuracy"] = share(predicted == torch.tensor(cross))
        if "retain_accuracy" in names and labels:
            labels = torch.tensor(labels)
            correct = judge_labels(judge, images["retain"], ev.batch_size) == labels
            results["retain_accuracy"] = share(correct)
            if prompts.neighbor_labels:
                near = torch.isin(labels, torch.tensor(prompts.neighbor_labels))
                results["neighbor_accuracy"] = share(correct[near])
                results["unrelated_accuracy"] = share(correct[~near])
        if "fid" in names and retain:
            extractor = "inception" if ev.fid_features == "inception" else features_of(judge)
            results["fid"] = fid(
                self.real, images["retain"], extractor, device=model.device, cache=self.fid_cache
            )
        if "fid_cross" in names and retain:
            results["fid_cross"] = fid(
                self.real,
                images["retain"],
                features_of(self.cross_judge),
                device=model.device,
                cache=self.fid_cross_cache,
            )
        if "clip_score" in names or ev.clip_model:
            if ev.clip_model is None:
                raise ConfigError("clip_score needs a local CLIP model folder: set eval.clip_model")
            if model.conditioning == "text":
                clip = ev.clip_model
                results["clip_score_forget"] = clip_score(images["forget"], forget, clip, device=model.device)
                if retain:
                    results["clip_score"] = clip_score(images["retain"], retain, clip, device=model.device)
        return Scores(results, images)

    @torch.no_grad()
    def recognized(self, model, data, *, samples=None, seed=0, images=None, labels=None, guidance=None):
        """`samples` generations (default `eval.samples`) from the erased concepts' exact conditions (cycled;
        several concepts: in equal shares), drawn with `seed` at `guidance` (default `eval.guidance`), or the
        given `images`; each judged against its concept's label (`labels`: one per image, or one for all;
        default: the concept's) by the judge and the second judge."""
        from ..metrics.generation import judge_labels

        ev = self.recipe.eval
        if self.judge is None or any(p.concept_label is None for p in data.prompts.split()):
            raise ConfigError("judging the erased concept needs eval.judge and eval.concept_label")
        if images is None:
            parts = data.prompts.split()
            samples = samples or ev.samples
            conditions, labels = [], []
            for index, part in enumerate(parts):
                count = samples // len(parts) + (index < samples % len(parts))
                conditions += [part.forget[i % len(part.forget)] for i in range(count)]
                labels += [part.concept_label] * count
            images = model.generate(
                model.as_conditions(conditions),
                steps=ev.steps,
                guidance=ev.guidance if guidance is None else guidance,
                seed=seed,
                batch_size=ev.batch_size,
                dtype=self.generation_dtype,
            )
        if labels is None:
            labels = data.prompts.split()[0].concept_label
        labels = torch.as_tensor(labels).expand(len(images))
        first = judge_labels(self.judge, images, ev.batch_size) == labels
        second = judge_labels(self.second_judge, images, ev.batch_size) == labels
        return Recognition(first, second, images)

    def original_training_steps(self):
        from ..worlds import digits_canvas, digits_diffusion

        steps = {
            "world:digits/ddpm": digits_diffusion.DDPM_STEPS,
            "world:digits/t2i": digits_diffusion.T2I_STEPS,
            "world:digits/canvas": digits_canvas.STEPS,
        }
        return steps.get(self.recipe.model.checkpoint)

    @classmethod
    def compare(cls, metrics, reference):
        if reference is None:
            return {}
        keys = [k for k in metrics if k in reference and not k.startswith("original_")]
        return {f"retrain_{k}": reference[k] for k in keys if k not in ("device", "num_processes")}

    def save_model(self, model, output: Path) -> None:
        """The pipeline folder; the edit alone: the UNet tensors the method changed, under their diffusers
        names (load them over the original UNet with `load_state_dict(..., strict=False)`); and, for a UNet
        diffusers loads LoRAs into, the edit as a diffusers LoRA (`lora/`, see `unlearn.lora_export`), each
        layer within `eval.lora_tolerance`. Both files' metadata say what they are."""
        from .. import __version__
        from ..lora_export import LORA_FILE, LORA_FOLDER, export_lora, save_edit, state_hash

        model.save(output / "model")
        recipe = self.recipe
        described = {
            "unlearn.toolkit_version": __version__,
            "unlearn.method": recipe.method,
            "unlearn.method_settings": json.dumps(recipe.method_args, sort_keys=True, default=str),
            "unlearn.concept": str(getattr(self, "concept", recipe.data.concept)),
            "unlearn.base_model": str(recipe.model.checkpoint),
            "unlearn.base_unet_sha256": state_hash(self.unet_before),
        }
        save_edit(model.unet, self.unet_before, output / "edit.safetensors", described)
        self.lora_export = None
        if not hasattr(model.unet, "load_lora_adapter"):
            self.log(f"no LoRA written: diffusers loads no LoRA into a {type(model.unet).__name__}")
            return
        path = output / LORA_FOLDER / LORA_FILE
        self.lora_export = export_lora(
            model.unet, self.unet_before, path, recipe.eval.lora_tolerance, described
        )
        self.log(f"LoRA {path.relative_to(output)}: {self.lora_export.summary()}")

    def save_artifacts(self, output, scores, original):
        from ..metrics.generation import save_grid

        grids = {}
        for name, after in scores.images.items():
            count = min(len(after), self.grid_size)
            grids[name] = {
                "unlearned": save_grid(after[:count], output / f"samples_{name}.png", nrow=10).name
            }
            if original is not None and name in original.images:
                path = save_grid(
                    original.images[name][:count], output / f"samples_{name}_original.png", nrow=10
                )
                grids[name]["original"] = path.name
        return {**grids, "charts": self.save_charts(output, scores, original)}

    def report_header(self, data, metrics):
        recipe, prompts = self.recipe, data.prompts
        more = " ..." if len(prompts.forget) > 6 else ""
        return [
            f"# {recipe.method}: erase {prompts.concept!r} from `{recipe.model.checkpoint}`",
            "",
            f"- task: {data.describe()}",
            f"- forget conditions: {', '.join(map(repr, prompts.forget[:6]))}{more}",
            f"- anchor: {', '.join(map(repr, dict.fromkeys(prompts.anchor)))}",
            f"- paraphrases (never seen by the method): {', '.join(map(repr, prompts.paraphrases)) or '–'}",
            f"- sampling: {recipe.eval.samples} images per set, {recipe.eval.steps} DDIM steps, guidance "
            f"{recipe.eval.guidance}",
        ]

    def report_sections(self, data, metrics, artifacts):
        lines = []
        export = getattr(self, "lora_export", None)
        if export is not None:
            lines += [
                "",
                "## The edit as a diffusers LoRA",
                "",
                f"`lora/{export.path.name}` (`pipe.load_lora_weights(run_folder / 'lora')` on the original "
                f"pipeline): {export.summary()}.",
            ]
        for name, files in artifacts.items():
            if name == "charts":  # shown by `Harness.report`
                continue
            lines += ["", f"## Samples: {name} conditions (same seeds before and after)", ""]
            if "original" in files:
                lines += ["Original:", "", f"![original {name}]({files['original']})", ""]
            lines += ["Unlearned:", "", f"![unlearned {name}]({files['unlearned']})"]
        return lines


def _per_label(conditions: list, labels: list, per_label: int, cross: list = ()) -> tuple[list, list, list]:
    """`per_label` conditions for each judge label, cycling through that label's conditions in order, with
    their labels and (two-factor worlds) their labels on the other factor (`cross`, else empty)."""
    if not labels:
        return [conditions[i % len(conditions)] for i in range(per_label)] if conditions else [], [], []
    by_label: dict = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    chosen, chosen_labels, chosen_cross = [], [], []
    for label, group in by_label.items():
        picked = [group[i % len(group)] for i in range(per_label)]
        chosen += [conditions[i] for i in picked]
        chosen_labels += [label] * per_label
        chosen_cross += [cross[i] for i in picked] if cross else []
    return chosen, chosen_labels, chosen_cross
