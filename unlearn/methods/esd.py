"""ESD: Erasing Concepts from Diffusion Models (Gandikota, Materzyńska, Fiotto-Kaufman, Bau; ICCV 2023)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import UnlearnData
from ..errors import ConfigError
from ..models.base import Model
from ..train import train_steps
from .base import Method, hyperparameter


@dataclass
class ESD(Method):
    """ESD: fine-tune the model so that conditioning on the concept steers *away* from it (negative guidance).

    1. Keep a frozen copy θ* of the UNet (the teacher).
    2. Every step, for a batch of forget conditions c (the concept's prompts, or its class):
       a. draw a sampling step k uniformly in [0, `ddim_steps`) and run the *current* model's DDIM trajectory
          from pure noise under c with guidance `start_guidance` for k steps (no gradient): x_t, t = the
          trajectory's timestep at step k (the reference draws t within that step's bin; we take its start);
       b. e_0 = θ*(x_t, t, ∅) (or the anchor's condition with `use_anchor`), e_c = θ*(x_t, t, c);
       c. loss = MSE(θ(x_t, t, c), e_0 - η (e_c - e_0)) with η = `negative_guidance`: the edited model's
          prediction for c becomes the teacher's negatively guided one.
    3. Which weights train: `params` "xattn" (ESD-x: cross-attention, for a style or an artist: erasure tied to
       the prompt) or "noxattn" (ESD-u: everything else, for nudity-like concepts that must go whatever the
       prompt); "full" for class-conditional models, which have no cross-attention.

    Defaults follow the reference's `train-scripts/train-esd.py` (lr 1e-5, 1000 iterations, 50 DDIM steps,
    start guidance 3, negative guidance 1, batch 1); the digits recipes use larger batches and fewer steps.
    """

    families = ("diffusion",)
    steps: int = hyperparameter(1000, "optimizer steps")
    lr: float = hyperparameter(1e-5, "Adam learning rate")
    batch_size: int = hyperparameter(1, "forget conditions per step")
    params: str | list = hyperparameter(
        "xattn", "weights that train: xattn (ESD-x), noxattn (ESD-u), full, kv, or a list of name globs"
    )
    negative_guidance: float = hyperparameter(1.0, "η: how far the target steers away from the concept")
    start_guidance: float = hyperparameter(3.0, "classifier-free guidance of the trajectory that makes x_t")
    ddim_steps: int = hyperparameter(50, "DDIM steps of that trajectory; x_t is taken at a random one")
    use_anchor: bool = hyperparameter(
        False, "steer towards the anchor's prediction instead of the unconditional one"
    )
    max_grad_norm: float | None = hyperparameter(None, "clip the gradient norm to this; None = no clipping")

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        if self.params in ("xattn", "noxattn") and model.conditioning != "text":
            raise ConfigError(
                f"esd params {self.params!r} splits a text-to-image UNet at its cross-attention; this model is "
                f"{model.conditioning}-conditioned: use params: full"
            )
        chosen = model.train_only(self.params)
        teacher = model.frozen_copy()
        prompts = data.prompts
        pairs = list(zip(prompts.forget, prompts.anchor))
        sampler = model.sampler(self.ddim_steps)
        rng = random.Random(torch.initial_seed())

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
                (x_t,) = model.trajectory(cond, sampler, [k], self.start_guidance, uncond)
                t = sampler.timesteps[k]
                e_0 = teacher(x_t, t, teacher.encode(references))
                e_c = teacher(x_t, t, cond)
                target = e_0 - self.negative_guidance * (e_c - e_0)
            return F.mse_loss(model(x_t, t, cond).float(), target.float())

        optimizer = torch.optim.Adam(chosen.values(), lr=self.lr)
        return train_steps(
            model,
            loss_fn,
            optimizer,
            accelerator,
            self.steps,
            max_grad_norm=self.max_grad_norm,
            stage="esd",
            state={"prompts": rng},
            settings={"method": self, "data": data},
        )
