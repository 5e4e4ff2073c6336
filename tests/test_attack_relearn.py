"""The relearning attack (unlearn/attacks/relearn.py) on the three families, and Retrain for GANs."""

from __future__ import annotations

import math

import pytest
import torch

from unlearn.attacks import get_attack
from unlearn.attacks.base import Target
from unlearn.attacks.relearn import Relearn
from unlearn.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

JUDGE = "test_attack_relearn:toy_judge"


def toy_judge():
    """A fixed random projection of the centred 8x8 grey thumbnail onto 10 classes (no training)."""
    weight = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))

    def judge(images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), 8).flatten(1)
        x = x - x.mean(1, keepdim=True)
        return 5 * x / (x.norm(dim=1, keepdim=True) + 1e-8) @ weight.T

    return judge


def _target(recipe: dict, model=None):
    """(harness ready for attacks, task, model) for a recipe given as a mapping."""
    from unlearn.harness import HARNESSES
    from unlearn.recipe import from_dict

    recipe = from_dict(recipe)
    harness = HARNESSES[recipe.model.family](recipe, device="cpu", log=lambda message: None)
    if model is None:
        model, data = harness.setup()
    else:
        data = harness.task(model) if recipe.model.family == "diffusion" else harness.task()
    harness.before(model, data, None)
    return Target(harness, data, model, log=lambda message: None), model


def _assert_probe(probe, steps: int, shots: list[int]) -> None:
    assert [step for step, _ in probe.curve] == list(range(steps + 1))
    assert all(0.0 <= value <= 100.0 for _, value in probe.curve)
    assert math.isclose(probe.success, sum(v for _, v in probe.curve) / len(probe.curve))
    for k in shots:
        assert 0.0 <= probe.metrics[f"final_k{k}"] <= 100.0
        assert f"S50_k{k}" in probe.metrics


# -- registry and settings -------------------------------------------------------------------------------


def test_relearn_is_registered_for_every_family_with_its_settings():
    assert get_attack("relearn") is Relearn
    for family in ("classifier", "diffusion", "gan"):
        assert get_attack("relearn", family) is Relearn
    from unlearn.recipe import from_dict

    recipe = from_dict(
        {
            "method": {"name": "retrain"},
            "model": {"family": "gan", "arch": "dcgan_digits", "checkpoint": None},
            "data": {"dataset": "digits", "forget_class": [3]},
        }
    )
    (attack,) = recipe.build_attacks([{"name": "relearn", "shots": [0, 1], "steps": 10, "neighbor": True}])
    assert attack.shots == [0, 1] and attack.steps == 10 and attack.neighbor
    with pytest.raises(ConfigError):
        recipe.build_attacks([{"name": "relearn", "shots": 5}])


# -- classifier ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_classifier(digits_world):
    recipe = {
        "method": {"name": "retrain"},
        "model": {"arch": "digits_cnn", "checkpoint": "world:digits"},
        "data": {"dataset": "digits", "forget_class": [3]},
    }
    return _target(recipe)


def test_relearn_on_the_original_classifier_keeps_the_class(digits_classifier):
    target, model = digits_classifier
    attack = Relearn(shots=[0, 5], steps=20, eval_every=10)
    assert "20 steps of batch 64" in attack.budget(target) and "% of the original's" in attack.budget(target)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    torch.manual_seed(0)
    probe = Relearn(shots=[0, 5], steps=20, eval_every=10).run(model, target, seed=0)
    assert [step for step, _ in probe.curve] == [0, 10, 20]
    assert probe.curve[0][1] >= 95.0 and probe.success >= 90.0
    assert probe.metrics["final_k0"] >= 90.0 and probe.metrics["S50_k0"] == 0.0
    assert probe.metrics["steps_share"] > 0 and probe.hits is None
    assert any(not torch.equal(before[n], t) for n, t in model.state_dict().items())  # it trained


