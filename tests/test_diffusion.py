"""The diffusion family: the adapter's primitives, the diffusion methods' promises, and `unlearn erase` end to end
on tiny pipelines built from configs (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_diffusion import cat_task, tiny_ddpm_pipeline, tiny_sd_pipeline
from tiny_diffusion import cpu_accelerator as _accelerator
from tiny_diffusion import load_pipeline as _load


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "sd": tiny_sd_pipeline(root / "sd"),
        "sd_pixels": tiny_sd_pipeline(root / "sd_pixels", vae=False),
        "ddpm": tiny_ddpm_pipeline(root / "ddpm", num_classes=10),
    }


def _digits_class_task(model):
    from unlearn.data import forget_digits_concept
    from unlearn.datasets import load_dataset

    return forget_digits_concept(
        load_dataset("digits", "train"), load_dataset("digits", "test"), "class", classes=[3]
    )


# -- the adapter --------------------------------------------------------------------------------------------


def test_adapter_kinds_and_save_round_trip(pipelines, tmp_path, one_thread):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    sd, pixels, ddpm = _load(pipelines["sd"]), _load(pipelines["sd_pixels"]), _load(pipelines["ddpm"])
    assert (sd.conditioning, sd.channels, sd.image_size) == ("text", 3, 16)
    assert (pixels.conditioning, pixels.channels, pixels.image_size, pixels.vae) == ("text", 1, 8, None)
    assert (ddpm.conditioning, ddpm.num_classes, ddpm.null_class) == ("class", 10, 10)
    for name, model in (("sd", sd), ("pixels", pixels), ("ddpm", ddpm)):
        model.save(tmp_path / name)
        again = _load(tmp_path / name)
        for (key, a), b in zip(model.unet.state_dict().items(), again.unet.state_dict().values()):
            assert torch.equal(a, b), key
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd"))  # what a user does with the output
    assert pipe(["a cat"], num_inference_steps=2, output_type="pt").images.shape == (1, 3, 16, 16)
    assert type(DiffusionPipeline.from_pretrained(str(tmp_path / "ddpm"))).__name__ == "DDPMPipeline"


def test_generate_is_seeded_per_image_and_in_range(pipelines, one_thread):
    model = _load(pipelines["ddpm"])
    a = model.generate([0, 1, 2], steps=3, guidance=2.0, seed=5)
    b = model.generate([0, 1, 2, 3], steps=3, guidance=2.0, seed=5, batch_size=2)
    assert a.shape == (3, 1, 8, 8) and 0.0 <= a.min() and a.max() <= 1.0
    assert torch.allclose(a, b[:3], atol=1e-5)  # image i starts from the same noise whatever the batching
    assert not torch.allclose(a, model.generate([0, 1, 2], steps=3, guidance=2.0, seed=6))


def test_generation_precision_bf16_is_close_and_auto_is_fp32_without_a_gpu(pipelines, one_thread):
    from unlearn.harness.diffusion import DiffusionHarness
    from unlearn.recipe import from_dict

    model = _load(pipelines["sd"])  # text encoder, UNet and VAE all run under the autocast
    prompts = ["a cat", "a dog", "a photo of the tree"]
    full = model.generate(prompts, steps=3, guidance=2.0, seed=1)
    half = model.generate(prompts, steps=3, guidance=2.0, seed=1, dtype=torch.bfloat16)
    assert half.dtype == torch.float32 and half.shape == full.shape
    difference = (half - full).abs().max().item()
    assert 0 < difference < 0.1, difference  # bf16 computed (not fp32), to about bf16's 3 significant digits

    def harness(**settings):
        recipe = from_dict(
            {
                "method": "esd",
                "model": {"family": "diffusion", "checkpoint": str(pipelines["sd"])},
                "data": {"dataset": "generated", "concept": "cat"},
                "eval": {"judge": None, **settings},
            }
        )
        return DiffusionHarness(recipe, "cpu")

    assert harness().generation_dtype is None  # auto: bf16 on a GPU that has it, fp32 here
    assert harness(precision="bf16").generation_dtype == torch.bfloat16
    assert harness(precision="fp32").generation_dtype is None


def test_predict_x0_inverts_add_noise_and_denoise_composes(pipelines, one_thread):
    model = _load(pipelines["sd_pixels"])
    x0, noise = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.allclose(model.predict_x0(model.add_noise(x0, noise, t), t, noise), x0, atol=1e-4)
    cond, uncond = model.encode(["a cat", "a dog"]), model.encode(["", ""])
    with torch.no_grad():
        whole = model.denoise(noise, cond, model.sampler(4), guidance=3.0, uncond=uncond)
        sampler = model.sampler(4)
        part = model.denoise(noise, cond, sampler, 0, 2, 3.0, uncond)
        part = model.denoise(part, cond, sampler, 2, None, 3.0, uncond)
    assert torch.allclose(whole, part, atol=1e-6)


def test_noised_draws_noise_then_timesteps(pipelines):
    model = _load(pipelines["ddpm"])
    x0 = torch.rand(3, 1, 8, 8)
    torch.manual_seed(4)
    x_t, noise, t = model.noised(x0)
    torch.manual_seed(4)
    want_noise = torch.randn_like(x0)
    want_t = model.sample_timesteps(3)
    assert torch.equal(noise, want_noise) and torch.equal(t, want_t)
    assert torch.equal(x_t, model.add_noise(x0, want_noise, want_t))
    given = torch.tensor([1, 2, 3])
    assert torch.equal(model.noised(x0, given)[2], given)


def test_trajectory_stops_on_one_run_from_fresh_noise(pipelines, one_thread):
    model = _load(pipelines["sd_pixels"])
    cond, uncond = model.encode(["a cat", "a dog"]), model.encode(["", ""])
    sampler = model.sampler(4)
    with torch.no_grad():
        torch.manual_seed(2)
        early, late = model.trajectory(cond, sampler, [1, 3], 3.0, uncond)
        torch.manual_seed(2)
        noise = torch.randn(model.latent_shape(2)) * sampler.init_noise_sigma
        assert torch.equal(early, model.denoise(noise, cond, sampler, 0, 1, 3.0, uncond))
        assert torch.equal(late, model.denoise(early, cond, sampler, 1, 3, 3.0, uncond))


def test_cross_attention_maps_are_recorded_and_the_processors_restored(pipelines, one_thread):
    model = _load(pipelines["sd_pixels"])
    x, cond = torch.randn(2, 1, 8, 8), model.encode(["a cat", "a dog"])
    processors = {n: type(m.processor) for n, m in model.unet.named_modules() if n.endswith("attn2")}
    with torch.no_grad():
        plain = model(x, 10, cond)
        with model.cross_attention_maps() as maps:
            recorded = model(x, 10, cond)
    assert set(maps) == set(processors) and all(len(m) == 1 for m in maps.values())
    for name, (attention,) in maps.items():
        layer = model.unet.get_submodule(name)
        assert attention.shape[:2] == (2, layer.heads) and attention.shape[-1] == cond.shape[1]
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    assert {n: type(m.processor) for n, m in model.unet.named_modules() if n.endswith("attn2")} == processors
    assert not any("get_attention_scores" in vars(m) for m in model.unet.modules())


def test_parameter_sets_select_cross_attention(pipelines):
    model = _load(pipelines["sd"])
    kv = model.parameters_named("kv")
    assert kv and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in kv)
    rest = model.parameters_named("all_but_xattn")
    assert not any(".attn2." in n for n in rest)
    assert len(rest) + len(model.parameters_named("xattn")) == len(list(model.unet.parameters()))
    esd_u = model.parameters_named("noxattn")  # ESD-u: also leaves the time embedding and output layers alone
    assert set(esd_u) == {
        n for n in rest if not n.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))
    }
    from unlearn.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown parameter set"):
        model.parameters_named("attn3")


def test_encode_refuses_out_of_range_classes(pipelines):
    from unlearn.errors import ConfigError

    with pytest.raises(ConfigError, match="out of range"):
        _load(pipelines["ddpm"]).encode([11])


# -- the methods keep their promises -----------------------------------------------------------------------


def _unet(model):
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()}


def test_salun_moves_only_salient_weights(pipelines, tmp_path, one_thread):
    from unlearn.methods.salun import SalUnDiffusion
    from unlearn.params import ParamMask

    model = _load(pipelines["sd"])
    data = cat_task(model)
    before = _unet(model)
    SalUnDiffusion(steps=3, lr=1e-2, batch_size=2, retain_weight=0.1, mask_guidance=8.5).unlearn(
        model, data, _accelerator(tmp_path)
    )
    mask = ParamMask.load(tmp_path / "saliency_mask.safetensors")
    assert abs(mask.density() - 0.5) < 0.01
    moved = 0
    for name, param in model.unet.named_parameters():
        keep = mask.masks[name]
        assert torch.equal(param.detach()[~keep], before[name][~keep]), name  # pinned bit for bit
        moved += int((param.detach()[keep] != before[name][keep]).sum())
    assert moved > 0


def test_salun_pseudo_target_pulls_concept_to_anchor(pipelines, tmp_path, one_thread):
    """With retain_weight 0 the forget loss alone drives ε(x_t | concept) towards ε(x_t | anchor)."""
    from unlearn.methods.salun import SalUnDiffusion

    model = _load(pipelines["sd_pixels"])
    data = cat_task(model)
    x_t, t = torch.randn(4, 1, 8, 8), torch.tensor([500] * 4)

    def distance():
        with torch.no_grad():
            cat = model(x_t, t, model.encode(["the cat"] * 4))
            dog = model(x_t, t, model.encode(["a dog"] * 4))
        return float((cat - dog).pow(2).mean())

    start = distance()
    SalUnDiffusion(steps=30, lr=3e-3, batch_size=4, retain_weight=0.0, sparsity=0.0).unlearn(
        model, data, _accelerator(tmp_path)
    )
    assert distance() < 0.5 * start


def test_esd_x_edits_only_cross_attention_and_keeps_teacher_target(pipelines, tmp_path, one_thread):
    from unlearn.methods.esd import ESD

    model = _load(pipelines["sd"])
    before = _unet(model)
    ESD(steps=2, lr=1e-2, ddim_steps=4, params="xattn").unlearn(
        model, cat_task(model), _accelerator(tmp_path)
    )
    changed = {n for n, p in model.unet.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(".attn2." in n for n in changed)


def test_esd_refuses_cross_attention_split_on_class_models(pipelines, tmp_path):
    from unlearn.errors import ConfigError
    from unlearn.methods.esd import ESD

    model = _load(pipelines["ddpm"])
    with pytest.raises(ConfigError, match="use params: full"):
        ESD(steps=1).unlearn(model, _digits_class_task(model), _accelerator(tmp_path))


def test_esd_on_a_class_model_uses_the_null_class(pipelines, tmp_path, one_thread):
    from unlearn.methods.esd import ESD

    model = _load(pipelines["ddpm"])
    before = _unet(model)
    ESD(steps=2, lr=1e-2, ddim_steps=4, params="full", batch_size=2).unlearn(
        model, _digits_class_task(model), _accelerator(tmp_path)
    )
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.unet.named_parameters())


def test_grad_ascent_raises_the_forget_loss(pipelines, tmp_path, one_thread):
    from unlearn.methods.baselines import GradAscentDiffusion

    model = _load(pipelines["ddpm"])
    data = _digits_class_task(model)
    batch = next(iter(torch.utils.data.DataLoader(data.forget, batch_size=64)))

    def forget_loss():
        torch.manual_seed(0)
        with torch.no_grad():
            return float(model.loss(batch))

    start = forget_loss()
    GradAscentDiffusion(steps=5, lr=1e-2, batch_size=32).unlearn(model, data, _accelerator(tmp_path))
    assert forget_loss() > start


def test_retrain_draws_fresh_weights_and_trains_on_retain_only(pipelines, tmp_path, one_thread):
    from unlearn.methods.baselines import RetrainDiffusion

    model = _load(pipelines["ddpm"])
    data = _digits_class_task(model)
    assert all(int(c) != 3 for _, c in data.retain)
    before = _unet(model)
    RetrainDiffusion(steps=1, batch_size=8).unlearn(model, data, _accelerator(tmp_path))
    assert all(
        not torch.equal(p.detach(), before[n]) for n, p in model.unet.named_parameters() if p.numel() > 8
    )


# -- data ---------------------------------------------------------------------------------------------------


def test_digits_concept_task_has_exact_prompts_paraphrases_and_anchor():
    from unlearn.data import forget_digits_concept
    from unlearn.datasets import load_dataset

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    task = forget_digits_concept(train, test, "text", concept="three")
    prompts = task.prompts
    assert prompts.concept_label == 3
    assert all("three" in p.split() for p in prompts.forget)
    assert prompts.paraphrases and all("3" in p.split() for p in prompts.paraphrases)
    assert all("four" in a.split() and "three" not in a.split() for a in prompts.anchor)
    assert set(prompts.retain_labels) == set(range(10)) - {3}
    assert all(caption in prompts.forget for _, caption in task.forget)
    assert task.forget.labels.eq(3).all() and not task.retain.labels.eq(3).any()


def test_digits_multi_concept_task_merges_and_splits():
    """Several digits erased together: one forget / anchor pair list, retain without any of them, each concept
    its own part (for methods that train one thing per concept), neighbours next to each erased digit."""
    from unlearn.data import forget_digits_concept
    from unlearn.datasets import load_dataset
    from unlearn.errors import DataError

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    task = forget_digits_concept(train, test, "text", concept=["three", "seven"])
    prompts = task.prompts
    three, seven = prompts.split()
    assert (three.concept_label, seven.concept_label) == (3, 7) and prompts.concept_label is None
    assert prompts.forget == three.forget + seven.forget and prompts.anchor == three.anchor + seven.anchor
    assert all("eight" in a.split() for a in seven.anchor)
    assert set(prompts.retain_labels) == set(range(10)) - {3, 7} and three.retain == prompts.retain
    assert prompts.neighbor_labels == [2, 4, 6, 8] and three.neighbor_labels == [2, 4]
    assert (
        set(task.forget.labels.tolist()) == {3, 7}
        and not torch.isin(task.retain.labels, torch.tensor([3, 7])).any()
    )
    single = forget_digits_concept(train, test, "text", concept="three").prompts
    assert single.split() == [single] and single.neighbor_labels == [2, 4]
    # an anchor that is erased too is skipped: "three" and "four" together send "three" to "five"
    both = forget_digits_concept(train, test, "text", concept=["three", "four"]).prompts
    assert all("five" in a.split() for a in both.split()[0].anchor) and both.neighbor_labels == [2, 5]
    with pytest.raises(DataError, match="same digit twice"):
        forget_digits_concept(train, test, "text", concept=["three", "3"])


def test_generated_multi_concept_task_fills_templates(pipelines, one_thread):
    """Stable Diffusion style: several concepts (celebrities, artists) share prompt templates over {concept}."""
    from unlearn.data import forget_generated_concept

    model = _load(pipelines["sd"])
    task = forget_generated_concept(
        model,
        ["cat", "dog"],
        ["a photo of the {concept}", "{concept}"],
        ["the {concept}"],
        ["a house"],
        "a tree",
        num_images=2,
        steps=2,
    )
    cat, dog = task.prompts.split()
    assert cat.forget == ["a photo of the cat", "cat"] and dog.paraphrases == ["the dog"]
    assert task.prompts.forget == cat.forget + dog.forget and task.prompts.anchor == ["a tree"] * 4
    assert task.prompts.concept == "cat+dog" and task.prompts.retain == ["a house"] and len(task.forget) == 2


class _ScriptedModel:
    """A stand-in text-to-image model whose generation for a prompt is an image the scripted judge reads as
    `answers[prompt]` (default: the digit the prompt names)."""

    conditioning = "text"
    device = torch.device("cpu")
    unet = torch.nn.Linear(1, 1)

    def __init__(self, answers):
        from unlearn.worlds.digits_text import CAPTIONS

        self.answers = {c: label for label, captions in CAPTIONS.items() for c in captions} | answers

    def as_conditions(self, values):
        return list(values)

    def generate(self, conditions, **_):
        return torch.stack([torch.full((1, 8, 8), self.answers[c] / 10.0) for c in conditions])


def _scripted_judge(images):
    return torch.nn.functional.one_hot((images.mean((1, 2, 3)) * 10).round().long(), 10).float()


def scripted_judge():
    """The `eval.judge` factory of `_judged`."""
    return _scripted_judge


def _judged(model, task, names, samples: int) -> tuple[dict, dict]:
    """The diffusion harness's scores of `model` on `task`, judged by `_scripted_judge`."""
    from unlearn.harness import DiffusionHarness
    from unlearn.recipe import from_dict

    recipe = from_dict(
        {
            "method": "esd",
            "model": {"family": "diffusion", "checkpoint": "scripted"},
            "data": {"dataset": "generated", "concept": "scripted"},
            "eval": {"metrics": list(names), "samples": samples, "judge": "test_diffusion:scripted_judge"},
        }
    )
    harness = DiffusionHarness(recipe)
    harness.before(model, task, None)
    scores = harness.score(model, task)
    return scores.metrics, scores.images


