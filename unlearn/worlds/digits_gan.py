"""The digits GAN world: an unconditional DCGAN-style GAN trained on the 8×8 digits, judged by the classifier.

The generator is unconditional, as in the Adapt-then-Unlearn paper's MNIST setting: which digit a sample shows is
decided by the digits classifier (the feedback classifier), not by a condition. The world is trained
deterministically on the CPU in fp32 (non-saturating logistic losses, R1 on real images, Adam, an exponential
moving average of the generator, which is the saved generator as StyleGAN2's `g_ema` is), then judged: the
share of samples the classifier assigns to each digit (every digit must get at least `MIN_CLASS_SHARE` %) and
the share it classifies with confidence >= 0.9 (at least `MIN_CONFIDENT` %). Both figures are printed and
written to `world.json`.

Measured (seed 0): 3,500 steps in 220 s with two torch threads on an idle 2-core CPU (every digit at
7.5-12.6 % of 2,000 samples, 79.5 % confident); with one thread on the same CPU shared with two other jobs,
363 s (691 s at load 5; 8.2-12.2 %, 79.4 %: builds are bit-identical only at the same thread count).
Generator 0.41 M, discriminator 0.39 M parameters.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from ..checkpoints import write_json
from ..datasets import load_dataset
from ..errors import ConfigError, TrainingError
from ..train import Batches, Trainer, discriminator_step, generator_loss_on_shards, parallel_generator

SEED = 0
ARCH = "dcgan_digits"
ARCH_CONFIG = {"latent_dim": 32, "width": 64}
STEPS = 3500
BATCH_SIZE = 64
LR = 2e-4
BETAS = (0.5, 0.99)
R1_GAMMA = 1.0
R1_EVERY = 4  # lazy R1 (StyleGAN2): every 4 discriminator steps, scaled by 4
EMA_DECAY = 0.999
JUDGE_SAMPLES = 2000
CONFIDENCE = 0.9
MIN_CLASS_SHARE = 3.0
MIN_CONFIDENT = 70.0


def build_digits_gan(seed: int = SEED):
    """A fresh digits GAN (weights drawn from `seed`)."""
    from ..models.gan import build_gan

    torch.manual_seed(seed)
    return build_gan(ARCH, **ARCH_CONFIG)


def train_gan(
    model,
    images: torch.Tensor,
    steps: int = STEPS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    r1_gamma: float = R1_GAMMA,
    ema_decay: float = EMA_DECAY,
    seed: int = SEED,
    log=print,
    log_every: int = 1000,
    callback=None,
    accelerator=None,
) -> None:
    """Train `model` (a `GAN`) on `images` (N, C, H, W) in [0, 1]; deterministic for a fixed seed.

    Alternating steps: the discriminator on a real batch and a fake one (+ lazy R1 every `R1_EVERY` steps),
    then the generator with the non-saturating loss. The generator's weights end as their exponential moving
    average (decay `ema_decay`); `callback(step, ema_generator)` is called at every log point. Batches come from a `torch.Generator` seeded with `seed`; latents from the
    global RNG seeded with `seed` inside a fork, so the caller's RNG state is left as it was. fp32 always.

    `accelerator`: None for the world (no log file, no checkpoint). A run's (RetrainGAN's): the loop also writes
    `train.jsonl` (and accelerate's trackers, `train.log_with`) every `log_every` steps and checkpoints every
    `train.checkpoint_every_steps`, and resumes; gradient accumulation is refused. On several processes the
    result is the one-process one for the same global batch, as in Adapt-then-Unlearn's loop: every process
    draws each step's real batch and latents alike; the discriminator step runs on the whole global batch in
    every process (its gradients averaged over them), the generator step runs the generator under DDP on this
    process's share of the latents, judged by the discriminator on the gathered batch
    (`unlearn.train.generator_loss_on_shards`).
    """
    if accelerator is not None and accelerator.gradient_accumulation_steps > 1:
        raise ConfigError(
            "GAN training (Retrain) steps a discriminator and a generator per step and does not accumulate "
            "gradients; set train.gradient_accumulation_steps to 1"
        )
    several = accelerator is not None and accelerator.num_processes > 1
    gen_opt = torch.optim.Adam(model.generator.parameters(), lr=lr, betas=BETAS)
    dis_opt = torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=BETAS)
    ema = copy.deepcopy(model.generator).requires_grad_(False)
    reals = Batches(images, batch_size, torch.Generator().manual_seed(seed), torch.stack)
    net = model.generator
    if several:  # the loop of Adapt-then-Unlearn's, whose parts these are
        net = parallel_generator(model, accelerator)
        # fp32 as on one process whatever train.mixed_precision: drop the autocast wrapper prepare() gave it
        accelerator.unwrap_model(net, keep_fp32_wrapper=False)
    trainer = Trainer(
        model,
        gen_opt,
        accelerator,
        stage="train_gan",
        total=steps,
        state={"discriminator_optimizer": dis_opt, "reals": reals, "ema": ema},
        settings={"batch": batch_size, "lr": lr, "r1": r1_gamma, "ema": ema_decay, "seed": seed},
        log_every=log_every,
        log=log if accelerator is None else None,
    )
    started = time.perf_counter()
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in trainer.loop():
            real = next(reals)
            fake = model.generate(model.random_latents(batch_size))
            d_loss = model.discriminator_loss(real, fake)
            if r1_gamma and step % R1_EVERY == 0:
                d_loss = d_loss + R1_EVERY * model.r1_penalty(real, r1_gamma)
            if several:  # the whole global batch in every process, the gradients averaged over them
                discriminator_step(trainer, d_loss, dis_opt, model.discriminator)
                z = model.random_latents(batch_size)
                g_loss = generator_loss_on_shards(model, net, z, accelerator)  # the generator on its share
            else:
                trainer.step(d_loss, optimizer=dis_opt, name="discriminator")
                g_loss = model.generator_loss(model.generate(model.random_latents(batch_size)))
            trainer.step(g_loss, name="generator")
            if not (torch.isfinite(d_loss) and torch.isfinite(g_loss)):
                raise TrainingError(f"GAN training diverged at step {step}")
            with torch.no_grad():
                for target, source in zip(ema.parameters(), model.generator.parameters()):
                    target.lerp_(source, 1.0 - ema_decay)
            at_log_point = (step + 1) % log_every == 0 or step + 1 == steps
            if log is not None and at_log_point:
                log(
                    f"step {step + 1}/{steps}  D {d_loss.item():.3f}  G {g_loss.item():.3f}  "
                    f"{time.perf_counter() - started:.0f} s"
                )
            if callback is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
                callback(step + 1, ema)
    model.generator.load_state_dict(ema.state_dict())
    model.eval()


@torch.no_grad()
def judge_gan(model, n: int = JUDGE_SAMPLES, seed: int = SEED, judge=None) -> dict:
    """Class shares (percent per digit) and the share classified with confidence >= 0.9, on n samples."""
    from .digits import load_digits_classifier

    judge = (judge or load_digits_classifier()).eval()
    images = model.sample(n, seed=seed)
    probs = torch.softmax(judge(images.to(next(judge.parameters()).device)).float(), dim=1).cpu()
    labels = probs.argmax(1)
    shares = [100.0 * float((labels == c).float().mean()) for c in range(probs.shape[1])]
    confident = 100.0 * float((probs.max(1).values >= CONFIDENCE).float().mean())
    return {"class_shares": [round(s, 2) for s in shares], "confident": round(confident, 2), "samples": n}


def prepare_gan(folder: str | Path, verbose: bool = True) -> dict:
    """Build, train, judge and save the digits GAN (a GAN folder with `world.json`); returns the figures.

    Raises:
        TrainingError: training diverged, or the samples miss the world's promises (a digit below
            `MIN_CLASS_SHARE` %, or fewer than `MIN_CONFIDENT` % confident samples).
    """
    started = time.perf_counter()
    images = load_dataset("digits", "train").images
    model = build_digits_gan(SEED)
    train_gan(model, images, log=print if verbose else None)
    seconds = time.perf_counter() - started
    figures = judge_gan(model)
    info = {
        "family": "gan",
        "train_seconds": round(seconds, 1),
        **figures,
        "min_class_share": min(figures["class_shares"]),
        "confidence_threshold": CONFIDENCE,
        "seed": SEED,
        "arch": ARCH,
        **ARCH_CONFIG,
        "steps": STEPS,
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "r1_gamma": R1_GAMMA,
        "ema_decay": EMA_DECAY,
        "torch_threads": torch.get_num_threads(),
    }
    if verbose:
        shares = "  ".join(f"{c}: {s:.1f}" for c, s in enumerate(figures["class_shares"]))
        print(
            f"digits world: GAN trained in {seconds:.0f} s; the classifier assigns its {figures['samples']} "
            f"samples to every digit (%, {shares}; lowest {info['min_class_share']:.1f}), "
            f"{figures['confident']:.1f} % with confidence >= {CONFIDENCE}"
        )
    if info["min_class_share"] < MIN_CLASS_SHARE or figures["confident"] < MIN_CONFIDENT:
        raise TrainingError(
            f"the digits GAN misses its promises: lowest class share {info['min_class_share']:.1f} % "
            f"(needs {MIN_CLASS_SHARE}), {figures['confident']:.1f} % confident (needs {MIN_CONFIDENT})"
        )
    model.save(folder)
    write_json(info, Path(folder) / "world.json")
    return info
