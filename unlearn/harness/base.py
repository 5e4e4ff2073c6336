"""What every family's harness offers: build the task, score a model, report it, put it in a bench table."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from ..errors import ConfigError
from ..spread import everywhere, is_main_process

if TYPE_CHECKING:
    from ..data import UnlearnData
    from ..models.base import Model
    from ..recipe import Recipe


@dataclass(frozen=True)
class MetricInfo:
    """One entry of a family's metric catalogue.

    Attributes:
        title: short name in tables.
        meaning: one line: what is measured.
        better: "higher", "lower", or "retrain" (best when closest to the Retrain model's value).
        unit: "%", "s" or "" (a plain number).
        requested_by: the `eval.metrics` entry that produces this key; None: the key is itself an entry.
    """

    title: str
    meaning: str
    better: str
    unit: str = "%"
    requested_by: str | None = None


# `eval` settings of what happens around scoring, not of scoring: not part of the original scores' cache key.
AROUND_SCORING = (
    "reference",
    "original",
    "cache",
    "attacks",
    "attack_seeds",
    "utility_margin",
    "lora_tolerance",
)

# Keys every run writes, whatever its family.
COMMON: dict[str, MetricInfo] = {
    "RTE_s": MetricInfo(
        "RTE (s)",
        "run time of the unlearning call (summed over the segments of a resumed run)",
        "lower",
        "s",
        "(always)",
    ),
    "pruned_sparsity": MetricInfo(
        "sparsity",
        "share of zero weights after `model.prune`, before unlearning",
        "higher",
        "",
        "model.prune",
    ),
}


@dataclass
class Recognition:
    """Which draws of the erased class or concept show it (attacks, `Harness.recognized`).

    Attributes:
        by_judge: one boolean per draw: the harness's judge recognizes the concept (for a classifier: the model
            itself classifies the held-out example correctly).
        by_second_judge: the same by the second, independently trained judge (a classifier: the same as
            `by_judge`).
        images: the images judged (generators), else None.
    """

    by_judge: torch.Tensor
    by_second_judge: torch.Tensor
    images: torch.Tensor | None = None

    @property
    def rate(self) -> float:
        """Percent recognized by the judge."""
        return share(self.by_judge)

    @property
    def second_rate(self) -> float:
        """Percent recognized by the second judge."""
        return share(self.by_second_judge)


@dataclass
class Scores:
    """What scoring a model gives: flat metrics, and the images it drew (generative families)."""

    metrics: dict[str, float]
    images: dict[str, torch.Tensor] = field(default_factory=dict)


class Harness(ABC):
    """Everything family-specific about evaluating an unlearning run.

    One instance serves one run: `setup` loads the recipe's model and builds its task, `before` takes what
    scoring needs from the original model, `score` scores a model (the original and the unlearned one alike),
    `compare` derives the keys that set a score against the original's or Retrain's, `save_artifacts` writes
    sample grids, `report` writes the family's report.md. The class attributes are the family's metric
    catalogue and bench table.
    """

    family: ClassVar[str]
    catalogue: ClassVar[dict[str, MetricInfo]]
    default_metrics: ClassVar[tuple[str, ...]]
    columns: ClassVar[tuple[str, ...]]  # bench table columns (catalogue keys), in order
    legend: ClassVar[str]  # what the bench table's columns mean
    row_extras: ClassVar[tuple[str, ...]] = ()  # keys kept in results.json beside the table's columns
    files: ClassVar[str] = (  # what report.md says the run folder holds
        "`model/` (the unlearned model), `recipe.yaml` (resolved), `metrics.json`, `train.jsonl`, `run.log`, "
        "the charts `chart_*.png`."
    )

    def __init__(self, recipe: Recipe, device: str | torch.device = "cpu", log=print):
        self.recipe = recipe
        self.device = torch.device(device)
        self.log = log
        self.names = list(recipe.eval.metrics)
        # the generators' autocast dtype while scoring (`eval.precision`): bf16 asked, or auto on a GPU with bf16
        precision = recipe.eval.precision
        if precision == "auto":
            cuda = self.device.type == "cuda" and torch.cuda.is_available()
            precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        self.generation_dtype = torch.bfloat16 if precision == "bf16" else None

    # ---------------------------------------------------------------------------------------------- catalogue

    @classmethod
    def metric_names(cls) -> list[str]:
        """The names `eval.metrics` may list for this family."""
        return [key for key, info in cls.catalogue.items() if info.requested_by is None]

    @classmethod
    def check_metrics(cls, names) -> None:
        known = cls.metric_names()
        for name in names:
            if name not in known:
                raise ConfigError(
                    f"{name!r} is not a metric of the {cls.family} family; its metrics: {', '.join(known)}"
                )

    @classmethod
    def info(cls, key: str) -> MetricInfo | None:
        """The catalogue entry of a metric key, also of patterned keys such as `acc_class_3` or
        `erasure_rate:three`."""
        catalogue = {**cls.catalogue, **COMMON}
        if key in catalogue:
            return catalogue[key]

        for pattern, info in catalogue.items():
            if "<" in pattern and key.startswith(pattern.split("<")[0]):
                return info
        return None

    # -------------------------------------------------------------------------------------------- the task

    @abstractmethod
    def setup(self) -> tuple[Model, UnlearnData]:
        """The recipe's model (loaded, on the device, prepared as the recipe trains it) and the task."""

    @abstractmethod
    def load_output(self, path: Path, data: UnlearnData) -> Model:
        """A run's saved model, prepared as `setup` prepares the original (so it scores as it did in the run)."""

    @abstractmethod
    def before(self, original: Model, data: UnlearnData, reference_dir: Path | None) -> None:
        """Take from the original model, before unlearning, what scoring needs (frozen copies, draws)."""

    # ------------------------------------------------------------------------------------------------ scoring

    multi_process: ClassVar[bool] = False  # whether a run of this family may be launched on several processes

    @abstractmethod
    def score(self, model: Model, data: UnlearnData, original: bool = False) -> Scores:
        """Score `model` on the task with the recipe's `eval.metrics`; `original`: it is the model before
        unlearning (comparisons of a model with itself are skipped)."""

    # Whether the original model's scores are worth caching (`score_original`): the generative families, whose
    # scoring generates thousands of images; a classifier's is one pass over its test set.
    cache_original: ClassVar[bool] = False
    grid_size: ClassVar[int] = 0  # images per set that the report's sample grids show (and the cache keeps)
    score_version: ClassVar[int] = 1  # bump when scoring changes outside the files `code_hash` reads

    def score_original(self, model: Model, data: UnlearnData) -> Scores:
        """`score(model, data, original=True)`, read from the toolkit cache (`unlearn.evalcache`) when the same
        original model was scored before with the same task, evaluation settings and seed; otherwise scored and
        stored there. Off with `eval.cache: false`, and for families that do not cache (`cache_original`).
        Cached, the images are those the sample grids show (`grid_size` per set)."""
        if not (self.cache_original and self.recipe.eval.cache):
            return self.score(model, data, original=True)
        from .. import evalcache
        from ..errors import OutputError
        from ..metrics.generation import owner_module

        judge = getattr(self, "judge", None)
        if judge is not None and owner_module(judge) is None:
            self.log("original scores: not cached (the judge is a plain function, which no key can capture)")
            return self.score(model, data, original=True)

        material = self.cache_material(model, data)
        key = evalcache.entry_key(material)
        path = evalcache.entry_path(self.family, key)
        found = evalcache.read_entry(path, key, material) if path.exists() else None
        if everywhere(isinstance(found, tuple)):  # (several processes score together, or read alike)
            self.log(f"original scores: cached ({key[:12]})")
            return Scores(*found)
        if found is not None and not isinstance(found, tuple):
            self.log(f"original scores: ignoring cache entry {path} ({found}); scoring again")
        scores = self.score(model, data, original=True)
        if not is_main_process():  # scored with the others (`unlearn.spread`), stored by the main process
            return scores
        grids = {name: images[: self.grid_size] for name, images in scores.images.items()}
        try:
            evalcache.write_entry(path, key, material, scores.metrics, grids)
            self.log(f"original scores: stored in the cache ({key[:12]})")
        except OutputError as err:  # a read-only or full cache costs later runs time, not this run its result
            self.log(f"original scores: not cached ({err})")
        return scores

    def cache_material(self, model: Model, data: UnlearnData) -> dict:
        """What the original model's scores depend on (the cache key is its hash): the scoring code (its version
        and source files), the model's weights as scored, the task (the recipe's data section and the prompts or
        classes built from it), the evaluation settings that change what is generated or measured, the seed,
        the metrics asked for, the judge's weights and the device. Families add theirs
        (`super().cache_material(...)`)."""
        from .. import __version__
        from ..evalcache import weights_hash
        from ..metrics.generation import extractor_fingerprint

        ev = dataclasses.asdict(self.recipe.eval)
        for name in AROUND_SCORING:
            ev.pop(name, None)
        judge = getattr(self, "judge", None)
        device = self.device.type
        if device == "cuda":
            device += f" {torch.cuda.get_device_name(self.device)}"
        return {
            "harness": f"{type(self).__module__}.{type(self).__qualname__}",
            "score_version": self.score_version,
            "code": code_hash(type(self), type(model)),
            "grid_size": self.grid_size,
            "toolkit": __version__,
            "torch": torch.__version__,
            "device": device,
            "checkpoint": str(self.recipe.model.checkpoint),
            "weights": weights_hash(model),
            "data": dataclasses.asdict(self.recipe.data),
            "prompts": dataclasses.asdict(data.prompts) if data.prompts is not None else None,
            "eval": ev,
            "metrics": list(self.names),
            "seed": self.recipe.seed,
            "judge": extractor_fingerprint(judge) if judge is not None else None,
        }

    @classmethod
    def compare(cls, metrics: dict, reference: dict | None) -> dict:
        """Keys that set the unlearned model's scores against the original's (`original_*` in `metrics`) or
        Retrain's (`reference`, its metrics): none by default."""
        return {}

    # ------------------------------------------------------------------------------------------ utility guard

    # The retained-quality metrics (higher is better, in points) the utility guard watches; none: no guard.
    utility_keys: ClassVar[tuple[str, ...]] = ()

    def utility_guard(self, metrics: dict) -> dict:
        """The guard's verdict on a scored run: `utility_warning` is one sentence when a `utility_keys` metric
        fell more than `eval.utility_margin` points below the original model's (`original_*`), else None;
        `utility_drop` is the largest fall in points. Why: a recipe tuned for one model can erase the class
        and much of another model with it, and nothing else would say so at run time."""
        margin = self.recipe.eval.utility_margin
        drops = {}
        for key in self.utility_keys:
            before, after = metrics.get(f"original_{key}"), metrics.get(key)
            if isinstance(before, (int, float)) and isinstance(after, (int, float)):
                if math.isfinite(before) and math.isfinite(after):
                    drops[key] = (before - after, before, after)
        if not drops:
            return {"utility_warning": None}
        verdict: dict = {"utility_drop": round(max(d[0] for d in drops.values()), 4), "utility_warning": None}
        fallen = [
            f"{self.info(k).title} fell {d:.1f} points ({b:.1f} → {a:.1f} %)"
            for k, (d, b, a) in drops.items()
            if d > margin
        ]
        if fallen:
            verdict["utility_warning"] = (
                f"utility warning: {' and '.join(fallen)} below the original model, more than "
                f"eval.utility_margin={margin:g}; the recipe's settings may not suit this model: try "
                "method.lr=auto, or a smaller method.lr or fewer method.epochs"
            )
        return verdict

    def check_original(self, model: Model, data: UnlearnData) -> str | None:
        """One sentence when the original model scores so poorly on the data as the toolkit preprocesses it
        that the run cannot mean anything (a wrong normalisation, say), else None. Checked before any
        training; none by default."""
        return None

    # ---------------------------------------------------------------------------------------------- writing

    def save_model(self, model: Model, output: Path) -> None:
        """The unlearned model, in the format the user brought (`output/model`)."""
        model.save(output / "model")

    def save_artifacts(self, output: Path, scores: Scores, original: Scores | None) -> dict[str, dict]:
        """Write what a reader looks at besides numbers (sample grids, charts); returns {name: {kind: file}},
        the charts under "charts" (`save_charts`)."""
        return {"charts": self.save_charts(output, scores, original)}

    def save_charts(self, output: Path, scores: Scores, original: Scores | None) -> dict[str, str]:
        """Write the run's PNG charts into `output`; returns {caption: file name}, in report order. Every
        family: the training losses the run logged (`train.jsonl`; none for a method that does not train)."""
        from ..charts import loss_chart

        chart = loss_chart(output / "train.jsonl", output / "chart_training_loss.png")
        return {"Training losses as `train.jsonl` logged them": chart.name} if chart else {}

    def report(self, data: UnlearnData, metrics: dict, artifacts: dict) -> str:
        """report.md: the header, the metric table (original / unlearned / Retrain), the family's sections."""
        has_gap = any(key.startswith("gap_") for key in metrics)
        lines = [
            *self.report_header(data, metrics),
            f"- run time (RTE): {metrics['RTE_s']:.1f} s on {metrics.get('device', '?')}"
            f" ({metrics.get('num_processes', 1)} process(es))",
            "",
            "| metric | original | unlearned | Retrain |" + (" gap |" if has_gap else ""),
            "|---|---|---|---|" + ("---|" if has_gap else ""),
        ]
        for key in self.report_keys(metrics):
            info = self.info(key)
            title = info.title + (f": {key.split(':', 1)[1]}" if ":" in key else "")
            unit = f" ({info.unit})" if info.unit else ""
            row = f"| {title}{unit} | {fmt(metrics.get(f'original_{key}'))} | {fmt(metrics[key])} | "
            row += f"{fmt(metrics.get(f'retrain_{key}'))} |"
            lines.append(row + (f" {fmt(metrics.get(f'gap_{key}'))} |" if has_gap else ""))
        lines += guard_lines(metrics)
        lines += self.report_sections(data, metrics, artifacts)
        lines += chart_section(artifacts.get("charts", {}))
        lines += ["", "Metrics:", ""]
        for key in self.report_keys(metrics):
            info = self.info(key)
            if ":" not in key:
                lines.append(f"- {info.title}: {info.meaning}; {better_text(info.better)}.")
        lines += ["", f"Files: {self.files}", ""]
        return "\n".join(lines)

    def report_keys(self, metrics: dict) -> list[str]:
        """The keys of the report's main table: scalar catalogue keys the run wrote, in catalogue order, each
        followed by its per-concept keys."""
        keys = []
        for key in self.catalogue:
            if "<" in key or key not in metrics:
                continue
            keys.append(key)
            keys += [k for k in metrics if k.startswith(f"{key}:")]
        return keys

    def report_header(self, data: UnlearnData, metrics: dict) -> list[str]:
        recipe = self.recipe
        return [
            f"# {recipe.method} on `{recipe.model.checkpoint}`",
            "",
            f"- task: {data.describe()}",
        ]

    def report_sections(self, data: UnlearnData, metrics: dict, artifacts: dict) -> list[str]:
        return []

    def headline(self, metrics: dict) -> str:
        """One line for the log: the bench columns the run has."""
        shown = [
            f"{self.info(k).title} {metrics[k]:.2f}" for k in self.columns if k in metrics and k != "RTE_s"
        ]
        return "  ".join([*shown, f"RTE {metrics['RTE_s']:.1f}s"])

    # ------------------------------------------------------------------------------------------------ attacks

    @property
    def second_judge(self):
        """The judge that scores what an attack found searching on `self.judge` (loaded on first use)."""
        if getattr(self, "_second_judge", None) is None:
            self._second_judge = recipe_second_judge(self.recipe, self.device, getattr(self, "judge", None))
        return self._second_judge

    def recognized(
        self,
        model: Model,
        data: UnlearnData,
        *,
        samples: int | None = None,
        seed: int = 0,
        images: torch.Tensor | None = None,
        labels=None,
    ) -> Recognition:
        """How much of the erased class or concept `model` shows: draws of it (generators: `samples` images
        from its conditions with `seed`, or the given `images`) judged by the judge and the second judge. A
        classifier classifies held-out examples of the forgotten data (`images` / `labels`, default: the test
        examples of the forgotten classes)."""
        raise ConfigError(f"the {self.family} harness cannot tell whether a model shows the erased concept")

    def original_training_steps(self) -> int | None:
        """Optimizer steps that trained the recipe's original model, where known (the digits worlds): relearning
        budgets are also stated as a share of them."""
        return None

    # -------------------------------------------------------------------------------------------- the bench

    @classmethod
    def bench_row(cls, metrics: dict, reference: dict) -> dict:
        """A method's row of the bench: the table's columns and their per-concept keys."""
        keys = [*cls.columns, *cls.row_extras]
        row = {k: metrics[k] for k in keys if k in metrics}
        row.update({k: v for k, v in metrics.items() if ":" in k and k.split(":")[0] in cls.columns})
        return row

    @classmethod
    def reference_rows(cls, reference: dict) -> tuple[dict, dict]:
        """The `original` and Retrain rows of the bench, from the Retrain run's metrics."""
        original = {k[len("original_") :]: v for k, v in reference.items() if k.startswith("original_")}
        return {**cls.bench_row(original, reference), "RTE_s": 0.0}, cls.bench_row(reference, reference)