def test_generation_scores_each_concept_and_the_neighbours_apart():
    """Per-concept erasure rates and their mean; neighbour and unrelated accuracy split the retained digits."""
    from unlearn.data import forget_digits_concept
    from unlearn.datasets import load_dataset
    from unlearn.worlds.digits_text import CAPTIONS

    task = forget_digits_concept(
        load_dataset("digits", "train"), load_dataset("digits", "test"), "text", concept=["three", "seven"]
    )
    # "three" is gone everywhere, "seven" survives on its paraphrases, and "two" (a neighbour) is damaged
    answers = {c: 4 for c in CAPTIONS[3]} | {c: 8 for c in task.prompts.split()[1].forget}
    answers |= {c: 1 for c in CAPTIONS[2]}
    names = ("erasure_rate", "erasure_rate_paraphrase", "retain_accuracy")
    results, images = _judged(_ScriptedModel(answers), task, names, samples=10)
    assert results["erasure_rate:three"] == 0 and results["erasure_rate:seven"] == 0
    assert results["erasure_rate_paraphrase:three"] == 0 and results["erasure_rate_paraphrase:seven"] == 100
    assert results["erasure_rate_paraphrase"] == 50 and results["erasure_rate"] == 0
    assert results["neighbor_accuracy"] == 75 and results["unrelated_accuracy"] == 100
    assert results["retain_accuracy"] == 100 * 7 / 8
    assert len(images["forget"]) == 20 and len(images["retain"]) == 80


