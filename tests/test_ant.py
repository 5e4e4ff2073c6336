"""ANT (Set You Straight: Auto-Steering Denoising Trajectories): the trajectory split, the objective's targets,
the differentiable unconditional terms, the intersected saliency mask, the LoRA mode's fusion into a plain UNet,
and `unlearn erase` end to end on tiny pipelines built from configs (no download)."""

from __future__ import annotations

import random

import pytest
import torch
import yaml
from tiny_diffusion import cat_task, tiny_sd_pipeline
from tiny_diffusion import cpu_accelerator as _accelerator
from tiny_diffusion import load_pipeline as _load


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("ant_pipelines")
    return {"sd": tiny_sd_pipeline(root / "sd"), "pixels": tiny_sd_pipeline(root / "pixels", vae=False)}


def _task(model, concepts=None):
    data = cat_task(model, num_images=2, retain=("a photo of the dog", "a house"), anchor=None)
    if concepts is not None:  # several concepts erased together, as the recipe's `data.concept: [...]`
        from unlearn.data import ConceptPrompts

        parts = [ConceptPrompts(concept=c, forget=f, anchor=[""]) for c, f in concepts]
        data.prompts = ConceptPrompts.merge(parts, data.prompts.retain, [])
    return data


def _unet(model):
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()}


def _ant(**kwargs):
    from unlearn.methods.ant import ANT

    settings = dict(
        mode="saliency", steps=2, lr=1e-2, split_step=2, ddim_steps=4, mask_seeds=[0, 1], mask_iterations=1
    )
    return ANT(**{**settings, **kwargs})


# -- the timestep split -------------------------------------------------------------------------------------


def test_early_indices_are_the_high_noise_steps_before_the_split(pipelines):
    from unlearn.methods.ant import draw_indices

    rng = random.Random(0)
    draws = [draw_indices(rng, 7, 50) for _ in range(2000)]
    early, late = {e for e, _ in draws}, {k for _, k in draws}
    assert early == set(range(7)) and late == set(range(7, 50))  # all of each stage, nothing across
    sampler = _load(pipelines["pixels"]).sampler(50)
    assert sampler.timesteps[6] > sampler.timesteps[7]  # index 0 = pure noise: early = high t


def test_objective_keeps_the_direction_early_and_reverses_it_late(pipelines, monkeypatch, one_thread):
    """At the original weights the early targets are the model's own predictions (η = 1: e_u + (e_c − e_u)),
    so the loss is the late term alone, MSE(e_c, e_u − (e_c − e_u)) = 4 MSE(e_c, e_u) at the late point; and
    the trajectory stops at the drawn indices' timesteps."""
    import unlearn.methods.ant as ant

    model = _load(pipelines["pixels"])
    teacher = model.frozen_copy()
    monkeypatch.setattr(ant, "draw_indices", lambda rng, split, steps: (1, 5))
    seen = []
    real_forward = teacher.forward

    def spy(x_t, t, cond):
        seen.append(torch.as_tensor(t).clone())
        return real_forward(x_t, t, cond)

    monkeypatch.setattr(teacher, "forward", spy)
    method = _ant(split_step=3, ddim_steps=8, early_weight=5.0)
    sampler = model.sampler(8)
    torch.manual_seed(0)
    loss = method.objective(model, teacher, sampler, ["the cat"], random.Random(0))
    t = seen[-1]
    assert t.tolist() == [sampler.timesteps[1].item(), sampler.timesteps[5].item()] * 2
    # recompute the late term by hand on the same trajectory
    torch.manual_seed(0)
    with torch.no_grad():
        cond, uncond = model.encode(["the cat"]), model.encode([""])
        x = torch.randn(model.latent_shape(1)) * sampler.init_noise_sigma
        x = model.denoise(x, cond, sampler, 0, 5, method.start_guidance, uncond)
        e_c, e_u = model(x, sampler.timesteps[5], cond), model(x, sampler.timesteps[5], uncond)
    assert torch.allclose(loss, 4 * torch.nn.functional.mse_loss(e_c, e_u), rtol=1e-4)


