"""The model-family adapter base class."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..params import ParamMask


class Model(nn.Module, ABC):
    """A family adapter: it knows an architecture and offers the family's primitives, nothing about unlearning."""

    family: ClassVar[str]
    # Set on a pruned model ("prune first, then unlearn"): its False entries are pruned and stay exactly zero
    # in every training loop (`unlearn.train.pinned_params`).
    pruning_mask: ParamMask | None = None

    @property
    def trainable(self) -> nn.Module:
        """The part that unlearning edits (the classifier network, the generator, the UNet)."""
        return self

    @abstractmethod
    def loss(self, batch) -> torch.Tensor:
        """The family's ordinary training loss on one batch (the retain term of most objectives)."""

    def frozen_copy(self) -> Model:
        """A detached copy in eval mode with gradients off: the "original model" objectives compare against."""
        twin = copy.deepcopy(self)
        twin.eval()
        twin.requires_grad_(False)
        return twin

    @abstractmethod
    def reinitialize(self) -> None:
        """Draw fresh weights from the global torch RNG (the Retrain baseline trains from scratch)."""

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Write the model to the folder `path` in the format it was loaded from."""
