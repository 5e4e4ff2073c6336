"""The Hugging Face model card in every output model folder (`RUN_DIR/model/README.md`) and `--push-to-hub`.

The card parses with huggingface_hub and names what was erased, from which model (its fingerprint), the method
with its settings, the metrics as machine-readable evaluation results, and the toolkit version; it changes
neither how the folder loads nor its fingerprint as an input. The upload itself is not tested (no network):
huggingface_hub's calls are replaced, to check what would be uploaded, and how a refusal is said.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from tiny_diffusion import tiny_sd_pipeline

import unlearn
from unlearn.cli import main

ROOT = Path(__file__).resolve().parents[1]
RL = str(ROOT / "recipes" / "classifier" / "digits" / "random_label.yaml")
RL_ARGS = ["method.epochs=1", "eval.reference=null"]


def _card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "model" / "README.md")


def _results(card: ModelCard) -> dict:
    return {result.metric_type: result for result in card.data.eval_results}


@pytest.fixture(scope="module")
def rl_run(digits_world, tmp_path_factory):
    """`unlearn erase random_label.yaml` for one epoch, without a Retrain reference (about 15 s)."""
    out = tmp_path_factory.mktemp("card") / "rl"
    assert main(["erase", RL, "-o", str(out), *RL_ARGS]) == 0
    return out


def test_the_card_names_the_erased_class_the_model_the_method_the_metrics_and_the_version(rl_run):
    card = _card(rl_run)
    metrics = json.loads((rl_run / "metrics.json").read_text())
    data = card.data
    assert data.pipeline_tag == "image-classification" and "machine-unlearning" in data.tags
    assert data.unlearning["erased"] == {"classes": [3], "dataset": "digits"}
    assert "class 3" in data.model_name and "random_label" in data.model_name
    base = data.unlearning["base_model"]
    assert base["checkpoint"] == "world:digits"
    assert base["fingerprint"] == json.loads((rl_run / "run.json").read_text())["checkpoint"]
    method = data.unlearning["method"]
    assert method["name"] == "random_label" and method["settings"]["epochs"] == 1
    assert method["settings"]["lr"] == 0.02 and "momentum" in method["settings"]  # defaults spelt out
    assert data.unlearning["recipe"] == {
        k: v for k, v in yaml.safe_load((rl_run / "recipe.yaml").read_text()).items() if k != "output"
    }
    assert data.unlearning["toolkit"]["version"] == unlearn.__version__

    # model-index: one evaluation result per metric, its metrics.json key as the type
    results = _results(card)
    for key in ("UA", "RA", "TA", "MIA", "original_UA", "original_TA", "acc_class_3", "RTE_s"):
        assert results[key].metric_value == pytest.approx(metrics[key])
    assert results["UA"].metric_name == "unlearned: UA (%)"
    assert results["original_acc_class_3"].metric_name == "original: acc. class 3 (%)"
    assert "device" not in results and "num_processes" not in results
    assert {r.task_type for r in results.values()} == {"image-classification"}
    assert results["UA"].dataset_type == "digits" and "class 3" in results["UA"].task_name

    body = card.text
    assert "## How to load it" in body and "load_model(" in body and "Retrain is the control" in body
    assert f"| UA (%) | {metrics['original_UA']:.2f} | {metrics['UA']:.2f} | – |" in body


def test_the_card_changes_neither_loading_nor_the_fingerprint_of_the_folder(rl_run, tmp_path):
    from unlearn.models import load_model
    from unlearn.runfolder import checkpoint_fingerprint

    copy = tmp_path / "model"
    shutil.copytree(rl_run / "model", copy)
    model = load_model(copy, num_classes=10)
    assert model.num_classes == 10
    before = checkpoint_fingerprint(str(copy))
    (copy / "README.md").write_text("rewritten, as `unlearn attack` rewrites it\n")
    assert checkpoint_fingerprint(str(copy)) == before
    (copy / "unlearn_model.json").write_text((copy / "unlearn_model.json").read_text() + " ")
    assert checkpoint_fingerprint(str(copy)) != before  # the model's own files still count


def test_recorded_attacks_are_added_to_the_card(rl_run, tmp_path):
    """What `unlearn attack` does once its attacks have run: record them, then rewrite the card."""
    from unlearn.attacks.run import record_attacks
    from unlearn.card import write_model_card

    run_dir = tmp_path / "run"
    shutil.copytree(rl_run, run_dir)
    found = {
        "feature_probe.success": 40.0,
        "original_feature_probe.success": 90.0,
        "retrain_feature_probe.success": 20.0,
        "feature_probe.R": 2 / 7,
        "feature_probe.R_std": float("nan"),
    }
    shown = {"feature_probe": {"budget": "a probe", "seeds": [0], "baselines": []}}
    write_model_card(run_dir, record_attacks(run_dir, found, shown))
    card = _card(run_dir)
    results = _results(card)
    assert results["feature_probe.success"].metric_value == 40.0
    assert results["retrain_feature_probe.success"].metric_name.startswith("Retrain: ")
    assert results["feature_probe.R"].metric_value == pytest.approx(2 / 7)
    assert "feature_probe.R_std" not in results  # NaN is no evaluation result
    assert card.data.unlearning["attacks"] == ["feature_probe"]
    assert "| feature_probe | 90.00 | 20.00 | 40.00 | 0.29 |" in card.text
    assert _results(_card(rl_run)).keys().isdisjoint({"feature_probe.success"})  # the original is untouched


def test_a_transformers_output_folder_with_its_card_loads_and_serves_as_an_input(tmp_path, one_thread):
    """A tiny ViT folder erased: the card says transformers and the folder loads with from_pretrained; a second
    run that takes that folder as its input still reuses its finished folder after the card is rewritten (as
    `unlearn attack` rewrites it): the card is not part of the input's fingerprint."""
    from test_cli import tiny_vit
    from transformers import AutoModelForImageClassification

    from unlearn.card import write_model_card

    vit = ["model.arch=null", "method.batch_size=256", "eval.original=false", *RL_ARGS]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["erase", RL, "-o", str(first), "--checkpoint", str(tiny_vit(tmp_path / "vit")), *vit]) == 0
    card = _card(first)
    assert card.data.library_name == "transformers" and "AutoModelForImageClassification" in card.text
    assert card.data.unlearning["base_model"]["name"] == "vit"  # a local folder: by its name, not its path
    assert AutoModelForImageClassification.from_pretrained(str(first / "model"), local_files_only=True)

    again = ["erase", RL, "-o", str(second), "--checkpoint", str(first / "model"), *vit]
    assert main(again) == 0
    write_model_card(first, {**json.loads((first / "metrics.json").read_text()), "UA": 12.5})
    assert _results(_card(first))["UA"].metric_value == 12.5
    assert main(again) == 0  # reused, not refused as "a run of another input checkpoint"
    assert json.loads((second / "run.json").read_text())["complete"]


