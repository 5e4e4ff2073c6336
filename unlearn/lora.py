"""The one LoRA implementation (peft), for every method that trains a low-rank adapter (ANT, RealEra).

A LoRA wraps a linear layer W: the layer computes W x + (alpha / rank) B A x, with A (rank × d_in) drawn at
random and B (d_out × rank) zero, so the model is unchanged until the factors train. Here:

- `add_lora` wraps the named modules of a model and returns the factors, the only parameters left trainable;
  the factors are fp32 whatever the base weights' dtype (a bf16 factor loses updates smaller than its rounding).
- `delta_weights` gives each wrapped layer's update (alpha / rank) B A, e.g. for a closed-form fusion.
- `merge` folds the update into the base weights, `unmerge` takes it back out; `remove_lora` puts the plain
  layers back, merged or not, so the model is a plain diffusers model again.
- `save_lora` exports the adapter as a diffusers LoRA file (`pipeline.load_lora_weights(folder, weight_name=...)`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError


def add_lora(
    model: nn.Module, targets: Sequence[str], rank: int, alpha: float | None = None, adapter: str = "lora"
) -> list[nn.Parameter]:
    """Wrap the modules `targets` (full names from `model.named_modules()`) in peft LoRA layers.

    Args:
        model: the model to adapt (a UNet); all its own parameters are frozen.
        targets: full module names, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`.
        rank: the LoRA rank.
        alpha: the LoRA alpha (the update is scaled by alpha / rank); None = rank (scale 1).
        adapter: the adapter's name (several may coexist; `delta_weights` and `save_lora` pick one).

    Returns:
        The adapter's factors, fp32, requiring grad, in module order.
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = {name for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if not targets or missing:
        raise ConfigError(
            f"LoRA targets must name modules of the model; not found: {missing or 'no targets'}"
        )
    # a regex over full names: peft matches a plain list by name suffix, which could also catch nested modules
    pattern = "(" + "|".join(re.escape(t) for t in targets) + ")"
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=pattern)
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=adapter)
    factors = [p for name, p in model.named_parameters() if f".{adapter}." in name and ".lora_" in name]
    for param in factors:
        param.data = param.data.float()
        param.requires_grad_(True)
    return factors


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's peft LoRA layers, by module name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


@torch.no_grad()
def delta_weights(model: nn.Module, adapter: str = "lora") -> dict[str, torch.Tensor]:
    """Each wrapped layer's weight update (alpha / rank) B A under `adapter`, fp32, by module name."""
    return {name: layer.get_delta_weight(adapter).float() for name, layer in lora_layers(model).items()}


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold the active adapters into the base weights (the wrappers stay; `unmerge` undoes it)."""
    for layer in lora_layers(model).values():
        layer.merge()


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Take merged adapters back out of the base weights."""
    for layer in lora_layers(model).values():
        layer.unmerge()


@torch.no_grad()
def remove_lora(model: nn.Module, merge: bool) -> None:
    """Put every wrapped layer's plain base layer back in its place, after folding the adapters in (`merge`) or
    discarding them; the model carries no peft state afterwards and its parameters are frozen."""
    for name, layer in lora_layers(model).items():
        if merge and not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if "peft_config" in vars(model):  # set by peft's injection
        del model.peft_config
    model.requires_grad_(False)


def lora_state_dict(model: nn.Module, adapter: str = "lora") -> dict[str, torch.Tensor]:
    """The adapter's factors under peft's names (`<module>.lora_A.weight`, `<module>.lora_B.weight`)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter)


def save_lora(model: nn.Module, path: str | Path, adapter: str = "lora", prefix: str = "unet") -> Path:
    """Export the adapter of the pipeline component `prefix` as a diffusers LoRA file (safetensors, with the
    rank and alpha in its metadata): `pipeline.load_lora_weights(path.parent, weight_name=path.name)` loads it.
    """
    from diffusers.loaders.lora_base import LoraBaseMixin

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"a LoRA is exported as .safetensors, not {path.name!r}")
    config = model.peft_config[adapter].to_dict()
    # the layers that carry this adapter, by name (the config holds the regex `add_lora` matched them with)
    config["target_modules"] = sorted(n for n, layer in lora_layers(model).items() if adapter in layer.lora_A)
    factors = lora_state_dict(model, adapter)
    path.parent.mkdir(parents=True, exist_ok=True)
    LoraBaseMixin.write_lora_layers(
        state_dict={f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in factors.items()},
        save_directory=str(path.parent),
        is_main_process=True,
        weight_name=path.name,
        save_function=None,
        safe_serialization=True,
        lora_adapter_metadata={f"{prefix}.{k}": v for k, v in config.items()},
    )
    return path
