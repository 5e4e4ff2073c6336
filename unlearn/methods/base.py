"""The Method base class, and `hyperparameter()`, how a method declares a field with its help text and range."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from ..data import UnlearnData
from ..errors import ConfigError
from ..models.base import Model

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "linear")
AUGMENT = ("none", "crop_flip")  # unlearn.train.AUGMENTATIONS

# The range of a field that a method does not declare itself, by its name (exact, then by ending): every
# learning rate is positive, every batch holds an example, every loop runs at least once, every weight and
# guidance scale is non-negative. A method declares another range with `hyperparameter(..., ge=...)`.
BY_NAME: dict[str, dict] = {
    "lr": {"gt": 0},
    "batch_size": {"ge": 1},
    "epochs": {"ge": 1},
    "steps": {"ge": 1},
    "momentum": {"ge": 0, "lt": 1},
    "weight_decay": {"ge": 0},
    "max_grad_norm": {"gt": 0},
    "sparsity": {"ge": 0, "lt": 1},
    "optimizer": {"choices": OPTIMIZERS},
    "lr_schedule": {"choices": LR_SCHEDULES},
    "augment": {"choices": AUGMENT},
}
BY_ENDING: dict[str, dict] = {
    "_lr": {"gt": 0},
    "_batch_size": {"ge": 1},
    "_weight": {"ge": 0},
    "_guidance": {"ge": 0},
    "_scale": {"ge": 0},
    "_steps": {"ge": 1},
    "_epochs": {"ge": 1},
}
_BOUNDS = ("ge", "gt", "le", "lt")


def hyperparameter(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
) -> Any:
    """A method field with its one-line help text (printed by `unlearn ls methods NAME`) and, for numbers, its
    range (`ge` >=, `gt` >, `le` <=, `lt` <) or, for names, its `choices`; a field that declares none takes the
    range its name implies (`BY_NAME`, `BY_ENDING`). Recipes are checked against them before anything loads.

    Mutable defaults (lists, dicts) are copied per instance.
    """
    metadata: dict[str, Any] = {"help": help}
    rule = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if choices is not None:
        rule["choices"] = tuple(choices)
    if rule:
        metadata["rule"] = rule
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_rule(field: dataclasses.Field) -> dict:
    """The range or choices of a method field: its own, else the one its name implies, else none ({})."""
    if "rule" in field.metadata:
        return field.metadata["rule"]
    if field.name in BY_NAME:
        return BY_NAME[field.name]
    for ending, rule in BY_ENDING.items():
        if field.name.endswith(ending):
            return rule
    return {}


def describe(rule: dict) -> str:
    """A rule in words: "at least 1", "greater than 0", "in [0, 1)", "one of sgd, adam, adamw"."""
    if "choices" in rule:
        return f"one of {', '.join(map(str, rule['choices']))}"
    low = next(((k, rule[k]) for k in ("ge", "gt") if k in rule), None)
    high = next(((k, rule[k]) for k in ("le", "lt") if k in rule), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    if low:
        return f"{'at least' if low[0] == 'ge' else 'greater than'} {low[1]}"
    if high:
        return f"{'at most' if high[0] == 'le' else 'less than'} {high[1]}"
    return "a finite number"


def check_value(name: str, rule: dict, value: Any, example: Any = None) -> None:
    """Refuse `value` of the setting `name` (e.g. "method.lr") outside `rule`, in one sentence; None passes
    (a field's `| None`, checked by type elsewhere), lists and other values not numbers or strings pass."""
    if value is None or isinstance(value, bool):
        return
    hint = f" (e.g. {name}={example})" if example is not None and not isinstance(example, bool) else ""
    if isinstance(value, str):
        if "choices" in rule and value not in rule["choices"]:
            raise ConfigError(f"{name} must be {describe(rule)}, got {value!r}; set one of them{hint}")
        return
    if not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}; set a number{hint}")
    ok = (
        ("ge" not in rule or value >= rule["ge"])
        and ("gt" not in rule or value > rule["gt"])
        and ("le" not in rule or value <= rule["le"])
        and ("lt" not in rule or value < rule["lt"])
    )
    if not ok:
        raise ConfigError(f"{name} must be {describe(rule)}, got {value!r}; change it{hint}")


