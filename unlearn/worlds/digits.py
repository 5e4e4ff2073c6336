"""The digits world: scikit-learn's handwritten digits and a classifier trained on them, deterministically.

The classifier (`digits_cnn`, about 0.15 M parameters) trains in seconds on a CPU and reaches about 98 % test
accuracy. It is the "original model" of the digits recipes, and later judges what generative models produce
(`digits_diffusion`, `digits_gan`); `worlds.prepare` builds the world's models in order.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints import write_json
from ..datasets import load_dataset
from ..models.classifier import CONFIG_NAME, build_classifier, load_classifier
from .cache import cache_dir

SEED = 0
EPOCHS = 30
BATCH_SIZE = 64
LR = 0.05
WEIGHT_DECAY = 5e-4
MIN_TEST_ACCURACY = 95.0
SECOND_JUDGE_SEED = 1
TRAIN_STEPS = EPOCHS * -(-1437 // BATCH_SIZE)  # optimizer steps of the digits classifier (1,437 train images)


def world_folder() -> Path:
    """The digits world's folder in the cache (one subfolder per model)."""
    return cache_dir() / "digits"


def classifier_path(verbose: bool = True) -> Path:
    """The digits classifier's folder, trained there on first use."""
    path = world_folder() / "classifier"
    if not (path / CONFIG_NAME).exists():
        train_digits_classifier(path, verbose=verbose)
    return path


def second_judge_path(verbose: bool = True) -> Path:
    """The digits world's second judge's folder (an MLP, other seed), trained there on first use."""
    path = world_folder() / "second_judge"
    if not (path / CONFIG_NAME).exists():
        train_digits_classifier(path, verbose=verbose, arch="digits_mlp", seed=SECOND_JUDGE_SEED)
    return path


def train_digits_classifier(
    path: Path, verbose: bool = True, arch: str = "digits_cnn", seed: int = SEED
) -> float:
    """Train a digits classifier deterministically on CPU in fp32 and save it; returns test accuracy."""
    started = time.perf_counter()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = fit_digits_classifier(train, arch, seed)
    with torch.no_grad():
        accuracy = 100.0 * float((model(test.images).argmax(1) == test.labels).float().mean())
    model.save(path)
    seconds = time.perf_counter() - started
    info = {"arch": arch, "test_accuracy": accuracy, "train_seconds": seconds, "seed": seed}
    write_json(info, path / "world.json")
    if verbose:
        print(f"digits world: {arch} trained in {seconds:.1f} s, test accuracy {accuracy:.2f} %")
    if accuracy < MIN_TEST_ACCURACY:
        raise RuntimeError(f"digits classifier reached only {accuracy:.2f} % test accuracy")
    return accuracy


def fit_digits_classifier(train, arch: str = "digits_cnn", seed: int = SEED, epochs: int = EPOCHS):
    """The world's training recipe on a given dataset (SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 64,
    cosine over `epochs` epochs, fp32 on CPU, seeded): returns the trained classifier in eval mode. The world's
    classifiers are it on the full train set for 30 epochs; U-LiRA's shadow models use it on subsets."""
    torch.manual_seed(seed)
    model = build_classifier(arch, num_classes=train.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(train) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            loss = F.cross_entropy(model(train.images[batch]), train.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    return model


def load_digits_classifier():
    """The digits classifier (trained on first use): the judge of the digits world's generative models."""
    return load_classifier(classifier_path(), None, 10)


def load_digits_second_judge():
    """The digits world's second judge (an MLP, independently seeded and trained on first use): attacks that
    stop their search on the first judge are scored by this one (reference/attacks.md §0, rule 3)."""
    return load_classifier(second_judge_path(), None, 10)
