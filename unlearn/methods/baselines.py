"""The standard baselines of the Sparse / SalUn classification code: Retrain, FT, GA, RL.

Defaults here suit the digits world (seconds on a CPU); the CIFAR-10 recipes carry the reference settings
(`reference/methods.md` §1.5, §2.4): Retrain 182 epochs at lr 0.1 (cosine), FT 10 epochs at lr 0.01,
GA 5 epochs at lr 1e-4, RL 10 epochs at lr 0.013, SGD with momentum 0.9 and weight decay 5e-4, batch 256.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import UnlearnData
from ..errors import ConfigError
from ..models.base import Model
from ..train import (
    Phase,
    data_parallel,
    diffusion_loss,
    endless,
    fit,
    make_loader,
    make_optimizer,
    train_diffusion,
    train_steps,
)
from .base import Method, hyperparameter


def cross_entropy(model, batch) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


@dataclass
class _Trained(Method):
    """Shared hyperparameters of the SGD-trained classifier baselines."""

    epochs: int = hyperparameter(10, "passes over the training set (reference FT 10)")
    lr: float = hyperparameter(0.01, "learning rate (reference FT 0.01)")
    batch_size: int = hyperparameter(64, "examples per batch (reference 256)")
    optimizer: str = hyperparameter("sgd", "sgd (the reference's), adam or adamw")
    momentum: float = hyperparameter(0.9, "SGD momentum (reference 0.9)")
    weight_decay: float = hyperparameter(5e-4, "L2 weight decay of the optimizer (reference 5e-4)")
    lr_schedule: str = hyperparameter("constant", "constant, cosine or linear decay over all steps")
    max_grad_norm: float | None = hyperparameter(None, "clip the gradient to this L2 norm; null: no clipping")
    augment: str = hyperparameter(
        "none", "batch augmentation: none, or crop_flip (CIFAR's random crop and flip)"
    )

    def _fit(
        self, model: Model, phases: list[Phase], accelerator, stage: str, mask=None, after_step=None
    ) -> Model:
        optimizer = make_optimizer(
            model.parameters(), self.optimizer, self.lr, self.momentum, self.weight_decay
        )
        return fit(
            model,
            phases,
            optimizer,
            accelerator,
            self.epochs,
            lr_schedule=self.lr_schedule,
            mask=mask,
            max_grad_norm=self.max_grad_norm,
            augment=self.augment,
            stage=stage,
            after_step=after_step,
            settings={"method": self},
        )


@dataclass
class Retrain(_Trained):
    """Retrain: train from scratch on the retain set only. The gold standard every method is measured against.

    1. Draw fresh weights.
    2. Train with cross-entropy on D_r for `epochs` epochs.
    """

    families = ("classifier",)
    epochs: int = hyperparameter(30, "epochs of training from scratch on the retain set (reference 182)")
    lr: float = hyperparameter(0.05, "peak learning rate (reference 0.1)")
    lr_schedule: str = hyperparameter(
        "cosine", "cosine (the reference's), constant or linear decay over all steps"
    )

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        model.reinitialize()
        retain = make_loader(data.retain, self.batch_size)
        return self._fit(model, [Phase(retain, cross_entropy, "retain")], accelerator, "retrain")


@dataclass
class FineTune(_Trained):
    """Fine-tuning (FT): continue training on the retain set, letting catastrophic forgetting erase D_f.

    1. Train with cross-entropy on D_r for `epochs` epochs at a small learning rate.
    """

    families = ("classifier",)

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        retain = make_loader(data.retain, self.batch_size)
        return self._fit(model, [Phase(retain, cross_entropy, "retain")], accelerator, "finetune")


@dataclass
class GradAscent(_Trained):
    """Gradient ascent (GA): maximise the cross-entropy on the forget set.

    1. For `epochs` epochs, step along +grad of CE on D_f (minimise -CE). Nothing holds the rest in place,
       so epochs and lr must stay small.
    """

    families = ("classifier",)
    epochs: int = hyperparameter(5, "passes of gradient ascent over the forget set (reference 5)")
    lr: float = hyperparameter(
        1e-3, "learning rate; keep it small, nothing bounds the ascent (reference 1e-4)"
    )

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        forget = make_loader(data.forget, self.batch_size)

        def ascent(model, batch):
            return -cross_entropy(model, batch)

        return self._fit(model, [Phase(forget, ascent, "forget")], accelerator, "grad_ascent")


@dataclass
class RandomLabel(_Trained):
    """Random labeling (RL): train on the forget set with random labels, then on the retain set.

    As in the reference code (`Classification/unlearn/RL.py`), each epoch makes:
    1. one pass over all forget batches, each example labelled with a fresh uniformly random class;
    2. one pass over all retain batches with their true labels.
    With `mixed: true` (the reference's CIFAR-100 branch) forget and retain examples share one shuffled loader.
    With `exclude_true_label: true` the random label always differs from the true one (the paper's y' != y;
    the reference code may draw the true label).
    """

    families = ("classifier",)
    epochs: int = hyperparameter(
        10, "epochs; one epoch = a random-label pass over the forget set, then a pass over the retain set"
    )
    lr: float = hyperparameter(0.01, "learning rate (reference 0.013)")
    mixed: bool = hyperparameter(
        False, "one shuffled loader for forget and retain examples (the reference's CIFAR-100 branch)"
    )
    exclude_true_label: bool = hyperparameter(
        False, "draw random labels different from the true one (the paper's y' != y; the reference may not)"
    )

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        return self._fit(model, self.phases(data), accelerator, "random_label")

    def phases(self, data: UnlearnData) -> list[Phase]:
        """One epoch of RL: the forget pass with random labels and the retain pass (or one mixed pass)."""
        num_classes = data.num_classes

        def random_labels(labels: torch.Tensor) -> torch.Tensor:
            if not self.exclude_true_label:
                return torch.randint(0, num_classes, labels.shape, device=labels.device)
            shift = torch.randint(1, num_classes, labels.shape, device=labels.device)
            return (labels + shift) % num_classes

        def forget_loss(model, batch):
            images, labels = batch
            return F.cross_entropy(model(images), random_labels(labels))

        if not self.mixed:
            return [
                Phase(make_loader(data.forget, self.batch_size), forget_loss, "forget"),
                Phase(make_loader(data.retain, self.batch_size), cross_entropy, "retain"),
            ]
        both = torch.utils.data.ConcatDataset([_Flagged(data.forget, True), _Flagged(data.retain, False)])

        def mixed_loss(model, batch):
            images, labels, is_forget = batch
            labels = torch.where(is_forget, random_labels(labels), labels)
            return F.cross_entropy(model(images), labels)

        return [Phase(make_loader(both, self.batch_size), mixed_loss, "mixed")]


class _Flagged(torch.utils.data.Dataset):
    """Adds a forget flag to each example of a dataset."""

    def __init__(self, dataset, flag: bool):
        self.dataset, self.flag = dataset, flag

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, label, torch.tensor(self.flag)


# -- diffusion models --------------------------------------------------------------------------------------


@dataclass
class RetrainDiffusion(Method):
    """Retrain for diffusion models: the UNet trained from scratch on the retain set only.

    1. Draw fresh UNet weights (the text encoder and VAE are kept: they are what the concept is *spelt* with,
       and no method edits them).
    2. Train with the ordinary diffusion loss on D_r for `steps` steps with the loop that trains the digits
       world (`unlearn.train.train_diffusion`: AdamW, `warmup_steps` of linear warmup then cosine decay,
       gradients clipped at norm 1, the condition dropped with probability `uncond_prob` for classifier-free
       guidance), seeded by the run's seed; under the run's mixed precision and gradient accumulation; on
       several processes with the one-process result for the same global batch (`multi_process`: DDP, the
       global batch drawn alike and sharded).

    The defaults are the digits DDPM world's training recipe, so Retrain is the original minus the class.
    """

    families = ("diffusion",)
    multi_process = True
    steps: int = hyperparameter(1500, "optimizer steps of training from scratch (the digits DDPM world's)")
    lr: float = hyperparameter(2e-3, "AdamW peak learning rate (the digits DDPM world's)")
    batch_size: int = hyperparameter(128, "retain images per step")
    uncond_prob: float = hyperparameter(
        0.1,
        "probability of dropping the condition, for classifier-free guidance (0.1 = the world's)",
        ge=0,
        le=1,
    )
    warmup_steps: int = hyperparameter(
        100, "steps of linear learning-rate warm-up before the cosine decay", ge=0
    )

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        model.reinitialize()
        model.train_only("full")
        seed = torch.initial_seed() % 2**63
        train_diffusion(
            model,
            data.retain,
            self.steps,
            self.batch_size,
            self.lr,
            self.uncond_prob,
            seed,
            log=accelerator.print,
            warmup_steps=self.warmup_steps,
            accelerator=accelerator,
            stage="retrain",
        )
        return model


@dataclass
class GradAscentDiffusion(Method):
    """Gradient ascent for diffusion models: maximise the diffusion loss on the concept's examples.

    1. For `steps` steps: loss = -MSE(ε, ε_θ(x_t | c_f)) on a forget batch, plus `retain_weight` times the
       ordinary diffusion loss on a retain batch (0 = plain GA; the SalUn DDPM code's `--method ga` adds the
       retain term the same way, weighted by its `--alpha`). Unbounded: steps and lr must stay small.

    Departures from that code (`DDPM/runners/diffusion.py`, `functions/losses.py`; tests/test_fidelity_rest.py
    checks the loss against it up to the scale): both losses are means over every element, where the reference
    sums over each image's pixels and averages over the batch, so its loss is C·H·W times ours (the ratio of the
    two terms is the same; the scale matters only through Adam's ε and the clip at norm 1); the condition is
    never dropped (the reference's forward drops it with probability 0.1); timesteps are uniform (the
    reference's are antithetic); and `retain_weight` defaults to 0, plain gradient ascent as the baseline the
    papers compare against (the reference's `--alpha` defaults to 1).

    Several processes (`multi_process`): the UNet trains under DDP on each process's share of the global batches,
    drawn alike in every process (`unlearn.train.diffusion_loss`), so the run is the one-process run. Under FSDP
    (`shards_model`) `train_steps` shards the UNet in place and every process computes the whole batch: the
    gradients are equal, the memory is split, the work is not.
    """

    families = ("diffusion",)
    multi_process = True
    shards_model = True  # FSDP: `train_steps` shards the trained UNet
    steps: int = hyperparameter(100, "optimizer steps of ascent, each on one forget (and one retain) batch")
    lr: float = hyperparameter(1e-5, "Adam learning rate; keep it small, nothing bounds the ascent")
    batch_size: int = hyperparameter(64, "images per forget batch and per retain batch")
    retain_weight: float = hyperparameter(
        0.0,
        "weight of the retain set's ordinary diffusion loss; 0 = plain gradient ascent (the reference's --alpha)",
    )
    params: str | list = hyperparameter(
        "full", "UNet weights that may move: full, xattn, kv, noxattn, or a list of parameter-name globs"
    )
    max_grad_norm: float | None = hyperparameter(1.0, "clip the gradient to this L2 norm; null: no clipping")

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        chosen = model.train_only(self.params)
        forget, retain = endless(data.forget, self.batch_size), endless(data.retain, self.batch_size)
        optimizer = torch.optim.Adam(chosen.values(), lr=self.lr)
        net = data_parallel(model, accelerator)  # the UNet's trained passes, under DDP on several processes

        def loss_fn(step: int) -> torch.Tensor:
            loss = -diffusion_loss(model, next(forget), net=net, accelerator=accelerator)
            if not self.retain_weight:
                return loss
            return loss + self.retain_weight * diffusion_loss(
                model, next(retain), net=net, accelerator=accelerator
            )

        return train_steps(
            net,
            loss_fn,
            optimizer,
            accelerator,
            self.steps,
            max_grad_norm=self.max_grad_norm,
            stage="grad_ascent",
            state={"forget": forget, "retain": retain},
            settings={"method": self, "data": data},
        )


# -- GANs ------------------------------------------------------------------------------------------------


@dataclass
class RetrainGAN(Method):
    """Retrain for GANs: generator and discriminator trained from scratch on the retained classes' real images.

    1. Draw fresh weights for both networks.
    2. Train them with the digits GAN world's own loop (`unlearn.worlds.digits_gan.train_gan`: logistic
       discriminator loss with lazy R1, non-saturating generator loss, Adam betas (0.5, 0.99), the generator
       ending as its exponential moving average) on the real images of every class but the erased one, seeded
       by the run's seed. fp32 (whatever `train.mixed_precision`), with the run's `train.jsonl`, checkpoints and
       resume.

    The defaults are the digits GAN world's training recipe, so Retrain is the original minus the class: the
    control of the attacks (a generator that never saw the class). It needs the task's real retained images
    (`data.dataset: digits`); a GAN task without a dataset (`generated`) has none and is refused.

    Several processes (`multi_process`): the result of one process for the same global batch. Every process
    draws each step's real batch and latents alike; the discriminator steps on the whole global batch in every
    process (its gradients averaged over them), and the generator trains under DDP on this process's share of
    the latents, judged on the gathered batch (`train_gan`, as in Adapt-then-Unlearn's loop). Gradient
    accumulation is refused (a discriminator and a generator step per step).
    """

    families = ("gan",)
    multi_process = True
    accumulates = False  # the world's loop (`train_gan`)
    steps: int = hyperparameter(3500, "alternating discriminator / generator steps (the digits GAN world's)")
    lr: float = hyperparameter(2e-4, "Adam learning rate of both networks (the digits GAN world's)")
    batch_size: int = hyperparameter(64, "real retained images (and as many samples) per step (the world's)")

    def check_recipe(self, recipe, conditioning: str | None) -> None:
        super().check_recipe(recipe, conditioning)
        if recipe.data.dataset == "generated":
            raise ConfigError(
                "retraining a GAN needs real images of the retained classes, and data.dataset generated has none: "
                "give data.dataset (e.g. digits)"
            )

    def unlearn(self, model: Model, data: UnlearnData, accelerator) -> Model:
        from ..errors import ConfigError
        from ..worlds.digits_gan import train_gan

        if not len(data.retain):
            raise ConfigError(
                "retraining a GAN needs real images of the retained classes: give data.dataset (e.g. digits)"
            )
        images = torch.stack([data.retain[i][0] for i in range(len(data.retain))]).to(model.device)
        model.reinitialize()
        train_gan(
            model,
            images,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=torch.initial_seed() % 2**63,
            log=accelerator.print if accelerator is not None else print,
            accelerator=accelerator,  # its trackers (train.log_with) get the losses
        )
        return model
