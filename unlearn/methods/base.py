"""The Method base class, and `hyperparameter()`, how a method declares a field with its help text."""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from ..data import UnlearnData
from ..models.base import Model


def hyperparameter(default: Any, help: str) -> Any:
    """A method field with its one-line help text (printed by `unlearn ls methods NAME`).

    Mutable defaults (lists, dicts) are copied per instance.
    """
    metadata = {"help": help}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class Method(ABC):
    """One unlearning algorithm. Dataclass fields are its hyperparameters, each declared with
    `hyperparameter(default, help)`.

    Subclasses set `families` (the model families they support) and implement `unlearn`.
    """

    families: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        """Return the unlearned model (may edit `model` in place; the caller keeps its own copy)."""
