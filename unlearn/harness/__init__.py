"""One evaluation harness per model family: it builds the task from a recipe, scores a model, owns the
family's metric catalogue, its report section and its bench columns. `unlearn.pipeline` knows no family."""

from __future__ import annotations

from .base import COMMON, Harness, MetricInfo, Scores
from .classifier import ClassifierHarness
from .diffusion import DiffusionHarness
from .gan import GANHarness

HARNESSES: dict[str, type[Harness]] = {
    "classifier": ClassifierHarness,
    "diffusion": DiffusionHarness,
    "gan": GANHarness,
}

__all__ = [
    "COMMON",
    "HARNESSES",
    "ClassifierHarness",
    "DiffusionHarness",
    "GANHarness",
    "Harness",
    "MetricInfo",
    "Scores",
]