def test_generated_multi_concept_runs_are_judged_per_concept():
    """Several concepts on generated data: `eval.concept_label` gives one judge label per concept, so each part
    is judged against its own label."""
    from unlearn.data import forget_generated_concept

    model = _ScriptedModel({"three": 3, "seven": 2, "a house": 1})  # "seven" already erased to a two
    task = forget_generated_concept(
        model,
        ["three", "seven"],
        ["{concept}"],
        None,
        ["a house"],
        None,
        num_images=2,
        concept_label=[3, 7],
        retain_labels=[1],
    )
    assert [p.concept_label for p in task.prompts.split()] == [3, 7]
    results, _ = _judged(model, task, ("erasure_rate", "retain_accuracy"), samples=4)
    assert results["erasure_rate:three"] == 100 and results["erasure_rate:seven"] == 0
    assert results["retain_accuracy"] == 100


def test_class_task_and_errors():
    from unlearn.data import ConceptPrompts, forget_digits_concept
    from unlearn.datasets import load_dataset
    from unlearn.errors import ConfigError, DataError

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    task = forget_digits_concept(train, test, "class", classes=[9])
    assert task.prompts.forget == [9] and task.prompts.anchor == [0] and 9 not in task.prompts.retain
    with pytest.raises(DataError, match="one class at a time"):
        forget_digits_concept(train, test, "class", classes=[3, 4])
    with pytest.raises(ConfigError, match="unknown digits concept"):
        forget_digits_concept(train, test, "text", concept="eleven")
    with pytest.raises(DataError, match="forget set is empty"):
        ConceptPrompts(concept="x", forget=[], anchor=[""])


