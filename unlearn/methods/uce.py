"""UCE: Unified Concept Editing in Diffusion Models (Gandikota, Orgad, Belinkov, Materzyńska, Bau; WACV 2024)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..data import UnlearnData
from ..errors import ConfigError
from ..models.base import Model
from .base import Method, hyperparameter
from .closed_form import concept_keys, edit_cross_attention, preserved_keys


@dataclass
class UCE(Method):
    """UCE: erase a concept by rewriting the cross-attention key/value projections in closed form, no training.

    1. Keys: the text-encoder states of every forget prompt from its concept word to the end of the sequence
       (`closed_form.concept_keys`), aligned position by position with the same states of its anchor prompt.
    2. Targets: what each `attn2.to_k` / `attn2.to_v` projection outputs for the anchor's states, so the
       concept is read as the anchor (the reference maps to " " by default; the digits recipe maps "three" to
       "four", as SalUn does).
    3. Preservation: every state of the retain prompts and of the empty prompt keeps its output (UCE's
       `preserve_scale` terms; the empty prompt is the unconditional branch of classifier-free guidance, so it
       must not move).
    4. Each projection becomes W* = (Σ v cᵀ + s W0 Σ c_p c_pᵀ + λ W0)(Σ c cᵀ + s Σ c_p c_pᵀ + λ I)⁻¹ with
       `erase_scale` weighting the erased terms (the reference's `erase_scale`, folded into the keys).

    Defaults follow the reference's `train-scripts/train_erase.py`: `ridge` λ = 0.1 (the reference's `lamb`),
    `erase_scale` 1, and `preserve_scale` None = max(0.1, 1 / number of preserved prompts).
    """

    families = ("diffusion",)
    erase_scale: float = hyperparameter(1.0, "weight of the erased concept's terms in the solve")
    preserve_scale: float | None = hyperparameter(
        None, "weight of the preserved states' terms; None = max(0.1, 1 / number of preserved prompts)"
    )
    ridge: float = hyperparameter(0.1, "λ > 0, the ridge term λ ||W - W0||² that keeps the edit small")
    preserve_unconditional: bool = hyperparameter(
        True, "also preserve the empty prompt (the unconditional branch of classifier-free guidance)"
    )

    def __post_init__(self) -> None:
        if self.ridge <= 0:
            raise ConfigError(f"uce ridge (λ) must be positive, got {self.ridge}")
        if self.erase_scale <= 0:
            raise ConfigError(f"uce erase_scale must be positive, got {self.erase_scale}")

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        started = time.perf_counter()
        prompts = data.prompts
        if model.conditioning != "text":
            raise ConfigError("uce edits cross-attention: it needs a text-to-image model")
        keys, anchor_keys = concept_keys(model, prompts.forget, prompts.anchor)
        preserve_keys, scale = preserved_keys(
            model, prompts.retain, self.preserve_unconditional, self.preserve_scale
        )
        # erase_scale s_e multiplies the erased terms Σ v cᵀ and Σ c cᵀ: the same as scaling both c and v by
        # sqrt(s_e), which the solve sees as keys and target keys scaled alike (the projections are linear).
        root = self.erase_scale**0.5
        edited = edit_cross_attention(
            model,
            keys * root,
            target_keys=anchor_keys * root,
            preserve_keys=preserve_keys,
            preserve_scale=scale,
            ridge=self.ridge,
        )
        accelerator.print(
            f"uce: edited {len(edited)} projections with {len(keys)} concept states and "
            f"{len(preserve_keys)} preserved states in {time.perf_counter() - started:.2f}s"
        )
        return model
