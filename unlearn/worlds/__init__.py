"""Embedded testbeds that ship inside installed packages, trained once and cached."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from .cache import cache_dir

__all__ = ["FAMILIES", "WORLDS", "cache_dir", "prepare", "resolve"]

WORLDS = ("digits",)
FAMILIES = {"digits": ("classifier", "ddpm", "t2i", "gan", "canvas")}  # the models each world can build


def prepare(world: str, verbose: bool = True, families: Sequence[str] | str | None = None) -> dict[str, Path]:
    """Build (once) and return the checkpoints of a world, by family.

    Args:
        world: one of `WORLDS`.
        verbose: print what is trained and how well.
        families: which models to build: None for the quick default (the classifier only), "all", or names
            such as ("classifier", "ddpm", "t2i"). Models already cached are returned as well.
    """
    if not isinstance(world, str) or world not in WORLDS:
        raise ConfigError(f"unknown world {world!r}; known worlds: {', '.join(WORLDS)}")
    if families is not None and not isinstance(families, str):
        if not isinstance(families, Sequence) or not all(isinstance(f, str) for f in families):
            raise ConfigError(f"families must be None, 'all' or a list of model names, got {families!r}")
    return _prepare_digits(verbose, families)


def _writable_cache(folder: Path, families: Sequence[str]) -> None:
    """Refuse in one sentence a cache that cannot hold the models `families` about to be built in `folder`:
    `$UNLEARN_CACHE` (or a folder in it) is a file, or cannot be created or written."""
    root = cache_dir()
    where = f"the model cache {str(root)!r} ($UNLEARN_CACHE)"
    for path in (root, folder, *(folder / family for family in families)):
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"{where} cannot hold the world: {str(path)!r} is a file, not a folder; point UNLEARN_CACHE at a "
                "writable folder"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"{where} cannot be created ({err.strerror or err}); point UNLEARN_CACHE at a writable folder"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{where} is not writable; point UNLEARN_CACHE at a writable folder")


def _prepare_digits(verbose: bool = True, families: Sequence[str] | str | None = None) -> dict[str, Path]:
    """The digits world. The classifier (seconds) is always built: it judges the generative models. The DDPM
    and the text-to-image model (several minutes each, `digits_diffusion`), the GAN (minutes, `digits_gan`) and
    the digits × styles text-to-image model with its judges (`canvas`, `digits_canvas`) are built only when asked
    for in `families`; when already cached they are returned whether asked for or not."""
    from .digits import CONFIG_NAME, classifier_path, world_folder

    known = FAMILIES["digits"]
    if families is None:
        wanted: tuple[str, ...] = ("classifier",)
    elif isinstance(families, str):
        wanted = known if families == "all" else (families,)
    else:
        wanted = tuple(families)
    unknown = [f for f in wanted if f not in known]
    if unknown:
        raise ConfigError(f"the digits world has no {unknown[0]!r} model; it has: {', '.join(known)}")
    folder = world_folder()
    missing = [
        f
        for f, marker in (
            ("classifier", Path("classifier") / CONFIG_NAME),
            ("ddpm", Path("ddpm") / "model_index.json"),
            ("t2i", Path("t2i") / "model_index.json"),
            ("gan", Path("gan") / "gan_config.json"),
            ("canvas", Path("canvas") / "model_index.json"),
        )
        if (f == "classifier" or f in wanted) and not (folder / marker).exists()
    ]
    if missing:  # something will be built and saved there
        _writable_cache(folder, missing)
    paths = {"classifier": classifier_path(verbose=verbose)}
    for family in ("ddpm", "t2i"):
        path = folder / family
        if not (path / "model_index.json").exists() and family in wanted:
            from . import digits_diffusion

            build = digits_diffusion.prepare_ddpm if family == "ddpm" else digits_diffusion.prepare_t2i
            build(path, verbose=verbose)
        if (path / "model_index.json").exists():
            paths[family] = path
    gan = folder / "gan"
    if not (gan / "gan_config.json").exists() and "gan" in wanted:
        from .digits_gan import prepare_gan

        prepare_gan(gan, verbose=verbose)
    if (gan / "gan_config.json").exists():
        paths["gan"] = gan
    canvas = folder / "canvas"
    if not (canvas / "model_index.json").exists() and "canvas" in wanted:
        from .digits_canvas import prepare_canvas

        prepare_canvas(canvas, verbose=verbose)
    if (canvas / "model_index.json").exists():
        paths["canvas"] = canvas
    return paths


def resolve(checkpoint: str) -> Path:
    """Turn `world:<name>[/<family>]` into the cached checkpoint path, building the world if needed."""
    name = checkpoint.split(":", 1)[1]
    world, _, family = name.partition("/")
    family = family or "classifier"
    if world in WORLDS and family not in FAMILIES[world]:
        raise ConfigError(f"world {world!r} has no {family!r} model; it has: {', '.join(FAMILIES[world])}")
    paths = prepare(world, verbose=True, families=(family,))
    if family not in paths:
        raise ConfigError(f"world {world!r} has no {family!r} model; it has: {', '.join(paths)}")
    return paths[family]
