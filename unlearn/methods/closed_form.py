"""Closed-form edits of cross-attention key/value projections (UCE, RealEra's first stage, ANT's and MACE's
LoRA fusion).

In a text-to-image UNet the text reaches the image only through the cross-attention projections
`attn2.to_k` and `attn2.to_v`: each maps a text-encoder state c to a key W_k c and a value W_v c. Making the
concept's states produce the keys and values of the anchor's states makes the UNet draw the anchor whenever
the concept is asked for, and the least-squares version of that edit has a closed form (Gandikota et al.,
"Unified Concept Editing in Diffusion Models", WACV 2024, Eq. 7; Lu et al., MACE, CVPR 2024, Eq. 5):

    W* = argmin_W  Σ_i ||W c_i − v_i||² + s Σ_p ||(W − W0) c_p||² + λ ||W − W0||²_F
       = (Σ_i v_i c_iᵀ + s W0 Σ_p c_p c_pᵀ + λ W0) (Σ_i c_i c_iᵀ + s Σ_p c_p c_pᵀ + λ I)⁻¹

with c_i the erased states, v_i their new outputs, c_p the preserved states and λ a ridge that keeps the system
invertible and the edit small (the `ridge` of UCE, RealEra and ANT). This file holds that solve, the two things
around it (which states carry a prompt's concept, the loop over the UNet's projections) and the fusion of
several LoRAs into the plain projections (`fuse_loras`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def cross_attention(model) -> dict[str, nn.Linear]:
    """The UNet's cross-attention key and value projections (`...attn2.to_k`, `...attn2.to_v`), by name."""
    if model.conditioning != "text":
        raise ConfigError(
            f"closed-form cross-attention edits need a text-to-image model; this one is {model.conditioning}-"
            "conditioned"
        )
    layers = {
        name: module
        for name, module in model.unet.named_modules()
        if name.endswith(("attn2.to_k", "attn2.to_v")) and isinstance(module, nn.Linear)
    }
    if not layers:
        raise ConfigError("this UNet has no cross-attention projections (attn2.to_k / attn2.to_v) to edit")
    return layers