def code_hash(*classes) -> str:
    """sha256 of the source files that define `classes` and of the generation metrics: an edit to the scoring,
    sampling or metric code changes the key of the original scores' cache (a development checkout included)."""
    import hashlib
    import inspect

    from ..metrics import generation

    digest = hashlib.sha256()
    files = {inspect.getsourcefile(c) for c in classes} | {inspect.getsourcefile(generation)}
    for file in sorted(f for f in files if f):
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()


def guard_lines(metrics: dict) -> list[str]:
    """report.md's lines of the utility guard's warning and of the `auto` search, where the run has them."""
    from ..tune import tune_report_line

    warning = metrics.get("utility_warning")
    return (["", f"**{warning[0].upper()}{warning[1:]}**"] if warning else []) + tune_report_line(metrics)


def class_table(metrics: dict, prefix: str, marked, caption: str) -> list[str]:
    """Report lines of a per-class table: the keys `<prefix><c>` of the original, the unlearned model and, where
    the run has them, Retrain; the classes in `marked` starred; none when the run has no such keys."""
    classes = sorted(int(k[len(prefix) :]) for k in metrics if k.startswith(prefix))
    if not classes:
        return []
    return [
        "",
        caption,
        "",
        "| class | " + " | ".join(f"{c}{'*' if c in marked else ''}" for c in classes) + " |",
        "|---|" + "---|" * len(classes),
        "| original | " + " | ".join(fmt(metrics.get(f"original_{prefix}{c}")) for c in classes) + " |",
        "| unlearned | " + " | ".join(fmt(metrics.get(f"{prefix}{c}")) for c in classes) + " |",
    ] + (
        ["| Retrain | " + " | ".join(fmt(metrics.get(f"retrain_{prefix}{c}")) for c in classes) + " |"]
        if any(f"retrain_{prefix}{c}" in metrics for c in classes)
        else []
    )


