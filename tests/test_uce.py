"""Closed-form cross-attention edits (unlearn/methods/closed_form.py) and UCE, the method built on them alone."""

from __future__ import annotations

import pytest
import torch
from tiny_diffusion import load_pipeline as _load
from tiny_diffusion import tiny_sd_pipeline


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("pipelines") / "sd")


def _objective(w, w0, keys, targets, preserve, scale, ridge):
    return (
        ((keys @ w.T - targets) ** 2).sum()
        + scale * (((w - w0) @ preserve.T) ** 2).sum()
        + ridge * ((w - w0) ** 2).sum()
    )


def test_solve_projection_solves_its_normal_equations():
    """The gradient of the least-squares objective vanishes at the solution, and no other weight does better."""
    from unlearn.methods.closed_form import solve_projection

    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    keys, targets = (
        torch.randn(4, 7, generator=gen, dtype=torch.float64),
        torch.randn(4, 5, generator=gen, dtype=torch.float64),
    )
    preserve = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    solved = solve_projection(w0, keys, targets, preserve, preserve_scale=0.3, ridge=0.1)
    w = solved.clone().requires_grad_(True)
    _objective(w, w0, keys, targets, preserve, 0.3, 0.1).backward()
    assert w.grad.abs().max() < 1e-9
    best = _objective(solved, w0, keys, targets, preserve, 0.3, 0.1)
    for _ in range(5):
        other = solved + 1e-3 * torch.randn(solved.shape, generator=gen, dtype=torch.float64)
        assert _objective(other, w0, keys, targets, preserve, 0.3, 0.1) > best


def test_solve_projection_extremes_and_errors():
    """With a huge preservation weight on a spanning set the weight cannot move; with no ridge and no
    preservation the problem is refused."""
    from unlearn.errors import ConfigError
    from unlearn.methods.closed_form import solve_projection

    w0 = torch.randn(3, 4)
    keys, targets = torch.randn(2, 4), torch.randn(2, 3)
    kept = solve_projection(w0, keys, targets, torch.eye(4), preserve_scale=1e9, ridge=1e-3)
    assert torch.allclose(kept, w0, atol=1e-5) and kept.dtype == w0.dtype
    remapped = solve_projection(w0, keys, targets, None, ridge=1e-9)  # exact fit of 2 keys in 4 dimensions
    assert torch.allclose(keys @ remapped.T, targets, atol=1e-4)
    with pytest.raises(ConfigError, match="ridge"):
        solve_projection(w0, keys, targets, None, ridge=0.0)


def test_fuse_loras_gives_the_concept_its_lora_outputs(sd_folder, one_thread):
    """MACE's fusion: with a tiny ridge and no preservation, the concept's states get the outputs of the layer
    with the concept's (scaled) update merged in; a layer without an update keeps its outputs."""
    from unlearn.methods.closed_form import concept_keys, cross_attention, fuse_loras

    model = _load(sd_folder)
    layers = cross_attention(model)
    first, second = sorted(layers)[:2]
    keys = concept_keys(model, ["the cat", "a photo of the cat"])[0]
    delta = torch.randn(layers[first].weight.shape, generator=torch.Generator().manual_seed(0))
    w0 = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    edited = fuse_loras(model, [(keys, {first: delta})], scale=0.5, ridge=1e-8)
    assert edited == [f"{name}.weight" for name in layers]
    with torch.no_grad():
        torch.testing.assert_close(
            layers[first](keys), keys @ (w0[first] + 0.5 * delta).T, atol=1e-3, rtol=1e-3
        )
        torch.testing.assert_close(layers[second](keys), keys @ w0[second].T, atol=1e-3, rtol=1e-3)


def test_concept_keys_start_at_the_concept_word_and_align_with_the_anchor(sd_folder, one_thread):
    from unlearn.methods.closed_form import concept_keys

    model = _load(sd_folder)
    length, width = model.tokenizer.model_max_length, model.unet.config.cross_attention_dim
    keys, anchors = concept_keys(model, ["a photo of the cat", "cat"], ["a dog", "a photo of the dog"])
    # "a photo of the cat": the word is token 5, so positions 5.. (length - 5); "a dog": token 2. The pair keeps
    # what both have: length - max(5, 2). Likewise the second pair: length - max(1, 5).
    assert keys.shape == anchors.shape == (2 * (length - 5), width)
    states = model.text_encoder(
        model.tokenizer(["cat"], padding="max_length", return_tensors="pt").input_ids
    )[0]
    assert torch.allclose(keys[length - 5 :], states[0, 1 : 1 + length - 5].float(), atol=1e-6)
    everything, _ = concept_keys(model, ["cat", ""], positions="all")
    assert everything.shape == (2 * length, width)


def _uce_run(folder, tmp_path, **fields):
    """UCE on a tiny SD pipeline: returns the model, the UNet before, the projections before and the states."""
    from accelerate import Accelerator

    from unlearn.data import forget_generated_concept
    from unlearn.methods import get_method
    from unlearn.methods.closed_form import concept_keys, cross_attention

    model = _load(folder)
    task = forget_generated_concept(
        model,
        "cat",
        ["a photo of the cat"],
        None,
        ["a photo of the dog"],
        "a photo of the house",
        num_images=2,
        steps=2,
    )
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    originals = {name: layer.weight.detach().clone() for name, layer in cross_attention(model).items()}
    keys, anchor_keys = concept_keys(model, task.prompts.forget, task.prompts.anchor)
    kept, _ = concept_keys(model, [*task.prompts.retain, ""], positions="all")
    get_method("uce", "diffusion")(**fields).unlearn(
        model, task, Accelerator(cpu=True, project_dir=str(tmp_path))
    )
    return model, before, originals, keys, anchor_keys, kept


def test_uce_remaps_the_concept_to_the_anchor_and_its_preservation_terms_hold(
    sd_folder, tmp_path, one_thread
):
    """Only attn2 to_k / to_v change. Without preservation the concept's states give (nearly) the anchor's
    outputs through every edited projection; with a strong preservation weight the retained prompt's and the
    empty prompt's outputs move less than without. (The tiny text encoder's states of all prompts are nearly
    parallel, so the two goals pull against each other far more than in SD.)"""
    from unlearn.methods.closed_form import cross_attention

    free = _uce_run(sd_folder, tmp_path / "free", ridge=1e-3, preserve_scale=0.0)
    held = _uce_run(sd_folder, tmp_path / "held", ridge=1e-3, preserve_scale=100.0)
    model, before, originals, keys, anchor_keys, kept = free
    after = model.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)
    held_layers = cross_attention(held[0])
    for name, layer in cross_attention(model).items():
        w0, w, w_held = originals[name], layer.weight.detach(), held_layers[name].weight.detach()
        target = anchor_keys @ w0.T
        assert (keys @ w.T - target).norm() < 0.2 * (keys @ w0.T - target).norm()
        assert (kept @ (w_held - w0).T).norm() < 0.5 * (kept @ (w - w0).T).norm()


def test_uce_refuses_class_models_and_bad_fields(tmp_path):
    from unlearn.errors import ConfigError
    from unlearn.methods import get_method

    uce = get_method("uce", "diffusion")
    with pytest.raises(ConfigError, match="ridge"):
        uce(ridge=0.0)
    with pytest.raises(ConfigError, match="erase_scale"):
        uce(erase_scale=-1.0)
