"""Every diffusion erasure of a text-to-image UNet also writes its edit as a diffusers LoRA (`lora/`): a stock
`StableDiffusionPipeline` loads it with `load_lora_weights` and its UNet then computes what the edited UNet
computes, within the tolerance the file states (exact for low-rank edits: UCE, ANT's fused LoRAs); both the LoRA
and `edit.safetensors` say in their metadata what they are."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from tiny_diffusion import stock_pipeline, tiny_sd_pipeline

FORGET = ["a photo of the cat", "the cat"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("lora_export") / "sd")


def _unet_out(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x, states = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 12, 8, generator=generator)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=states).sample


def _loaded_errors(unet, original: dict, edited: dict) -> dict[str, float]:
    """Each LoRA layer the pipeline loaded: the relative error of its weight update against the true delta."""
    from unlearn.lora import lora_layers

    errors = {}
    for name, layer in lora_layers(unet).items():
        delta = edited[f"{name}.weight"].double() - original[f"{name}.weight"].double()
        update = layer.get_delta_weight(layer.active_adapters[0]).double()
        errors[name] = float(torch.linalg.norm(update - delta) / torch.linalg.norm(delta))
    return errors


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# -- the factorization ----------------------------------------------------------------------------------------


def test_factorize_finds_a_low_rank_delta_exactly():
    from unlearn.lora_export import factorize

    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 3, generator=generator) @ torch.randn(3, 48, generator=generator)
    up, down, fit = factorize(delta, 1e-3)
    assert fit.rank == 3 and not fit.larger_than_delta and fit.error < 1e-6
    assert up.shape == (64, 3) and down.shape == (3, 48)
    assert torch.allclose(up @ down, delta, atol=1e-5)
    # a conv kernel: flattened to out x in*kh*kw, A keeps the kernel size, B is a 1 x 1 conv
    kernel = (torch.randn(8, 1, generator=generator) @ torch.randn(1, 4 * 9, generator=generator)).reshape(
        8, 4, 3, 3
    )
    up, down, fit = factorize(kernel, 1e-3)
    assert fit.rank == 1 and up.shape == (8, 1, 1, 1) and down.shape == (1, 4, 3, 3)
    assert torch.allclose((up.flatten(1) @ down.flatten(1)).reshape(kernel.shape), kernel, atol=1e-5)


def test_factorize_meets_the_tolerance_at_the_smallest_rank_and_says_when_it_is_not_low_rank():
    from unlearn.errors import ConfigError
    from unlearn.lora_export import factorize

    generator = torch.Generator().manual_seed(0)
    # singular values 1, 0.1, 0.01, ...: a tolerance of 2e-3 needs 3 of them, 1e-12 needs 13, more than the
    # 16*16/32 = 8 at which the factors hold as many numbers as the delta
    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))
    delta = u @ torch.diag(10.0 ** -torch.arange(16.0, dtype=torch.float64)) @ v.T
    up, down, fit = factorize(delta, 2e-3)
    assert fit.rank == 3 and not fit.larger_than_delta and fit.error <= 2e-3
    up, down, fit = factorize(delta, 1e-12)
    assert fit.rank == 13 and fit.larger_than_delta and fit.error <= 1e-12
    assert up.numel() + down.numel() > delta.numel()  # faithful, not compact: the result says so
    _, _, fit = factorize(torch.zeros(4, 6), 1e-3)
    assert fit.rank == 1 and fit.error == 0
    with pytest.raises(ConfigError, match="tolerance"):
        factorize(delta, 1.5)


def test_export_carries_weights_and_biases_and_names_what_it_cannot(source, tmp_path, one_thread):
    from unlearn.lora_export import export_lora

    pipe = stock_pipeline(source)
    unet = pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    original = _unet_out(unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_out.0")):  # rank-1 weight edits (to_out also its bias)
                out, k = module.weight.shape
                module.weight += torch.randn(out, 1, generator=generator) @ torch.randn(
                    1, k, generator=generator
                )
            if name.endswith("attn2.to_out.0"):
                module.bias += 0.1
        unet.conv_in.bias += 0.05  # a bias alone: rank-1 zero factors carry it
        norm = unet.down_blocks[0].resnets[0].norm1
        norm.weight += 0.05  # no LoRA holds a norm
    edited = _unet_out(unet)
    export = export_lora(unet, before, tmp_path / "lora" / "pytorch_lora_weights.safetensors", 1e-3)
    assert export.not_carried == ["down_blocks.0.resnets.0.norm1.weight"] and not export.exact
    assert "NOT CARRIED" in export.summary() and "norm1.weight" in export.summary()
    assert not export.inexact and export.max_error < 1e-6 and {f.rank for f in export.layers} == {1}
    assert "conv_in" in {f.name for f in export.layers}

    with torch.no_grad():  # the norm back as it was: all else the LoRA carries, exactly
        norm.weight -= 0.05
    edited = _unet_out(unet)
    fresh = stock_pipeline(source)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    loaded = _unet_out(fresh.unet)
    assert torch.linalg.norm(loaded - edited) <= 1e-5 * torch.linalg.norm(edited - original)
    metadata = _metadata(export.path)
    assert json.loads(metadata["unlearn.not_carried"]) == export.not_carried
    assert json.loads(metadata["lora_adapter_metadata"])["unet.lora_bias"] is True


# -- each kind of method, end to end --------------------------------------------------------------------------

RUNS = {
    # closed form, low-rank by construction: one key state per forget prompt (last_word), so rank <= 2
    "uce": ({"name": "uce", "positions": "last_word"}, "cat"),
    # a full-weight fine-tune (Adam): not low-rank, so the LoRA needs ranks near full, and says so. lr 1e-3: at
    # the default 1e-5 two steps move the outputs by 5e-5 of their size, below what fp32 round-off (3e-7 of
    # it) lets a comparison of outputs resolve to 1e-3 of the edit
    "esd": ({"name": "esd", "steps": 2, "ddim_steps": 4, "lr": 1e-3}, "cat"),
    # RealEra's LoRA stage alone: a rank-2 LoRA trained, then merged into the UNet; found again exactly
    "realera": (
        {
            "name": "realera",
            "closed_form": False,
            "num_beyond": 2,
            "lora_steps": 2,
            "lora_batch_size": 2,
            "lora_rank": 2,
            "lora_lr": 1e-2,
        },
        "cat",
    ),
    # one LoRA per concept, fused in closed form
    "ant": (
        {"name": "ant", "mode": "lora", "steps": 2, "split_step": 1, "ddim_steps": 3, "lora_rank": 2},
        None,
    ),
}


@pytest.mark.parametrize("method", sorted(RUNS))
def test_a_runs_lora_loads_into_a_stock_pipeline_and_reproduces_the_edited_unet(
    source, tmp_path, method, one_thread
):
    from safetensors.torch import load_file

    from unlearn import __version__
    from unlearn.cli import main

    settings, concept = RUNS[method]
    data = {"dataset": "generated", "retain_prompts": ["a photo of the dog"], "num_images": 2}
    if concept is None:  # ANT's lora mode: two concepts, one LoRA each
        data.update(
            concept=["cat", "house"], forget_prompts=["a photo of the {concept}"], retain_prompts=["a tree"]
        )
    else:
        data.update(concept=concept, forget_prompts=FORGET)
    recipe = {
        "method": settings,
        "model": {"family": "diffusion", "checkpoint": str(source)},
        "data": data,
        "eval": {"samples": 2, "steps": 2, "original": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["erase", str(path), "-o", str(out)]) == 0

    lora = out / "lora" / "pytorch_lora_weights.safetensors"
    metadata = _metadata(lora)
    assert metadata["unlearn.method"] == method and metadata["unlearn.toolkit_version"] == __version__
    assert metadata["unlearn.base_model"] == str(source) and len(metadata["unlearn.base_unet_sha256"]) == 64
    assert "cat" in metadata["unlearn.concept"] and metadata["unlearn.lora_tolerance"] == "0.001"
    layers = json.loads(metadata["unlearn.lora_layers"])
    stated = float(metadata["unlearn.lora_max_relative_error"])
    assert layers and stated == pytest.approx(max(v["relative_error"] for v in layers.values()), rel=1e-2)
    edit_metadata = _metadata(out / "edit.safetensors")
    assert edit_metadata["unlearn.method"] == method and "UNet edit" in edit_metadata["unlearn.format"]
    assert {name.rpartition(".")[0] for name in load_file(str(out / "edit.safetensors"))} == set(layers)
    report = (out / "report.md").read_text()
    assert "## The edit as a diffusers LoRA" in report and "largest relative error" in report

    original_unet, edited_unet = stock_pipeline(source).unet, stock_pipeline(out / "model").unet
    original, edited = _unet_out(original_unet), _unet_out(edited_unet)
    pipe = stock_pipeline(source)
    pipe.load_lora_weights(str(out / "lora"))  # the stock loader, the default weight name
    loaded = _unet_out(pipe.unet)
    errors = _loaded_errors(pipe.unet, original_unet.state_dict(), edited_unet.state_dict())
    assert set(errors) == set(layers)  # every layer loaded, each with the error its file states
    assert all(errors[n] == pytest.approx(v["relative_error"], rel=1e-2, abs=1e-6) for n, v in layers.items())
    deviation = float(torch.linalg.norm(loaded - edited) / torch.linalg.norm(edited - original))
    # every edit is reproduced within the tolerance, in the file's metadata and in the loaded UNet's outputs
    assert metadata["unlearn.lora_exact"] == "true" and stated <= 1e-3 and deviation <= 1e-3
    assert not json.loads(metadata["unlearn.lora_inexact_layers"])
    not_low_rank = json.loads(metadata["unlearn.lora_not_low_rank_layers"])
    if method == "esd":  # Adam's update is full rank: near-full ranks, and the file and the report say so
        assert not_low_rank and "NOT LOW-RANK" in report
    else:  # low-rank edits are found at ranks far below full
        assert not not_low_rank and "NOT LOW-RANK" not in report
        assert all(v["rank"] <= (4 if method == "ant" else 2) for v in layers.values())
