"""GPU runs: mixed precision on CUDA keeps the fit() promises, and the digits erase works on a GPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fit_mixed_precision_on_cuda_keeps_pinned_weights(precision):
    from accelerate import Accelerator

    from unlearn.models import build_classifier
    from unlearn.params import ParamMask
    from unlearn.train import Phase, fit, make_optimizer

    torch.manual_seed(0)
    model = build_classifier("resnet18_cifar", 10)
    before = {n: p.detach().clone() for n, p in model.network.named_parameters()}
    masks = {n: torch.rand_like(p) < 0.5 for n, p in model.network.named_parameters()}
    data = TensorDataset(torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    optimizer = make_optimizer(model.parameters(), "sgd", 0.05, 0.9, 5e-4)
    accelerator = Accelerator(mixed_precision=precision)
    fit(
        model,
        [Phase(DataLoader(data, batch_size=16), lambda m, b: F.cross_entropy(m(b[0]), b[1]))],
        optimizer,
        accelerator,
        2,
        mask=ParamMask(masks),
    )
    moved = 0
    for name, param in model.network.named_parameters():
        after = param.detach().cpu()
        keep = masks[name]
        assert torch.equal(after[~keep], before[name][~keep]), f"pinned entries of {name} moved"
        moved += int((after[keep] != before[name][keep]).sum())
        assert param.dtype == torch.float32  # trainable weights stay fp32 under mixed precision
    assert moved > 0


def test_digits_erase_on_cuda_bf16(tmp_path, digits_world):
    from unlearn.pipeline import run
    from unlearn.recipe import find_path, load_recipe

    recipe = load_recipe(
        find_path("recipes/classifier/digits/random_label.yaml"), ["train.mixed_precision=bf16"]
    )
    metrics = run(recipe, tmp_path / "run")
    assert metrics["device"].startswith("cuda")
    assert metrics["UA"] >= 95
    assert abs(metrics["TA"] - metrics["retrain_TA"]) <= 3
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["UA"] == metrics["UA"]


@pytest.mark.parametrize(
    "recipe",
    [
        "esd_x_vangogh.yaml",
        "uce_artists.yaml",
        "ant_nudity.yaml",
        "ant_celebrities_100.yaml",
        "realera_celebrities.yaml",
        "doco_vangogh.yaml",
    ],
)
def test_sd_size_recipe_steps_on_cuda(recipe):
    """Each text-to-image method trains (or edits) a UNet of Stable Diffusion's size in bf16, one SD recipe each
    (benchmarks/sd_step.py)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("sd_step", root / "benchmarks" / "sd_step.py")
    sd_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sd_step)
    row = sd_step.time_recipe(root / "recipes/diffusion/sd" / recipe, "sd15", "cuda", 2)
    assert row["unet_parameters"] > 800e6 and row["precision"] == "bf16"
    assert row["edited_parameters"] > 0, f"{recipe}: the method left the UNet unchanged"
    assert row["steps_per_s"] and row["peak_gib"] > 0
