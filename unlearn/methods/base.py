"""The Method base class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from ..data import UnlearnData
from ..models.base import Model


@dataclass
class Method(ABC):
    """One unlearning algorithm. Dataclass fields are its hyperparameters.

    Subclasses set `families` (the model families they support) and implement `unlearn`.
    """

    families: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        """Return the unlearned model (may edit `model` in place; the caller keeps its own copy)."""
