"""SalUn: the saliency mask as the reference computes it, and the mask respected bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn.errors import ConfigError
from unlearn.params import ParamMask, saliency_mask


def _ce_ascent(model, batch):
    return -F.cross_entropy(model(batch[0]), batch[1])


def test_saliency_mask_is_global_top_k_of_summed_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(3)]
    mask = saliency_mask(model, _ce_ascent, batches, sparsity=0.7)

    # Independent computation: signed sum of per-batch gradients, magnitude, global ranking in NumPy.
    summed = {n: np.zeros(tuple(p.shape)) for n, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        _ce_ascent(model, batch).backward()
        for n, p in model.named_parameters():
            summed[n] += p.grad.numpy()
    flat = np.concatenate([np.abs(g).ravel() for g in summed.values()])
    keep = int(flat.size * 0.3)
    threshold = np.sort(flat)[::-1][keep - 1]
    for name, grad in summed.items():
        np.testing.assert_array_equal(mask.masks[name].numpy(), np.abs(grad) >= threshold)
    assert sum(int(m.sum()) for m in mask.masks.values()) == keep
    assert mask.density() == pytest.approx(keep / flat.size)


def test_saliency_mask_refuses_bad_sparsity():
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError):
        saliency_mask(model, _ce_ascent, [], sparsity=1.0)


def _digits_task():
    from unlearn.data import forget_classes
    from unlearn.datasets import load_dataset

    return forget_classes(load_dataset("digits", "train"), load_dataset("digits", "test"), [3])


def test_salun_moves_only_salient_weights_and_saves_its_mask(digits_world, tmp_path):
    from accelerate import Accelerator

    from unlearn.evaluate import evaluate
    from unlearn.methods import get_method
    from unlearn.models import load_model

    data = _digits_task()
    model = load_model("world:digits", "digits_cnn", 10)
    before = {n: p.detach().clone() for n, p in model.network.named_parameters()}
    method = get_method("salun", "classifier")(epochs=3, weight_decay=5e-4, momentum=0.9)
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    unlearned = method.unlearn(model, data, accelerator)

    saved = ParamMask.load(tmp_path / "saliency_mask.safetensors")
    assert saved.density() == pytest.approx(0.5, abs=1e-4)
    moved = 0
    for name, param in unlearned.network.named_parameters():
        keep = saved.masks[name]
        assert torch.equal(param.detach()[~keep], before[name][~keep]), f"pinned entries of {name} moved"
        moved += int((param.detach()[keep] != before[name][keep]).sum())
    assert moved > 0
    assert evaluate(unlearned, data, ["UA"])["UA"] >= 90


def test_salun_reuses_a_saved_mask(digits_world, tmp_path):
    from accelerate import Accelerator

    from unlearn.methods.salun import SalUn
    from unlearn.models import load_model

    data = _digits_task()
    first = SalUn(epochs=1)
    mask = first.mask(
        load_model("world:digits", "digits_cnn", 10), data, Accelerator(cpu=True, project_dir=str(tmp_path))
    )
    again = SalUn(epochs=1, mask_path=str(tmp_path / "saliency_mask.safetensors"))
    loaded = again.mask(load_model("world:digits", "digits_cnn", 10), data, Accelerator(cpu=True))
    assert mask.masks.keys() == loaded.masks.keys()
    assert all(torch.equal(mask.masks[n], loaded.masks[n]) for n in mask.masks)