def chart_section(charts: dict[str, str]) -> list[str]:
    """Report lines that show the charts ({caption: file name}, see `Harness.save_charts`); none without."""
    if not charts:
        return []
    lines = ["", "## Charts"]
    for caption, file in charts.items():
        lines += ["", f"{caption}:", "", f"![{caption}]({file})"]
    return lines


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def better_text(direction: str) -> str:
    return {"higher": "higher is better", "lower": "lower is better"}.get(
        direction, "best when close to Retrain"
    )


def share(hits: torch.Tensor) -> float:
    """Percent of True entries; NaN for none."""
    return 100.0 * float(hits.float().mean()) if len(hits) else math.nan


def recipe_judge(recipe: Recipe, device):
    """The classifier that tells which class or concept a generation shows: `eval.judge`, else the digits
    world's classifier for digits recipes, else None."""
    from ..metrics.generation import load_judge

    if recipe.eval.judge:
        judge = load_judge(recipe.eval.judge)
    elif recipe.data.dataset == "digits":
        from ..worlds.digits import load_digits_classifier

        judge = load_digits_classifier()
    elif recipe.data.dataset == "digits_canvas":
        judge = _canvas_judge(recipe, cross=False, second=False)
    else:
        return None
    return judge.to(device) if isinstance(judge, torch.nn.Module) else judge


