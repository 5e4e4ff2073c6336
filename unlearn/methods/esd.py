"""ESD: Erasing Concepts from Diffusion Models (Gandikota, Materzyńska, Fiotto-Kaufman, Bau; ICCV 2023)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import UnlearnData
from ..errors import ConfigError
from ..models.base import Model
from ..train import data_parallel, shard, train_steps
from .base import Method, hyperparameter


@dataclass
class ESD(Method):
    """ESD: fine-tune the model so that conditioning on the concept steers *away* from it (negative guidance).

    1. Keep a frozen copy θ* of the UNet (the teacher).
    2. Every step, for a batch of forget conditions c (the concept's prompts, or its class):
       a. draw a sampling step k uniformly in [0, S), S = `ddim_steps`, and run a DDIM trajectory from pure
          noise under c with guidance `start_guidance` (no gradient), by the model being trained
          (`sample_with: model`) or by θ* (`frozen`); x_t and its timestep t depend on `timestep`:
          - "bin" (the reference `train-scripts/train-esd.py`, the paper's code): the trajectory starts at the
            second DDIM timestep and stops after min(S - 1, S - k) steps (its CompVis sampler's `t_start=-1`,
            `till_T=k`), and t is drawn uniformly in [round(kT/S), round((k+1)T/S)), T the training steps.
            As in the reference, t labels x_t two to three DDIM steps noisier than it is (k = 0 and 1 give the
            finished sample).
          - "step" (the newer `esd_sd.py`): x_t is the latent before DDIM step k and t that step's timestep.
       b. e_0 = θ*(x_t, t, ∅) (or the anchor's condition with `use_anchor`), e_c = θ*(x_t, t, c);
       c. loss = MSE(θ(x_t, t, c), e_0 - η (e_c - e_0)) with η = `negative_guidance`: the edited model's
          prediction for c becomes the teacher's negatively guided one.
    3. Which weights train: `params` "xattn" (ESD-x: every `attn2` weight, for a style or an artist: erasure
       tied to the prompt) or "noxattn" (ESD-u, exactly the reference's `--train_method noxattn`: everything but
       cross-attention, the time embedding and the output norm/conv, for nudity-like concepts that must go
       whatever the prompt); "full" for class-conditional models, which have no cross-attention.

    Defaults follow `train-scripts/train-esd.py` (rohitgandikota/erasing at a2189e9, the "older version" its
    README points to: the CompVis code of the ICCV 2023 paper): lr 1e-5, 1000 iterations, 50 DDIM steps, start
    guidance 3, negative guidance 1, batch 1, x_t from the model being trained, t drawn in the step's bin. The
    newer diffusers script `esd_sd.py` (2024) samples with the frozen model at the step's own timestep and has
    other defaults (200 iterations, lr 5e-5, negative guidance 2): `sample_with: frozen, timestep: step` gives
    its sampling. Its `esd-u` set (every Linear / Conv2d outside `attn2`: norms frozen, time embedding and
    `conv_out` trained) is not offered; `noxattn` is the paper code's. The digits recipes use larger batches
    and fewer steps.

    Several processes (`multi_process`): the edited UNet trains under DDP, the frozen θ* is each process's own
    unwrapped copy (one UNet; the text encoder is shared). Every process draws each step's prompts, k, t and
    the trajectory's starting noise for the whole batch alike, then samples, scores and trains its share of it
    (`unlearn.train.shard`), so the run is the one-process run.
    """

    families = ("diffusion",)
    multi_process = True
    shards_model = True  # FSDP: `train_steps` shards the trained UNet
    needs_images = False  # prompts alone: a ConceptPrompts is a whole task
    text_params = ("xattn", "kv", "noxattn", "all_but_xattn")
    steps: int = hyperparameter(1000, "optimizer steps")
    lr: float = hyperparameter(1e-5, "Adam learning rate")
    batch_size: int = hyperparameter(1, "forget conditions per step")
    params: str | list = hyperparameter(
        "xattn",
        "weights that train: xattn (ESD-x), noxattn (ESD-u, the reference's set), all_but_xattn, full, kv, or a "
        "list of name globs",
    )
    negative_guidance: float = hyperparameter(1.0, "η: how far the target steers away from the concept")
    start_guidance: float = hyperparameter(3.0, "classifier-free guidance of the trajectory that makes x_t")
    ddim_steps: int = hyperparameter(50, "DDIM steps of that trajectory; x_t is taken at a random one")
    use_anchor: bool = hyperparameter(
        False, "steer towards the anchor's prediction instead of the unconditional one"
    )
    max_grad_norm: float | None = hyperparameter(None, "clip the gradient norm to this; None = no clipping")
    sample_with: str = hyperparameter(
        "model",
        "who draws x_t: model = the model being trained (the reference train-esd.py), frozen = the frozen "
        "original (the newer esd_sd.py)",
        choices=("model", "frozen"),
    )
    timestep: str = hyperparameter(
        "bin",
        "how x_t and t pair up: bin = the reference train-esd.py (t uniform in the k-th of S bins, x_t where its "
        "CompVis sampler stops), step = x_t before DDIM step k at that step's timestep (the newer esd_sd.py)",
        choices=("bin", "step"),
    )

    def check(self) -> None:
        if self.sample_with not in ("model", "frozen"):
            raise ConfigError(f"esd sample_with must be 'model' or 'frozen', not {self.sample_with!r}")
        if self.timestep not in ("bin", "step"):
            raise ConfigError(f"esd timestep must be 'bin' or 'step', not {self.timestep!r}")

    def noisy_point(
        self, sampler_model: Model, cond, uncond, sampler, k: int, rng: random.Random, accelerator=None
    ):
        """x_t and t for sampling step k (step 2a above), without gradient. The starting noise is drawn for the
        global batch (`cond`, `uncond`); x_t is this process's share of it (`unlearn.train.shard`)."""
        noise = torch.randn(sampler_model.latent_shape(len(cond)), device=sampler_model.device)
        noise, cond, uncond = shard(accelerator, noise, cond, uncond)
        if self.timestep == "step":  # the model's trajectory, up to the latent before step k
            x_t = sampler_model.denoise(
                noise * sampler.init_noise_sigma, cond, sampler, 0, k, self.start_guidance, uncond
            )
            return x_t, sampler.timesteps[k]
        steps, total = self.ddim_steps, sampler_model.num_train_timesteps
        stop = min(steps, steps + 1 - k)
        x_t = sampler_model.denoise(
            noise * sampler.init_noise_sigma, cond, sampler, 1, stop, self.start_guidance, uncond
        )
        low, high = round(k * total / steps), round((k + 1) * total / steps)
        return x_t, rng.randrange(low, max(high, low + 1))

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        if self.params in ("xattn", "noxattn", "all_but_xattn") and model.conditioning != "text":
            raise ConfigError(
                f"esd params {self.params!r} splits a text-to-image UNet at its cross-attention; this model is "
                f"{model.conditioning}-conditioned: use params: full"
            )
        chosen = model.train_only(self.params)
        teacher = model.frozen_copy()
        prompts = data.prompts
        pairs = list(zip(prompts.forget, prompts.anchor))
        sampler = model.sampler(self.ddim_steps)
        rng = random.Random(torch.initial_seed())  # the same stream in every process: the global batch
        net = data_parallel(model, accelerator)  # the trained UNet pass, under DDP on several processes

        def loss_fn(step: int) -> torch.Tensor:
            batch = [rng.choice(pairs) for _ in range(self.batch_size)]
            conditions = model.as_conditions(c for c, _ in batch)
            references = (
                model.as_conditions(a for _, a in batch)
                if self.use_anchor
                else model.null_conditions(len(batch))
            )
            k = rng.randrange(self.ddim_steps)
            with torch.no_grad():
                cond, uncond = model.encode(conditions), model.encode(model.null_conditions(len(batch)))
                sampler_model = model if self.sample_with == "model" else teacher
                x_t, t = self.noisy_point(sampler_model, cond, uncond, sampler, k, rng, accelerator)
                cond, references = shard(accelerator, cond, references)
                e_0 = teacher(x_t, t, teacher.encode(references))
                e_c = teacher(x_t, t, cond)
                target = e_0 - self.negative_guidance * (e_c - e_0)
            return F.mse_loss(net(x_t, t, cond).float(), target.float())

        optimizer = torch.optim.Adam(chosen.values(), lr=self.lr)
        return train_steps(
            net,
            loss_fn,
            optimizer,
            accelerator,
            self.steps,
            max_grad_norm=self.max_grad_norm,
            stage="esd",
            state={"prompts": rng},
            settings={"method": self, "data": data},
        )
