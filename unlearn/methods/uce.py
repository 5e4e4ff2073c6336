"""UCE: Unified Concept Editing in Diffusion Models (Gandikota, Orgad, Belinkov, Materzyńska, Bau; WACV 2024)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..data import UnlearnData
from ..errors import ConfigError
from ..models.base import Model
from ..train import broadcast_tensors
from .base import Method, hyperparameter
from .closed_form import concept_keys, edit_cross_attention, preserved_keys


@dataclass
class UCE(Method):
    """UCE: erase a concept by rewriting the cross-attention key/value projections in closed form, no training.

    1. Keys: the text-encoder states of every forget prompt from its last word token to the end of the sequence
       (`closed_form.concept_keys`), aligned position by position with the same states of its anchor prompt,
       the longer prompt of the pair setting how many positions both keep. The empty anchor has no word: its
       states start at position 0, the start-of-text token, as in the reference (`attention_mask.sum() - 2`,
       '' read as ' ').
    2. Targets: what each `attn2.to_k` / `attn2.to_v` projection outputs for the anchor's states, so the
       concept is read as the anchor (the reference's `--technique replace`; it maps to " " by default, the
       digits recipe maps "three" to "four", as SalUn does).
    3. Preservation: every state of the retain prompts and of the empty prompt keeps its output (UCE's
       `preserve_scale` terms; the empty prompt is the unconditional branch of classifier-free guidance, so it
       must not move; the reference always adds it too).
    4. Each projection becomes W* = (λ W0 + s_e Σ v cᵀ + s_p Σ W0 c_p c_pᵀ)(λ I + s_e Σ c cᵀ + s_p Σ c_p c_pᵀ)⁻¹
       (the reference's mat1 @ inverse(mat2)) with s_e = `erase_scale`, s_p = `preserve_scale`, λ = `ridge`.

    Defaults follow the reference's `train-scripts/train_erase.py` as its entry point runs it: `ridge` λ = 0.5
    (its `edit_model(..., lamb=0.5)`; the 0.1 in that function's signature is never used), `erase_scale` 1,
    `preserve_scale` None = max(0.1, 1 / number of preserved prompts, the empty prompt included). The newer
    `trainscripts/uce_sd_erase.py` uses one state per prompt (its last word token) instead of the span, no
    empty-prompt preservation and `preserve_scale` 1: `positions: last_word, preserve_unconditional: false,
    preserve_scale: 1.0` reproduces it (same λ = 0.5).

    Several processes (`multi_process`): every process solves the same edit (a few small solves), then all take
    the main process's edited weights, so every process holds the one-process result exactly.
    """

    families = ("diffusion",)
    multi_process = True
    needs_images = False  # prompts alone: a ConceptPrompts is a whole task
    needs_text = True
    erase_scale: float = hyperparameter(
        1.0, "weight of the erased concept's terms in the solve (reference 1)", gt=0
    )
    preserve_scale: float | None = hyperparameter(
        None,
        "weight of the preserved states' terms; None = max(0.1, 1 / number of preserved prompts), the reference "
        "train_erase.py's default (its newer uce_sd_erase.py uses 1.0)",
    )
    ridge: float = hyperparameter(
        0.5, "λ > 0, the ridge term λ ||W - W0||² that keeps the edit small (the reference's lamb, 0.5)", gt=0
    )
    preserve_unconditional: bool = hyperparameter(
        True,
        "also preserve the empty prompt (the unconditional branch of classifier-free guidance), as the reference "
        "train_erase.py does (its newer uce_sd_erase.py does not)",
    )
    positions: str = hyperparameter(
        "concept",
        "which text states carry a prompt: concept = from its last word token to the end, every state of the "
        "preserved prompts (the reference train_erase.py, the paper's); last_word = only the last word token's "
        "state, of erased, anchor and preserved prompts alike (the newer uce_sd_erase.py)",
        choices=("concept", "last_word"),
    )

    def check(self) -> None:
        if self.ridge <= 0:
            raise ConfigError(f"uce ridge (λ) must be positive, got {self.ridge}")
        if self.erase_scale <= 0:
            raise ConfigError(f"uce erase_scale must be positive, got {self.erase_scale}")
        if self.positions not in ("concept", "last_word"):
            raise ConfigError(f"uce positions must be 'concept' or 'last_word', not {self.positions!r}")

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        started = time.perf_counter()
        prompts = data.prompts
        if model.conditioning != "text":
            raise ConfigError("uce edits cross-attention: it needs a text-to-image model")
        keys, anchor_keys = concept_keys(model, prompts.forget, prompts.anchor, self.positions)
        preserve_keys, scale = preserved_keys(
            model,
            prompts.retain,
            self.preserve_unconditional,
            self.preserve_scale,
            positions="all" if self.positions == "concept" else "last_word",
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
        weights = dict(model.unet.named_parameters())
        broadcast_tensors(accelerator, [weights[name] for name in edited])
        accelerator.print(
            f"uce: edited {len(edited)} projections with {len(keys)} concept states and "
            f"{len(preserve_keys)} preserved states in {time.perf_counter() - started:.2f}s"
        )
        return model
