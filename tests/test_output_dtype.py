"""Outputs load as saved: every saved component keeps the dtype it came in (mixed precision is a training setting,
not an output format), and each family's output reloads with its library's default loading and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checkpoints import tiny_vit_folder
from tiny_diffusion import cat_task, cpu_accelerator, tiny_ddpm_pipeline, tiny_sd_pipeline

from unlearn.methods import get_method


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a component folder's safetensors files."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def _dtypes(folder: Path) -> set[torch.dtype]:
    return {t.dtype for t in _weights(folder).values() if t.is_floating_point()}


def _store_in(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite a component folder's weights in `dtype`, as a half-precision checkpoint on the hub is stored."""
    for file in folder.glob("*.safetensors"):
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(file)).items()}
        save_file(state, str(file), metadata={"format": "pt"})
    config = folder / "config.json"
    spec = json.loads(config.read_text())
    if "dtype" in spec or "torch_dtype" in spec:  # transformers reads the dtype to load in from config.json
        spec["dtype" if "dtype" in spec else "torch_dtype"] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(spec))


def _bf16_step(parameters, loss) -> None:
    """One SGD step with the loss computed under accelerate's bf16 autocast (a `train.mixed_precision: bf16`
    recipe)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    optimizer = torch.optim.SGD(list(parameters), lr=0.1)
    with accelerator.autocast():
        value = loss()
    value.float().backward()
    optimizer.step()


# -- text-to-image ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen", [torch.float32, torch.float16], ids=["fp32", "fp16-frozen-parts"])
def test_text_to_image_erased_in_bf16_reloads_and_generates(tmp_path, frozen, one_thread):
    """The bug: text encoder and VAE cast to bf16 for training (as the pipeline does for a bf16 recipe) were
    saved in bf16 beside an fp32 UNet, and a plain call of the reloaded pipeline failed ("mat1 and mat2 must
    have the same dtype")."""
    from diffusers import DiffusionPipeline

    from unlearn.models.diffusion import load_diffusion

    source = tiny_sd_pipeline(tmp_path / "sd")
    for part in ("text_encoder", "vae"):
        _store_in(source / part, frozen)
    model = load_diffusion(source)
    data = cat_task(model)
    model.cast_frozen(torch.bfloat16)
    text_encoder = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    model = get_method("esd")(steps=2, ddim_steps=4).unlearn(model, data, cpu_accelerator(tmp_path, "bf16"))
    out = tmp_path / "out"
    model.save(out)

    for part, dtype in (("text_encoder", frozen), ("vae", frozen), ("unet", torch.float32)):
        assert _dtypes(out / part) == {dtype}, part
    for part in ("text_encoder", "vae"):  # the frozen parts come out bit for bit as they came in
        original, saved = _weights(source / part), _weights(out / part)
        assert original.keys() == saved.keys() and all(torch.equal(original[k], saved[k]) for k in original)
    assert not all(
        torch.equal(a, b) for a, b in zip(_weights(source / "unet").values(), _weights(out / "unet").values())
    )
    # saving changed nothing in the model in memory: it goes on in bf16
    assert model.text_encoder.dtype == torch.bfloat16
    assert all(torch.equal(v, text_encoder[k]) for k, v in model.text_encoder.state_dict().items())

    pipe = DiffusionPipeline.from_pretrained(str(out))  # default loading, the real diffusers class
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    dtypes = {name: part.dtype for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    as_input = DiffusionPipeline.from_pretrained(str(source)).components
    assert dtypes == {name: as_input[name].dtype for name in dtypes}  # loads as the input loads
    if frozen != torch.float32:
        # transformers loads this input's fp16 text encoder in fp16 and diffusers its UNet in fp32: the input
        # itself needs a torch_dtype to run, and so does the output
        pipe = DiffusionPipeline.from_pretrained(str(out), torch_dtype=torch.float32)
    images = pipe(["a photo of the cat"], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


# -- class-conditional DDPM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_class_conditional_ddpm_keeps_its_dtype_and_runs(tmp_path, stored, one_thread):
    from diffusers import DiffusionPipeline

    from unlearn.data import forget_digits_concept
    from unlearn.datasets import load_dataset
    from unlearn.models.diffusion import load_diffusion

    source = tiny_ddpm_pipeline(tmp_path / "ddpm", num_classes=10)
    _store_in(source / "unet", stored)
    model = load_diffusion(source)
    assert model.unet.dtype == torch.float32  # diffusers loads in fp32: the UNet trains in fp32
    data = forget_digits_concept(
        load_dataset("digits", "train"), load_dataset("digits", "test"), "class", classes=[3]
    )
    esd = get_method("esd")(steps=2, ddim_steps=4, params="full")
    model = esd.unlearn(model, data, cpu_accelerator(tmp_path, "bf16"))
    out = tmp_path / "out"
    model.save(out)
    assert _dtypes(out / "unet") == {stored}

    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == "DDPMPipeline"
    unet, scheduler = (
        pipe.unet,
        pipe.scheduler,
    )  # DDPMPipeline.__call__ passes no class labels: two steps by hand
    scheduler.set_timesteps(2)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=unet.dtype)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=torch.tensor([0, 1])).sample, t, x).prev_sample
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


