"""Raw objects a library user brings, turned into the family adapters the methods expect.

A method's `unlearn(model, data, accelerator)` and `unlearn.evaluate(model, data)` call `as_model` and
`as_task` first (`Method.__init_subclass__` does it for every method, once, at its entry), so a user may hand
over what they already have:

- a plain `torch.nn.Module` classifier: wrapped by `classifier.wrap_classifier` (the head is the last `nn.Linear` with one
  output per class, the features are its input; images go in unchanged unless `mean` / `std` are given);
- a diffusers pipeline built or loaded in memory (`StableDiffusionPipeline`, `DDPMPipeline`, ...): wrapped by
  `Diffusion.from_pipeline`;
- for a prompt-only method (UCE, ESD, DoCo, ANT), a `ConceptPrompts` instead of an `UnlearnData`.

Everything else that is not the adapter of a family the method supports is refused with one sentence that
says what to pass instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError, DataError
from .base import Model
from .classifier import wrap_classifier


def as_model(model, families: Sequence[str], num_classes: int | None, who: str) -> Model:
    """`model` as the adapter of one of `families`, or one sentence that says how to pass it.

    Args:
        model: an adapter, a raw `nn.Module` classifier, or a diffusers pipeline.
        families: the model families the caller supports.
        num_classes: the task's number of classes (wrapping a raw classifier needs it).
        who: the caller, for the sentence ("method SalUn", "evaluate").
    """
    if isinstance(model, Model) or (isinstance(model, nn.Module) and hasattr(model, "trainable")):
        # an adapter, or a module that already offers the adapter's surface (`trainable`, ...): as it is
        if getattr(model, "family", families[0]) not in families:
            raise ConfigError(
                f"{who} works on {' and '.join(families)} models, not on a {model.family} model"
            )
        return model
    if is_pipeline(model):
        if "diffusion" not in families:
            raise ConfigError(f"{who} works on {' and '.join(families)} models, not on a diffusers pipeline")
        from .diffusion import Diffusion

        return Diffusion.from_pipeline(model)
    if isinstance(model, nn.Module) and "classifier" in families:
        if _looks_like_unet(model):
            raise ConfigError(
                f"{who} got a bare {type(model).__name__}; pass the whole diffusers pipeline (or "
                "unlearn.Diffusion(unet, scheduler, text_encoder, tokenizer)) to a diffusion method"
            )
        if not num_classes:
            raise DataError(f"{who} needs the task's number of classes to wrap a {type(model).__name__}")
        return wrap_classifier(model, num_classes)
    wanted = {
        "classifier": "a classifier nn.Module (or unlearn.wrap_classifier(module, num_classes))",
        "diffusion": "a diffusers pipeline (or unlearn.Diffusion)",
        "gan": "unlearn.GAN(generator, discriminator, latent_dim=...)",
    }
    give = " or ".join(wanted[f] for f in families if f in wanted)
    raise ConfigError(f"{who} cannot take a {type(model).__name__}; pass {give}")


def as_task(data, family: str, who: str, needs_images: bool = True):
    """`data` as an `UnlearnData` for a model of `family`: a `ConceptPrompts` becomes a task without images
    (enough for the prompt-only methods); a dataset or loader is refused with the builder to use. An object
    with the task's attributes (`forget`, `prompts`, ...) passes as it is."""
    from ..data import ConceptPrompts, UnlearnData, concept_task

    if isinstance(data, ConceptPrompts):
        if family != "diffusion":
            raise DataError(f"{who} erases from a {family}: give the task as an UnlearnData, not prompts")
        data = concept_task(data)
    if not isinstance(data, UnlearnData) and not hasattr(data, "prompts") and not hasattr(data, "forget"):
        builders = (
            "unlearn.forget_classes(train, test, classes) or unlearn.forget_fraction(train, test, fraction)"
            if family != "diffusion"
            else "unlearn.ConceptPrompts(concept, forget=[...], anchor=[...]) or an UnlearnData with images"
        )
        raise DataError(f"{who} needs the task as {builders}, not a {type(data).__name__}")
    prompts, forget = getattr(data, "prompts", None), getattr(data, "forget", None)
    if (
        family == "diffusion"
        and needs_images
        and prompts is not None
        and forget is not None
        and not len(forget)
    ):
        raise DataError(
            f"{who} trains on images of the concept, and the task has none; build it with "
            "unlearn.forget_generated_concept(model, concept, ...) (the model draws them) or use a prompt-only "
            "method (uce, esd, doco, ant)"
        )
    return data


def is_pipeline(value) -> bool:
    """A diffusers pipeline (checked by duck type, so diffusers is imported only when one is passed)."""
    return hasattr(value, "components") and hasattr(value, "unet") and hasattr(value, "scheduler")


def _looks_like_unet(module: nn.Module) -> bool:
    return type(module).__name__.startswith(("UNet2D", "UNet"))


__all__ = ["as_model", "as_task", "wrap_classifier"]
