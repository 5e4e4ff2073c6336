"""LAF: losses against direct computations, label-freedom bit for bit, repair, pruned zeros, the pipeline."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from unlearn.errors import ConfigError
from unlearn.methods.laf import LAF, EmbeddingVAE, ra_loss, ue_loss, vae_loss
from unlearn.params import ParamMask

FAST = {"epochs": 2, "vae_epochs": 2}


def _relabel(data, make_labels):
    """The same task with the labels of D_f and D_r replaced by `make_labels(labels)`."""
    from unlearn.datasets import ImageTensorDataset

    def swap(ds):
        return ImageTensorDataset(ds.images, make_labels(ds.labels), ds.num_classes, ds.name)

    return dataclasses.replace(data, forget=swap(data.forget), retain=swap(data.retain))


def _run(data, seed: int = 0, **fields):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from unlearn.models import load_model

    model = load_model("world:digits", "digits_cnn", 10)
    set_seed(seed)
    return LAF(**{**FAST, **fields}).unlearn(model, data, Accelerator(cpu=True))


def _state(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.network.state_dict().items()}


def test_vae_loss_matches_the_reference_formula():
    rng = np.random.default_rng(0)
    recon, e = rng.random((5, 7)), rng.normal(size=(5, 7))
    mu, logvar = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    sigma = np.exp(0.5 * logvar)
    kld = -0.5 * np.sum(np.log(sigma**2 + 1e-8) + 1 - mu**2 - sigma**2)
    expected = (np.sum((recon - e) ** 2) + 0.025 * kld) / 5
    got = vae_loss(*(torch.tensor(a) for a in (recon, e, mu, logvar)), kl_weight=0.025)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_ue_loss_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    recon_r, e_r = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    recon_f, e_f = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))

    def term(recon, e):
        total = 0.0
        for a, b in zip(recon, e):
            err = sum((x - y) ** 2 for x, y in zip(a, b))
            total += np.exp(err / (err + 1))
        return total

    expected = term(recon_r, e_r) - term(recon_f, e_f)
    got = ue_loss(*(torch.tensor(a) for a in (recon_r, e_r, recon_f, e_f)))
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_ra_loss_matches_the_reference_cosine_embedding_form():
    torch.manual_seed(0)
    e_r, t_r, e_f, t_f = torch.randn(4, 6), torch.randn(4, 6), torch.randn(3, 6), torch.randn(3, 6)
    temp = 5.0
    # The reference: CosineEmbeddingLoss (target +1, i.e. 1 - cos) per sample, temp on the forget term only.
    cos = nn.CosineEmbeddingLoss(reduction="none")
    d_r, d_f = cos(e_r, t_r, torch.ones(4)), cos(e_f, t_f, torch.ones(3))
    reference = torch.sum(torch.log(torch.exp(d_r) / torch.sum(torch.exp(d_f / temp))))
    assert torch.allclose(ra_loss(e_r, t_r, e_f, t_f, temp), reference, atol=1e-6)
    # And in NumPy: Σ_r d_r − |r| · log Σ_f exp(d_f / temp).
    a, b = e_r.numpy(), t_r.numpy()
    dr = 1 - (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    a, b = e_f.numpy(), t_f.numpy()
    df = 1 - (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    expected = dr.sum() - 4 * np.log(np.exp(df / temp).sum())
    assert float(ra_loss(e_r, t_r, e_f, t_f, temp)) == pytest.approx(expected, rel=1e-5)


def test_embedding_vae_shapes_and_decoder_output():
    e = torch.randn(5, 12) * 10
    recon, mu, logvar = EmbeddingVAE(12, 4, "sigmoid")(e)
    assert recon.shape == (5, 12) and mu.shape == logvar.shape == (5, 4)
    assert torch.all((recon > 0) & (recon < 1))
    torch.manual_seed(0)
    assert EmbeddingVAE(12, 4, "linear")(e)[0].min() < 0


def test_fields_are_validated():
    with pytest.raises(ConfigError, match="vae_data"):
        LAF(vae_data="forget")
    with pytest.raises(ConfigError, match="decoder_output"):
        LAF(decoder_output="tanh")
    with pytest.raises(ConfigError, match="temp"):
        LAF(temp=0)


def test_laf_never_reads_a_label(digits_world, one_thread, digits_task):
    """Same seed, true labels or garbage (all -1, or a permutation): bit-identical weights and buffers."""
    from unlearn.models import load_model

    data = digits_task
    true = _state(_run(data))
    for garbage in (lambda y: torch.full_like(y, -1), lambda y: y[torch.randperm(len(y))]):
        other = _state(_run(_relabel(data, garbage)))
        assert true.keys() == other.keys()
        for name in true:
            assert torch.equal(true[name], other[name]), f"{name} depends on the labels"
    original = _state(load_model("world:digits", "digits_cnn", 10))
    moved = [n for n in true if not torch.equal(true[n], original[n])]
    assert any(n.startswith("body.") for n in moved), "the extractor did not move"
    # The head carries no LAF gradient, and the student runs in eval mode (batch-norm statistics stay).
    assert all(not n.startswith("fc.") and "running" not in n for n in moved), moved


def test_repair_reads_labels_only_when_asked(digits_world, one_thread, digits_task):
    """LAF+R: with repair_epochs > 0 the head (and only the head) follows the retain labels."""
    data = digits_task
    plain = _state(_run(data))
    repaired = _state(_run(data, repair_epochs=1))
    shuffled = _state(_run(_relabel(data, lambda y: y[torch.randperm(len(y))]), repair_epochs=1))
    for name in plain:
        if name.startswith("fc."):
            assert not torch.equal(plain[name], repaired[name]), f"repair did not train {name}"
            assert not torch.equal(repaired[name], shuffled[name]), f"repair ignored the labels in {name}"
        else:
            assert torch.equal(plain[name], repaired[name]), f"repair moved {name} outside the head"
            assert torch.equal(repaired[name], shuffled[name]), name


def test_pruned_weights_stay_exactly_zero(digits_world, one_thread, digits_task):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from unlearn.models import load_model

    model = load_model("world:digits", "digits_cnn", 10)
    generator = torch.Generator().manual_seed(0)
    model.pruning_mask = ParamMask(
        {
            name: torch.rand(p.shape, generator=generator) > 0.5
            for name, p in model.trainable.named_parameters()
            if p.dim() > 1
        }
    )
    set_seed(0)
    method = LAF(epochs=1, vae_epochs=1, repair_epochs=1)
    unlearned = method.unlearn(model, digits_task, Accelerator(cpu=True))
    params = dict(unlearned.trainable.named_parameters())
    for name, keep in model.pruning_mask.masks.items():
        assert torch.all(params[name].detach()[~keep] == 0.0), f"pruned entries of {name} moved"
        assert torch.any(params[name].detach()[keep] != 0.0)
    assert all(p.requires_grad for p in unlearned.parameters()), "LAF left parameters frozen"


def test_refuses_gradient_accumulation(digits_world, digits_task):
    from accelerate import Accelerator

    from unlearn.models import load_model

    model = load_model("world:digits", "digits_cnn", 10)
    with pytest.raises(ConfigError, match="gradient accumulation"):
        LAF().unlearn(model, digits_task, Accelerator(cpu=True, gradient_accumulation_steps=2))


def test_digits_recipe_forgets_class_3_without_labels(digits_world, one_thread, tmp_path):
    """The pipeline runs the digits recipe; label-free LAF forgets class 3 and keeps test accuracy."""
    from unlearn.pipeline import run
    from unlearn.recipe import load_recipe

    recipe = load_recipe("recipes/classifier/digits/laf.yaml", ["eval.reference=null"])
    metrics = run(recipe, tmp_path / "run", log=lambda message: None)
    assert metrics["UA"] >= 90
    assert metrics["TA"] >= 94.3  # Retrain's TA on this task is about 99.3-99.7
    stages = {
        json.loads(line)["stage"] for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()
    }
    assert stages == {"vae_all", "vae_forget", "laf"}
