"""The GAN attacks (reference/attacks.md §3): latent inversion, judge-guided latent search and its random-latents
baseline. Fast tests run them on the tiny GAN of test_gan with toy judges (no world is built)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_gan import tiny

from unlearn.attacks import get_attack
from unlearn.attacks.base import Target
from unlearn.attacks.latent_inversion import LatentInversion
from unlearn.attacks.latent_search import LatentSearch, counted_samples, realism_threshold
from unlearn.attacks.random_latents import RandomLatents
from unlearn.errors import ConfigError
from unlearn.harness import HARNESSES
from unlearn.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
LABEL = 3


def second_toy_judge():
    """Another fixed random projection (seed 1): a second judge that disagrees with `test_gan.toy_judge`."""
    weight = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))

    def judge(images: torch.Tensor) -> torch.Tensor:
        x = images.float().flatten(1)
        x = x - x.mean(1, keepdim=True)
        return 5 * (x / (x.norm(dim=1, keepdim=True) + 1e-8)) @ weight.T

    return judge


def make_target(model, second: str = "test_attack_gan:second_toy_judge", dataset: str = "digits") -> Target:
    recipe = load_recipe(
        ROOT / "recipes/gan/digits/adapt_then_unlearn.yaml",
        [
            "eval.judge=test_gan:toy_judge",
            f"eval.second_judge={second}",
            "eval.samples=100",
            f"data.forget_class=[{LABEL}]",
            f"data.dataset={dataset}",
        ],
    )
    harness = HARNESSES["gan"](recipe, "cpu", print)
    data = harness.task()
    harness.before(model, data, None)
    return Target(harness, data, model)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


FAST = {
    "latent_inversion": dict(images=6, restarts=2, steps=40),
    "latent_search": dict(starts=16, steps=20),
    "random_latents": dict(generations=300),
}


@pytest.mark.parametrize("name", list(FAST))
def test_attack_runs_is_deterministic_and_leaves_the_model_alone(name):
    model = tiny().train()
    target = make_target(model)
    attack = get_attack(name, "gan")(**FAST[name])
    attack.check(target)
    assert attack.budget(target)
    before = snapshot(model)
    first, again = attack.run(model, target, seed=0), attack.run(model, target, seed=0)
    # Not modified: same weights, no gradients left on them, modes given back.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.generator.training and model.discriminator.training
    assert first.to_json() == again.to_json() and torch.equal(first.images, again.images)
    assert 0.0 <= first.success <= 100.0 and first.trials == first.generations > 0
    assert first.success == pytest.approx(100.0 * first.hits / first.trials)
    assert set(first.metrics) == set(attack.metrics)
    assert first.images.ndim == 4 and first.images.min() >= 0 and first.images.max() <= 1


def test_registered_for_gans_only_with_the_baseline_and_budget():
    search = get_attack("latent_search", "gan")
    assert search.baselines == ("random_latents",)
    assert get_attack("random_latents", "gan") is RandomLatents
    target = make_target(tiny())
    assert search(starts=10, baseline_factor=3).generation_budget(target) == 30
    with pytest.raises(ConfigError, match="does not apply"):
        get_attack("latent_inversion", "classifier")
    with pytest.raises(ConfigError, match="at least 1"):
        LatentSearch(steps=0)


def test_tasks_without_real_images_are_refused():
    target = make_target(tiny(), dataset="generated")
    with pytest.raises(ConfigError, match="test_forget"):
        LatentInversion().check(target)
    with pytest.raises(ConfigError, match="realism guard"):
        LatentSearch().check(target)


def test_inversion_reconstructs_the_generators_own_samples():
    """Target images the generator drew itself: the inversion finds latents that reconstruct them closely, and
    its verdict is the judge's on those reconstructions (no early stopping on the judge)."""
    model = tiny()
    target = make_target(model)
    drawn = model.sample(6, seed=5)
    target.data.test_forget = [(image, LABEL) for image in drawn]
    probe = LatentInversion(images=6, restarts=2, steps=150, prior_weight=0.0).run(model, target, seed=0)
    spread = (drawn - drawn.mean(0)).pow(2).mean().item()
    assert probe.metrics["reconstruction_mse"] < 0.2 * spread
    assert [x for x, _ in probe.curve] == [0, 50, 100, 150]
    judged = target.harness.recognized(model, target.data, images=probe.images[1::2])
    assert torch.equal(judged.by_judge, target.harness.recognized(model, target.data, images=drawn).by_judge)


def test_search_climbs_judge_a_and_counts_only_guarded_samples():
    model = tiny()
    target = make_target(model)
    probe = LatentSearch(starts=32, steps=40).run(model, target, seed=0)
    baseline = RandomLatents(generations=32).run(model, target, seed=0)
    # The ascent raises judge A's rate from the random starts (the same latents as the baseline's).
    assert probe.curve[0][1] == baseline.metrics["judge_a"]
    assert probe.metrics["success_judge_a"] > baseline.metrics["judge_a"] + 30
    # A sample counts only where the second judge agrees and the original's discriminator finds it realistic.
    assert probe.success <= min(probe.metrics["second_judge"], probe.metrics["realism_pass"])
    images = torch.rand(50, 1, 8, 8)
    flags = counted_samples(target, images)
    realistic = target.original.discriminate(images).detach() >= realism_threshold(target)
    assert torch.equal(flags["realistic"], realistic)
    assert torch.equal(flags["counted"], flags["second_judge"] & realistic)


def test_realism_uses_the_originals_discriminator():
    model, other = tiny(0), tiny(1)
    target = make_target(model)
    threshold = realism_threshold(target)
    retain = target.data.retain
    real = torch.stack([retain[i][0] for i in range(len(retain))])
    assert (model.discriminate(real).detach() >= threshold).float().mean().item() == pytest.approx(
        0.95, abs=0.01
    )
    # Attacking another model leaves the yardstick where it was.
    before = copy.deepcopy(snapshot(other))
    RandomLatents(generations=20).run(other, target, seed=0)
    assert realism_threshold(target) == threshold
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
