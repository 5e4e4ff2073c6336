"""What an attack is: a search or a fine-tuning that tries to bring the erased class or concept back, run with
the same budget on the original model, on Retrain and on the unlearned model (`unlearn.attacks.run`).

An attack returns a `Probe` per model: `success`, how much of the concept it brought back (percent; higher =
more of the concept), from which the runner computes the residual R = (m_unlearned − m_retrain) / (m_original −
m_retrain). Its hyperparameters (the budget among them) are dataclass fields declared with `hyperparameter()`,
as a method's are.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import ConfigError
from ..methods.base import hyperparameter

if TYPE_CHECKING:
    from ..data import UnlearnData
    from ..harness.base import Harness, MetricInfo
    from ..models.base import Model

__all__ = ["Attack", "Probe", "Target", "hyperparameter", "residual", "wilson"]


@dataclass
class Probe:
    """One attack on one model with one seed.

    Attributes:
        success: how much of the concept the attack brought back, in percent (the number R is computed on).
            Where the attack stopped its search on the harness's judge, `success` is the second, independent
            judge's verdict on what it found (the first judge's goes in `metrics["success_judge_a"]`).
        hits, trials: `success` as a count (hits of trials), for its Wilson interval; None when it is no rate.
        metrics: the attack's other numbers (keys of its `metrics` catalogue).
        curve: (x, y) points of a curve the report plots (a relearning curve: steps, percent recognized).
        images: what the attack produced (the report shows a grid).
        generations: the images the attack generated and judged (what a same-budget baseline may spend).
    """

    success: float
    hits: int | None = None
    trials: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[float, float]] | None = None
    images: torch.Tensor | None = None
    generations: int = 0

    def to_json(self) -> dict:
        return {
            "success": self.success,
            "hits": self.hits,
            "trials": self.trials,
            "metrics": self.metrics,
            "curve": self.curve,
            "generations": self.generations,
        }

    @classmethod
    def from_json(cls, raw: dict) -> Probe:
        curve = [tuple(point) for point in raw["curve"]] if raw.get("curve") else None
        return cls(
            raw["success"],
            raw.get("hits"),
            raw.get("trials"),
            dict(raw.get("metrics") or {}),
            curve,
            generations=raw.get("generations", 0),
        )


@dataclass
class Target:
    """What an attack may use besides the model it attacks.

    Attributes:
        harness: the family's harness, its judges ready (`harness.before` ran): `harness.recognized(model, data,
            ...)` says how much of the concept a model shows, `harness.judge` / `harness.second_judge` judge images.
        data: the task (forget / retain / test sets; the concept's prompts and labels for generators).
        original: the model before unlearning (a teacher, or a source of target images); never trained.
        role: which model is attacked: "original", "retrain" or "unlearned" (an attack on the unlearning
            procedure rather than on one model, such as U-LiRA's shadow models, needs it).
        log: where messages go.
    """

    harness: Harness
    data: UnlearnData
    original: Model
    role: str = "unlearned"
    log: Any = print

    @property
    def family(self) -> str:
        return self.harness.family

    @property
    def device(self) -> torch.device:
        return self.harness.device


@dataclass
class Attack(ABC):
    """One attack. Subclasses set the class attributes and implement `run`; their dataclass fields are the
    settings (the budget among them), each declared with `hyperparameter(default, help)`.

    Class attributes:
        name: the registry name (`unlearn attack RUN --attack NAME`, `eval.attacks`).
        families: the model families it applies to.
        success_meaning: what `Probe.success` counts, in one line.
        metrics: the attack's other output keys (`Probe.metrics`), each with its catalogue entry.
        baselines: the registered attacks that run beside it with the same number of generations (search
            attacks: random tokens, random latents, seed search); each takes a `generations` setting, which the
            runner sets to this attack's `generation_budget`.
        modifies_model: True when `run` trains the model it is given (the runner then hands it a copy).
    """

    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]]
    success_meaning: ClassVar[str]
    metrics: ClassVar[dict[str, MetricInfo]] = {}
    baselines: ClassVar[tuple[str, ...]] = ()
    modifies_model: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` in one sentence when a setting is out of range whatever the task (a learning rate
        of 0, no steps, an unknown choice). Runs when the attack is built, so `unlearn check` refuses a recipe
        with such `eval.attacks` before anything loads; what depends on the task is `check`'s. Default: nothing
        to check."""
        return None

    # -- range checks for `validate`; a setting whose default is None (the family's default, resolved in
    # -- `check` or `run`) may be left None

    def _bad(self, key: str, what: str) -> ConfigError:
        got = repr(getattr(self, key))
        got = got if len(got) <= 80 else got[:77] + "..."
        return ConfigError(
            f"{self.name}.{key} must be {what}, got {got} (`unlearn ls attacks {self.name}` lists its settings)"
        )

    def _left_default(self, key: str) -> bool:
        return getattr(self, key) is None and self.__dataclass_fields__[key].default is None

    def require_int(self, *keys: str, low: int = 1) -> None:
        """Each of `keys` is an integer >= `low`."""
        for key in keys:
            value = getattr(self, key)
            if self._left_default(key):
                continue
            if not _is_int(value) or value < low:
                raise self._bad(key, f"an integer of at least {low}")

    def require_number(self, *keys: str, low: float = 0.0, strict: bool = True) -> None:
        """Each of `keys` is a finite number > `low` (>= `low` when not `strict`)."""
        for key in keys:
            value = getattr(self, key)
            if self._left_default(key):
                continue
            if not _is_number(value) or (value <= low if strict else value < low):
                raise self._bad(key, f"a finite number {'>' if strict else '>='} {low:g}")

    def require_choice(self, key: str, choices: tuple[str, ...]) -> None:
        if getattr(self, key) not in choices:
            raise self._bad(key, f"one of {', '.join(choices)}")

    def require_list(self, key: str, item, what: str, empty: bool = False) -> None:
        """`key` is a list (non-empty unless `empty`) whose items all satisfy `item`; `what` says so in words."""
        value = getattr(self, key)
        if not isinstance(value, list) or (not value and not empty) or not all(map(item, value)):
            raise self._bad(key, what)

    def check(self, target: Target) -> None:
        """Raise `ConfigError` in one sentence when the attack does not apply to this task (default: it does)."""
        return None

    def generation_budget(self, target: Target) -> int:
        """The most images a search attack generates and judges on one model (its baselines get as many)."""
        raise NotImplementedError(f"{self.name} declares baselines but no generation budget")

    @abstractmethod
    def budget(self, target: Target) -> str:
        """The budget in words (steps, generations, share of the original training), for the report."""

    @abstractmethod
    def run(self, model: Model, target: Target, seed: int) -> Probe:
        """Attack `model`; the runner seeded the global RNG with `seed` (use it for any generator of your own)."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """An int or float that is a finite float (an int beyond a float's range, 10**400, is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def residual(unlearned: float, retrain: float, original: float, floor: float = 1.0) -> float:
    """R = (m_unlearned − m_retrain) / (m_original − m_retrain): 0 = as gone as in Retrain, 1 = as present as in
    the original. NaN when the original and Retrain differ by less than `floor` (percentage points): then the
    attack does not separate a model that knows the concept from one that never learned it."""
    if any(map(math.isnan, (unlearned, retrain, original))) or abs(original - retrain) < floor:
        return math.nan
    return (unlearned - retrain) / (original - retrain)


def wilson(hits: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate, in percent (95 % by default)."""
    if trials <= 0:
        return math.nan, math.nan
    p = hits / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)
