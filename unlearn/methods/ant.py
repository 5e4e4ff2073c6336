"""ANT: Set You Straight: Auto-Steering Denoising Trajectories to Sidestep Unwanted Concepts (Li, Lu, Ren, Kong;
ACM MM 2025, arXiv 2504.12782)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import ConceptPrompts, UnlearnData
from ..errors import ConfigError
from ..models.base import Model
from ..params import ParamMask
from ..train import broadcast_tensors, data_parallel, shard, train_steps
from .base import Method, hyperparameter

MODES = ("auto", "saliency", "lora")
MASK_SCOPES = ("tensor", "global")
# The reference's values for each mode, taken by the fields left null. The two reference codes differ, and their
# loss weights swap roles: Single's loss is L_late + α2·L_u,late + α1·(L_early + α2·L_u,early), Multiple's is
# L_late + α1·L_u,late + α2·(L_early + α1·L_u,early).
MODE_DEFAULTS = {
    # Single/configs/ant_train.yaml (train_ant_single.py): iterations 250, batch 1, before_step 7,
    # start_guidance 3, alpha1 1 (early), alpha2 0.5 (unconditional)
    "saliency": dict(
        steps=250, batch_size=1, split_step=7, start_guidance=3.0, early_weight=1.0, uncond_weight=0.5
    ),
    # Multiple/examples/config.yaml + prompts.yaml (train_ant.py): iterations 10, prompt batch 2, before_step 4,
    # the trajectory's CFG 7.5 (hard-coded in train_ant.py), alpha_2 0.5 (early), alpha_1 2.5 (unconditional)
    "lora": dict(
        steps=10, batch_size=2, split_step=4, start_guidance=7.5, early_weight=0.5, uncond_weight=2.5
    ),
}


def draw_indices(rng: random.Random, split_step: int, ddim_steps: int) -> tuple[int, int]:
    """One early and one late DDIM index, counted from pure noise (index 0 = the noisiest timestep).

    The early index lies in [0, split_step): the first, high-noise steps that lay out the image's structure,
    where ANT keeps the original conditional direction. The late index lies in [split_step, ddim_steps): the
    mid-to-late steps that fill in the concept, where ANT reverses it.
    """
    return rng.randrange(split_step), rng.randrange(split_step, ddim_steps)


def top_share(grads: dict[str, torch.Tensor], keep: float, scope: str = "tensor") -> dict[str, torch.Tensor]:
    """Boolean masks of the largest `keep` share of |grad|: per tensor (the reference's `generate_mask.py`
    ranks each tensor on its own) or over all tensors at once (`scope="global"`, SalUn's convention).

    Per tensor the count is int(keep·numel), rounded down as the reference's `rank < int(keep·numel)`
    (`generate_mask.py`), so at keep 0.5 a one-entry tensor keeps nothing. Entries whose gradient is exactly zero are never salient (a tie at zero would otherwise be
    broken arbitrarily).
    """
    if scope not in MASK_SCOPES:
        raise ConfigError(f"unknown mask scope {scope!r}; known: {', '.join(MASK_SCOPES)}")
    masks = {}
    if scope == "tensor":
        for name, grad in grads.items():
            magnitude = grad.detach().abs().flatten().float()
            count = min(int(magnitude.numel() * keep), magnitude.numel())
            flat = torch.zeros(magnitude.numel(), dtype=torch.bool, device=magnitude.device)
            flat[torch.topk(magnitude, count, sorted=False).indices] = True
            masks[name] = (flat & (magnitude > 0)).view_as(grad).cpu()
        return masks
    magnitude = torch.cat([g.detach().abs().flatten().float() for g in grads.values()])
    flat = torch.zeros(magnitude.numel(), dtype=torch.bool, device=magnitude.device)
    flat[torch.topk(magnitude, int(magnitude.numel() * keep), sorted=False).indices] = True
    flat &= magnitude > 0
    start = 0
    for name, grad in grads.items():
        masks[name] = flat[start : start + grad.numel()].view_as(grad).cpu()
        start += grad.numel()
    return masks


def saliency_intersection(
    maps: list[dict[str, torch.Tensor]], sparsity: float, scope: str = "tensor"
) -> ParamMask:
    """ANT's augmentation-enhanced saliency mask M*: threshold every gradient map (keep the top `1 − sparsity`
    share of |grad|), then keep only the weights salient in *every* map (the intersection)."""
    if not maps:
        raise ConfigError("the saliency intersection needs at least one gradient map")
    mask = ParamMask(top_share(maps[0], 1.0 - sparsity, scope))
    for grads in maps[1:]:
        mask = mask & ParamMask(top_share(grads, 1.0 - sparsity, scope))
    return mask


@dataclass
class ANT(Method):
    """ANT: along the model's own trajectories, keep the concept's direction early and reverse it late.

    Fine-tunes the model along its own denoising trajectories so that the concept's classifier-free-guidance
    direction δ(c) = ε(x_t, c) − ε(x_t, "") is kept where the image's structure forms and reversed where the
    concept would be drawn (Li et al., 2025; reference/methods.md §5):

    1. Keep a frozen copy θ* (the teacher). Every step, for a batch of forget prompts c:
       a. draw a DDIM index k_e in [0, `split_step`) and k_l in [`split_step`, `ddim_steps`), counted from pure
          noise (`draw_indices`: early = high noise), and run the *current* model's DDIM trajectory under c with
          guidance `start_guidance` (no gradient) from one start noise to x_e at k_e and on to x_l at k_l;
       b. teacher e_u = θ*(x, t, ""), e_c = θ*(x, t, c) at both points;
       c. early (t > t'): L_early = MSE(θ(x_e, c), e_u + η (e_c − e_u)): the original conditional direction;
          late (t < t'): L_late = MSE(θ(x_l, c), e_u − η (e_c − e_u)): the direction reversed (ESD's target);
          both: L_uncond = MSE(θ(x, ""), e_u): the unconditional prediction stays the original's, with gradient
          through θ; η = `negative_guidance`;
       d. loss = L_late + w_u L_uncond_late + w_e (L_early + w_u L_uncond_early), w_e = `early_weight`,
          w_u = `uncond_weight` (single-concept code: w_e = α1 = 1, w_u = α2 = 0.5; multi-concept code:
          w_e = α_2 = 0.5, w_u = α_1 = 2.5; the defaults of each mode, below).
    2. Single concept (`mode: saliency`): the full UNet (`params`) trains only inside the augmentation-enhanced
       saliency mask M*: for every prompt variant (`mask_prompts`, default the forget prompts) and seed
       (`mask_seeds`), the gradient of the step-1 loss summed over `mask_iterations` draws at the *original*
       weights is one map; each map keeps its top `1 − sparsity` share of |grad| (per tensor, or global with
       `mask_scope`), and M* is their intersection. Saved as `saliency_mask.safetensors` in the run folder.
    3. Several concepts (`mode: lora`): one peft LoRA (rank `lora_rank`, on `lora_targets`, by default the
       cross-attention key/value projections) per concept (`data.prompts.split()`), trained with the step-1
       loss alone on that concept; then all LoRAs are fused into the plain to_k / to_v weights in closed form
       (MACE's fusion): W* = argmin Σ_i ||W K_i − (W0 + s ΔW_i) K_i||² + `preserve_scale` ||(W − W0) P||² +
       `ridge` ||W − W0||², K_i the concept's text states, P the retain prompts' states, s = `fuse_scale`.
       The adapters are removed afterwards: the returned UNet is plain. `mode: auto` picks saliency for one
       concept and lora for several.

    Where the paper and the reference code disagree, this follows the paper:
    - Direction of the split. The multi-concept code and the paper keep the direction in the first
      `split_step` steps from noise (t > t') and reverse it after; the single-concept code's CompVis sampler
      stops early so that its "first 7 steps" are in fact the last, nearly clean ones (reference/methods.md
      §5.4). Here early always means high noise.
    - The unconditional terms carry gradient (the single-concept code computes θ(x, "") under no_grad, so its
      L_uncond is inert; the multi-concept code's is active).
    - Saliency maps are taken at the original weights: the reference's gradient pass takes optimizer steps
      (lr 1e-2) between maps. And they keep the *largest* |grad| (the reference's `generate_mask.py` keeps the
      smallest half, against the paper's "heavy hitters").
    - The trained model's predictions are plain conditional ones, as in the paper's formulas and the
      single-concept code (the multi-concept code guides the LoRA model's and the teacher's conditional
      predictions with CFG 7.5 before comparing).
    - The multi-concept code trains LECO's "c3lier" LoRA (every attention and conv layer) and fuses only its
      cross-attention share with a hard-coded scale 4.3 (`fuse_scale` here); here the LoRA sits on the
      projections the fusion can express exactly, so nothing trained is dropped. Its preservation set is
      MACE's COCO / domain caches; here the retain prompts' states.
    - x_t is taken at the DDIM step's own timestep (the reference draws t within that step's bin).
    - The fusion reads each concept prompt's states from its last word on (`closed_form.concept_keys`), where
      the multi-concept code reads all 77 positions: the positions before the word do not know the concept
      (CLIP is causal) and are shared with every prompt of the same prefix, so fitting them to the LoRA's
      outputs would move unrelated prompts. And its ridge must be positive (the reference's `lamb` is 0):
      with few preserved states the system is otherwise singular.

    Several processes (`multi_process`): the trained UNet (saliency mode) or the concept's LoRA (lora mode) trains
    under DDP; the teacher θ* is each process's own unwrapped copy. Every process draws each step's prompts, the
    indices k_e and k_l and the trajectories' starting noise for the whole batch alike, then runs the trajectory,
    the teacher and the trained passes on its share of it (`unlearn.train.shard`): `batch_size` must be a
    multiple of the number of processes. The saliency maps are independent (each from its own seed), so they are
    spread over the processes (map i on process i mod N) and the intersection is taken across them, which is the
    intersection of all maps exactly. The LoRA fusion is solved alike on every process, then all take the main
    process's fused weights. So the run is the one-process run. Mixed precision and gradient accumulation work as
    in one process (each micro-batch is a fresh global batch).

    Defaults follow the reference code of each mode: the settings that differ between the two codes (`steps`,
    `batch_size`, `split_step`, `start_guidance`, `early_weight`, `uncond_weight`) default to null and take
    the mode's value (`MODE_DEFAULTS`): saliency, the single-concept code's `Single/configs/ant_train.yaml`
    (250 iterations, batch 1, before_step 7, start guidance 3, α1 = 1 early, α2 = 0.5 unconditional); lora,
    the multi-concept code's `Multiple/examples/config.yaml` and `prompts.yaml` (10 iterations per concept,
    prompt batch 2, before_step 4, CFG 7.5, and its swapped weights: α_2 = 0.5 early, α_1 = 2.5
    unconditional). Shared by both: Adam(W) lr 5e-4, 50 DDIM steps, η = 1; gradient maps over 5 seeds,
    10 iterations each, 50 % per tensor (`configs/ant_gradient.yaml`, `generate_mask.py`); LoRA rank 64,
    alpha 1, fusion scale 4.3 (`fuse_lora_ant.py`). A value set explicitly wins in both modes.
    """

    families = ("diffusion",)
    multi_process = True
    needs_images = False  # prompts alone: a ConceptPrompts is a whole task
    mode: str = hyperparameter(
        "auto", "saliency (one concept), lora (several), or auto: by the number of concepts"
    )
    steps: int | None = hyperparameter(
        None,
        "optimizer steps (per concept in lora mode); null: the mode's reference value (saliency 250, lora 10)",
    )
    lr: float = hyperparameter(5e-4, "learning rate (Adam for saliency, AdamW for the LoRAs)")
    batch_size: int | None = hyperparameter(
        None, "forget prompts per step; null: the mode's reference value (saliency 1, lora 2)"
    )
    split_step: int | None = hyperparameter(
        None,
        "DDIM index t' from noise: before it the direction is kept, after reversed; null: the mode's reference "
        "value (saliency 7, lora 4)",
        ge=1,
    )
    ddim_steps: int = hyperparameter(50, "DDIM steps of the model's own trajectories")
    start_guidance: float | None = hyperparameter(
        None,
        "classifier-free guidance of those trajectories; null: the mode's reference value (saliency 3, lora 7.5)",
    )
    negative_guidance: float = hyperparameter(1.0, "η: the weight of the concept direction in both targets")
    early_weight: float | None = hyperparameter(
        None,
        "w_e, weight of the early-stage loss; null: the mode's reference value (saliency 1 = Single's alpha1, "
        "lora 0.5 = Multiple's alpha_2)",
    )
    uncond_weight: float | None = hyperparameter(
        None,
        "w_u, weight of the unconditional terms; null: the mode's reference value (saliency 0.5 = Single's "
        "alpha2, lora 2.5 = Multiple's alpha_1)",
    )
    max_grad_norm: float | None = hyperparameter(None, "clip the gradient norm to this; None = no clipping")
    # single concept: saliency-masked fine-tuning
    params: str | list = hyperparameter("full", "weights that may train (a parameter set or name globs)")
    sparsity: float = hyperparameter(
        0.5,
        "share of weights each gradient map leaves out of the mask: 1 − the ratio r of the reference's "
        "<prompt>_<r>.pt (generate_mask.py keeps rank < r·numel); at the reference's 0.5 the two agree",
    )
    mask_scope: str = hyperparameter(
        "tensor", "rank |grad| per tensor (the reference) or global (SalUn)", choices=MASK_SCOPES
    )
    mask_prompts: list | None = hyperparameter(
        None, "prompt variants of the gradient maps; None = forget prompts"
    )
    mask_seeds: list = hyperparameter(
        [24, 42, 98, 403, 3407], "seeds of the gradient maps (one map per prompt variant and seed)"
    )
    mask_iterations: int = hyperparameter(10, "objective draws summed into each gradient map", ge=1)
    mask_path: str | None = hyperparameter(None, "load the saliency mask from this file instead")
    # several concepts: one LoRA each, fused in closed form
    lora_rank: int = hyperparameter(64, "rank of each concept's LoRA", ge=1)
    lora_alpha: float = hyperparameter(1.0, "LoRA alpha (updates scale by alpha / rank)", gt=0)
    lora_targets: list = hyperparameter(
        ["attn2.to_k", "attn2.to_v"], "cross-attention projections that carry a LoRA (name endings)"
    )
    fuse_scale: float = hyperparameter(4.3, "s: each LoRA's update weighs s in the fusion targets")
    preserve_scale: float = hyperparameter(1.0, "weight of the retain prompts' states in the fusion")
    ridge: float = hyperparameter(0.1, "λ > 0, the ridge term λ ||W - W0||² of the fusion", gt=0)

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown ant mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.mode != "auto":  # the mode is known: the fields left null take its reference values now
            for name, value in MODE_DEFAULTS[self.mode].items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        if self.split_step is not None and not 0 < self.split_step < self.ddim_steps:
            raise ConfigError(
                f"ant split_step must lie strictly between 0 and ddim_steps ({self.ddim_steps}) so that both "
                f"stages have steps, got {self.split_step}"
            )
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"ant sparsity must lie in [0, 1), got {self.sparsity}")
        if self.mask_scope not in MASK_SCOPES:
            raise ConfigError(f"unknown ant mask_scope {self.mask_scope!r}; known: {', '.join(MASK_SCOPES)}")
        if not all(
            isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 for seed in self.mask_seeds
        ):
            raise ConfigError(
                f"method.mask_seeds must list non-negative integer seeds, got {self.mask_seeds!r}"
            )
        if self.mask_prompts is not None and not all(isinstance(p, str) for p in self.mask_prompts):
            raise ConfigError(f"method.mask_prompts must list prompts (text), got {self.mask_prompts!r}")
        if not self.mask_seeds or self.mask_iterations < 1:
            raise ConfigError("ant needs at least one mask seed and one mask iteration per gradient map")
        bad = [t for t in self.lora_targets if not str(t).endswith(("attn2.to_k", "attn2.to_v"))]
        if bad or not self.lora_targets:
            raise ConfigError(
                f"ant lora_targets must name cross-attention key/value projections (attn2.to_k, attn2.to_v), "
                f"the layers the closed-form fusion can write; got {bad or self.lora_targets}"
            )

    def check_recipe(self, recipe, conditioning: str | None) -> None:
        super().check_recipe(recipe, conditioning)
        concepts = recipe.data.concept if isinstance(recipe.data.concept, list) else [recipe.data.concept]
        lora = self.mode == "lora" or (self.mode == "auto" and len(concepts) > 1)
        if lora and conditioning == "class":
            raise ConfigError(
                "ant mode lora fuses LoRAs into the cross-attention of a text-to-image UNet, and "
                f"{recipe.model.checkpoint!r} is class-conditioned: use mode: saliency"
            )

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        concepts = data.prompts.split()
        mode = self.mode if self.mode != "auto" else ("saliency" if len(concepts) == 1 else "lora")
        method = dataclasses.replace(self, mode=mode)  # the null settings take this mode's reference values
        processes = accelerator.num_processes
        if method.batch_size % processes:  # refused now, not after the saliency maps
            raise ConfigError(
                f"ant batch_size {method.batch_size} cannot be split evenly across {processes} processes; set "
                f"method.batch_size to a multiple of {processes}"
            )
        if mode == "lora":
            return method._lora(model, data.prompts, concepts, accelerator)
        return method._saliency(model, data.prompts, accelerator)

    # -- the objective, shared by both modes ---------------------------------------------------------------

    def objective(
        self,
        model: Model,
        teacher: Model,
        sampler,
        conditions,
        rng: random.Random,
        net=None,
        accelerator=None,
    ) -> torch.Tensor:
        """The ANT loss on one batch of forget conditions (step 1 of the class docstring).

        `conditions` is the global batch: the indices and the trajectory's starting noise are drawn for all of
        it, and the loss is this process's share of it (`shard`), with the trained pass through `net` (the model
        as `data_parallel` wrapped it; default `model`)."""
        if any(getattr(self, name) is None for name in MODE_DEFAULTS["saliency"]):
            raise ConfigError(
                "ant mode auto has no settings until the mode is known: set mode saliency or lora"
            )
        net = model if net is None else net
        n = len(conditions)
        k_early, k_late = draw_indices(rng, self.split_step, self.ddim_steps)
        t_early, t_late = sampler.timesteps[k_early], sampler.timesteps[k_late]
        with torch.no_grad():
            cond, uncond = model.encode(conditions), model.encode(model.null_conditions(n))
            # the starting noise of the whole batch (as `Diffusion.trajectory` draws it), then this process's share
            noise = torch.randn(model.latent_shape(n), device=model.device) * sampler.init_noise_sigma
            noise, cond, uncond = shard(accelerator, noise, cond, uncond)
            n = len(noise)
            # one trajectory of the current model: noise -> x_early -> x_late (k_early < k_late)
            guidance = self.start_guidance
            x_early = model.denoise(noise, cond, sampler, 0, k_early, guidance, uncond)
            x_late = model.denoise(x_early, cond, sampler, k_early, k_late, guidance, uncond)
            x = torch.cat([x_early, x_late])
            t = torch.cat([t_early.expand(n), t_late.expand(n)]).to(model.device)
            both = teacher(torch.cat([x, x]), torch.cat([t, t]), _cat(uncond, uncond, cond, cond))
            e_u, e_c = both.float().chunk(2)
            direction = self.negative_guidance * (e_c - e_u)
            keep_target, reverse_target = (e_u + direction).chunk(2)[0], (e_u - direction).chunk(2)[1]
            e_u_early, e_u_late = e_u.chunk(2)
        # the trained model, conditional and unconditional, at both points, in one call with gradient
        out = net(torch.cat([x, x]), torch.cat([t, t]), _cat(cond, cond, uncond, uncond)).float()
        c_early, c_late, u_early, u_late = out.chunk(4)
        late = F.mse_loss(c_late, reverse_target) + self.uncond_weight * F.mse_loss(u_late, e_u_late)
        early = F.mse_loss(c_early, keep_target) + self.uncond_weight * F.mse_loss(u_early, e_u_early)
        return late + self.early_weight * early

    def _loss_fn(
        self,
        model: Model,
        teacher: Model,
        prompts: ConceptPrompts,
        rng: random.Random,
        net=None,
        accelerator=None,
    ):
        """A `train_steps` loss: each step a global batch of the concept's forget prompts, drawn with `rng` (the
        same stream in every process), this process's share of it trained through `net`."""
        sampler = model.sampler(self.ddim_steps)

        def loss_fn(step: int) -> torch.Tensor:
            batch = model.as_conditions(rng.choice(prompts.forget) for _ in range(self.batch_size))
            return self.objective(model, teacher, sampler, batch, rng, net, accelerator)

        return loss_fn

    # -- single concept: saliency-masked full fine-tuning ---------------------------------------------------

    def _saliency(self, model: Model, prompts: ConceptPrompts, accelerator) -> Model:
        chosen = model.train_only(self.params)
        teacher = model.frozen_copy()
        mask = self.mask(model, teacher, prompts, accelerator)
        optimizer = torch.optim.Adam(chosen.values(), lr=self.lr)
        rng = random.Random(torch.initial_seed())  # the same stream in every process: the global batch
        net = data_parallel(model, accelerator)  # the trained UNet pass, under DDP on several processes
        return train_steps(
            net,
            self._loss_fn(model, teacher, prompts, rng, net, accelerator),
            optimizer,
            accelerator,
            self.steps,
            mask=mask,
            max_grad_norm=self.max_grad_norm,
            stage="ant",
            state={"prompts": rng},
            settings={"method": self, "prompts": prompts},
        )

    def mask(self, model: Model, teacher: Model, prompts: ConceptPrompts, accelerator) -> ParamMask:
        """M*: loaded from `mask_path`, or the intersection of the gradient maps over prompt variants × seeds
        at the original weights (nothing is stepped), saved to the run folder.

        Several processes: each map depends on its prompt and seed alone, so process i computes maps i, i + N,
        ... and the processes intersect their partial masks (`intersect_across`): every process holds the
        intersection of all maps, the one-process mask exactly."""
        if self.mask_path:
            return ParamMask.load(self.mask_path)
        variants = list(self.mask_prompts) if self.mask_prompts else list(prompts.forget)
        sampler = model.sampler(self.ddim_steps)
        params = {n: p for n, p in model.trainable.named_parameters() if p.requires_grad}
        devices = [model.device] if model.device.type == "cuda" else []
        was_training = model.training
        model.eval()
        pairs = [(prompt, int(seed)) for prompt in variants for seed in self.mask_seeds]
        maps = []
        for prompt, seed in pairs[accelerator.process_index :: accelerator.num_processes]:
            summed = {n: torch.zeros_like(p) for n, p in params.items()}
            # the same seed gives the same noise and timesteps for every prompt variant
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                rng = random.Random(seed)
                for _ in range(self.mask_iterations):
                    model.zero_grad(set_to_none=True)
                    with accelerator.autocast():
                        loss = self.objective(model, teacher, sampler, model.as_conditions([prompt]), rng)
                    loss.backward()
                    for name, param in params.items():
                        if param.grad is not None:
                            summed[name] += param.grad
            maps.append(summed)  # |Σ grad| over the iterations: the reference's map
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        if maps:
            mask = saliency_intersection(maps, self.sparsity, self.mask_scope)
        else:  # more processes than maps: this one adds nothing to the intersection
            mask = ParamMask({n: torch.ones(p.shape, dtype=torch.bool) for n, p in params.items()})
        mask = intersect_across(accelerator, mask)
        if accelerator.project_dir and accelerator.is_main_process:
            mask.save(Path(accelerator.project_dir) / "saliency_mask.safetensors")
        return mask

    # -- several concepts: one LoRA per concept, fused in closed form ---------------------------------------

    def _lora(
        self, model: Model, merged: ConceptPrompts, concepts: list[ConceptPrompts], accelerator
    ) -> Model:
        from ..lora import add_lora, delta_weights, remove_lora, save_lora
        from .closed_form import concept_keys, cross_attention, fuse_loras, preserved_keys

        if model.conditioning != "text":
            raise ConfigError(
                "ant mode lora fuses LoRAs into the cross-attention of a text-to-image UNet; this model is "
                f"{model.conditioning}-conditioned: use mode: saliency"
            )
        targeted = [name for name in cross_attention(model) if name.endswith(tuple(self.lora_targets))]
        if not targeted:
            raise ConfigError(f"no cross-attention projection matches lora_targets {self.lora_targets}")
        teacher = model.frozen_copy()
        trained = []  # per concept: its text states and its LoRA's weight updates, for the fusion
        for index, concept in enumerate(concepts):
            adapter = f"ant_{index}"
            factors = add_lora(model.unet, targeted, self.lora_rank, self.lora_alpha, adapter)
            optimizer = torch.optim.AdamW(factors, lr=self.lr)
            rng = random.Random(torch.initial_seed())  # the same stream in every process: the global batch
            net = data_parallel(model, accelerator)  # this concept's LoRA (all that trains), under DDP
            train_steps(
                net,
                self._loss_fn(model, teacher, concept, rng, net, accelerator),
                optimizer,
                accelerator,
                self.steps,
                max_grad_norm=self.max_grad_norm,
                stage=f"ant_lora_{index}",
                state={"prompts": rng},
                settings={"method": self, "prompts": concept},
            )
            if accelerator.project_dir and accelerator.is_main_process:
                save_lora(model.unet, Path(accelerator.project_dir) / f"lora_{index}.safetensors", adapter)
            trained.append((concept_keys(model, list(concept.forget))[0], delta_weights(model.unet, adapter)))
            remove_lora(model.unet, merge=False)  # back to the plain layers with their original weights
        model.unet.requires_grad_(True)
        preserve, _ = preserved_keys(model, merged.retain, unconditional=False, scale=self.preserve_scale)
        fused = fuse_loras(model, trained, self.fuse_scale, preserve, self.preserve_scale, self.ridge)
        weights = dict(model.unet.named_parameters())  # solved alike everywhere: take the main one's
        broadcast_tensors(accelerator, [weights[name] for name in fused])
        model.eval()
        return model


def intersect_across(accelerator, mask: ParamMask) -> ParamMask:
    """The intersection of every process's `mask` (the same parameters in each), held by every process; `mask`
    itself on one process."""
    if accelerator is None or accelerator.num_processes == 1:
        return mask
    masks = {}
    for name, keep in mask.masks.items():
        # an entry is kept by every process iff the sum of the processes' 0/1 votes is the number of processes
        votes = accelerator.reduce(keep.to(accelerator.device, torch.int32), reduction="sum")
        masks[name] = (votes == accelerator.num_processes).cpu()
    return ParamMask(masks)


def _cat(*conditions):
    """Concatenate encoded conditions (text states, or class-id tensors)."""
    return torch.cat(list(conditions))
