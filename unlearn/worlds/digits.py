"""The digits world: scikit-learn's handwritten digits and a classifier trained on them, deterministically.

The classifier (`digits_cnn`, about 0.15 M parameters) trains in seconds on a CPU and reaches about 98 % test
accuracy. It is the "original model" of the digits recipes, and later judges what generative models produce.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints import write_json
from ..datasets import load_dataset
from ..errors import ConfigError
from ..models.classifier import CONFIG_NAME, build_classifier, load_classifier
from . import cache_dir

SEED = 0
EPOCHS = 30
BATCH_SIZE = 64
LR = 0.05
WEIGHT_DECAY = 5e-4
MIN_TEST_ACCURACY = 95.0


FAMILIES = ("classifier", "ddpm", "t2i", "gan")


def prepare_digits(verbose: bool = True, families: Sequence[str] | str | None = None) -> dict[str, Path]:
    """Build (once, then cached) the digits world's models and return their folders by family.

    The classifier (seconds) is always built: it judges the generative models. The DDPM and the text-to-image
    model (several minutes each, `digits_diffusion`) and the GAN (minutes, `digits_gan`) are built only when
    asked for in `families` ("all" asks for every family); when already cached they are returned whether asked
    for or not.
    """
    if families is None:
        wanted: tuple[str, ...] = ("classifier",)
    elif isinstance(families, str):
        wanted = FAMILIES if families == "all" else (families,)
    else:
        wanted = tuple(families)
    unknown = [f for f in wanted if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"the digits world has no {unknown[0]!r} model; it has: {', '.join(FAMILIES)}")
    folder = cache_dir() / "digits"
    classifier = folder / "classifier"
    if not (classifier / CONFIG_NAME).exists():
        train_digits_classifier(classifier, verbose=verbose)
    paths = {"classifier": classifier}
    for family in ("ddpm", "t2i"):
        path = folder / family
        if not (path / "model_index.json").exists() and family in wanted:
            from . import digits_diffusion

            build = digits_diffusion.prepare_ddpm if family == "ddpm" else digits_diffusion.prepare_t2i
            build(path, verbose=verbose)
        if (path / "model_index.json").exists():
            paths[family] = path
    gan = folder / "gan"
    if not (gan / "gan_config.json").exists() and "gan" in wanted:
        from .digits_gan import prepare_gan

        prepare_gan(gan, verbose=verbose)
    if (gan / "gan_config.json").exists():
        paths["gan"] = gan
    return paths


def train_digits_classifier(path: Path, verbose: bool = True) -> float:
    """Train the digits classifier deterministically on CPU in fp32 and save it; returns test accuracy."""
    started = time.perf_counter()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(SEED)
    model = build_classifier("digits_cnn", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(train) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS * steps_per_epoch)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            loss = F.cross_entropy(model(train.images[batch]), train.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    with torch.no_grad():
        accuracy = 100.0 * float((model(test.images).argmax(1) == test.labels).float().mean())
    model.save(path)
    seconds = time.perf_counter() - started
    write_json({"test_accuracy": accuracy, "train_seconds": seconds, "seed": SEED}, path / "world.json")
    if verbose:
        print(f"digits world: classifier trained in {seconds:.1f} s, test accuracy {accuracy:.2f} %")
    if accuracy < MIN_TEST_ACCURACY:
        raise RuntimeError(f"digits classifier reached only {accuracy:.2f} % test accuracy")
    return accuracy


def load_digits_classifier():
    """The digits classifier (trained on first use): the judge of the digits world's generative models."""
    path = prepare_digits()["classifier"]
    return load_classifier(path, None, 10)


def world_info() -> dict:
    path = prepare_digits()["classifier"] / "world.json"
    return json.loads(path.read_text())