def test_unconditional_terms_carry_gradient(pipelines, one_thread):
    """With the model moved away from the teacher, weighting the unconditional terms changes the gradient
    (the single-concept reference computes them under no_grad, where they would not)."""
    model = _load(pipelines["pixels"])
    teacher = model.frozen_copy()
    with torch.no_grad():
        for param in model.unet.parameters():
            param.add_(0.05 * torch.randn_like(param))
    sampler = model.sampler(4)

    def gradient(uncond_weight):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        method = _ant(uncond_weight=uncond_weight)
        method.objective(model, teacher, sampler, ["the cat"], random.Random(0)).backward()
        return torch.cat([p.grad.flatten() for p in model.unet.parameters() if p.grad is not None])

    without, with_uncond = gradient(0.0), gradient(1.0)
    assert not torch.allclose(without, with_uncond)


# -- the saliency mask --------------------------------------------------------------------------------------


def test_saliency_mask_is_the_and_of_each_maps_largest_share():
    from unlearn.methods.ant import saliency_intersection

    a = {"w": torch.tensor([4.0, -3.0, 2.0, 1.0]), "b": torch.tensor([0.5])}
    b = {"w": torch.tensor([1.0, 5.0, -6.0, 0.0]), "b": torch.tensor([-2.0])}
    mask = saliency_intersection(
        [a, b], sparsity=0.5
    )  # per tensor int(0.5·n): 2 of 4, 0 of 1 (the reference's)
    assert mask.masks["w"].tolist() == [False, True, False, False]  # {0, 1} AND {1, 2}
    assert mask.masks["b"].tolist() == [False]
    single = saliency_intersection([a], sparsity=0.5)
    assert single.masks["w"].tolist() == [True, True, False, False]  # the largest |grad|, not the smallest
    glob = saliency_intersection([a, b], sparsity=0.6, scope="global")  # 2 of 5 entries per map
    assert glob.masks["w"].tolist() == [False, True, False, False]  # {w0, w1} AND {w2, w1}
    assert glob.masks["b"].tolist() == [False]
    glob = saliency_intersection([a, b], sparsity=0.4, scope="global")  # 3 of 5 entries per map
    assert glob.masks["w"].tolist() == [False, True, True, False]  # {w0, w1, w2} AND {w2, w1, b}
    assert glob.masks["b"].tolist() == [False]


def test_saliency_mode_masks_at_the_original_weights_and_pins_the_rest(pipelines, tmp_path, one_thread):
    from unlearn.params import ParamMask

    model = _load(pipelines["pixels"])
    data = _task(model)
    before = _unet(model)
    method = _ant(mode="auto", sparsity=0.3)  # one concept: unlearn picks saliency
    teacher = model.frozen_copy()
    mask = _ant(sparsity=0.3).mask(model, teacher, data.prompts, _accelerator(tmp_path / "mask"))
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.unet.named_parameters())  # no step taken
    assert 0.0 < mask.density() < 0.7  # four maps (2 prompts x 2 seeds) of 70 % each, intersected
    method.unlearn(model, data, _accelerator(tmp_path))
    saved = ParamMask.load(tmp_path / "saliency_mask.safetensors")
    moved = 0
    for name, param in model.unet.named_parameters():
        keep = saved.masks[name]
        assert torch.equal(keep, mask.masks[name]), name  # the same seeds give the same mask
        assert torch.equal(param.detach()[~keep], before[name][~keep]), name  # pinned bit for bit
        moved += int((param.detach()[keep] != before[name][keep]).sum())
    assert moved > 0


# -- several concepts: LoRA per concept, fused ----------------------------------------------------------------


def test_lora_mode_leaves_a_plain_unet_that_changed_only_cross_attention_kv(pipelines, tmp_path, one_thread):
    model = _load(pipelines["sd"])
    data = _task(model, concepts=[("cat", ["the cat"]), ("dog", ["the dog", "a dog"])])
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    _ant(mode="auto", lora_rank=4, lora_alpha=4.0, fuse_scale=1.0).unlearn(
        model, data, _accelerator(tmp_path)
    )
    after = model.unet.state_dict()
    assert set(after) == set(before)  # no LoRA tensor, no base_layer wrapper left
    assert not any("lora" in type(m).__name__.lower() for m in model.unet.modules())
    assert not getattr(model.unet, "peft_config", None)
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)
    assert (tmp_path / "lora_0.safetensors").exists() and (tmp_path / "lora_1.safetensors").exists()
    assert all(p.requires_grad for p in model.unet.parameters())