# -- GAN ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gan_keeps_its_dtype_and_runs(tmp_path, stored, one_thread):
    from unlearn.models.gan import DigitsGenerator, build_gan, load_gan

    torch.manual_seed(0)
    build_gan("dcgan_digits").save(tmp_path / "gan")
    for name in ("generator.safetensors", "discriminator.safetensors"):
        state = load_file(str(tmp_path / "gan" / name))
        save_file({k: v.to(stored) for k, v in state.items()}, str(tmp_path / "gan" / name))
    model = load_gan(tmp_path / "gan")
    assert model.generator.project.weight.dtype == torch.float32  # trains in fp32
    _bf16_step(model.generator.parameters(), lambda: model.loss(torch.zeros(8, 1, 8, 8)))
    model.save(tmp_path / "out")
    for name in ("generator.safetensors", "discriminator.safetensors"):
        assert {v.dtype for v in load_file(str(tmp_path / "out" / name)).values()} == {stored}

    assert load_gan(tmp_path / "out").sample(4).shape == (4, 1, 8, 8)
    bare = DigitsGenerator()  # plain torch loading into the bare architecture
    bare.load_state_dict(load_file(str(tmp_path / "out" / "generator.safetensors")))
    assert torch.isfinite(bare(torch.randn(2, 32))).all()


# -- classifiers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_builtin_classifier_keeps_its_dtype_and_runs(tmp_path, stored, one_thread):
    import torch.nn.functional as F

    from unlearn.models.classifier import load_classifier
    from unlearn.models.zoo import DigitsCNN

    torch.manual_seed(0)
    save_file(
        {k: v.to(stored) for k, v in DigitsCNN().state_dict().items()}, str(tmp_path / "in.safetensors")
    )
    model = load_classifier(tmp_path / "in.safetensors", "digits_cnn", 10)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    _bf16_step(model.network.parameters(), lambda: F.cross_entropy(model(x), y))
    model.save(tmp_path / "out")
    assert {v.dtype for v in load_file(str(tmp_path / "out" / "model.safetensors")).values()} == {stored}

    bare = DigitsCNN()
    bare.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert bare(model.prepare(x)).shape == (8, 10)
    assert load_classifier(tmp_path / "out", None, 10)(x).shape == (8, 10)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transformers_classifier_keeps_its_dtype_and_runs(tmp_path, stored, one_thread):
    import torch.nn.functional as F
    from transformers import AutoModelForImageClassification

    from unlearn.models.classifier import load_classifier

    source = tiny_vit_folder(tmp_path / "vit")
    _store_in(source, stored)
    model = load_classifier(source, None, 10)
    assert next(model.network.parameters()).dtype == torch.float32  # trains in fp32
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    _bf16_step(model.network.parameters(), lambda: F.cross_entropy(model(x), y))
    model.save(tmp_path / "out")
    assert _dtypes(tmp_path / "out") == {stored}

    reloaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out"))  # default loading
    assert reloaded.dtype == stored
    with torch.no_grad():
        assert reloaded(model.prepare(x).to(stored)).logits.shape == (4, 10)
    assert load_classifier(tmp_path / "out", None, 10)(x).shape == (4, 10)


def test_a_bf16_recipe_through_the_cli_writes_a_pipeline_that_runs(tmp_path, one_thread):
    """`unlearn erase` with `train.mixed_precision: bf16` (the SD recipes' setting) on an fp32 pipeline."""
    import yaml
    from diffusers import DiffusionPipeline

    from unlearn.cli import main

    source = tiny_sd_pipeline(tmp_path / "sd")
    recipe = {
        "method": {"name": "esd", "steps": 2, "ddim_steps": 4},
        "model": {"family": "diffusion", "checkpoint": str(source)},
        "data": {
            "dataset": "generated",
            "concept": "cat",
            "retain_prompts": ["a photo of the dog"],
            "num_images": 2,
        },
        "train": {"mixed_precision": "bf16"},
        "eval": {"samples": 2, "steps": 2},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["erase", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "run")]) == 0
    out = tmp_path / "run" / "model"
    for part in ("text_encoder", "vae", "unet"):
        assert _dtypes(out / part) == {torch.float32}, part
    pipe = DiffusionPipeline.from_pretrained(str(out))
    images = pipe(["a photo of the cat"], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