# ------------------------------------------------------------------------------------------ --push-to-hub


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub's repo creation and upload, replaced: records what would be uploaded."""
    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        calls["repo"] = (repo_id, kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls["upload"] = kwargs
        calls["files"] = sorted(p.name for p in folder.iterdir())
        calls["card"] = ModelCard.load(folder / "README.md")

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_model_folder_with_its_card(rl_run, hub, capsys):
    # the same command again reuses the complete run folder, then uploads it
    assert main(["erase", RL, "-o", str(rl_run), *RL_ARGS, "--push-to-hub", "someone/digits-without-3"]) == 0
    assert hub["repo"][0] == "someone/digits-without-3"
    assert Path(hub["upload"]["folder_path"]) == rl_run / "model"
    assert hub["upload"]["repo_id"] == "someone/digits-without-3" and hub["upload"]["repo_type"] == "model"
    assert hub["files"] == ["README.md", "model.safetensors", "unlearn_model.json"]
    assert hub["card"].data.unlearning["erased"]["classes"] == [3]
    assert "uploaded" in capsys.readouterr().out


@pytest.mark.parametrize(
    "cause, said",
    [("offline", "offline mode"), ("refused", "403 Forbidden"), ("unreachable", "Name or service not known")],
)
def test_an_unreachable_or_refusing_hub_is_one_sentence_and_the_run_stays_complete(
    rl_run, hub, monkeypatch, capsys, cause, said
):
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import httpx  # the HTTP client huggingface_hub uses

    url = "https://huggingface.co/api/repos/create"

    def refuse(self, repo_id, **kwargs):
        if cause == "offline":  # HF_HUB_OFFLINE=1
            raise OfflineModeIsEnabled(f"Cannot reach {url}: offline mode is enabled.")
        if cause == "refused":  # a token without write access to the namespace
            response = httpx.Response(403, request=httpx.Request("POST", url))
            raise HfHubHTTPError("403 Forbidden: you have no write access", response=response)
        raise httpx.ConnectError("[Errno -2] Name or service not known")  # no network

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    capsys.readouterr()
    assert main(["erase", RL, "-o", str(rl_run), *RL_ARGS, "--push-to-hub", "someone/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not upload" in err and "the run folder is complete" in err
    assert said in err
    assert json.loads((rl_run / "run.json").read_text())["complete"]
    assert (rl_run / "model" / "README.md").exists() and (rl_run / "metrics.json").exists()


@pytest.mark.parametrize(
    "repo_id, token, message",
    [
        ("someone/x", None, "needs a Hugging Face token"),
        ("not a repo id!", "hf_not_a_real_token", "is not a Hugging Face repo id"),
    ],
)
def test_push_to_hub_without_a_token_or_with_a_bad_repo_id_is_refused_before_anything_runs(
    tmp_path, monkeypatch, capsys, repo_id, token, message
):
    import huggingface_hub

    # the token this machine has (None: neither HF_TOKEN nor one stored by `hf auth login`)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    out = tmp_path / "run"
    assert main(["erase", RL, "-o", str(out), *RL_ARGS, "--push-to-hub", repo_id]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- diffusion


def test_a_diffusers_output_folder_carries_a_card_and_still_loads(tmp_path, one_thread):
    """ESD on a tiny Stable Diffusion pipeline built from configs: the card names the concept and says
    text-to-image and diffusers; the folder loads with StableDiffusionPipeline beside its card."""
    from diffusers import StableDiffusionPipeline

    source = tiny_sd_pipeline(tmp_path / "sd")
    recipe = {
        "method": {"name": "esd", "steps": 2, "ddim_steps": 4},
        "model": {"family": "diffusion", "checkpoint": str(source)},
        "data": {
            "dataset": "generated",
            "concept": "cat",
            "retain_prompts": ["a photo of the dog"],
            "num_images": 4,
        },
        "eval": {"samples": 4, "steps": 2},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["erase", str(tmp_path / "recipe.yaml"), "-o", str(out)]) == 0
    card = _card(out)
    assert card.data.pipeline_tag == "text-to-image" and card.data.library_name == "diffusers"
    assert card.data.unlearning["erased"]["concept"] == ["cat"] and "'cat'" in card.data.model_name
    assert card.data.unlearning["method"]["name"] == "esd"
    fingerprint = card.data.unlearning["base_model"]["fingerprint"]
    assert fingerprint.startswith("sha256:") and len(fingerprint) == len("sha256:") + 64
    metrics = json.loads((out / "metrics.json").read_text())
    results = _results(card)
    assert results["RTE_s"].metric_value == pytest.approx(metrics["RTE_s"])  # no judge here: run time only
    assert "DiffusionPipeline.from_pretrained" in card.text
    assert StableDiffusionPipeline.from_pretrained(str(out / "model")) is not None


# ----------------------------------------------------------------------------------------------------- GAN


@pytest.mark.slow  # about 16 s
def test_a_gan_output_folder_carries_a_card_and_still_loads(tmp_path, world_cache, one_thread):
    """Adapt-then-unlearn for a few steps on a tiny GAN (test_gan's setting): the card names the class and the
    GAN's metrics; the folder reloads with `load_gan` beside its card."""
    from test_gan import _erase, tiny

    from unlearn.models.gan import load_gan

    tiny().save(tmp_path / "gan")
    assert _erase(tmp_path, tmp_path / "gan") == 0
    out = tmp_path / "run"
    card = _card(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert card.data.pipeline_tag == "unconditional-image-generation" and card.data.library_name is None
    assert card.data.unlearning["erased"]["classes"] == [3]
    assert card.data.unlearning["method"]["name"] == "adapt_then_unlearn"
    results = _results(card)
    for key in ("erasure_rate", "original_erasure_rate", "fid"):
        assert results[key].metric_value == pytest.approx(metrics[key])
    assert 'family="gan"' in card.text
    assert load_gan(out / "model").sample(2, seed=0).shape == (2, 1, 8, 8)
