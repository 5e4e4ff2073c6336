"""Recipes: YAML -> dataclasses, `key=value` overrides, validation. Nothing runs here."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .datasets import DATASETS
from .errors import CheckpointNotFoundError, ConfigError
from .methods import get_method
from .metrics import METRICS

FAMILIES = ("classifier",)
PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class PruneSpec:
    """Prune first, then unlearn: how the loaded model is made sparse before the method runs (`unlearn.prune`).

    method: "omp" (one-shot global magnitude pruning to `sparsity`), "imp" (`rounds` rounds pruning `rate` of
        the surviving weights, each rewound and retrained), or "zeros" (the checkpoint is already sparse: its
        zero weights in `scope` are the pruned ones, e.g. a `pruned/` model of an earlier run).
    epochs: retraining epochs after each pruning step on the full training set (forget + retain: pruning
        happens before any unlearning request); 0 = OMP without retraining. OMP with epochs > 0 is the
        reference's OMP (prune, rewind, retrain once).
    rewind: a state-dict file to rewind to before retraining (the reference rewinds to epoch 8 of the original
        training); None rewinds to the loaded trained weights.
    """

    method: str = "omp"
    sparsity: float = 0.95
    scope: str = "conv"
    rounds: int = 1
    rate: float = 0.2
    epochs: int = 0
    lr: float = 0.1
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    augment: str = "none"
    rewind: str | None = None


PRUNE_METHODS = ("omp", "imp", "zeros")


@dataclass
class ModelSpec:
    family: str = "classifier"
    arch: str | None = "digits_cnn"  # built-in name, "torchvision:<name>", or None for a transformers folder
    checkpoint: str | None = "world:digits"  # a path, "world:<name>", or None for fresh weights
    prune: dict | None = None  # a PruneSpec: prune the loaded model first, then unlearn on the sparse model

    def prune_spec(self) -> PruneSpec | None:
        return None if self.prune is None else _build(PruneSpec, self.prune, "model.prune")


@dataclass
class DataSpec:
    dataset: str = "digits"
    root: str | None = None
    download: bool = False
    image_size: int | None = None
    forget_class: list | None = None
    forget_fraction: float | None = None


@dataclass
class TrainSpec:
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    cpu: bool = False
    checkpoint_every: int = 1


@dataclass
class EvalSpec:
    metrics: list = field(default_factory=lambda: ["UA", "RA", "TA", "MIA", "per_class", "representation"])
    reference: str | None = None  # a recipe (relative to this one) or run folder giving the Retrain reference
    original: bool = True  # also score the model before unlearning (keys original_*)
    batch_size: int = 256


SECTIONS = {"model": ModelSpec, "data": DataSpec, "train": TrainSpec, "eval": EvalSpec}
TOP_LEVEL = ("method", *SECTIONS, "seed", "output")


@dataclass
class Recipe:
    method: str
    method_args: dict
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    seed: int = 0
    output: str | None = None
    source: str | None = None  # the file it was read from

    def build_method(self):
        """The method instance with this recipe's hyperparameters."""
        return get_method(self.method, self.model.family)(**self.method_args)

    def to_dict(self) -> dict:
        """The resolved recipe: every hyperparameter spelt out, defaults included."""
        method = {"name": self.method, **dataclasses.asdict(self.build_method())}
        out = {"method": method}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        if self.model.prune is not None:
            out["model"]["prune"] = dataclasses.asdict(self.model.prune_spec())
        out["seed"] = self.seed
        out["output"] = self.output
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file and apply `section.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"recipe {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"recipe {str(path)!r} is not readable YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping with at least a 'method' section")
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(raw, source=str(path))


def apply_override(raw: dict, item: str) -> None:
    """Apply one `key.path=value` override to a raw recipe dict (before validation)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML") from err
    parts = key.strip().split(".")
    if len(parts) == 1 and parts[0] in ("seed", "output"):
        raw[parts[0]] = parsed
        return
    if len(parts) != 2:
        raise ConfigError(f"override key {key!r} must be section.key (e.g. method.lr=0.01), or seed / output")
    section, name = parts
    if section not in TOP_LEVEL:
        _unknown("recipe section", section, TOP_LEVEL)
    if section == "method" and isinstance(raw.get("method"), str):
        raw["method"] = {"name": raw["method"]}
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise ConfigError(f"recipe section {section!r} must be a mapping")
    raw[section][name] = parsed


def from_dict(raw: dict, source: str | None = None) -> Recipe:
    """Validate a raw recipe dict and build the `Recipe`."""
    for key in raw:
        if key not in TOP_LEVEL:
            _unknown("recipe section", key, TOP_LEVEL)
    method = raw.get("method")
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict) or "name" not in method:
        raise ConfigError(
            "the recipe needs a 'method' section with a 'name' (e.g. method: {name: random_label})"
        )
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"recipe section {name!r} must be a mapping")
        sections[name] = _build(cls, values, name)
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    recipe = Recipe(
        method=str(method["name"]),
        method_args={k: v for k, v in method.items() if k != "name"},
        seed=seed,
        output=raw.get("output"),
        source=source,
        **sections,
    )
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    """Check everything that can be checked without loading data or weights."""
    model, data, train, ev = recipe.model, recipe.data, recipe.train, recipe.eval
    if model.family not in FAMILIES:
        raise ConfigError(f"unknown model family {model.family!r}; known: {', '.join(FAMILIES)}")
    prune = model.prune_spec()
    if prune is not None:
        if prune.method not in PRUNE_METHODS:
            _unknown("model.prune.method", prune.method, PRUNE_METHODS)
        if not 0.0 <= prune.sparsity < 1.0 or not 0.0 <= prune.rate < 1.0:
            raise ConfigError("model.prune.sparsity and model.prune.rate must lie in [0, 1)")
        if prune.rounds < 1 or prune.epochs < 0:
            raise ConfigError("model.prune.rounds must be at least 1 and model.prune.epochs at least 0")
    cls = get_method(recipe.method, model.family)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in recipe.method_args.items():
        if key not in fields:
            _unknown(f"hyperparameter of method {recipe.method!r}", key, fields)
        _check_type(f"method.{key}", fields[key].type, value)
    if data.dataset not in DATASETS:
        _unknown("dataset", data.dataset, DATASETS)
    if (data.forget_class is None) == (data.forget_fraction is None):
        raise ConfigError(
            "give exactly one of data.forget_class (class-wise) or data.forget_fraction (random)"
        )
    if data.forget_class is not None:
        if not data.forget_class:
            raise ConfigError("the forget set is empty: data.forget_class lists no class")
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in data.forget_class):
            raise ConfigError(f"data.forget_class must list integer class ids, got {data.forget_class!r}")
    if train.mixed_precision not in PRECISIONS:
        _unknown("train.mixed_precision", train.mixed_precision, PRECISIONS)
    if train.gradient_accumulation_steps < 1:
        raise ConfigError("train.gradient_accumulation_steps must be at least 1")
    for name in ev.metrics:
        if name not in METRICS:
            _unknown("metric", name, METRICS)


def _build(cls, values: dict, section: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            _unknown(f"key of section {section!r}", key, fields)
        _check_type(f"{section}.{key}", fields[key].type, value)
    if section == "data" and isinstance(values.get("forget_class"), int):
        values = {**values, "forget_class": [values["forget_class"]]}
    return cls(**values)


_TYPES = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "None": (type(None),),
    "list": (list,),
    "dict": (dict,),
}


def _check_type(name: str, annotation, value) -> None:
    """Check `value` against a simple annotation string such as `float | None` or `list`."""
    allowed: tuple = ()
    for part in str(annotation).split("|"):
        base = part.strip().split("[")[0]
        allowed += _TYPES.get(base, (object,))
    if name == "data.forget_class" and isinstance(value, int):
        return
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        raise ConfigError(f"{name} must be {annotation}, got {value!r}")


def _unknown(what: str, name, known) -> None:
    close = difflib.get_close_matches(str(name), list(known), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown {what} {name!r}.{hint} Known: {', '.join(map(str, known))}")


def find_path(path: str | Path) -> Path:
    """A recipe or suite path as given, else relative to the project root (where recipes/ and evals/ live)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    candidate = Path(__file__).resolve().parents[1] / path
    return candidate if candidate.exists() else path