@torch.no_grad()
def concept_keys(
    model, prompts: Sequence[str], anchors: Sequence[str] | None = None, positions: str = "concept"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text-encoder states that carry each prompt's concept, stacked as (M, d).

    CLIP's text encoder is causal: the states before the concept word do not know it, and every state from the
    word on does (the word itself, the end token and the padding that repeats it). So, as UCE's
    `train-scripts/train_erase.py` does, a prompt contributes the states from its last word token to the end of
    the sequence (`positions="concept"`); or only its last word token's state (`positions="last_word"`, UCE's
    newer `trainscripts/uce_sd_erase.py`); or all of them (`positions="all"`, UCE's preservation terms).
    A prompt's last word token is at `concept_starts`: for the empty prompt that is position 0, the
    start-of-text token, as in both reference scripts.

    Args:
        model: a text-conditioned `Diffusion`.
        prompts: the prompts whose states are returned.
        anchors: one prompt per prompt; when given, their states are returned too, aligned position by position
            with the prompts' (both start at their own last word token and have the same length, the longer of
            the two prompts setting how many positions the pair keeps: UCE's alignment).
        positions: "concept", "last_word" or "all".

    Returns:
        `(keys, anchor_keys)`; `anchor_keys` is None without `anchors`.
    """
    if positions not in ("concept", "last_word", "all"):
        raise ConfigError(f"positions must be 'concept', 'last_word' or 'all', not {positions!r}")
    if anchors is not None and len(anchors) != len(prompts):
        raise ConfigError(f"give one anchor per prompt ({len(prompts)}), not {len(anchors)}")
    if not prompts:
        return torch.zeros(0, model.unet.config.cross_attention_dim), None
    states, last = _states(model, list(prompts))
    anchor_states, anchor_last = _states(model, list(anchors)) if anchors is not None else (None, None)
    if positions == "all":
        return states.flatten(0, 1), (anchor_states.flatten(0, 1) if anchors is not None else None)
    if positions == "last_word":
        rows = torch.arange(len(states))
        return states[rows, last], (anchor_states[rows, anchor_last] if anchors is not None else None)
    if anchors is None:
        return torch.cat([s[i:] for s, i in zip(states, last.tolist())]), None
    keys, anchor_keys = [], []
    length = states.shape[1]
    for s, i, a, j in zip(states, last.tolist(), anchor_states, anchor_last.tolist()):
        span = length - max(i, j)  # the longer prompt of the pair sets how many positions both keep
        keys.append(s[i : i + span])
        anchor_keys.append(a[j : j + span])
    return torch.cat(keys), torch.cat(anchor_keys)


def preserved_keys(
    model,
    prompts: Sequence[str],
    unconditional: bool = True,
    scale: float | None = None,
    positions: str = "all",
) -> tuple[torch.Tensor, float]:
    """The preservation terms of a closed-form edit: the states of `prompts` (every position with
    `positions="all"`, as UCE's `train_erase.py`; the last word token's with "last_word", as its newer
    `uce_sd_erase.py`) and, with `unconditional`, of the empty prompt (the unconditional branch of
    classifier-free guidance, which must not move); and their weight, `scale` or `train_erase.py`'s default
    max(0.1, 1 / number of preserved prompts, the empty prompt included)."""
    preserved = [*prompts, *([""] if unconditional else [])]
    keys, _ = concept_keys(model, preserved, positions=positions)
    return keys, scale if scale is not None else max(0.1, 1.0 / max(len(preserved), 1))


def concept_starts(model, prompts: list[str]) -> list[int]:
    """Where each prompt's concept positions start: the index of its last word token ([start, words..., end,
    padding]), i.e. the number of real tokens − 2, as UCE's reference computes it (`attention_mask.sum() - 2`).
    The empty prompt has no word: it starts at 0, its start-of-text token (the reference maps '' to ' ', which
    CLIP's tokenizer also reads as no word)."""
    return _starts(_tokens(model, prompts)).tolist()


def _starts(tokens) -> torch.Tensor:
    return tokens.attention_mask.sum(1).sub(2)


def _tokens(model, prompts: list[str]):
    return model.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=model.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


def _states(model, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder states (N, L, d) in float32 and where each prompt's concept positions start."""
    tokens = _tokens(model, prompts)
    states = model.text_encoder(tokens.input_ids.to(model.text_encoder.device))[0].float().cpu()
    return states, _starts(tokens)


def solve_projection(
    weight: torch.Tensor,
    keys: torch.Tensor,
    targets: torch.Tensor,
    preserve_keys: torch.Tensor | None = None,
    preserve_scale: float = 1.0,
    ridge: float = 0.1,
) -> torch.Tensor:
    """W* = argmin ||W Kᵀ − Tᵀ||² + preserve_scale·||(W − W0) Pᵀ||² + ridge·||W − W0||², from its normal
    equations W (KᵀK + s PᵀP + λI) = TᵀK + s W0 PᵀP + λ W0, solved in float64.

    Args:
        weight: W0, (d_out, d_in).
        keys: K, the states to remap, (M, d_in).
        targets: T, their new outputs, (M, d_out) (without any bias of the layer).
        preserve_keys: P, states whose outputs must stay W0 p, (Q, d_in).
        preserve_scale: s, the weight of the preservation terms.
        ridge: λ > 0, which keeps the system invertible and the edit small.

    Returns:
        W*, with the dtype and device of `weight`.
    """
    if ridge <= 0 and (preserve_keys is None or len(preserve_keys) == 0):
        raise ConfigError("solve_projection needs ridge > 0 or preservation terms to be well posed")
    w0 = weight.detach().double().cpu()
    k, t = keys.double().cpu(), targets.double().cpu()
    lhs = k.T @ k + ridge * torch.eye(w0.shape[1], dtype=torch.float64)
    rhs = t.T @ k + ridge * w0
    if preserve_keys is not None and len(preserve_keys):
        p = preserve_keys.double().cpu()
        lhs = lhs + preserve_scale * (p.T @ p)
        rhs = rhs + preserve_scale * (w0 @ p.T @ p)
    # lhs is symmetric: W* lhs = rhs  <=>  lhs W*ᵀ = rhsᵀ
    solved = torch.linalg.solve(lhs, rhs.T).T
    return solved.to(dtype=weight.dtype, device=weight.device)


@torch.no_grad()
def edit_cross_attention(
    model,
    keys: torch.Tensor,
    target_keys: torch.Tensor | None = None,
    preserve_keys: torch.Tensor | None = None,
    preserve_scale: float = 1.0,
    ridge: float = 0.1,
    targets_from: dict[str, Callable[[torch.Tensor], torch.Tensor] | torch.Tensor] | None = None,
) -> list[str]:
    """Rewrite every cross-attention key/value projection in place with `solve_projection`.

    Each layer's targets are its own current outputs for `target_keys` (UCE: the concept's states take the
    anchor's keys and values), or `targets_from[name]` (fusion: what a LoRA-edited copy of the layer outputs for
    the concept's states), a tensor (M, d_out) or a function of `keys`. Preserved states keep the layer's
    current outputs.

    Returns:
        The names of the edited weight tensors (`<layer>.weight`).
    """
    if (target_keys is None) == (targets_from is None):
        raise ConfigError(
            "give target_keys (remap to other states' outputs) or targets_from (fusion), not both"
        )
    edited = []
    for name, layer in cross_attention(model).items():
        if targets_from is None:
            targets = layer(target_keys.to(layer.weight.device, layer.weight.dtype))
        else:
            given = targets_from[name]
            targets = given(keys.to(layer.weight.device, layer.weight.dtype)) if callable(given) else given
        targets = targets.float()
        if layer.bias is not None:  # the bias is not edited: solve for the weight's share of the output
            targets = targets - layer.bias.float()
        layer.weight.copy_(
            solve_projection(layer.weight, keys, targets.cpu(), preserve_keys, preserve_scale, ridge)
        )
        edited.append(f"{name}.weight")
    return edited


@torch.no_grad()
def fuse_loras(
    model,
    concepts: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
    scale: float = 1.0,
    preserve_keys: torch.Tensor | None = None,
    preserve_scale: float = 1.0,
    ridge: float = 0.1,
) -> list[str]:
    """MACE's closed-form fusion of several LoRAs into the plain key/value projections (ANT's multi-concept mode).

    Each concept's text states K_i take the outputs of the layer with that concept's LoRA merged in,
    (W0 + scale ΔW_i) K_i (plus the layer's bias); a layer without a LoRA keeps its own outputs; the preserved
    states keep theirs. One `edit_cross_attention` solve per layer.

    Args:
        model: a text-conditioned `Diffusion` whose projections are plain layers again (LoRAs removed).
        concepts: per concept, its text states K_i (M_i, d_in) and its LoRA's weight updates ΔW_i by layer name
            (`lora.delta_weights`).
        scale: s, the weight of each LoRA's update (the reference's fusion scale).
        preserve_keys, preserve_scale, ridge: as in `solve_projection`.

    Returns:
        The names of the edited weight tensors.
    """
    keys = torch.cat([k for k, _ in concepts])
    targets = {}
    for name, layer in cross_attention(model).items():
        if not any(name in deltas for _, deltas in concepts):
            targets[name] = layer(keys.to(layer.weight.device, layer.weight.dtype)).float().cpu()
            continue
        weight = layer.weight.float().cpu()
        bias = layer.bias.float().cpu() if layer.bias is not None else None
        targets[name] = torch.cat(
            [
                F.linear(k, weight + scale * deltas[name].cpu() if name in deltas else weight, bias)
                for k, deltas in concepts
            ]
        )
    return edit_cross_attention(
        model,
        keys,
        preserve_keys=preserve_keys,
        preserve_scale=preserve_scale,
        ridge=ridge,
        targets_from=targets,
    )
