"""RealEra: Semantic-level Concept Erasure via Neighbor-Concept Mining (Liu, An, Zhang, Li, Wu, Gu, Lin, Wang;
arXiv 2410.09140).

No public code exists. What the abstract and secondary summaries say (reference/methods.md §6.1) is kept; every
bound, weight and loss form below is our reconstruction (§6.3) and is a documented field.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import UnlearnData
from ..errors import ConfigError, DataError
from ..lora import add_lora, remove_lora
from ..models.base import Model
from ..train import broadcast_tensors, data_parallel, endless, shard, share_weight, train_steps
from .base import Method, hyperparameter
from .closed_form import concept_keys, concept_starts, edit_cross_attention, preserved_keys


@dataclass
class RealEra(Method):
    """RealEra: erase a concept *and its semantic neighbourhood*, first in closed form, then with a LoRA.

    "Concept residue" is the paper's problem: a concept erased from its exact prompts still comes back under
    related wordings ("3" for "three"). RealEra widens the erasure to the concept's neighbourhood in the
    text-embedding space and keeps everything beyond that neighbourhood where it was:

    1. Concept keys e: the text-encoder states that carry each forget prompt's concept (UCE's convention, from
       its last word to the end of the sequence, `closed_form.concept_keys`), aligned with the anchor prompt's
       states a.
    2. Neighbour-concept mining: for every key, draw η = ρ·u·||e|| with u a uniform random direction and ρ
       uniform in [0, `max_distance`] (D_1, relative to ||e||), and keep e + η iff ||η|| ≤ D_1·||e|| and
       `min_cosine` ≤ cos(e, e + η) ≤ `max_cosine` (the band [S_1, S_2]); `num_neighbors` per key, from a seeded
       torch.Generator. Each neighbour is erased together with its key: mapped to the anchor state a its key
       is aligned with.
    3. Beyond-concept regularization: perturbations that fall *outside* the band (ρ in [D_1, `beyond_distance`],
       cos(e, e + η) < S_1), rescaled to ||e|| so they lie on the shell where real text states live (CLIP's
       final layer norm gives every state about the same norm), `num_beyond` per key. They are preserved:
       W e' = W0 e', together with every state of the retain prompts and of the empty prompt (UCE's
       preservation terms). This confines the change of the mapping to the neighbourhood.
    4. Closed form (UCE / MACE, Eq. 5): every cross-attention `attn2.to_k` / `attn2.to_v` becomes
       W* = argmin Σ ||W c − W0 a||² + s Σ ||(W − W0) p||² + λ ||W − W0||² over the keys and neighbours c and
       the preserved p (`closed_form.edit_cross_attention`). A neighbour weighs `neighbor_weight /
       num_neighbors`, a beyond-concept sample `beyond_weight / num_beyond` (folded into the keys as square
       roots: the projections are linear).
    5. LoRA stage (MACE's second stage, here on noise prediction as the abstract says): a rank-`lora_rank`
       LoRA on the cross-attention projections `lora_modules` is trained for `lora_steps` so that on noised
       forget images ε_θ(x_t, t, c) ≈ sg ε_orig(x_t, t, anchor(c)), where c is the forget prompt's encoding or,
       for a share `neighbor_share` of the batch, that encoding with its concept positions replaced by freshly
       mined neighbours (the UNet takes encoded states, so e + η is fed as they are). Beyond-concept
       regularization in this stage: on retain images under retain prompts, and on the forget x_t under
       beyond-concept encodings, ε_θ ≈ sg ε_orig, weighted by `preserve_weight`. ε_orig is the model before
       step 4.
    6. The LoRA is merged into the weights and the adapter removed: the UNet is a plain diffusers UNet again,
       and only cross-attention tensors differ from the input model.

    Choices (no code to compare with; the paper's values are unknown, reference/methods.md §6.2):
    - D_1 relative to ||e|| (`relative_distance`), because states of different text encoders differ in scale.
      Defaults S_1 = 0.8, S_2 = 0.99, D_1 = 0.75: a random direction is nearly orthogonal to e, so
      cos(e, e + η) ≈ 1 / sqrt(1 + ρ²) and ρ = 0.75 is exactly where cos reaches 0.8; S_2 = 0.99 drops
      perturbations too small to add anything to e itself.
    - `beyond_distance` 1.5 (= 2 D_1): far enough to fall below S_1 about half the time.
    - The LoRA stage trains on noised forget images (real ones in the digits world, the original model's
      generations with `dataset: generated`), as MACE's LoRA stage trains on generated images of the
      concept, instead of ESD-style trajectories of the model itself: no sampling loop per step.
    - MACE's LoRA settings (§5.3): rank 1, lr 1e-4, 50 steps, batch 1. MACE's LoRA loss is an attention-map
      loss; RealEra's abstract speaks of noise-prediction alignment, which we implement.
    - `lora_modules` default to all four attention projections of attn2 (to_q, to_k, to_v, to_out.0): the
      closed form already moved to_k / to_v; the LoRA may also reshape the queries and the output.

    Several processes (`multi_process`): the closed form (mining from the seeded generator, the solves) runs alike
    on every process, then all take the main process's edited weights. In the LoRA stage the LoRA trains under
    DDP and the original model ε_orig is each process's own unwrapped copy; every process draws each step's
    global batch alike (forget and retain images, noise, timesteps, which rows take a neighbour, the mined
    neighbours and beyond-concept samples, from the same seeded RNGs), then runs ε_orig and the trained passes on
    its share of it (`unlearn.train.shard`): `lora_batch_size` must be a multiple of the number of processes; the
    short batch that ends each pass over the forget or retain images splits unevenly if it must, each share's
    loss scaled by its size (`unlearn.train.share_weight`). So the run is the one-process run. Mixed precision
    and gradient accumulation work as in one process (each micro-batch is a fresh global batch).
    """

    families = ("diffusion",)
    multi_process = True
    needs_text = True
    # neighbour-concept mining (step 2)
    num_neighbors: int = hyperparameter(8, "neighbours mined per concept state", ge=0)
    max_distance: float = hyperparameter(0.75, "D_1: the largest perturbation ||η|| of a neighbour", gt=0)
    relative_distance: bool = hyperparameter(True, "D_1 and beyond_distance are shares of the state's norm")
    min_cosine: float = hyperparameter(
        0.8, "S_1: the lowest cosine between a state and its neighbour", ge=-1, le=1
    )
    max_cosine: float = hyperparameter(
        0.99, "S_2: the highest cosine between a state and its neighbour", ge=-1, le=1
    )
    neighbor_weight: float = hyperparameter(1.0, "weight of a state's neighbours together in the closed form")
    max_tries: int = hyperparameter(100, "rounds of rejection sampling before mining gives up", ge=1)
    # beyond-concept regularization (step 3)
    num_beyond: int = hyperparameter(8, "beyond-concept samples per concept state", ge=0)
    beyond_distance: float = hyperparameter(1.5, "the largest perturbation of a beyond-concept sample", gt=0)
    beyond_weight: float = hyperparameter(1.0, "weight of a state's beyond-concept samples together")
    preserve_unconditional: bool = hyperparameter(True, "also preserve the empty prompt's states")
    # closed form (step 4)
    closed_form: bool = hyperparameter(True, "run the closed-form stage (steps 1-4)")
    erase_scale: float = hyperparameter(1.0, "weight of the erased states' terms in the solve", gt=0)
    preserve_scale: float | None = hyperparameter(
        None, "weight of the preserved states' terms; None = max(0.1, 1 / number of preserved prompts)"
    )
    ridge: float = hyperparameter(0.1, "λ > 0, the ridge term λ ||W - W0||² of the solve", gt=0)
    # LoRA stage (step 5)
    lora_steps: int = hyperparameter(50, "optimizer steps of the LoRA stage; 0 skips it", ge=0)
    lora_rank: int = hyperparameter(1, "rank of the LoRA", ge=1)
    lora_alpha: float | None = hyperparameter(
        None, "LoRA alpha (updates scale by alpha / rank); None = rank", gt=0
    )
    lora_lr: float = hyperparameter(1e-4, "AdamW learning rate of the LoRA")
    lora_batch_size: int = hyperparameter(1, "forget (and retain) images per LoRA step")
    lora_modules: list = hyperparameter(
        ["to_q", "to_k", "to_v", "to_out.0"], "attn2 projections that carry the LoRA"
    )
    neighbor_share: float = hyperparameter(
        0.5, "share of a LoRA batch conditioned on mined neighbours", ge=0, le=1
    )
    preserve_weight: float = hyperparameter(1.0, "weight of the LoRA stage's preservation terms; 0 = none")
    max_grad_norm: float | None = hyperparameter(None, "clip the gradient norm to this; None = no clipping")

    def check(self) -> None:
        check_bounds(self.max_distance, self.min_cosine, self.max_cosine, self.relative_distance)
        if self.beyond_distance <= self.max_distance:
            raise ConfigError(
                f"realera beyond_distance ({self.beyond_distance}) must exceed max_distance ({self.max_distance})"
            )
        if self.num_neighbors < 0 or self.num_beyond < 0:
            raise ConfigError("realera num_neighbors and num_beyond must be 0 or more")
        if self.ridge <= 0 or self.erase_scale <= 0:
            raise ConfigError(
                f"realera ridge and erase_scale must be positive, got {self.ridge}, {self.erase_scale}"
            )
        if not 0.0 <= self.neighbor_share <= 1.0:
            raise ConfigError(f"realera neighbor_share must lie in [0, 1], got {self.neighbor_share}")
        if self.lora_steps < 0 or self.lora_rank < 1 or self.lora_batch_size < 1:
            raise ConfigError("realera lora_steps must be >= 0, lora_rank and lora_batch_size >= 1")
        if not self.lora_modules or not all(isinstance(m, str) and m for m in self.lora_modules):
            raise ConfigError(
                f"method.lora_modules must list attn2 projection names (e.g. to_k, to_v), got {self.lora_modules!r}"
            )
        if not self.closed_form and not self.lora_steps:
            raise ConfigError(
                "realera with closed_form false and lora_steps 0 runs no stage and leaves the model unchanged; "
                "set closed_form: true or lora_steps above 0"
            )

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        if model.conditioning != "text":
            raise ConfigError("realera edits cross-attention: it needs a text-to-image model")
        processes = accelerator.num_processes if accelerator is not None else 1
        if self.lora_steps and self.lora_batch_size % processes:
            raise ConfigError(
                f"realera lora_batch_size {self.lora_batch_size} cannot be split evenly across {processes} "
                f"processes; set method.lora_batch_size to a multiple of {processes}"
            )
        generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
        teacher = model.frozen_copy() if self.lora_steps else None  # ε_orig: the model before any edit
        if self.closed_form:
            self.edit(model, data, generator, accelerator)
        if self.lora_steps:
            self.lora_stage(model, teacher, data, generator, accelerator)
        return model

    # -- steps 1-4: mining and the closed form -----------------------------------------------------------------

    def edit(
        self, model: Model, data: UnlearnData, generator: torch.Generator, accelerator=None
    ) -> list[str]:
        """The closed-form stage: concept keys, mined neighbours and beyond-concept samples, one solve per
        cross-attention projection. Returns the names of the edited tensors. Several processes: each solves the
        same edit from the same generator, then all take the main process's edited weights."""
        started = time.perf_counter()
        prompts = data.prompts
        keys, anchor_keys = concept_keys(model, prompts.forget, prompts.anchor)
        neighbors, source = self.neighbors(keys, self.num_neighbors, generator)
        beyond = self.beyond(keys, self.num_beyond, generator)
        preserve_keys, scale = preserved_keys(
            model, prompts.retain, self.preserve_unconditional, self.preserve_scale
        )
        # Weights enter as square roots on both sides of each term (the projections are linear, biases are not
        # edited): erase_scale on keys and neighbours, the per-sample weights on neighbours and beyond samples.
        root = self.erase_scale**0.5
        w_n = (self.neighbor_weight / max(self.num_neighbors, 1)) ** 0.5
        w_b = (self.beyond_weight / max(self.num_beyond, 1)) ** 0.5
        all_keys = torch.cat([keys, neighbors * w_n]) * root
        all_targets = torch.cat([anchor_keys, anchor_keys[source] * w_n]) * root
        all_preserved = torch.cat([preserve_keys, beyond * w_b])
        edited = edit_cross_attention(
            model,
            all_keys,
            target_keys=all_targets,
            preserve_keys=all_preserved,
            preserve_scale=scale,
            ridge=self.ridge,
        )
        weights = dict(model.unet.named_parameters())
        broadcast_tensors(accelerator, [weights[name] for name in edited])
        if accelerator is not None:
            accelerator.print(
                f"realera: edited {len(edited)} projections with {len(keys)} concept states, {len(neighbors)} "
                f"neighbours, {len(beyond)} beyond-concept and {len(preserve_keys)} preserved states in "
                f"{time.perf_counter() - started:.2f}s"
            )
        return edited

    # -- step 5-6: the LoRA stage -------------------------------------------------------------------------------

    def lora_stage(
        self, model: Model, teacher: Model, data: UnlearnData, generator: torch.Generator, accelerator
    ) -> Model:
        """Train a LoRA on the cross-attention so that the concept and its mined neighbours predict the
        original model's noise for the anchor, then merge it into the weights and remove it. Each step draws
        the global batch alike in every process and trains on this process's share of it (`shard`)."""
        prompts = data.prompts
        anchor_of = dict(zip(prompts.forget, prompts.anchor))
        targets = lora_targets(model.unet, self.lora_modules)
        factors = add_lora(model.unet, targets, self.lora_rank, self.lora_alpha, "realera")  # all else frozen
        forget = endless(data.forget, self.lora_batch_size)
        retain = (
            endless(data.retain, self.lora_batch_size) if self.preserve_weight and len(data.retain) else None
        )
        rng = random.Random(torch.initial_seed())  # the same stream in every process: the global batch
        net = data_parallel(model, accelerator)  # the LoRA (all that trains), under DDP on several processes

        def loss_fn(step: int) -> torch.Tensor:
            images, conditions = next(forget)
            conditions = list(conditions)
            unknown = [c for c in conditions if c not in anchor_of]
            if unknown:
                raise DataError(f"forget image captioned {unknown[0]!r}, which is not a forget prompt")
            x_t, _, t = model.noised(model.to_latents(images))
            with torch.no_grad():
                cond = model.encode(conditions)
                use = [rng.random() < self.neighbor_share for _ in conditions]
                cond = self.perturb(model, conditions, cond, use, generator, beyond=False)
                anchors = teacher.encode([anchor_of[c] for c in conditions])
                x_t, t, cond, anchors = shard(accelerator, x_t, t, cond, anchors, uneven=True)
                target = teacher(x_t, t, anchors)
            weight = share_weight(accelerator, len(images))  # (a pass's short last batch may split unevenly)
            loss = F.mse_loss(net(x_t, t, cond).float(), target.float()) * weight
            if not self.preserve_weight:
                return loss
            # beyond-concept regularization: what lies outside the band keeps the original prediction
            keep = []
            if self.num_beyond:
                with torch.no_grad():
                    far = self.perturb(
                        model,
                        conditions,
                        model.encode(conditions),
                        [True] * len(conditions),
                        generator,
                        beyond=True,
                    )
                    far = shard(accelerator, far, uneven=True)
                    far_target = teacher(x_t, t, far)
                keep.append(F.mse_loss(net(x_t, t, far).float(), far_target.float()) * weight)
            if retain is not None:
                r_images, r_conditions = next(retain)
                r0 = model.to_latents(r_images)
                # t before ε: the order this term always drew them in (a seed keeps giving the same run)
                r_x, _, r_t = model.noised(r0, model.sample_timesteps(len(r0)))
                with torch.no_grad():
                    r_cond = model.encode(list(r_conditions))
                    r_x, r_t, r_cond = shard(accelerator, r_x, r_t, r_cond, uneven=True)
                    r_target = teacher(r_x, r_t, r_cond)
                r_weight = share_weight(accelerator, len(r_images))
                keep.append(F.mse_loss(net(r_x, r_t, r_cond).float(), r_target.float()) * r_weight)
            return loss + self.preserve_weight * sum(keep)

        optimizer = torch.optim.AdamW(factors, lr=self.lora_lr)
        train_steps(
            net,
            loss_fn,
            optimizer,
            accelerator,
            self.lora_steps,
            max_grad_norm=self.max_grad_norm,
            stage="realera-lora",
            state={"forget": forget, "retain": retain, "rng": rng, "generator": generator},
            settings={"method": self, "data": data},
        )
        remove_lora(model.unet, merge=True)
        return model

    def neighbors(
        self, keys: torch.Tensor, count: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`mine_neighbors` with this method's bounds."""
        return mine_neighbors(
            keys,
            count,
            self.max_distance,
            self.min_cosine,
            self.max_cosine,
            generator,
            self.relative_distance,
            self.max_tries,
        )

    def beyond(self, keys: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
        """`beyond_concept` with this method's bounds."""
        return beyond_concept(
            keys,
            count,
            self.max_distance,
            self.beyond_distance,
            self.min_cosine,
            generator,
            self.relative_distance,
            self.max_tries,
        )

    def perturb(
        self,
        model: Model,
        prompts: list[str],
        states: torch.Tensor,
        which: list[bool],
        generator: torch.Generator,
        beyond: bool,
    ) -> torch.Tensor:
        """Encoded prompts (N, L, d) with the concept positions (last word to the end) of the rows in `which`
        replaced by mined neighbours (or, with `beyond`, by beyond-concept samples); a new tensor."""
        states = states.clone()
        spans = concept_starts(model, prompts)
        for row, (start, chosen) in enumerate(zip(spans, which)):
            if not chosen:
                continue
            span = states[row, start:].float().cpu()
            if beyond:
                new = self.beyond(span, 1, generator)
            else:
                new, _ = self.neighbors(span, 1, generator)
            states[row, start:] = new.to(states.device, states.dtype)
        return states


# -- the parts, each usable on its own ---------------------------------------------------------------------------


def check_bounds(max_distance: float, min_cosine: float, max_cosine: float, relative: bool = True) -> None:
    """Refuse a neighbourhood that is empty or ill-defined (D_1 <= 0, S_1 > S_2, a band no η can reach)."""
    if not max_distance > 0:
        raise ConfigError(f"realera max_distance (D_1) must be positive, got {max_distance}")
    if not -1.0 <= min_cosine <= max_cosine <= 1.0:
        raise ConfigError(
            f"realera needs -1 <= min_cosine (S_1) <= max_cosine (S_2) <= 1, got {min_cosine} and {max_cosine}"
        )
    # with ||η|| <= D_1 ||e|| (D_1 < 1) the cosine cannot fall below sqrt(1 - D_1²): the band must reach above it
    if relative and max_distance < 1 and max_cosine < math.sqrt(1 - max_distance**2):
        raise ConfigError(
            f"realera max_distance {max_distance} keeps every neighbour above cosine "
            f"{math.sqrt(1 - max_distance**2):.3f}, beyond max_cosine {max_cosine}: widen one of them"
        )


def _draw(
    keys: torch.Tensor,
    count: int,
    low: float,
    high: float,
    accept,
    generator: torch.Generator,
    relative: bool,
    max_tries: int,
    what: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling shared by mining and beyond-concept sampling: for every key, `count` perturbations
    η = ρ u (u a uniform random unit direction, ρ uniform in [low, high], times ||e|| when `relative`) with
    `accept(cos, distance_bound)` true. Returns (samples (M·count, d), index of each sample's key)."""
    keys = keys.float()
    m, d = keys.shape
    scale = keys.norm(dim=1, keepdim=True) if relative else torch.ones(m, 1)
    have = torch.zeros(m, dtype=torch.long)
    rows_found, samples_found = [], []
    for _ in range(max_tries):
        missing = (have < count).nonzero().flatten()
        if not len(missing):
            break
        # 2·count candidates per key still short of samples: most are accepted with sensible bounds
        rows = missing.repeat_interleave(2 * count)
        direction = F.normalize(torch.randn(len(rows), d, generator=generator), dim=1)
        radius = low + (high - low) * torch.rand(len(rows), 1, generator=generator)
        eta = direction * radius * scale[rows]
        candidates = keys[rows] + eta
        cos = F.cosine_similarity(keys[rows], candidates, dim=1)
        ok = accept(cos, eta.norm(dim=1), scale[rows, 0]).view(len(missing), 2 * count)
        # keep each key's first accepted candidates, no more than it still needs
        keep = ok & (ok.cumsum(1) <= (count - have[missing]).unsqueeze(1))
        have[missing] += keep.sum(1)
        keep = keep.flatten()
        rows_found.append(rows[keep])
        samples_found.append(candidates[keep])
    if bool((have < count).any()):
        raise ConfigError(
            f"realera found too few {what} in {max_tries} tries: the distance bound and the cosine band leave "
            "almost no room; widen them"
        )
    if not rows_found:
        return keys.new_zeros(0, d), torch.zeros(0, dtype=torch.long)
    rows, samples = torch.cat(rows_found), torch.cat(samples_found)
    order = torch.sort(rows, stable=True).indices  # grouped by key, in the order they were drawn
    return samples[order], rows[order]


def mine_neighbors(
    keys: torch.Tensor,
    num_neighbors: int,
    max_distance: float,
    min_cosine: float,
    max_cosine: float,
    generator: torch.Generator,
    relative: bool = True,
    max_tries: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour-concept mining: `num_neighbors` perturbed copies e + η of every key e with ||η|| <= D_1 (times
    ||e|| when `relative`) and S_1 <= cos(e, e + η) <= S_2.

    Args:
        keys: concept states e, (M, d).
        num_neighbors: neighbours per key.
        max_distance: D_1.
        min_cosine, max_cosine: the band [S_1, S_2].
        generator: a seeded torch.Generator (the same seed gives the same neighbours).
        relative: D_1 is a share of ||e||.
        max_tries: rounds of rejection sampling before giving up.

    Returns:
        `(neighbours (M·num_neighbors, d), source)`: `source[i]` is the row of `keys` neighbour i comes from.
    """
    check_bounds(max_distance, min_cosine, max_cosine, relative)

    def accept(cos, dist, scale):
        return (cos >= min_cosine) & (cos <= max_cosine) & (dist <= max_distance * scale * (1 + 1e-6))

    return _draw(keys, num_neighbors, 0.0, max_distance, accept, generator, relative, max_tries, "neighbours")


def beyond_concept(
    keys: torch.Tensor,
    num_samples: int,
    max_distance: float,
    beyond_distance: float,
    min_cosine: float,
    generator: torch.Generator,
    relative: bool = True,
    max_tries: int = 100,
) -> torch.Tensor:
    """Beyond-concept samples: perturbations of every key outside the neighbourhood (||η|| in [D_1,
    `beyond_distance`], cos(e, e + η) < S_1), rescaled to the norm of their key. Returns (M·num_samples, d)."""
    if beyond_distance <= max_distance:
        raise ConfigError(f"beyond_distance ({beyond_distance}) must exceed max_distance ({max_distance})")

    def accept(cos, dist, scale):
        return cos < min_cosine

    samples, source = _draw(
        keys,
        num_samples,
        max_distance,
        beyond_distance,
        accept,
        generator,
        relative,
        max_tries,
        "beyond-concept samples",
    )
    if not len(samples):
        return samples
    return F.normalize(samples, dim=1) * keys.float().norm(dim=1)[source].unsqueeze(1)


def lora_targets(unet: nn.Module, modules: list[str]) -> list[str]:
    """The full names of the cross-attention projections `modules` (names inside `attn2`) of `unet`."""
    if not modules:
        raise ConfigError(
            "realera lora_modules is empty: name attn2 projections (to_q, to_k, to_v, to_out.0)"
        )
    pattern = r".*attn2\.(" + "|".join(re.escape(m) for m in modules) + r")"
    names = [name for name, _ in unet.named_modules() if re.fullmatch(pattern, name)]
    if not names:
        raise ConfigError(f"realera lora_modules {modules} match no cross-attention projection of this UNet")
    return names