def _canvas_judge(recipe: Recipe, cross: bool, second: bool):
    """The digits × styles world's judge of the erased concept's factor (`cross`: of the other factor;
    `second`: the independently trained MLP)."""
    from ..worlds.canvas_text import concept_factor
    from ..worlds.digits_canvas import FACTORS, load_canvas_judge

    concept = recipe.data.concept
    factor = concept_factor(concept if isinstance(concept, str) else concept[0])[0]
    if cross:
        factor = next(f for f in FACTORS if f != factor)
    return load_canvas_judge(factor, second)


def recipe_cross_judge(recipe: Recipe, prompts, device):
    """In a two-factor world (`prompts.factor` set, the digits × styles world), the judge of the other factor,
    which scores cross-domain retainability; else None."""
    if prompts is None or prompts.factor is None or recipe.data.dataset != "digits_canvas":
        return None
    return _canvas_judge(recipe, cross=True, second=False).to(device)


def recipe_second_judge(recipe: Recipe, device, judge):
    """The second, independently trained judge that scores what an attack found by searching on the first
    (reference/attacks.md §0, rule 3): `eval.second_judge`, else the digits world's MLP for digits recipes, else
    the first judge itself (then an attack can win by fooling it: the report says so)."""
    from ..metrics.generation import load_judge

    if recipe.eval.second_judge:
        second = load_judge(recipe.eval.second_judge)
    elif recipe.data.dataset == "digits":
        from ..worlds.digits import load_digits_second_judge

        second = load_digits_second_judge()
    elif recipe.data.dataset == "digits_canvas":
        second = _canvas_judge(recipe, cross=False, second=True)
    else:
        return judge
    return second.to(device) if isinstance(second, torch.nn.Module) else second


def features_of(judge):
    """The judge's penultimate features (a `Classifier`), else its logits: FID's feature extractor."""
    return getattr(judge, "features", judge)
