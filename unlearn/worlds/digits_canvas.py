"""The digits × styles world: a text-to-image model that draws each digit in five styles, and one judge per factor.

A small UnlearnCanvas (reference/attacks.md §1.6; the styles and captions are in `canvas_text`). It is built by
`unlearn prepare digits --families canvas` (or on first use of `world:digits/canvas`) into the digits world's
folder, deterministically:

- `canvas/`: the text-to-image model, a 16x16 pixel-space `UNet2DConditionModel` with cross-attention at 8x8
  and 4x4 and its own small CLIP text encoder, trained jointly on "a {digit} in {style} style" (four wordings
  per pair) with the loop of the other digits models (`train.train_diffusion`); saved as a
  `StableDiffusionPipeline` folder without VAE, like `world:digits/t2i`.
- `canvas_judges/{digit,style}`: CNNs that tell a 16x16 image's digit and its style; `{digit,style}_second`:
  independently seeded MLPs, the second judges of the attacks (reference/attacks.md §0, rule 3). All four are
  trained on the real styled images with the digits world's classifier recipe.

The build keeps its promises or fails: each judge recognizes at least `MIN_JUDGE_ACCURACY` % of the held-out
styled images, and of `PROMISE_SAMPLES` guided generations per (digit, style) pair both judges recognize the
asked digit and style in at least `MIN_PAIR_RATE` % for every pair and `MIN_OVERALL_RATE` % overall. The
figures go to `canvas/world.json`.

Measured on a busy 2-core CPU with one torch thread (seed 0): the judges reach 98.3 % (digit CNN), 96.2 % (digit
MLP) and 100 % (both style judges) on the 1,800 held-out styled images, in 3 min together; the text-to-image model
(1.06 M UNet + 0.07 M text encoder, 2,000 steps at batch 64) trains in 32 min, and both judges recognize the
asked digit and style in 100 % of the 1,000 guided samples (20 per pair, guidance 3, 25 DDIM steps; every pair
100 %). The whole build took 38 min.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..checkpoints import write_json
from ..datasets import CaptionedDataset, ImageTensorDataset, load_dataset
from ..errors import DataError
from ..train import train_diffusion
from .canvas_text import CAPTIONS, STYLES, combination, digit_of, load_canvas_tokenizer, style_of

SEED = 0
UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (16, 32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "cross_attention_dim": 64,
}
STEPS = 2000
BATCH_SIZE = 64
LR = 2e-3
WARMUP_STEPS = 100
UNCOND_PROB = 0.1
GUIDANCE = 3.0
SAMPLE_STEPS = 25
THREADS = 1  # torch threads of the build: one does not stall when other jobs share the cores
FACTORS = ("digit", "style")
JUDGE_EPOCHS = 10
SECOND_JUDGE_SEED = 1
MIN_JUDGE_ACCURACY = 95.0
PROMISE_SAMPLES = 20  # guided generations per (digit, style) pair, judged on both factors
MIN_PAIR_RATE = 75.0
MIN_OVERALL_RATE = 95.0


@contextmanager
def torch_threads(n: int):
    """Run a block with `n` torch threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def judges_folder() -> Path:
    """Where the judges live: `canvas_judges/` in the digits world's folder."""
    from .digits import world_folder

    return world_folder() / "canvas_judges"


def factor_dataset(dataset: ImageTensorDataset, factor: str) -> ImageTensorDataset:
    """The canvas images labelled by one factor: their digit (10 classes) or their style (5)."""
    if factor == "digit":
        return ImageTensorDataset(dataset.images, digit_of(dataset.labels), 10, name="digits_canvas_digit")
    return ImageTensorDataset(
        dataset.images, style_of(dataset.labels), len(STYLES), name="digits_canvas_style"
    )


def judge_path(factor: str, second: bool = False, verbose: bool = True) -> Path:
    """The folder of a factor's judge (`second`: its second judge), trained there on first use."""
    from ..models.classifier import CONFIG_NAME
    from .digits import fit_digits_classifier

    if factor not in FACTORS:
        raise DataError(f"the canvas world judges {' and '.join(FACTORS)}, not {factor!r}")
    path = judges_folder() / (f"{factor}_second" if second else factor)
    if (path / CONFIG_NAME).exists():
        return path
    started = time.perf_counter()
    arch, seed = ("canvas_mlp", SECOND_JUDGE_SEED) if second else ("canvas_cnn", SEED)
    train = factor_dataset(load_dataset("digits_canvas", "train"), factor)
    test = factor_dataset(load_dataset("digits_canvas", "test"), factor)
    with torch_threads(THREADS):
        model = fit_digits_classifier(train, arch, seed, epochs=JUDGE_EPOCHS)
        with torch.no_grad():
            accuracy = 100.0 * float((model(test.images).argmax(1) == test.labels).float().mean())
    seconds = time.perf_counter() - started
    if verbose:
        print(
            f"digits canvas world: {factor} judge ({arch}) trained in {seconds:.1f} s, test accuracy {accuracy:.2f} %"
        )
    if accuracy < MIN_JUDGE_ACCURACY:
        raise DataError(
            f"the canvas world's {factor} judge reached {accuracy:.2f} % test accuracy, below the promised "
            f"{MIN_JUDGE_ACCURACY:g} %"
        )
    model.save(path)
    write_json(
        {"arch": arch, "factor": factor, "test_accuracy": accuracy, "train_seconds": seconds, "seed": seed},
        path / "world.json",
    )
    return path


