"""Model-family adapters."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .base import Model
from .classifier import Classifier, build_classifier, load_classifier, wrap_classifier


def load_model(
    checkpoint: str | Path | None,
    arch: str | None = None,
    num_classes: int = 10,
    family: str = "classifier",
    module: nn.Module | None = None,
) -> Model:
    """Load a model of `family` from a checkpoint path, a `world:<name>` checkpoint, or fresh from `arch`.

    `module`: for a classifier folder saved from your own architecture (`wrap_classifier`), a fresh instance
    of it to load the weights into (a folder never carries code).

    Folders that name custom code (transformers' `auto_map`, a custom diffusers pipeline or component) are
    refused with `CheckpointError` before anything loads: no code from a checkpoint ever runs."""
    from ..errors import ConfigError
    from ..worlds import resolve

    if family not in ("classifier", "diffusion", "gan"):
        raise ConfigError(f"unknown model family {family!r}; known: classifier, diffusion, gan")
    if checkpoint and str(checkpoint).startswith("world:"):
        checkpoint = str(resolve(str(checkpoint)))
    if family == "gan":
        from .gan import build_gan, load_gan

        if not checkpoint:  # fresh weights of a built-in architecture (tests, training from scratch)
            return build_gan(arch or "dcgan_digits")
        return load_gan(checkpoint)
    if family == "diffusion":
        from .diffusion import load_diffusion

        if not checkpoint:
            raise ConfigError(
                "a diffusion recipe needs model.checkpoint: a diffusers pipeline folder or hub id"
            )
        return load_diffusion(checkpoint)
    if module is not None and not (checkpoint and Path(checkpoint).is_dir()):
        raise ConfigError(
            "module= reloads a model folder saved by the toolkit; give that folder as checkpoint"
        )
    return load_classifier(checkpoint, arch, num_classes, module)


def __getattr__(name: str):  # the other adapters import diffusers / heavy code: only on first use
    if name == "Diffusion":
        from .diffusion import Diffusion

        return Diffusion
    if name == "GAN":
        from .gan import GAN

        return GAN
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GAN",
    "Classifier",
    "Diffusion",
    "Model",
    "build_classifier",
    "load_classifier",
    "load_model",
    "wrap_classifier",
]