# -- the command line ---------------------------------------------------------------------------------------


def _recipe(tmp_path, checkpoint, method: dict, data: dict, name="recipe.yaml", **eval_args):
    recipe = {
        "method": method,
        "model": {"family": "diffusion", "checkpoint": str(checkpoint)},
        "data": data,
        "eval": {"samples": 4, "steps": 2, **eval_args},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_erase_concept_from_a_stable_diffusion_folder(pipelines, tmp_path, one_thread):
    """A Stable-Diffusion pipeline built elsewhere goes through `unlearn erase --concept`, the output loads with
    StableDiffusionPipeline and generates, the input is untouched, and the edit holds only what changed."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from unlearn.cli import main

    source = pipelines["sd"]
    stamp = {p.name: p.stat().st_mtime_ns for p in source.rglob("*") if p.is_file()}
    data = {
        "dataset": "generated",
        "concept": "dog",
        "retain_prompts": ["a photo of the cat"],
        "num_images": 4,
    }
    recipe = _recipe(tmp_path, source, {"name": "esd", "steps": 2, "ddim_steps": 4}, data)
    out = tmp_path / "run"
    assert main(["erase", str(recipe), "--concept", "cat", "-o", str(out)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "model"))
    assert pipe(["a cat"], num_inference_steps=2, output_type="pt").images.shape == (1, 3, 16, 16)
    edit = load_file(str(out / "edit.safetensors"))
    assert edit and all(".attn2." in name for name in edit)
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["data"]["concept"] == "cat" and resolved["method"]["params"] == "xattn"
    assert {p.name: p.stat().st_mtime_ns for p in source.rglob("*") if p.is_file()} == stamp
    report = (out / "report.md").read_text()
    assert "samples_forget_original.png" in report and (out / "samples_forget.png").exists()
    assert main(["eval", str(out), "--json"]) == 0  # a run on generated data is scored again


def _eval_equals_the_run(run_dir, capsys) -> dict:
    """`unlearn eval RUN_DIR --json` gives the run's own metrics.json numbers, exactly."""
    from unlearn.cli import main

    capsys.readouterr()
    assert main(["eval", str(run_dir), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    recorded = json.loads((run_dir / "metrics.json").read_text())
    assert scores == {k: recorded[k] for k in scores}
    return scores


def test_erase_a_class_from_a_ddpm_is_judged(pipelines, tmp_path, digits_world, one_thread, capsys):
    from unlearn.cli import main

    recipe = _recipe(
        tmp_path, pipelines["ddpm"], {"name": "salun", "steps": 2, "batch_size": 16}, {"forget_class": [3]}
    )
    assert main(["erase", str(recipe), "-o", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("erasure_rate", "retain_accuracy", "fid", "original_erasure_rate", "original_fid", "RTE_s"):
        assert key in metrics
    assert 0.0 <= metrics["erasure_rate"] <= 100.0 and metrics["fid"] >= 0.0
    scores = _eval_equals_the_run(tmp_path / "run", capsys)
    assert {"erasure_rate", "retain_accuracy", "fid", "original_erasure_rate"} <= set(scores)


@pytest.mark.parametrize(
    ("method", "data", "message"),
    [
        ({"name": "finetune"}, {"forget_class": [3]}, "does not support the diffusion family"),
        ({"name": "salun"}, {"forget_fraction": 0.1}, "not a random share"),
        ({"name": "salun"}, {"forget_class": [3], "concept": "three"}, "exactly one of"),
        ({"name": "esd", "steps": 1}, {"concept": "eleven"}, "unknown digits concept"),
    ],
)
def test_erase_refuses_bad_diffusion_recipes(pipelines, tmp_path, capsys, method, data, message):
    from unlearn.cli import main

    recipe = _recipe(tmp_path, pipelines["sd_pixels"], method, data)
    assert main(["erase", str(recipe), "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_erase_refuses_missing_and_non_pipeline_checkpoints(tmp_path, capsys):
    from unlearn.cli import main

    (tmp_path / "folder").mkdir()
    for checkpoint, message in (
        (tmp_path / "nowhere", "does not exist"),
        (tmp_path / "folder", "model_index"),
    ):
        recipe = _recipe(tmp_path, checkpoint, {"name": "salun"}, {"forget_class": [3]})
        assert main(["erase", str(recipe), "-o", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err


def test_sd_step_benchmark_runs_each_sd_recipe_on_a_tiny_pipeline(tmp_path, one_thread):
    """benchmarks/sd_step.py (the GPU real-size check) runs every SD recipe's method through the same code."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("sd_step", root / "benchmarks" / "sd_step.py")
    sd_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sd_step)
    for name in sd_step.RECIPES:
        row = sd_step.time_recipe(root / "recipes" / "diffusion" / "sd" / name, "tiny", "cpu", 1)
        assert row["recipe"] == name and row["unet_parameters"] < 1e6
        assert row["edited_parameters"] > 0