def load_canvas_judge(factor: str, second: bool = False):
    """A factor's judge of the canvas world ("digit" or "style"; `second`: the MLP), trained on first use."""
    from ..models.classifier import load_classifier

    return load_classifier(judge_path(factor, second), None, 10 if factor == "digit" else len(STYLES))


def prepare_judges(verbose: bool = True) -> None:
    """Train (once) the four judges: each factor's CNN and its second judge, the MLP."""
    for factor in FACTORS:
        for second in (False, True):
            judge_path(factor, second, verbose)


def build_canvas_t2i(seed: int = SEED):
    """A fresh canvas text-to-image model (16x16 UNet, CLIP text encoder, the world's tokenizer) from `seed`."""
    from .digits_diffusion import build_t2i

    return build_t2i(seed, UNET_CONFIG, load_canvas_tokenizer())


@torch.no_grad()
def promise_rates(model, samples: int = PROMISE_SAMPLES, seed: int = SEED) -> torch.Tensor:
    """Per (digit, style) pair, the share (%) of `samples` guided generations (its captions in turn) that both
    judges recognize as the asked digit and style: a (10, 5) tensor."""
    pairs = [combination(d, s) for d in range(10) for s in range(len(STYLES))]
    prompts = [CAPTIONS[p][k % len(CAPTIONS[p])] for p in pairs for k in range(samples)]
    labels = torch.tensor([p for p in pairs for _ in range(samples)])
    images = model.generate(prompts, steps=SAMPLE_STEPS, guidance=GUIDANCE, seed=seed, batch_size=250)
    digit = load_canvas_judge("digit").eval()(images).argmax(1) == digit_of(labels)
    style = load_canvas_judge("style").eval()(images).argmax(1) == style_of(labels)
    both = (digit & style).float().view(len(pairs), samples).mean(1) * 100
    return both.view(10, len(STYLES))


def prepare_canvas(folder: str | Path, verbose: bool = True) -> dict:
    """Build, train, check and save the canvas text-to-image model (and its judges, if not yet built).

    Returns:
        The figures written to `world.json`.

    Raises:
        DataError: a promise failed (a judge's accuracy or a pair's recognition rate); nothing is saved.
    """
    prepare_judges(verbose)
    started = time.perf_counter()
    log = print if verbose else None
    with torch_threads(THREADS):
        model = build_canvas_t2i(SEED)
        dataset = CaptionedDataset(load_dataset("digits_canvas", "train"), CAPTIONS, seed=SEED)
        train_diffusion(
            model, dataset, STEPS, BATCH_SIZE, LR, UNCOND_PROB, SEED, log=log, warmup_steps=WARMUP_STEPS
        )
        model.text_encoder.requires_grad_(False)
        seconds = time.perf_counter() - started
        rates = promise_rates(model)
    overall, worst = float(rates.mean()), float(rates.min())
    digit, style = divmod(int(rates.argmin()), len(STYLES))
    info = {
        "family": "canvas",
        "train_seconds": round(seconds, 1),
        "recognized_both": round(overall, 2),
        "recognized_worst_pair": round(worst, 2),
        "worst_pair": f"{digit} {STYLES[style]}",
        "recognized_by_style": {s: round(float(rates[:, i].mean()), 2) for i, s in enumerate(STYLES)},
        "recognized_by_digit": {str(d): round(float(rates[d].mean()), 2) for d in range(10)},
        "samples_per_pair": PROMISE_SAMPLES,
        "guidance": GUIDANCE,
        "sample_steps": SAMPLE_STEPS,
        "seed": SEED,
        "steps": STEPS,
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "uncond_prob": UNCOND_PROB,
        "torch_threads": THREADS,
    }
    if verbose:
        print(
            f"digits canvas world: text-to-image model trained in {seconds:.0f} s; both judges recognize the asked "
            f"digit and style in {overall:.1f} % of {rates.numel() * PROMISE_SAMPLES} guided samples (worst pair "
            f"{info['worst_pair']}: {worst:.0f} %)"
        )
    if overall < MIN_OVERALL_RATE or worst < MIN_PAIR_RATE:
        raise DataError(
            f"the canvas world's model broke its promise: both factors recognized in {overall:.1f} % of samples "
            f"(promised {MIN_OVERALL_RATE:g} %), worst pair {info['worst_pair']} {worst:.0f} % (promised "
            f"{MIN_PAIR_RATE:g} %)"
        )
    model.save(folder)
    write_json(info, Path(folder) / "world.json")
    return info