def test_lora_fusion_gives_the_concept_the_lora_outputs(pipelines, tmp_path, monkeypatch, one_thread):
    """With no preservation and a tiny ridge, the fused layer reproduces the LoRA-merged layer's outputs on the
    concept's text states (MACE's closed-form fusion)."""
    from unlearn.methods import closed_form

    model = _load(pipelines["pixels"])
    data = _task(model)
    data.prompts.retain = []
    data.prompts.retain_labels = []
    captured = {}
    real = closed_form.edit_cross_attention

    def spy(model, keys, **kwargs):
        captured.update(keys=keys, targets=kwargs["targets_from"])
        return real(model, keys, **kwargs)

    monkeypatch.setattr(closed_form, "edit_cross_attention", spy)
    _ant(mode="lora", lora_rank=4, lora_alpha=4.0, ridge=1e-6).unlearn(model, data, _accelerator(tmp_path))
    layers = closed_form.cross_attention(model)
    for name, layer in layers.items():
        with torch.no_grad():
            out = layer(captured["keys"])
        assert torch.allclose(out, captured["targets"][name], atol=1e-3), name


def test_lora_mode_refuses_a_class_model(tmp_path):
    from tiny_diffusion import tiny_ddpm_pipeline

    from unlearn.errors import ConfigError

    model = _load(tiny_ddpm_pipeline(tmp_path / "ddpm", num_classes=3))

    class Data:
        prompts = type("P", (), {"forget": [1], "retain": [], "split": lambda self: [self]})()

    with pytest.raises(ConfigError, match="use mode: saliency"):
        _ant(mode="lora").unlearn(model, Data(), _accelerator(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "both"}, "unknown ant mode"),
        ({"split_step": 4, "ddim_steps": 4}, "strictly between"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"mask_scope": "layer"}, "mask_scope"),
        ({"lora_targets": ["attn1.to_q"]}, "lora_targets"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    from unlearn.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _ant(**kwargs)


# -- the command line ---------------------------------------------------------------------------------------


def test_erase_with_ant_round_trips_a_stable_diffusion_folder(pipelines, tmp_path, one_thread):
    from diffusers import StableDiffusionPipeline

    from unlearn.cli import main

    recipe = {
        "method": {
            "name": "ant",
            "steps": 2,
            "split_step": 1,
            "ddim_steps": 3,
            "mask_seeds": [0],
            "mask_iterations": 1,
        },
        "model": {"family": "diffusion", "checkpoint": str(pipelines["sd"])},
        "data": {
            "dataset": "generated",
            "concept": "cat",
            "retain_prompts": ["a photo of the dog"],
            "num_images": 2,
        },
        "eval": {"samples": 2, "steps": 2},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["erase", str(path), "-o", str(out)]) == 0
    assert (out / "saliency_mask.safetensors").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "model"))
    assert pipe(["a cat"], num_inference_steps=2, output_type="pt").images.shape == (1, 3, 16, 16)
    original = _load(pipelines["sd"]).unet.state_dict()
    again = _load(out / "model").unet.state_dict()
    assert set(again) == set(original) and any(not torch.equal(again[k], original[k]) for k in original)


def test_erase_two_concepts_with_ant_lora_gives_a_plain_pipeline(pipelines, tmp_path, one_thread):
    from unlearn.cli import main

    recipe = {
        "method": {"name": "ant", "steps": 2, "split_step": 1, "ddim_steps": 3, "lora_rank": 2},
        "model": {"family": "diffusion", "checkpoint": str(pipelines["pixels"])},
        "data": {
            "dataset": "generated",
            "concept": ["cat", "dog"],
            "forget_prompts": ["a photo of the {concept}"],
            "retain_prompts": ["a house"],
            "num_images": 2,
        },
        "eval": {"samples": 2, "steps": 2},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["erase", str(path), "-o", str(out)]) == 0
    assert (out / "lora_0.safetensors").exists() and (out / "lora_1.safetensors").exists()
    original = _load(pipelines["pixels"]).unet.state_dict()
    again = _load(
        out / "model"
    ).unet.state_dict()  # a pixel-space pipeline: no VAE for StableDiffusionPipeline
    assert set(again) == set(original)
    changed = {k for k in original if not torch.equal(again[k], original[k])}
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)
