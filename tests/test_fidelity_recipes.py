"""Recipes that claim to follow a reference hold the reference's settings (issue 16: every recipe whose comment
says "the reference's value" holds it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unlearn.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "recipes" / "classifier" / "cifar10"
CIFAR_RECIPES = sorted([*CIFAR.glob("*.yaml"), *(CIFAR / "classwise").glob("*.yaml")])


@pytest.mark.parametrize("path", CIFAR_RECIPES, ids=lambda p: p.relative_to(CIFAR).as_posix())
def test_cifar_recipes_train_on_augmented_data_like_the_references(path):
    """The SalUn and Sparse references build their forget and retain loaders from the augmented training set
    (RandomCrop(32, padding=4) + RandomHorizontalFlip, `no_aug` False by default; Unlearn-Saliency
    Classification/dataset.py and main_random.py, Unlearn-Sparse dataset.py and main_forget.py), so every
    method that trains on images does so here too; otherwise UA/RA/MIA are comparable neither across methods
    nor with the papers. LAF follows its own reference's augmentation, set in laf.yaml."""
    method = load_recipe(path).build_method()
    if hasattr(method, "augment") and type(method).__name__ != "LAF":
        assert method.augment == "crop_flip", f"{path.name} trains without the reference's augmentation"
