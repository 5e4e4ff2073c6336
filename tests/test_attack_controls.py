"""Sanity controls for the generative attacks: "erasures" that only hide the output fool the plain erasure rate
and are seen through by the attacks, which reach the model the way an attacker would.

- a text-to-image model that swaps the erased prompts for the anchor before its text encoder, and a DDPM that
  swaps the erased class id for the anchor's: their exact-prompt generations are the anchor's (the harness's
  erasure rate reads "erased"), while concept inversion and the token search get exactly the original model's
  results (so R = 1 against any Retrain that differs from the original);
- a GAN that throws away the samples its judge calls the erased class after generating them: `sample` never
  shows the class, while latent inversion and latent search get exactly the original's results.

These fakes live in the tests only. The classifier control (a logit pushed down, exposed by the feature probe)
is in test_attacks.py; the same controls on the digits worlds with their Retrain models are measured by
benchmarks/attack_controls.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_attack_inversion import SETTINGS as INVERSION
from test_attack_inversion import _target as diffusion_target
from test_gan import tiny
from tiny_diffusion import load_pipeline, tiny_ddpm_pipeline, tiny_sd_pipeline

from unlearn.attacks import get_attack


def swapping_fake(model, forget: list, anchor):
    """The model with its erased conditions replaced by the anchor before encoding: prompts (text) or class ids."""
    fake = copy.deepcopy(model)
    encode = fake.encode

    def swapped(conditions):
        if fake.conditioning == "text":
            return encode([anchor if c in forget else c for c in conditions])
        ids = torch.as_tensor(conditions).clone()
        ids[torch.isin(ids, torch.as_tensor(forget))] = int(anchor)
        return encode(ids)

    fake.encode = swapped
    return fake


def rejecting_fake(gan, judge, label: int):
    """The GAN with `sample` keeping only the draws its judge does not call `label` (drawing more until full)."""
    fake = copy.deepcopy(gan)
    sample = fake.sample

    def filtered(n, seed=0, batch_size=1024):
        kept, round_ = [], 0
        while sum(len(k) for k in kept) < n:
            images = sample(n, seed=seed + 7919 * round_, batch_size=batch_size)
            kept.append(images[judge(images).argmax(1) != label])
            round_ += 1
        return torch.cat(kept)[:n]

    fake.sample = filtered
    return fake


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    return {
        "text": load_pipeline(tiny_sd_pipeline(root / "sd", vae=False)),
        "class": load_pipeline(tiny_ddpm_pipeline(root / "ddpm", num_classes=10)),
    }


def _same(first, second) -> None:
    assert first.success == second.success and first.metrics == second.metrics
    if first.images is not None:
        assert torch.equal(first.images, second.images)


@pytest.mark.parametrize("conditioning", ["text", "class"])
def test_a_condition_swapping_fake_fools_the_erasure_rate_and_not_the_attacks(
    pipelines, conditioning, one_thread
):
    original = pipelines[conditioning]
    target = diffusion_target(original, conditioning)
    prompts = target.data.prompts
    anchor = prompts.anchor[0]
    fake = swapping_fake(original, list(prompts.forget), anchor)
    # Fooled: what the fake draws for the erased conditions is the anchor's drawing.
    shown = fake.generate(fake.as_conditions([prompts.forget[0]] * 2), steps=2, seed=5)
    anchors = original.generate(original.as_conditions([anchor] * 2), steps=2, seed=5)
    assert torch.equal(shown, anchors)
    # Not fooled: the attacks reach the model below the swap, and get the original's results exactly.
    attacks = [get_attack("concept_inversion")(**INVERSION)]
    if conditioning == "text":
        attacks.append(get_attack("token_search")(targets=2, max_tokens=4, batch=8))
    for attack in attacks:
        _same(attack.run(fake, target, seed=0), attack.run(original, target, seed=0))


def test_a_rejecting_gan_fools_sampling_and_not_the_latent_attacks(one_thread):
    from test_attack_gan import make_target

    original = tiny()
    target = make_target(original)
    judge, label = target.harness.judge, target.data.prompts.concept_label
    fake = rejecting_fake(original, judge, label)
    assert (judge(original.sample(400, seed=0)).argmax(1) == label).any()  # the original draws the class
    assert not (judge(fake.sample(400, seed=0)).argmax(1) == label).any()  # the fake never shows it
    settings = {
        "latent_inversion": dict(images=4, restarts=1, steps=20),
        "latent_search": dict(starts=8, steps=10),
    }
    for name, values in settings.items():
        attack = get_attack(name, "gan")(**values)
        _same(attack.run(fake, target, seed=0), attack.run(original, target, seed=0))