@dataclass
class Method(ABC):
    """One unlearning algorithm. Dataclass fields are its hyperparameters, each declared with
    `hyperparameter(default, help)`.

    Subclasses set `families` (the model families they support) and implement `unlearn`; `check` adds the rules
    between fields (run at construction, after every field's range), `check_recipe` the rules between the
    method and the rest of a recipe (run by recipe validation, before anything loads).
    """

    families: ClassVar[tuple[str, ...]] = ()
    # the method's loop steps two optimizers (or a custom loop) and refuses train.gradient_accumulation_steps > 1
    accumulates: ClassVar[bool] = True
    # the method edits a text-to-image model's cross-attention: a class-conditional model is refused
    needs_text: ClassVar[bool] = False
    # the `params` sets that need cross-attention (a text-to-image UNet) in this method
    text_params: ClassVar[tuple[str, ...]] = ("xattn", "kv")
    # a diffusion method that trains on images of the concept (False: prompts alone, a `ConceptPrompts`, do)
    needs_images: ClassVar[bool] = True
    # the method runs under a multi-process launch (`accelerate launch --num_processes N`) with the result of one
    # process for the same global batch: its trained model wrapped for data parallelism (`train.data_parallel`),
    # each step's global batch drawn alike everywhere and sharded (`train.shard`), a closed-form edit broadcast.
    # Every classifier method runs so (the family's `fit()` does it for them: `Harness.multi_process`); a
    # generative method that does not say so is refused on several processes (`pipeline.check_processes`).
    multi_process: ClassVar[bool] = False
    # the method trains through `train.train_steps`, which shards its trained UNet in place under an FSDP launch
    # (`recipes/accelerate/fsdp_*.yml`); another method under FSDP is refused (`pipeline.check_sharding`)
    shards_model: ClassVar[bool] = False
    # set by the registry (`unlearn.methods.METHODS`): the name this method is registered as, and its variants
    # for every family (this class among them)
    registered_as: ClassVar[str | None] = None
    variants: ClassVar[tuple[type[Method], ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        """Every method's `unlearn` takes what a library user brings: its model and task are checked, and raw
        objects wrapped (`unlearn.models.wrap`), once, here at the entry, before the method sees them."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("unlearn")
        if own is None or getattr(own, "_takes_raw_inputs", False):
            return

        @functools.wraps(own)
        def unlearn(self, model, data, accelerator, *args, **kwargs):
            model, data = self.inputs(model, data)
            return own(self, model, data, accelerator, *args, **kwargs)

        unlearn._takes_raw_inputs = True
        cls.unlearn = unlearn

    def inputs(self, model, data) -> tuple[Model, UnlearnData]:
        """`model` as an adapter of a family this method supports and `data` as an `UnlearnData`, or one
        sentence that says what to pass (a model of another family names the variant of this method for it)."""
        from ..models.wrap import as_model, as_task, is_pipeline

        who = f"method {type(self).__name__}"
        family = model.family if isinstance(model, Model) else "diffusion" if is_pipeline(model) else None
        if family is not None and family not in self.families:
            raise ConfigError(f"{who} {self._variant_for(family)}")
        family = family or ("classifier" if "classifier" in self.families else self.families[0])
        data = as_task(data, family, who, self.needs_images)  # the task first: wrapping needs its classes
        return as_model(model, self.families, getattr(data, "num_classes", None), who), data

    def _variant_for(self, family: str) -> str:
        """The end of the sentence refusing a `family` model: the registered variant to use instead, if any."""
        name = self.registered_as
        if name is None:
            return f"works on {', '.join(self.families)} models, not on a {family} model"
        for variant in self.variants:
            if family in variant.families:
                return (
                    f"works on {', '.join(self.families)} models; for a {family} model use "
                    f"unlearn.get_method({name!r}, family={family!r}) ({variant.__name__})"
                )
        return f"works on {', '.join(self.families)} models, and {name!r} has no {family} variant"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            default = field.default if field.default is not dataclasses.MISSING else None
            check_value(f"method.{field.name}", field_rule(field), value, default)
        self.check()

    def check(self) -> None:  # noqa: B027 (an optional hook: most methods have no rule between fields)
        """Refuse settings that are each in range but do not work together (a ConfigError in one sentence)."""

    def check_recipe(self, recipe, conditioning: str | None) -> None:
        """Refuse what this method cannot run with the rest of `recipe`, before anything loads.

        Args:
            recipe: the `unlearn.recipe.Recipe`.
            conditioning: the model's conditioning when the checkpoint names it ("text", "class"; a world
                model), else None (known only once loaded).
        """
        if not self.accumulates and recipe.train.gradient_accumulation_steps > 1:
            raise ConfigError(
                f"method {recipe.method!r} steps its own optimizers and does not accumulate gradients; set "
                "train.gradient_accumulation_steps to 1 (use a larger method.batch_size instead)"
            )
        if self.needs_text and conditioning not in (None, "text"):
            raise ConfigError(
                f"method {recipe.method!r} edits a text-to-image model's cross-attention, and "
                f"{recipe.model.checkpoint!r} is {conditioning}-conditioned: choose a text-to-image model "
                "(e.g. world:digits/t2i) or another method"
            )
        params = getattr(self, "params", None)
        if params is not None:
            check_params(params, conditioning, self.text_params)

    @abstractmethod
    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        """Return the unlearned model (may edit `model` in place; the caller keeps its own copy)."""


def check_params(params, conditioning: str | None, text_params: tuple[str, ...] = ("xattn", "kv")) -> None:
    """`method.params` of a diffusion method: a parameter set of `PARAMETER_SETS`, or a non-empty list of
    globs; the sets in `text_params` need a text-to-image model."""
    from ..models.diffusion import PARAMETER_SETS

    if isinstance(params, list):
        if not params or not all(isinstance(p, str) and p for p in params):
            raise ConfigError(
                f"method.params must be a parameter set ({', '.join(PARAMETER_SETS)}) or a non-empty list of "
                f"parameter-name globs, got {params!r}"
            )
        return
    if params not in PARAMETER_SETS:
        raise ConfigError(
            f"method.params must be one of {', '.join(PARAMETER_SETS)}, or a list of parameter-name globs; got "
            f"{params!r}"
        )
    if params in text_params and conditioning == "class":
        raise ConfigError(
            f"method.params {params!r} splits a text-to-image UNet at its cross-attention, and this model is "
            "class-conditioned: use params: full"
        )
