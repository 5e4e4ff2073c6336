"""DoCo: Unlearning Concepts in Diffusion Model via Concept Domain Correction (Wu, Zhou, Yang, Wang, Chang, Zhu,
Hu, Zhou, Yang; AAAI 2025, arXiv 2405.15304; reference code yongliang-wu/DoCo)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import UnlearnData
from ..errors import ConfigError
from ..models.base import Model
from ..train import Trainer, shard
from .base import Method, hyperparameter

CPG_MODES = ("reference", "projection", "none")
UPDATE_ORDERS = ("generator_first", "discriminator_first")


@dataclass
class DoCo(Method):
    """DoCo: Unlearning Concepts in Diffusion Model via Concept Domain Correction (Wu et al., AAAI 2025).

    Adversarial concept domain correction with the concept-preserving gradient (reference/methods.md §7):

    1. Anchor images: before training, the original model draws `num_anchor_images` images from the anchor
       prompts (`anchor_steps` DDIM steps, guidance `anchor_guidance`); image i comes from the anchor of pair
       i mod P, where the P pairs are (data.prompts.forget[k], data.prompts.anchor[k]): each target prompt is
       paired with its anchor. The same images serve the adversarial half and the preservation half, as in the
       reference.
    2. Each step, for `batch_size` anchor images x0 (latents via `to_latents`; with `hflip` each image is
       mirrored left-right with probability 0.5 whenever it is drawn, for the adversarial and the preservation
       batch alike, as the reference flips its instance and its class images), noise ε and t ~ U{0..T-1}:
       x̂0_concept = x0 implied by ε_θ(x_t, t, target prompt) (trained model), x̂0_anchor = x0 implied by
       ε_θ*(x_t, t, anchor prompt) (frozen teacher, no gradient), both from `predict_x0` on the same x_t.
    3. Each iteration, in the reference's order (`update_order: generator_first`): first the model (after
       the warm-up) against the discriminator as it stands, then the discriminator.
    4. Model (the UNet's trained weights), only after `warm_up` iterations of discriminator-only training:
       L_adv = BCE(D(x̂0_concept), 0) (make the target's outputs indistinguishable from the anchor's) and
       L_pres = the ordinary diffusion loss of the anchor prompt on a second batch of anchor images (prior
       preservation), then by `cpg`:
       - "reference" (the concept-preserving gradient as the reference code computes it): g_pres = ∇L_pres and
         g_adv = ∇L_adv, each clipped to total norm `max_grad_norm`; per parameter tensor, with
         cos = ⟨g_adv, g_pres⟩ / (‖g_adv‖ ‖g_pres‖), g_adv ← g_adv − λ·cos·g_pres/‖g_pres‖ when cos < 0
         (λ = `cpg_lambda`); the optimizer steps on g_adv.
       - "projection" (textbook PCGrad): per parameter tensor, g_adv ← g_adv − (⟨g_adv, g_pres⟩ / ‖g_pres‖²)
         g_pres when the dot product is negative: the conflicting component is removed exactly.
       - "none": one gradient of L_adv + `prior_weight`·L_pres, clipped to `max_grad_norm`.
       With `add_preservation` (CPG modes only) the step also descends L_pres: g = g_adv' + `prior_weight`·g_pres.
       AdamW(`lr`, weight decay `weight_decay`), constant learning rate.
    5. Discriminator: a PatchGAN `PatchDiscriminator` on x̂0 (latents, or pixels without a VAE), stepped every
       iteration on the same x̂0 with L_D = BCE(D(x̂0_anchor), 0) + BCE(D(sg x̂0_concept), 1), plus, after a
       model step, BCE(D(sg x̂0_concept), 0) (`disc_adversarial_term`, see below); Adam(`disc_lr`, betas
       (0.5, 0.999)). Label convention kept from the reference: the anchor is "real" = 0, the concept "fake" = 1.
    6. Trained weights: the cross-attention keys and values (`params: kv`, the reference's
       `--parameter_group cross-attn`); everything else stays bit for bit.

    Where the reference code, the paper and this implementation differ:
    - The reference's CPG subtracts λ·cos·ĝ_pres with ĝ_pres a *unit* vector, which removes the conflicting
      component only when ‖g_adv‖ = 1 (it removes cos, not ‖g_adv‖·cos, along ĝ_pres); "reference" keeps this
      scaling, "projection" is the full projection.
    - In its CPG branch the reference steps on the corrected adversarial gradient only: the preservation loss
      never descends, it only vetoes conflicting directions. `add_preservation: false` (the default) keeps
      that; true adds the preservation gradient itself (a choice of ours, off by default).
    - Without CPG the reference uses L_adv + prior_loss_weight·L_prior·0.1 (a hard-coded 0.1); `prior_weight`
      is the product, so its default 0.1 is the reference's prior_loss_weight 1.0.
    - The reference draws anchor images with DPMSolver (25 steps, guidance 6, η 1) from LAION or ChatGPT
      captions of the anchor concept and builds target prompts from them by templates; we draw them with DDIM
      from the recipe's anchor prompts (no retrieval, no network), pairing each with its target prompt.
    - Order (train.py:1239-1295): the reference steps the UNet first, against the discriminator of the
      previous iteration, then the discriminator; `update_order: discriminator_first` (what this loop did
      before) steps the discriminator first, so the model fools the freshly updated one.
    - The reference's discriminator step also carries the gradient of the model's adversarial loss
      BCE(D(x̂0_concept), 0): its backward reaches the discriminator and only the UNet's optimizer zeroes
      gradients before `loss_D.backward()` adds to them, so after the warm-up D is pushed towards logit 0 on
      the concept (the two concept terms' logit gradient is 2σ − 1, not σ − 1). Almost certainly unintended,
      but it is what the paper's numbers were trained with: `disc_adversarial_term: true` (default) keeps it,
      false gives the textbook discriminator loss.
    - `hflip` (default on) follows the README's commands, which all pass `--hflip`; the argparse default is off.
    - The reference's scale/crop augmentation (on unless `--noaug`; the README's Van Gogh command turns it off,
      its object and nudity commands keep it) is not implemented: it rescales the images and prefixes the
      prompts ("a far away", "zoomed in"), which needs captions we do not have; its valid-region mask was unused
      by DoCo's losses anyway.
    - Warm-up: the reference trains the model once `global_step > warm_up` (warm_up + 1 discriminator-only
      iterations, 999 model steps of 2000); here `warm_up` counts them exactly (1000 model steps), one step
      more, kept so that `warm_up` means what it says.
    - The reference converts ε to x̂0 through a patched diffusers DDPM scheduler; we use `predict_x0`, the same
      formula, batched.
    - The reference runs accelerate's multi-GPU loop; so does this one (`multi_process`), with the result of one
      process for the same global batch: every process draws each iteration's anchor images, flips, noise and
      timesteps for the whole batch alike and runs the UNet on its share (`unlearn.train.shard`); the UNet's two
      gradients (taken with `torch.autograd.grad` for the CPG, which DDP does not see) are averaged over the
      processes before clipping and CPG. The discriminator, small but with BatchNorm (batch statistics: a share
      would see other ones, and SyncBatchNorm runs on GPUs only), judges the whole gathered x̂0 batch in every
      process alike, so it needs no DDP; the teacher is each process's own unwrapped copy.

    Defaults follow the reference README's commands (1 GPU): batch 8, lr 6e-6 × 8 (`--scale_lr`) = 4.8e-5,
    2000 iterations with 1000 of warm-up, λ 1, `max_grad_norm` 1, AdamW weight decay 1e-2, dlr (`disc_lr`) 1e-4 (objects,
    nudity; 5e-4 for the Van Gogh style), 1000 anchor images at guidance 6.
    """

    families = ("diffusion",)
    multi_process = True
    needs_images = False  # prompts alone: a ConceptPrompts is a whole task
    accumulates = False  # two optimizers per iteration
    text_params = ("xattn", "kv", "noxattn", "all_but_xattn")
    steps: int = hyperparameter(
        2000, "iterations, each one discriminator step and (after warm_up) one UNet step"
    )
    warm_up: int = hyperparameter(
        1000, "first iterations that train the discriminator only (reference 1000)", ge=0
    )
    lr: float = hyperparameter(4.8e-5, "AdamW learning rate of the UNet, constant (reference 6e-6 × batch 8)")
    disc_lr: float = hyperparameter(
        1e-4,
        "Adam learning rate of the discriminator (the reference's --dlr: 1e-4 objects/nudity, 5e-4 style)",
    )
    batch_size: int = hyperparameter(8, "anchor images per step (reference 8)")
    weight_decay: float = hyperparameter(1e-2, "AdamW weight decay of the UNet (reference 1e-2)")
    params: str | list = hyperparameter(
        "kv",
        "UNet weights that may move: kv (cross-attention keys/values, the reference), xattn, noxattn, full or globs",
    )
    cpg: str = hyperparameter(
        "reference",
        "gradient surgery: reference (the code's CPG scaling), projection (PCGrad) or none (a weighted sum)",
        choices=CPG_MODES,
    )
    cpg_lambda: float = hyperparameter(
        1.0, "strength λ of the reference CPG correction (reference --lambda_ 1)", ge=0
    )
    add_preservation: bool = hyperparameter(
        False, "also descend the preservation loss in the CPG modes (the reference only uses it to correct)"
    )
    prior_weight: float = hyperparameter(
        0.1,
        "weight of the anchor's diffusion (prior preservation) loss (reference prior_loss_weight 1 × 0.1)",
    )
    max_grad_norm: float | None = hyperparameter(
        1.0, "clip each of the adversarial and preservation gradients to this L2 norm; null: no clipping"
    )
    num_anchor_images: int = hyperparameter(
        1000, "images the original model draws from the anchor prompts first", ge=1
    )
    anchor_steps: int = hyperparameter(25, "DDIM steps per anchor image (the reference: 25 DPM-Solver steps)")
    anchor_guidance: float = hyperparameter(
        6.0, "classifier-free guidance scale of the anchor images (reference 6)"
    )
    update_order: str = hyperparameter(
        "generator_first",
        "per iteration: generator_first (the reference: the model steps against the discriminator as it was, "
        "then the discriminator steps) or discriminator_first (the textbook GAN order)",
        choices=UPDATE_ORDERS,
    )
    disc_adversarial_term: bool = hyperparameter(
        True,
        "generator_first only: the discriminator's step also descends the model's adversarial loss "
        "BCE(D(x0_concept), 0), as in the reference (whose backward leaves that gradient in D); false: the "
        "textbook discriminator loss only",
    )
    hflip: bool = hyperparameter(
        True,
        "mirror each drawn anchor image left-right with probability 0.5 (the reference README's --hflip; "
        "its argparse default is off)",
    )
    generate_batch_size: int = hyperparameter(16, "images per batch while drawing the anchor images")
    log_every: int = hyperparameter(
        50, "write the mean losses to train.jsonl every this many iterations", ge=1
    )

    def check(self) -> None:
        if self.update_order not in UPDATE_ORDERS:
            raise ConfigError(
                f"doco update_order must be one of {', '.join(UPDATE_ORDERS)}, got {self.update_order!r}"
            )
        if self.cpg not in CPG_MODES:
            raise ConfigError(f"doco cpg must be one of {', '.join(CPG_MODES)}, got {self.cpg!r}")
        if not 0 <= self.warm_up < self.steps:
            raise ConfigError(
                f"doco warm_up ({self.warm_up}) must lie in [0, steps) (steps {self.steps}): the model would "
                "never train"
            )
        if self.num_anchor_images < 1 or self.batch_size < 1:
            raise ConfigError("doco needs at least one anchor image and a batch_size of at least 1")

    def check_recipe(self, recipe, conditioning: str | None) -> None:
        super().check_recipe(recipe, conditioning)
        if recipe.train.mixed_precision == "fp16":
            raise ConfigError("doco's loop has no fp16 loss scaling; use train.mixed_precision bf16 or no")

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        if accelerator.mixed_precision == "fp16":
            raise ConfigError("doco's loop has no fp16 loss scaling; use train.mixed_precision bf16 or no")
        if accelerator.gradient_accumulation_steps > 1:
            raise ConfigError(
                "doco steps two optimizers per iteration; set train.gradient_accumulation_steps to 1"
            )
        if self.params in ("kv", "xattn", "noxattn") and model.conditioning != "text":
            raise ConfigError(
                f"doco params {self.params!r} selects a text-to-image UNet's cross-attention; this model is "
                f"{model.conditioning}-conditioned: use params: full"
            )
        chosen = model.train_only(self.params)
        params = list(chosen.values())
        teacher = model.frozen_copy()
        prompts = data.prompts
        pairs = list(zip(prompts.forget, prompts.anchor))
        images, which = self.anchor_images(model, pairs)
        disc = PatchDiscriminator(model.latent_shape(1)[1], min(model.latent_shape(1)[2:])).to(model.device)
        g_opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, eps=1e-8)
        d_opt = torch.optim.Adam(disc.parameters(), lr=self.disc_lr, betas=(0.5, 0.999))
        trainer = Trainer(  # a pruned model's zeros stay zero; the discriminator resumes with the model
            model,
            g_opt,
            accelerator,
            stage="doco",
            total=self.steps,
            state={"discriminator": disc, "discriminator_optimizer": d_opt},
            settings={"method": self, "data": data},
            log_every=self.log_every,
        )

        def draw() -> tuple[torch.Tensor, list, list]:
            """A batch of anchor latents with their (target, anchor) prompts."""
            index = torch.randint(len(images), (self.batch_size,))
            chosen_pairs = [pairs[int(which[i])] for i in index]
            x0 = model.to_latents(random_hflip(images[index]) if self.hflip else images[index])
            return (
                x0,
                model.as_conditions(c for c, _ in chosen_pairs),
                model.as_conditions(a for _, a in chosen_pairs),
            )

        model.train()
        disc.train()
        for position in trainer.loop():
            train_model = position >= self.warm_up
            # -- x̂0 of the target prompt (trained model) and of the anchor prompt (teacher) on the same x_t
            x0, targets, anchors = draw()  # the global batch, drawn alike in every process
            x_t, _, t = model.noised(x0)
            x_t, t, targets, anchors = shard(accelerator, x_t, t, targets, anchors)
            with accelerator.autocast():
                with torch.no_grad():
                    eps_anchor = teacher(x_t, t, teacher.encode(anchors))
                    target_cond = model.encode(targets)  # the text encoder is frozen
                with torch.set_grad_enabled(train_model):
                    eps_concept = model(x_t, t, target_cond)
            x0_anchor = model.predict_x0(x_t.float(), t, eps_anchor.float())
            x0_concept = model.predict_x0(x_t.float(), t, eps_concept.float())

            if self.update_order == "discriminator_first":
                self.discriminator_step(trainer, disc, d_opt, x0_anchor, x0_concept, after_model_step=False)
            # -- the model: fool the discriminator while the anchor keeps its ordinary diffusion loss
            if train_model:
                adv_loss, adv_term = self.adversarial_loss(disc, x0_concept, accelerator)
                prior_x0, _, prior_prompts = draw()
                prior_x_t, prior_noise, prior_t = model.noised(prior_x0)
                prior_x_t, prior_noise, prior_t, prior_prompts = shard(
                    accelerator, prior_x_t, prior_noise, prior_t, prior_prompts
                )
                with accelerator.autocast():
                    with torch.no_grad():
                        prior_cond = model.encode(prior_prompts)
                    prior_eps = model(prior_x_t, prior_t, prior_cond)
                pres_loss = F.mse_loss(prior_eps.float(), prior_noise.float())
                grads = self.generator_gradients(adv_term, pres_loss, params, accelerator)
                for param, grad in zip(params, grads):
                    param.grad = grad.to(param.dtype)
                trainer.update()
                trainer.record("adversarial", adv_loss)
                trainer.record("preservation", pres_loss)
            if self.update_order == "generator_first":
                self.discriminator_step(trainer, disc, d_opt, x0_anchor, x0_concept, train_model)
        model.eval()
        return model

    def adversarial_loss(self, disc: nn.Module, x0_concept, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
        """L_adv = BCE(D(x̂0_concept), 0) of the global batch, and the term whose gradient trains the UNet.

        One process: both are L_adv. Several: the discriminator judges the gathered global batch (its BatchNorm
        sees the one-process batch statistics), and the term is ⟨x̂0 share, N ∂L_adv/∂(that share)⟩, whose
        gradient, averaged over the N processes (`generator_gradients`), is the one-process ∇L_adv."""
        if accelerator is None or accelerator.num_processes == 1:
            loss = _bce(disc(x0_concept), 0.0)
            return loss, loss
        whole = accelerator.gather(x0_concept.detach().contiguous()).requires_grad_()
        loss = _bce(disc(whole), 0.0)
        (grad,) = torch.autograd.grad(loss, whole)
        term = (x0_concept * shard(accelerator, grad)).sum() * accelerator.num_processes
        return loss.detach(), term

    def discriminator_step(
        self, trainer: Trainer, disc: nn.Module, d_opt, x0_anchor, x0_concept, after_model_step: bool
    ) -> None:
        """One Adam step of the discriminator: anchor outputs are "real" (0), the target's "fake" (1), as the
        reference; after a model step of `generator_first` with `disc_adversarial_term`, plus the model's
        adversarial loss BCE(D(x̂0_concept), 0), whose gradient the reference leaves in the discriminator."""
        real, fake = (
            disc(_gathered(x0_anchor, trainer.accelerator)),
            disc(_gathered(x0_concept, trainer.accelerator)),
        )
        d_loss = _bce(real, 0.0) + _bce(fake, 1.0)
        if after_model_step and self.disc_adversarial_term:
            d_loss = d_loss + _bce(fake, 0.0)
        trainer.step(d_loss, optimizer=d_opt, name="discriminator")

    def generator_gradients(
        self,
        adv_loss: torch.Tensor,
        pres_loss: torch.Tensor,
        params: Sequence[torch.Tensor],
        accelerator=None,
    ) -> list[torch.Tensor]:
        """The model's update direction from the adversarial and preservation losses, by `cpg`. On several
        processes each gradient is averaged over them first: the gradient of the global batch's mean loss."""
        if self.cpg == "none":
            grads = torch.autograd.grad(adv_loss + self.prior_weight * pres_loss, params, allow_unused=True)
            grads = _mean_over_processes(_zeros_for_none(grads, params), accelerator)
            return clip_gradients(grads, self.max_grad_norm)
        # The reference computes the preservation gradient first, then the adversarial one; each is clipped.
        g_pres = torch.autograd.grad(pres_loss, params, retain_graph=True, allow_unused=True)
        g_pres = clip_gradients(
            _mean_over_processes(_zeros_for_none(g_pres, params), accelerator), self.max_grad_norm
        )
        g_adv = torch.autograd.grad(adv_loss, params, allow_unused=True)
        g_adv = clip_gradients(
            _mean_over_processes(_zeros_for_none(g_adv, params), accelerator), self.max_grad_norm
        )
        if self.cpg == "reference":
            g_adv = cpg_reference(g_adv, g_pres, self.cpg_lambda)
        else:
            g_adv = cpg_projection(g_adv, g_pres)
        if self.add_preservation:
            return [a + self.prior_weight * p for a, p in zip(g_adv, g_pres)]
        return g_adv

    @torch.no_grad()
    def anchor_images(self, model: Model, pairs: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """The original model's images of the anchor prompts, and each image's pair index (round robin)."""
        which = torch.arange(self.num_anchor_images) % len(pairs)
        conditions = model.as_conditions(pairs[int(k)][1] for k in which)
        # the seed follows the run's seed but differs from the evaluation's (which uses the recipe seed itself)
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        images = model.generate(
            conditions,
            steps=self.anchor_steps,
            guidance=self.anchor_guidance,
            seed=seed,
            batch_size=self.generate_batch_size,
        )
        return images, which


def _gathered(x: torch.Tensor, accelerator) -> torch.Tensor:
    """The global batch of which `x` is this process's share, in process order, without gradient."""
    x = x.detach()
    if accelerator is None or accelerator.num_processes == 1:
        return x
    return accelerator.gather(x.contiguous())


def _mean_over_processes(grads: list[torch.Tensor], accelerator) -> list[torch.Tensor]:
    """Each gradient averaged over the processes (what DDP does for a `backward`, done here for `autograd.grad`)."""
    if accelerator is None or accelerator.num_processes == 1:
        return grads
    return accelerator.reduce(grads, reduction="mean")


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right with probability 0.5 (the reference's `RandomHorizontalFlip(0.5)`)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def _bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), label))


def _zeros_for_none(
    grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """autograd's None (a parameter the loss does not reach) as a zero gradient."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def clip_gradients(grads: Sequence[torch.Tensor], max_norm: float | None) -> list[torch.Tensor]:
    """Scale a list of gradients to total L2 norm at most `max_norm` (torch's `clip_grad_norm_` rule)."""
    grads = list(grads)
    if not max_norm:
        return grads
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g * scale.to(g.dtype) for g in grads]


def cpg_reference(
    g_adv: Sequence[torch.Tensor], g_pres: Sequence[torch.Tensor], lam: float = 1.0, eps: float = 1e-8
) -> list[torch.Tensor]:
    """The reference code's concept-preserving gradient (`DoCo/gradient_clip.adjust_gradient`), per tensor:
    with unit vectors â = g_adv/(‖g_adv‖ + ε), p̂ = g_pres/(‖g_pres‖ + ε) (ε = 1e-8 as there) and cos = ⟨â, p̂⟩,
    g_adv − λ·cos·p̂ where cos < 0 (a unit vector along g_pres scaled by cos: not the full projection)."""
    out = []
    for a, p in zip(g_adv, g_pres):
        a_unit = a.float() / (torch.linalg.vector_norm(a.float()) + eps)
        p_unit = p.float() / (torch.linalg.vector_norm(p.float()) + eps)
        cos = (a_unit * p_unit).sum()
        corrected = a.float() - lam * cos * p_unit
        out.append(torch.where(cos < 0, corrected, a.float()).to(a.dtype))
    return out


def cpg_projection(
    g_adv: Sequence[torch.Tensor], g_pres: Sequence[torch.Tensor], eps: float = 1e-12
) -> list[torch.Tensor]:
    """Textbook PCGrad, per tensor: where ⟨g_adv, g_pres⟩ < 0, g_adv − (⟨g_adv, g_pres⟩ / ‖g_pres‖²) g_pres, so
    the result is orthogonal to g_pres; unchanged otherwise."""
    out = []
    for a, p in zip(g_adv, g_pres):
        dot = (a.float() * p.float()).sum()
        corrected = a.float() - dot / (p.float().pow(2).sum() + eps) * p.float()
        out.append(torch.where(dot < 0, corrected, a.float()).to(a.dtype))
    return out


class PatchDiscriminator(nn.Module):
    """The reference's PatchGAN on x̂0: conv 4×4 stride 2 to 64 channels (no norm), then 128, 256, 512 with
    BatchNorm, LeakyReLU 0.2 after each, and a final 4×4 conv (stride 1, padding 1) to one logit per patch.

    The number of stride-2 blocks adapts to the input: as many as the reference's four while the map stays at
    least 2×2 before the final conv, so a 64×64 SD latent gets the reference's four (a 3×3 logit map) and an
    8×8 digits image two (one logit covering the whole image).

    Args:
        channels: input channels (4 for SD latents, 1 for the digits world's pixels).
        size: the input's smaller side.
    """

    def __init__(self, channels: int, size: int):
        super().__init__()
        if size < 4:
            raise ConfigError(f"the PatchGAN discriminator needs inputs of at least 4x4, got {size}x{size}")
        blocks = max(1, min(4, int(math.log2(size)) - 1))
        widths = [64, 128, 256, 512][:blocks]
        layers: list[nn.Module] = []
        previous = channels
        for i, width in enumerate(widths):
            layers.append(nn.Conv2d(previous, width, 4, stride=2, padding=1))
            if i > 0:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.LeakyReLU(0.2))
            previous = width
        layers.append(nn.Conv2d(previous, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
