"""No code from a checkpoint ever runs: folders that name custom code (transformers' `auto_map`, a diffusers
pipeline or component from a module file) are refused in one sentence before anything loads, whatever is on
stdin, through the library and through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_checkpoints import tiny_vit_folder
from tiny_diffusion import tiny_sd_pipeline

from unlearn.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
YES = "y\n" * 500  # what `yes y |` would answer to any prompt


def _code(marker: Path, body: str) -> str:
    """A module that writes `marker` when imported, then defines `body`."""
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n{body}"


def custom_vit(folder: Path, marker: Path) -> Path:
    """A transformers image classifier whose config maps its classes to `evil.py` (auto_map)."""
    tiny_vit_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evil_vit"
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForImageClassification": "evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    body = (
        "from transformers import ViTConfig, ViTForImageClassification\n"
        "class EvilConfig(ViTConfig):\n    model_type = 'evil_vit'\n"
        "class EvilModel(ViTForImageClassification):\n    config_class = EvilConfig\n"
    )
    (folder / "evil.py").write_text(_code(marker, body))
    return folder


def custom_pipeline(folder: Path, marker: Path, how: str) -> Path:
    """A tiny Stable-Diffusion folder that names custom code in one of three ways."""
    tiny_sd_pipeline(folder, vae=False)
    index = json.loads((folder / "model_index.json").read_text())
    if how == "component":  # the UNet from unet/evil_unet.py
        index["unet"] = ["evil_unet", "EvilUNet"]
        body = "from diffusers import UNet2DConditionModel\nclass EvilUNet(UNet2DConditionModel):\n    pass\n"
        (folder / "unet" / "evil_unet.py").write_text(_code(marker, body))
    elif how == "pipeline":  # the pipeline class from evil_pipeline.py
        index["_class_name"] = ["evil_pipeline", "EvilPipeline"]
        body = "from diffusers import StableDiffusionPipeline\nclass EvilPipeline(StableDiffusionPipeline):\n    pass\n"
        (folder / "evil_pipeline.py").write_text(_code(marker, body))
    elif how == "auto_map":  # an AutoTokenizer whose config maps it to tokenizer/evil_tok.py
        index["tokenizer"] = ["transformers", "AutoTokenizer"]
        config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}
        (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
        body = "from transformers import CLIPTokenizer\nclass EvilTokenizer(CLIPTokenizer):\n    pass\n"
        (folder / "tokenizer" / "evil_tok.py").write_text(_code(marker, body))
    elif how == "library":  # a component from an installed module that is neither diffusers nor transformers
        index["scheduler"] = ["torch.nn", "Linear"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _one_sentence(err: Exception, folder: Path) -> str:
    message = str(err)
    assert len(message.splitlines()) == 1 and str(folder) in message and "custom code" in message
    assert message.count(". ") == 0  # one sentence
    return message


def test_the_marker_code_writes_the_marker(tmp_path):
    import runpy

    marker = tmp_path / "pwned"
    runpy.run_path(str(custom_vit(tmp_path / "vit", marker) / "evil.py"))
    assert marker.exists()


@pytest.mark.slow
def test_the_transformers_folder_really_runs_code_when_trusted(tmp_path):
    """The test folder is a working exploit: transformers told to trust it writes the marker."""
    marker = tmp_path / "pwned"
    folder = custom_vit(tmp_path / "vit", marker)
    script = (
        "from transformers import AutoModelForImageClassification as A\n"
        f"A.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert marker.exists()


def test_transformers_folder_with_custom_code_is_refused(tmp_path):
    from unlearn.metrics.generation import load_clip, load_judge
    from unlearn.models import load_model
    from unlearn.models.classifier import load_classifier

    marker = tmp_path / "pwned"
    folder = custom_vit(tmp_path / "vit", marker)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for load in (
        lambda: load_classifier(folder, None, 10),
        lambda: load_model(str(folder), None, 10),
        lambda: load_judge(folder),
        lambda: load_clip(folder),
    ):
        with pytest.raises(CheckpointError) as info:
            load()
        assert "auto_map: evil.EvilConfig, evil.EvilModel" in _one_sentence(info.value, folder)
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_loaders_refuse_even_without_the_folder_check(tmp_path, monkeypatch):
    """Defence in depth: with the folder check switched off, the loaders still pass trust_remote_code=False,
    so transformers and diffusers refuse (never ask) and no code runs."""
    import unlearn.metrics.generation as generation
    import unlearn.models.classifier as classifier
    import unlearn.models.diffusion as diffusion

    for module in (classifier, diffusion, generation):
        monkeypatch.setattr(module, "refuse_custom_code", lambda folder: None)
    marker = tmp_path / "pwned"
    vit = custom_vit(tmp_path / "vit", marker)
    for load in (lambda: classifier.load_classifier(vit, None, 10), lambda: generation.load_clip(vit)):
        with pytest.raises(CheckpointError):
            load()
    for how in ("component", "pipeline"):
        with pytest.raises(CheckpointError):
            diffusion.load_diffusion(custom_pipeline(tmp_path / how, marker, how))
    assert not marker.exists()


def test_cli_refuses_custom_code_whatever_is_on_stdin(tmp_path):
    """`yes y | unlearn erase --checkpoint FOLDER model.arch=null`: exit status 2, one line, no code run."""
    marker = tmp_path / "pwned"
    folder = custom_vit(tmp_path / "vit", marker)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "unlearn",
        "erase",
        str(ROOT / "recipes/classifier/digits/finetune.yaml"),
    ]
    command += ["--checkpoint", str(folder), "model.arch=null", "-o", str(tmp_path / "run")]
    done = subprocess.run(command, input=YES, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unlearn erase: error: refusing checkpoint"), lines
    assert str(folder) in lines[0] and "auto_map" in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("how", ["component", "pipeline", "auto_map", "library"])
def test_diffusers_folder_with_custom_code_is_refused(tmp_path, how):
    from unlearn.models import load_model
    from unlearn.models.diffusion import load_diffusion

    marker = tmp_path / "pwned"
    folder = custom_pipeline(tmp_path / "sd", marker, how)
    for load in (lambda: load_diffusion(folder), lambda: load_model(str(folder), family="diffusion")):
        with pytest.raises(CheckpointError) as info:
            load()
        _one_sentence(info.value, folder)
    assert not marker.exists()


@pytest.mark.slow  # diffusers refuses these folders itself too (in several lines); the library test suffices
def test_cli_refuses_a_diffusers_folder_with_custom_code(tmp_path):
    import yaml

    marker = tmp_path / "pwned"
    folder = custom_pipeline(tmp_path / "sd", marker, "component")
    recipe = {
        "method": {"name": "esd", "steps": 1},
        "model": {"family": "diffusion", "checkpoint": str(folder)},
        "data": {"dataset": "generated", "concept": "cat", "retain_prompts": ["a dog"], "num_images": 2},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "unlearn",
        "erase",
        str(tmp_path / "recipe.yaml"),
        "-o",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(command, input=YES, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unet/evil_unet.py" in lines[0], lines
    assert not marker.exists()


def test_standard_folders_still_load(tmp_path):
    """The check refuses only custom code: a stock transformers classifier and a stock pipeline load."""
    from unlearn.checkpoints import refuse_custom_code

    refuse_custom_code(tiny_vit_folder(tmp_path / "vit"))
    refuse_custom_code(tiny_sd_pipeline(tmp_path / "sd"))
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]  # as SD v1.x folders say
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps(index))
    refuse_custom_code(tmp_path / "sd")
