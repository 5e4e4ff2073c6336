"""unlearn/lora.py, the one LoRA implementation: fp32 factors on named modules, merge / unmerge / remove, and an
export that diffusers loads, on a tiny Stable-Diffusion pipeline built from configs."""

from __future__ import annotations

import pytest
import torch
from tiny_diffusion import stock_pipeline, tiny_sd_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("lora") / "sd")


def _kv(unet):
    return [n for n, _ in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]


def _trained(unet, rank=2, alpha=4.0, adapter="lora"):
    """A LoRA on the key/value projections with random (as if trained) factors."""
    from unlearn.lora import add_lora

    factors = add_lora(unet, _kv(unet), rank, alpha, adapter)
    generator = torch.Generator().manual_seed(0)
    for param in factors:
        param.data = torch.randn(param.shape, generator=generator) * 0.3
    return factors


def _out(unet):
    generator = torch.Generator().manual_seed(1)
    x, states = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 12, 8, generator=generator)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=states).sample


def test_factors_are_fp32_and_the_only_trainable_parameters(folder):
    from unlearn.lora import add_lora

    unet = stock_pipeline(folder).unet.to(torch.bfloat16)
    factors = add_lora(unet, _kv(unet), rank=2)
    assert len(factors) == 2 * len(_kv(unet))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in factors)
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in factors}
    _out(unet.float())  # runs with B = 0


def test_unknown_targets_are_refused(folder):
    from unlearn.errors import ConfigError
    from unlearn.lora import add_lora

    unet = stock_pipeline(folder).unet
    with pytest.raises(ConfigError, match="not found"):
        add_lora(unet, ["attn2.to_k"], rank=2)  # an ending, not a full module name


def test_merge_unmerge_and_remove(folder):
    from unlearn.lora import delta_weights, lora_layers, merge, remove_lora, unmerge

    unet = stock_pipeline(folder).unet
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    _trained(unet)
    remove_lora(unet, merge=False)  # discarded: the plain layers with their original weights, bit for bit
    assert not lora_layers(unet) and "peft_config" not in vars(unet)
    after = unet.state_dict()
    assert set(after) == set(original) and all(torch.equal(after[k], v) for k, v in original.items())

    _trained(unet)
    adapted = _out(unet)
    deltas = delta_weights(unet)
    assert set(deltas) == set(_kv(unet))
    merge(unet)
    torch.testing.assert_close(_out(unet), adapted)
    for name, delta in deltas.items():
        base = unet.get_submodule(name).get_base_layer().weight
        torch.testing.assert_close(base, original[f"{name}.weight"] + delta)
    unmerge(unet)  # W + Δ − Δ: the original weights up to float rounding
    for name in deltas:
        base = unet.get_submodule(name).get_base_layer().weight
        torch.testing.assert_close(base, original[f"{name}.weight"])
    remove_lora(unet, merge=True)  # folded in: a plain UNet that computes what the adapted one did
    assert set(unet.state_dict()) == set(original) and not lora_layers(unet)
    torch.testing.assert_close(_out(unet), adapted)


def test_export_loads_in_diffusers_with_its_scale(folder, tmp_path):
    from unlearn.lora import save_lora

    unet = stock_pipeline(folder).unet
    _trained(unet, rank=2, alpha=4.0, adapter="concept")  # scale alpha / rank = 2, carried in the metadata
    adapted = _out(unet)
    path = save_lora(unet, tmp_path / "out" / "concept.safetensors", adapter="concept")
    pipe = stock_pipeline(folder)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    torch.testing.assert_close(_out(pipe.unet), adapted)