def test_relearn_refuses_what_it_cannot_do(digits_classifier):
    target, _ = digits_classifier
    with pytest.raises(ConfigError, match="generators"):
        Relearn(neighbor=True).check(target)
    with pytest.raises(ConfigError, match="forget set has"):
        Relearn(shots=[100_000]).check(target)
    with pytest.raises(ConfigError, match="shots"):
        Relearn(shots=[]).check(target)


# -- diffusion -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("neighbor", [False, True])
def test_relearn_runs_on_a_tiny_class_conditional_ddpm(tmp_path, neighbor):
    from tiny_diffusion import tiny_ddpm_pipeline

    from unlearn.models.diffusion import load_diffusion

    model = load_diffusion(tiny_ddpm_pipeline(tmp_path / "ddpm", num_classes=10))
    recipe = {
        "method": {"name": "retrain"},
        "model": {"family": "diffusion", "checkpoint": str(tmp_path / "ddpm")},
        "data": {"dataset": "digits", "forget_class": [3]},
        "eval": {
            "judge": JUDGE,
            "second_judge": JUDGE,
            "samples": 4,
            "steps": 2,
            "metrics": ["erasure_rate"],
        },
    }
    target, model = _target(recipe, model)
    unet = {n: t.clone() for n, t in model.unet.state_dict().items()}
    torch.manual_seed(0)
    probe = Relearn(shots=[0, 2], steps=2, batch_size=4, eval_every=1, samples=4, neighbor=neighbor).run(
        model, target, seed=0
    )
    _assert_probe(probe, 2, [0, 2])
    assert (
        "success_judge_a" in probe.metrics
        and probe.images is not None
        and probe.images.shape[1:] == (1, 8, 8)
    )
    assert any(not torch.equal(unet[n], t) for n, t in model.unet.state_dict().items())


# -- GAN -------------------------------------------------------------------------------------------------


def _tiny_gan_target():
    from test_gan import tiny

    recipe = {
        "method": {"name": "retrain"},
        "model": {"family": "gan", "arch": "dcgan_digits", "checkpoint": None},
        "data": {"dataset": "digits", "forget_class": [3]},
        "eval": {"judge": JUDGE, "second_judge": JUDGE, "samples": 8, "metrics": ["erasure_rate"]},
    }
    return _target(recipe, tiny())


@pytest.mark.parametrize("neighbor", [False, True])
def test_relearn_runs_on_a_tiny_gan_and_is_reproducible(neighbor):
    target, model = _tiny_gan_target()
    start = {n: t.clone() for n, t in model.state_dict().items()}
    attack = Relearn(shots=[0, 2], steps=2, batch_size=8, eval_every=1, samples=8, neighbor=neighbor)
    probes = []
    for _ in range(2):
        model.load_state_dict(start)
        torch.manual_seed(0)
        probes.append(attack.run(model, target, seed=0))
    _assert_probe(probes[0], 2, [0, 2])
    assert probes[0].generations == 8 * 5
    assert probes[0].curve == probes[1].curve and probes[0].metrics == probes[1].metrics
    assert any(not torch.equal(start[n], t) for n, t in model.state_dict().items())


def test_retrain_gan_trains_fresh_weights_on_the_retained_images(tmp_path):
    from tiny_diffusion import cpu_accelerator

    from unlearn.methods import get_method
    from unlearn.methods.baselines import RetrainGAN

    target, model = _tiny_gan_target()
    assert get_method("retrain", "gan") is RetrainGAN
    start = {n: t.clone() for n, t in model.state_dict().items()}
    torch.manual_seed(0)
    result = RetrainGAN(steps=3, batch_size=8).unlearn(model, target.data, cpu_accelerator(tmp_path))
    after = result.state_dict()
    for part in ("generator.", "discriminator."):
        assert any(not torch.equal(start[n], after[n]) for n in start if n.startswith(part)), part
    assert result.sample(4).shape == (4, 1, 8, 8)

    empty = target.data
    empty.retain = empty.retain.subset([])
    with pytest.raises(ConfigError, match="real images"):
        RetrainGAN(steps=1).unlearn(model, empty, cpu_accelerator(tmp_path))
