"""Model-family adapters."""

from __future__ import annotations

from .base import Model
from .classifier import Classifier, build_classifier, load_classifier


def load_model(
    checkpoint: str | None, arch: str | None = None, num_classes: int = 10, family: str = "classifier"
):
    """Load a model of `family` from a checkpoint path, a `world:<name>` checkpoint, or fresh from `arch`."""
    from ..errors import ConfigError
    from ..worlds import resolve

    if family != "classifier":
        raise ConfigError(f"unknown model family {family!r}; known: classifier")
    if checkpoint and str(checkpoint).startswith("world:"):
        checkpoint = str(resolve(str(checkpoint)))
    return load_classifier(checkpoint, arch, num_classes)


__all__ = ["Classifier", "Model", "build_classifier", "load_classifier", "load_model"]
