"""Every CIFAR-10 recipe runs end to end on a tiny offline stand-in for CIFAR-10, on CPU.

The recipes' real settings (ResNet-18, 50k images, up to 182 epochs) need a GPU and the dataset; this checks
their wiring instead: each recipe under `recipes/classifier/cifar10/` and `.../cifar10/classwise/` is loaded as
written, then shrunk with `section.key=value` overrides (one epoch, small batches, a fresh `resnet18_cifar`
checkpoint, no Retrain reference) and run through `unlearn.pipeline.run`. CIFAR-10 itself is replaced by
scikit-learn's handwritten digits, resized to 32x32 and repeated to 3 channels (10 train and 5 test images per
class), so nothing is downloaded. Mixed precision stays as the recipe says (bf16 autocast runs on CPU). The
pre-unlearning evaluation (`eval.original`) is off: it is the same `evaluate` call as the final one, and on two
busy cores ResNet-18 costs about 30 ms an image, so it would double the time of each run.

A recipe whose method is not registered fails here (ConfigError from `load_recipe`), it is not skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unlearn import datasets
from unlearn.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "recipes" / "classifier" / "cifar10"
RECIPES = sorted([*CIFAR.glob("*.yaml"), *(CIFAR / "classwise").glob("*.yaml")])
TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 5
BATCH = 32

pytestmark = pytest.mark.slow


def digits_as_cifar(split: str) -> datasets.ImageTensorDataset:
    """A CIFAR-10-shaped stand-in: uint8 (N, 3, 32, 32) digits, per class the first 10 (train) or next 5 (test)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    chosen = []
    for label in range(10):
        where = np.flatnonzero(digits.target == label)
        chosen.extend(
            where[:TRAIN_PER_CLASS] if split == "train" else where[TRAIN_PER_CLASS:][:TEST_PER_CLASS]
        )
    chosen = np.sort(np.asarray(chosen))
    images = torch.from_numpy(digits.images[chosen].astype(np.float32) / 16.0).unsqueeze(1)
    images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(digits.target[chosen])
    return datasets.ImageTensorDataset(images, labels, num_classes=10, name="cifar10")


@pytest.fixture(autouse=True)
def offline_cifar(monkeypatch):
    """`load_dataset("cifar10", ...)` (imported by the pipeline) returns the digits stand-in; other
    torchvision datasets refuse, so a recipe that silently names another one cannot pass."""

    def fake(name, split, root, download):
        if name != "cifar10":
            raise AssertionError(f"the CIFAR-10 recipes should only load cifar10, not {name!r}")
        assert root is not None and not download
        return digits_as_cifar(split)

    monkeypatch.setattr(datasets, "_torchvision", fake)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A freshly initialised `resnet18_cifar` as a bare safetensors weights file (the recipes' format)."""
    from unlearn.checkpoints import save_state_dict
    from unlearn.models.classifier import build_classifier

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cifar-checkpoint") / "resnet18_cifar10.safetensors"
    save_state_dict(build_classifier("resnet18_cifar", 10).network.state_dict(), path)
    return path


def shrink(path: Path, checkpoint: Path, root: Path) -> list[str]:
    """Overrides that keep a recipe's wiring but make it tiny: one epoch of every training loop the method has
    (`epochs`, `retrain_epochs`, `prune_epochs`, ... above 1), batches of at most 32, the tmp checkpoint."""
    recipe = load_recipe(path)  # as written: an unregistered method or a bad key fails here, loudly
    overrides = [
        f"model.checkpoint={checkpoint}",
        f"data.root={root}",
        "eval.reference=null",
        "eval.original=false",
    ]
    for key, value in recipe.method_args.items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if (key.endswith("epochs") or key.endswith("steps")) and value > 1:
            overrides.append(f"method.{key}=1")
        elif key.endswith("batch_size") and value > BATCH:
            overrides.append(f"method.{key}={BATCH}")
    if recipe.model.prune is not None:  # prune first: one retraining epoch, small batches
        prune = {
            **recipe.model.prune,
            "epochs": min(recipe.model.prune.get("epochs", 0), 1),
            "batch_size": BATCH,
        }
        overrides.append(f"model.prune={json.dumps(prune)}")
    return overrides


def test_recipes_found():
    names = {p.relative_to(CIFAR).as_posix() for p in RECIPES}
    wanted = ["retrain", "finetune", "grad_ascent", "random_label", "salun", "l1_sparse"]
    assert {f"{m}.yaml" for m in wanted} <= names
    assert {f"classwise/{m}.yaml" for m in wanted} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(CIFAR).as_posix())
def test_cifar_recipe_runs_on_tiny_subset(path, checkpoint, tmp_path, one_thread):
    from unlearn.models.classifier import load_classifier
    from unlearn.pipeline import run

    written = load_recipe(path)
    recipe = load_recipe(path, shrink(path, checkpoint, tmp_path / "data"))
    assert recipe.method == written.method and recipe.data.dataset == "cifar10"
    assert recipe.train.mixed_precision == written.train.mixed_precision
    assert recipe.data.forget_class == written.data.forget_class
    assert recipe.data.forget_fraction == written.data.forget_fraction
    if path.parent.name == "classwise":
        assert written.data.forget_class == [0] and written.data.forget_fraction is None

    output = tmp_path / "run"
    metrics = run(recipe, output, log=lambda message: None)

    saved = json.loads((output / "metrics.json").read_text())
    assert saved.keys() == metrics.keys()
    for key in ("UA", "RA", "TA", "MIA"):
        assert math.isfinite(saved[key]) and 0 <= saved[key] <= 100, (key, saved[key])
    assert (output / "recipe.yaml").exists()
    resolved = load_recipe(output / "recipe.yaml")
    assert resolved.method == recipe.method and resolved.method_args.get("epochs", 1) <= 1

    model = load_classifier(output / "model", "resnet18_cifar", 10)
    images = digits_as_cifar("test").images[:4].float() / 255
    with torch.no_grad():
        logits = model.eval()(images)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
