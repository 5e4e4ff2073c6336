"""The diffusion family: any diffusers pipeline with a UNet and a scheduler, behind one interface.

Two kinds of conditioning are supported:

- **text**: Stable-Diffusion-style text-to-image (`UNet2DConditionModel`, a text encoder, a tokenizer, and an
  optional VAE; without one the UNet works in pixel space). Conditions are lists of prompts; "" is the
  unconditional prompt of classifier-free guidance.
- **class**: a class-conditional `UNet2DModel` (`num_class_embeds` set). Conditions are class ids; the last
  id, `num_class_embeds - 1`, is the null class of classifier-free guidance (the convention the digits world
  trains with). An unconditional `UNet2DModel` has conditioning **none**.

Images enter and leave as float tensors in [0, 1], shape (N, C, H, W); inside, the UNet sees [-1, 1] pixels or
VAE latents. Every primitive the erasure methods need (reference/methods.md §8) lives here: `encode`,
`add_noise` and `noised` (noise a batch at random timesteps), `forward` (the noise prediction), `guided`
(classifier-free guidance), `predict_x0`, `denoise` over part of a sampling trajectory and `trajectory` (the
model's own DDIM trajectory from fresh noise), `cross_attention_maps`, `generate`, and `loss` (the ordinary
ε-MSE diffusion loss).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import (
    atomic_path,
    load_errors,
    reason_of,
    refuse_custom_code,
    refuse_nonfinite,
    saved_as,
    stored_dtypes,
)
from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError
from ..progress import progress
from ..spread import map_batches
from .base import Model

# Where attention lives in a diffusers UNet: the cross-attention projections ESD-x, UCE, DoCo and ANT's LoRA
# edit, and everything else (ESD-u).
CROSS_ATTENTION = ("*attn2.to_k.*", "*attn2.to_v.*")
# What ESD-u leaves alone besides cross-attention: the reference's `--train_method noxattn` (rohitgandikota/erasing,
# train-scripts/train-esd.py) skips CompVis names starting with `out.` or containing `time_embed`, which are these
# top-level diffusers modules (the resnets' `time_emb_proj` is CompVis `emb_layers` and does train).
NOT_ESD_U = ("time_embedding.", "conv_norm_out.", "conv_out.")
PARAMETER_SETS = {
    "full": None,
    "xattn": ("*attn2.*",),  # the reference's `--train_method xattn`: all cross-attention weights
    "kv": CROSS_ATTENTION,
    # ESD-u, the reference's `--train_method noxattn` exactly: all but cross-attention and `NOT_ESD_U`
    "noxattn": "noxattn",
    # every weight but cross-attention, time embedding and output layers included (the toolkit's noxattn
    # before it was made the reference's)
    "all_but_xattn": "all_but_xattn",
}


class Diffusion(Model):
    """A diffusion model: UNet, noise scheduler and, for text conditioning, a text encoder and tokenizer.

    Only the UNet is `trainable`; the text encoder and VAE are frozen (an erasure method edits what the UNet
    does with a concept, not how the concept is spelt). Frozen parts may be cast to half precision with
    `cast_frozen` while the UNet keeps fp32 weights for mixed-precision training.
    """

    family = "diffusion"

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        text_encoder: nn.Module | None = None,
        tokenizer=None,
        vae: nn.Module | None = None,
        pipeline_class: type | None = None,
        extra_components: dict | None = None,
    ):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.vae = vae
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.pipeline_class = pipeline_class
        self.extra_components = dict(extra_components or {})  # safety checker, feature extractor, ...
        # component -> tensor name -> dtype as loaded, and the tensors `cast_frozen` replaced: `save` writes
        # every component in the dtype it came in (mixed precision is a training setting, not a format).
        self.input_dtypes: dict[str, dict[str, torch.dtype]] = {}
        self._uncast: dict[str, dict[str, torch.Tensor]] = {}
        for frozen in (text_encoder, vae):
            if frozen is not None:
                frozen.requires_grad_(False)
                frozen.eval()
        if text_encoder is not None and tokenizer is not None:
            self.conditioning = "text"
        elif getattr(unet.config, "num_class_embeds", None):
            self.conditioning = "class"
        else:
            self.conditioning = "none"

    # -- structure -----------------------------------------------------------------------------------------

    @property
    def trainable(self) -> nn.Module:
        return self.unet

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def num_classes(self) -> int | None:
        """Class-conditional models: the number of real classes (the null class excluded)."""
        if self.conditioning != "class":
            return None
        return int(self.unet.config.num_class_embeds) - 1

    @property
    def null_class(self) -> int:
        return int(self.unet.config.num_class_embeds) - 1

    @property
    def channels(self) -> int:
        return int(self.vae.config.in_channels if self.vae is not None else self.unet.config.in_channels)

    @property
    def image_size(self) -> int:
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return int(size) * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def parameters_named(self, which: str | tuple | list = "full") -> dict[str, nn.Parameter]:
        """UNet parameters by name: a set in `PARAMETER_SETS` ("full", "xattn", "kv", "noxattn" = ESD-u,
        "all_but_xattn") or glob patterns over `unet.named_parameters()` names (e.g. `["*attn2.to_k.*",
        "*attn2.to_v.*"]`)."""
        from ..params import select

        if isinstance(which, str):
            if which not in PARAMETER_SETS:
                raise ConfigError(
                    f"unknown parameter set {which!r}; known: {', '.join(PARAMETER_SETS)}, or a list of globs"
                )
            which = PARAMETER_SETS[which]
        if which in ("noxattn", "all_but_xattn"):
            cross = select(self.unet, PARAMETER_SETS["xattn"]) if self.conditioning == "text" else {}
            skipped = NOT_ESD_U if which == "noxattn" else ()
            return {
                n: p for n, p in self.unet.named_parameters() if n not in cross and not n.startswith(skipped)
            }
        return select(self.unet, which)

    def train_only(self, which: str | tuple | list = "full") -> dict[str, nn.Parameter]:
        """Freeze the UNet except the chosen parameters; returns them."""
        chosen = self.parameters_named(which)
        for name, param in self.unet.named_parameters():
            param.requires_grad_(name in chosen)
        return chosen

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Cast the frozen text encoder and VAE (not the UNet) to `dtype`, e.g. bf16 to save memory.

        The tensors they had are kept on the CPU, so that `save` writes these parts back bit for bit in the
        dtype they came in (a reloaded pipeline must not mix bf16 parts with an fp32 UNet)."""
        for name in ("text_encoder", "vae"):
            frozen = getattr(self, name)
            if frozen is None:
                continue
            uncast = self._uncast.setdefault(name, {})
            for key, tensor in frozen.state_dict().items():
                if tensor.is_floating_point() and tensor.dtype != dtype and key not in uncast:
                    uncast[key] = tensor.detach().cpu()
            frozen.to(dtype)

    def enable_gradient_checkpointing(self) -> None:
        if not getattr(self.unet, "_supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(self.unet).__name__} does not support gradient checkpointing")
        self.unet.enable_gradient_checkpointing()

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.text_encoder, self.vae):  # frozen parts stay in eval mode (no dropout)
            if frozen is not None:
                frozen.eval()
        return self

    # -- conditions ----------------------------------------------------------------------------------------

    def encode(self, conditions) -> torch.Tensor | None:
        """The UNet's conditioning for a batch: text-encoder states for prompts, ids for classes.

        Args:
            conditions: a list of prompts (text), a sequence or tensor of class ids (class), or a count or None
                (unconditional models).
        """
        if self.conditioning == "text":
            if isinstance(conditions, str) or not all(isinstance(c, str) for c in conditions):
                raise ConfigError("a text-to-image model is conditioned on a list of prompts")
            tokens = self.tokenizer(
                list(conditions),
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            ids = tokens.input_ids.to(self.text_encoder.device)
            states = self.text_encoder(ids)[0]
            return states.to(self.unet.dtype)
        if self.conditioning == "class":
            labels = torch.as_tensor(conditions, dtype=torch.long).flatten().to(self.device)
            if len(labels) and (labels.min() < 0 or labels.max() > self.null_class):
                raise ConfigError(
                    f"class id {int(labels.max() if labels.max() > self.null_class else labels.min())} is out of "
                    f"range: this model has classes 0..{self.num_classes - 1} (and null class {self.null_class})"
                )
            return labels
        return None

    def as_conditions(self, values) -> list | torch.Tensor:
        """A batch of conditions in the container `encode` takes: class ids as a tensor, prompts as a list."""
        if self.conditioning == "class":
            return torch.tensor([int(v) for v in values], dtype=torch.long)
        return list(values)

    def null_conditions(self, n: int) -> list | torch.Tensor | None:
        """n unconditional conditions (the empty prompt, the null class), before encoding."""
        if self.conditioning == "text":
            return [""] * n
        if self.conditioning == "class":
            return torch.full((n,), self.null_class, dtype=torch.long)
        return None

    def drop_conditions(self, conditions, prob: float):
        """Replace a random share `prob` of conditions by the unconditional one (classifier-free training)."""
        if prob <= 0 or self.conditioning == "none":
            return conditions
        drop = (torch.rand(len(conditions)) < prob).tolist()
        if self.conditioning == "text":
            return ["" if d else c for c, d in zip(conditions, drop)]
        labels = torch.as_tensor(conditions, dtype=torch.long).clone()
        labels[torch.tensor(drop, dtype=torch.bool)] = self.null_class
        return labels

    # -- the diffusion process -----------------------------------------------------------------------------

    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to what the UNet denoises: [-1, 1] pixels, or scaled VAE latents."""
        x = images.to(self.device) * 2.0 - 1.0
        if self.vae is None:
            return x.to(self.unet.dtype)
        latents = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample()
        return (latents * self.vae.config.scaling_factor).to(self.unet.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_latents`: images in [0, 1]."""
        if self.vae is not None:
            latents = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def latent_shape(self, n: int) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return (n, int(self.unet.config.in_channels), int(h), int(w))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, the forward process of the training scheduler."""
        return self.scheduler.add_noise(x0, noise, t.to(x0.device))

    def forward(self, x_t: torch.Tensor, t, cond) -> torch.Tensor:
        """The UNet's noise prediction ε(x_t, t, c) for encoded conditions `cond` (see `encode`)."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(len(x_t))
        if self.conditioning == "text":
            return self.unet(x_t, t, encoder_hidden_states=cond).sample
        if self.conditioning == "class":
            return self.unet(x_t, t, class_labels=cond).sample
        return self.unet(x_t, t).sample

    def guided(self, x_t: torch.Tensor, t, cond, uncond, guidance: float) -> torch.Tensor:
        """Classifier-free guidance: ε_u + w (ε_c - ε_u), one UNet call over both halves."""
        if guidance == 1.0 or uncond is None:
            return self.forward(x_t, t, cond)
        t = torch.as_tensor(t, device=x_t.device)
        t = torch.cat([t, t]) if t.ndim else t
        both = self.forward(torch.cat([x_t, x_t]), t, torch.cat([uncond, cond]))
        eps_uncond, eps_cond = both.chunk(2)
        return eps_uncond + guidance * (eps_cond - eps_uncond)

    def predict_x0(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t): the clean image a noise prediction implies."""
        alphas = self.scheduler.alphas_cumprod.to(x_t.device)[torch.as_tensor(t, device=x_t.device)]
        alphas = alphas.reshape(-1, *[1] * (x_t.ndim - 1)).to(x_t.dtype)
        return (x_t - (1 - alphas).sqrt() * eps) / alphas.sqrt()

    def sample_timesteps(self, n: int) -> torch.Tensor:
        """n timesteps drawn uniformly from the training schedule."""
        return torch.randint(0, self.num_train_timesteps, (n,), device=self.device)

    def noised(
        self, x0: torch.Tensor, t: torch.Tensor | None = None, antithetic: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Noise a batch: draw ε ~ N(0, I), then (unless `t` is given) timesteps t, in that order, and return
        `(x_t, ε, t)` with x_t = `add_noise(x0, ε, t)`.

        Timesteps are uniform and independent; with `antithetic`, n // 2 + 1 uniform draws t are each paired with
        T - 1 - t (the first n of the two halves), the antithetic sampling of the DDPM code SalUn builds on
        (`DDPM/runners/diffusion.py`: `t = cat([t, T - t - 1])[:n]`).
        """
        noise = torch.randn_like(x0)
        if t is None and antithetic:
            half = torch.randint(0, self.num_train_timesteps, (len(x0) // 2 + 1,), device=self.device)
            t = torch.cat([half, self.num_train_timesteps - 1 - half])[: len(x0)]
        elif t is None:
            t = self.sample_timesteps(len(x0))
        return self.add_noise(x0, noise, t), noise, t

    def loss(self, batch, uncond_prob: float = 0.0) -> torch.Tensor:
        """The ordinary diffusion loss: MSE between the noise and its prediction, at uniform timesteps.

        Args:
            batch: `(images, conditions)` with images in [0, 1]; conditions as `encode` takes them.
            uncond_prob: share of conditions replaced by the unconditional one (classifier-free training).
        """
        images, conditions = batch[0], batch[1] if len(batch) > 1 else None
        x0 = self.to_latents(images)
        if conditions is not None:
            conditions = self.drop_conditions(conditions, uncond_prob)
        cond = self.encode(conditions)
        x_t, noise, t = self.noised(x0)
        return F.mse_loss(self.forward(x_t, t, cond).float(), noise.float())

    def sampler(self, steps: int):
        """A DDIM scheduler (η = 0, deterministic) over `steps` of the training schedule."""
        from diffusers import DDIMScheduler

        sampler = DDIMScheduler.from_config(self.scheduler.config)
        sampler.set_timesteps(steps, device=self.device)
        return sampler

    def denoise(
        self,
        latents: torch.Tensor,
        cond,
        sampler,
        start: int = 0,
        stop: int | None = None,
        guidance: float = 1.0,
        uncond=None,
    ) -> torch.Tensor:
        """Run sampling steps `start..stop` of `sampler.timesteps` from `latents` (partial trajectories:
        ESD, ANT and DoCo train on the model's own intermediate samples). Gradients flow unless the caller
        disables them."""
        for t in sampler.timesteps[start:stop]:
            eps = self.guided(latents, t, cond, uncond, guidance)
            latents = sampler.step(eps, t, latents).prev_sample
        return latents

    def trajectory(
        self, cond, sampler, stops: list[int], guidance: float = 1.0, uncond=None
    ) -> list[torch.Tensor]:
        """The model's own DDIM trajectory under `cond` from fresh noise (drawn here), returned at the sampling
        indices `stops` (ascending; index k is the latent before step k, at timestep `sampler.timesteps[k]`).
        ESD and ANT train on these points. Gradients flow unless the caller disables them."""
        latents = torch.randn(self.latent_shape(len(cond)), device=self.device) * sampler.init_noise_sigma
        points, start = [], 0
        for stop in stops:
            latents = self.denoise(latents, cond, sampler, start, stop, guidance, uncond)
            points.append(latents)
            start = stop
        return points

    @contextlib.contextmanager
    def cross_attention_maps(self):
        """Record the cross-attention maps softmax(QKᵀ/√d) of every `attn2` layer during the UNet calls inside
        the block; yields {layer name: [maps (batch, heads, pixels, tokens), one per call]}.

        Inside the block these layers run diffusers' plain `AttnProcessor`, which materialises the maps (their
        outputs equal the fused kernel's up to float rounding); the processors are restored on exit.
        """
        from diffusers.models.attention_processor import AttnProcessor

        layers = {
            n: m for n, m in self.unet.named_modules() if n.endswith("attn2") and hasattr(m, "processor")
        }
        if not layers:
            raise ConfigError("this UNet has no cross-attention (attn2) layers whose maps could be recorded")
        maps = {name: [] for name in layers}
        processors = {name: layer.processor for name, layer in layers.items()}

        def recording(name, layer):
            scores = layer.get_attention_scores

            def record(query, key, attention_mask=None):
                probs = scores(query, key, attention_mask)
                maps[name].append(probs.unflatten(0, (-1, layer.heads)))
                return probs

            return record

        try:
            for name, layer in layers.items():
                layer.set_processor(AttnProcessor())
                layer.get_attention_scores = recording(name, layer)  # shadows the method for this instance
            yield maps
        finally:
            for name, layer in layers.items():
                vars(layer).pop("get_attention_scores", None)
                layer.set_processor(processors[name])

    @torch.no_grad()
    def generate(
        self,
        conditions=None,
        n: int | None = None,
        steps: int = 25,
        guidance: float = 3.0,
        seed: int = 0,
        batch_size: int = 256,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Sample images in [0, 1] with DDIM and classifier-free guidance.

        Args:
            conditions: one condition per image (prompts or class ids); None for unconditional models.
            n: number of images of an unconditional model.
            steps: DDIM steps.
            guidance: classifier-free guidance scale (1 = plain conditional sampling).
            seed: the initial noise of image i depends only on (seed, i), so the same seed gives the same
                starting noise before and after unlearning (sample grids compare like with like).
            batch_size: images per UNet batch. Inside `unlearn.spread.spread_over`, the batches are spread over
                the processes of a launch (each process returns all the images).
            dtype: the text encoder, UNet and VAE run under autocast to it (bf16 on a GPU: about twice the
                images per second); None: in their weights' dtype. The images come back as fp32.
        """
        if conditions is None:
            if n is None:
                raise ConfigError("generate needs conditions, or n for an unconditional model")
            conditions = [None] * n
        total = len(conditions)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(self.latent_shape(total), generator=generator)
        was_training = self.training
        self.eval()
        bar = progress(desc="generating", total=total, unit="img")

        def batch(items: slice) -> torch.Tensor:
            chunk = conditions[items]
            latents = noise[items].to(self.device, self.unet.dtype)
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                cond = self.encode(chunk) if self.conditioning != "none" else None
                uncond = (
                    self.encode(self.null_conditions(len(chunk))) if self.conditioning != "none" else None
                )
                sampler = self.sampler(steps)
                latents = latents * sampler.init_noise_sigma
                latents = self.denoise(latents, cond, sampler, guidance=guidance, uncond=uncond)
                images = self.decode(latents)
            bar.update(len(chunk))
            return images.float().cpu()

        images = map_batches(total, batch_size, batch)  # spread over the processes in scoring
        bar.close()
        self.train(was_training)
        return torch.cat(images)

    # -- Model -----------------------------------------------------------------------------------------------

    def frozen_copy(self) -> Diffusion:
        """A frozen copy of the UNet sharing the (already frozen) text encoder, tokenizer and VAE: the teacher
        costs one UNet of memory, not a second pipeline."""
        unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        twin = Diffusion(
            unet,
            self.scheduler,
            self.text_encoder,
            self.tokenizer,
            self.vae,
            self.pipeline_class,
            self.extra_components,
        )
        return twin.eval()

    def reinitialize(self) -> None:
        """Fresh UNet weights (the text encoder and VAE are kept: Retrain retrains what unlearning edits)."""
        for module in self.unet.modules():
            if hasattr(module, "reset_parameters") and module is not self.unet:
                module.reset_parameters()

    def components(self) -> dict:
        """The pipeline's components, as `DiffusionPipeline(**components)` takes them."""
        parts = {"unet": self.unet, "scheduler": self.scheduler, **self.extra_components}
        if self.conditioning == "text" or self.text_encoder is not None:
            parts.update(text_encoder=self.text_encoder, tokenizer=self.tokenizer, vae=self.vae)
        elif self.vae is not None:
            parts["vae"] = self.vae
        return parts

    @classmethod
    def from_pipeline(cls, pipeline) -> Diffusion:
        """Wrap a diffusers pipeline held in memory (built from configs, or loaded and changed by the user).

        The adapter shares the pipeline's modules (no copy): a method that edits the UNet in place edits the
        pipeline's. Components beyond the UNet, scheduler, text encoder, tokenizer and VAE (a safety checker, a
        feature extractor, or None for them) are kept and saved as they are."""
        parts = dict(getattr(pipeline, "components", None) or {})
        unet, scheduler = parts.pop("unet", None), parts.pop("scheduler", None)
        if not isinstance(unet, nn.Module) or scheduler is None:
            raise ConfigError(
                f"a {type(pipeline).__name__} needs a UNet and a scheduler to be erased from; it has "
                f"{sorted(k for k, v in dict(getattr(pipeline, 'components', {}) or {}).items() if v is not None)}"
            )
        text_encoder, tokenizer = parts.pop("text_encoder", None), parts.pop("tokenizer", None)
        vae = parts.pop("vae", None)
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        model = cls(unet, scheduler, text_encoder, tokenizer, vae, type(pipeline), parts)
        model.source = {"path": f"<in-memory {type(pipeline).__name__}>"}
        return model

    def save(self, path: str | Path) -> None:
        """Write a diffusers pipeline folder (loads with `DiffusionPipeline.from_pretrained`), atomically.

        Optional components the pipeline class requires and this model lacks (Stable Diffusion's
        `safety_checker` and `feature_extractor` of a pipeline built in memory) are saved as None, as
        diffusers itself saves a pipeline built with `safety_checker=None`."""
        pipeline_class = _pipeline_class(self)
        components = {**_absent_optionals(pipeline_class, self.components()), **self.components()}
        pipeline = pipeline_class(**components)
        with atomic_path(Path(path)) as tmp, contextlib.ExitStack() as stack:
            for name, module in self.components().items():  # each component in the dtype it came in
                if isinstance(module, nn.Module) and name in self.input_dtypes:
                    stack.enter_context(saved_as(module, self.input_dtypes[name], self._uncast.get(name)))
            pipeline.save_pretrained(str(tmp), safe_serialization=True)


def _absent_optionals(pipeline_class: type, components: dict) -> dict:
    """None for each optional component `pipeline_class.__init__` requires that `components` lacks; with no
    safety checker, `requires_safety_checker=False` (diffusers would otherwise refuse, or warn at length)."""
    import inspect

    optional = set(getattr(pipeline_class, "_optional_components", ()) or ())
    params = inspect.signature(pipeline_class.__init__).parameters
    absent = {name: None for name in params if name in optional and name not in components}
    checker = components.get("safety_checker", absent.get("safety_checker", "none required"))
    if "requires_safety_checker" in params and checker is None:
        absent["requires_safety_checker"] = False
    return absent


def _pipeline_class(model: Diffusion) -> type:
    if model.pipeline_class is not None:
        return model.pipeline_class
    from diffusers import DDPMPipeline, StableDiffusionPipeline

    return StableDiffusionPipeline if model.conditioning == "text" else DDPMPipeline


def load_diffusion(path: str | Path) -> Diffusion:
    """Load a diffusers pipeline folder (or, with network access, a hub id) that has a UNet and a scheduler.

    Never executes pickled code: diffusers reads safetensors, or `.bin` weights with `weights_only` loading.
    Never runs code shipped with the pipeline: a hub id is downloaded first, and a folder naming custom code
    is refused before anything loads (`refuse_custom_code`).
    """
    from diffusers import DiffusionPipeline

    local = Path(path).expanduser()
    is_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) is not None and not local.exists()
    if not local.exists() and not is_hub_id:
        raise CheckpointNotFoundError(f"diffusion checkpoint {str(path)!r} does not exist")
    if not local.exists():  # a hub id: fetch the files (no code runs), then check them like a local folder
        try:
            local = Path(DiffusionPipeline.download(str(path), trust_remote_code=False))
        except (OSError, ValueError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"cannot download the diffusers pipeline {str(path)!r}: {reason}") from err
    if not (local / "model_index.json").exists():
        raise CheckpointError(
            f"{str(path)!r} is not a diffusers pipeline folder (it has no model_index.json)"
        )
    refuse_custom_code(local)
    # A component saved as null (a text-to-image model in pixel space has no VAE) is passed as None: diffusers
    # refuses to load a null component that its pipeline class does not list as optional.
    index = json.loads((local / "model_index.json").read_text())
    nulls = {name: None for name, value in index.items() if value == [None, None]}
    if "safety_checker" in nulls and index.get("requires_safety_checker"):
        # there is no safety checker to require; diffusers would warn at length on every load
        nulls["requires_safety_checker"] = False
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # loading bars would bury a one-line error; the run log says more
    transformers_logging.disable_progress_bar()
    try:
        pipeline = DiffusionPipeline.from_pretrained(str(local), trust_remote_code=False, **nulls)
    except load_errors() as err:  # a mistyped config, weights of other shapes, a corrupt file
        raise CheckpointError(
            f"cannot load the diffusers pipeline {str(path)!r}: {reason_of(err)}; check its config files and "
            "weights (re-save it with save_pretrained)"
        ) from err
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
    pipeline.set_progress_bar_config(disable=True)
    parts = dict(pipeline.components)
    unet, scheduler = parts.pop("unet", None), parts.pop("scheduler", None)
    if unet is None or scheduler is None:
        raise CheckpointError(f"pipeline {str(path)!r} needs a UNet and a scheduler; it has {sorted(parts)}")
    text_encoder, tokenizer, vae = (
        parts.pop("text_encoder", None),
        parts.pop("tokenizer", None),
        parts.pop("vae", None),
    )
    _check_unet_config(unet, scheduler, local)
    for name, module in (("unet", unet), ("text_encoder", text_encoder), ("vae", vae)):
        if isinstance(module, nn.Module):
            refuse_nonfinite(module, f"{path}/{name}")
    model = Diffusion(unet, scheduler, text_encoder, tokenizer, vae, type(pipeline), parts)
    model.source = {"path": str(path)}
    model.input_dtypes = {  # as the files hold them (diffusers loads its own models in fp32 by default)
        name: stored_dtypes(module, local / name)
        for name, module in model.components().items()
        if isinstance(module, nn.Module)
    }
    return model


def _check_unet_config(unet, scheduler, folder: Path) -> None:
    """Refuse, at load, the UNet and scheduler config values the toolkit computes with when diffusers took them
    without a check (a sample_size "x" would fail only when the first noise is drawn)."""

    def positive(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    config = unet.config
    size = getattr(config, "sample_size", None)
    sizes = list(size) if isinstance(size, (list, tuple)) else [size]
    problems = {
        "unet/config.json: sample_size": (size, len(sizes) in (1, 2) and all(positive(v) for v in sizes)),
        "unet/config.json: in_channels": (
            getattr(config, "in_channels", None),
            positive(getattr(config, "in_channels", None)),
        ),
        "unet/config.json: num_class_embeds": (
            getattr(config, "num_class_embeds", None),
            getattr(config, "num_class_embeds", None) is None or positive(config.num_class_embeds),
        ),
        "scheduler/scheduler_config.json: num_train_timesteps": (
            getattr(scheduler.config, "num_train_timesteps", None),
            positive(getattr(scheduler.config, "num_train_timesteps", None)),
        ),
    }
    for name, (value, ok) in problems.items():
        if not ok:
            raise CheckpointError(
                f"diffusers pipeline {str(folder)!r}: {name} must be a positive integer, got {value!r}; fix the "
                "config or re-save the pipeline"
            )
