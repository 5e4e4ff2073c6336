"""Concept inversion (unlearn/attacks/concept_inversion.py) on tiny pipelines: text and class conditioning run
end to end, leave the attacked model's weights bit-identical, and repeat exactly for a seed."""

from __future__ import annotations

import pytest
import torch
from tiny_diffusion import load_pipeline, tiny_ddpm_pipeline, tiny_sd_pipeline

SETTINGS = {"steps": 3, "images": 4, "batch_size": 2, "samples": 4, "curve_points": 3, "curve_samples": 2}


def brightness_judge():
    """A deterministic stand-in judge (`eval.judge: test_attack_inversion:brightness_judge`): the digit is the
    image's mean brightness in tenths."""

    def judge(images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(
            (images.mean((1, 2, 3)) * 9).round().long().clamp(0, 9), 10
        ).float()

    return judge


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "text": tiny_sd_pipeline(root / "sd_pixels", vae=False),
        "text_vae": tiny_sd_pipeline(root / "sd"),
        "class": tiny_ddpm_pipeline(root / "ddpm", num_classes=10),
    }


def _target(model, conditioning: str):
    from unlearn.attacks.base import Target
    from unlearn.harness import DiffusionHarness
    from unlearn.recipe import from_dict

    if conditioning.startswith("text"):
        from unlearn.data import forget_generated_concept

        data = forget_generated_concept(
            model, "cat", ["a photo of the cat", "the cat"], None, ["a photo of the dog"], None,
            num_images=4, concept_label=3, steps=2,
        )  # fmt: skip
        spec = {"dataset": "generated", "concept": "cat"}
    else:
        from unlearn.data import forget_digits_concept
        from unlearn.datasets import load_dataset

        data = forget_digits_concept(
            load_dataset("digits", "train"), load_dataset("digits", "test"), "class", classes=[3]
        )
        spec = {"dataset": "digits", "forget_class": [3]}
    judge = "test_attack_inversion:brightness_judge"
    recipe = from_dict(
        {
            "method": "esd",
            "model": {"family": "diffusion", "checkpoint": "tiny"},
            "data": spec,
            "eval": {"samples": 4, "steps": 2, "judge": judge, "second_judge": judge},
        }
    )
    harness = DiffusionHarness(recipe)
    harness.before(model, data, None)
    return Target(harness, data, model, log=lambda message: None)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("conditioning", ["text", "text_vae", "class"])
def test_inversion_runs_leaves_the_model_unchanged_and_repeats(pipelines, conditioning, one_thread):
    from unlearn.attacks.concept_inversion import ConceptInversion

    model = load_pipeline(pipelines[conditioning])
    target = _target(model, conditioning)
    attack = ConceptInversion(**SETTINGS)
    attack.check(target)
    assert "3 Adam steps" in attack.budget(target)
    before, flags = _weights(model), {n: p.requires_grad for n, p in model.named_parameters()}
    tokenizer = model.tokenizer
    probes = []
    for _ in range(2):
        torch.manual_seed(5)  # as the runner seeds the global RNG before each run
        probes.append(attack.run(model, target, seed=5))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.tokenizer is tokenizer and (tokenizer is None or "<concept>" not in tokenizer.get_vocab())
    first, second = probes
    assert first.trials == 4 and first.generations == 4 + 3 * 2 and 0 <= first.success <= 100
    assert first.hits == round(first.success * first.trials / 100)
    assert set(first.metrics) == set(ConceptInversion.metrics)
    assert first.images.shape == (4, *target.data.forget[0][0].shape)
    assert [x for x, _ in first.curve] == [0.0, 1.0, 2.0, 3.0] and first.curve[-1][1] == first.success
    assert first.to_json() == second.to_json() and torch.equal(first.images, second.images)


def test_the_learned_vector_is_what_the_model_reads(pipelines, one_thread):
    """With the placeholder open, the new token's prompt moves with the vector (and only from the token on);
    with it closed, the model encodes as before (the hooks are gone)."""
    from unlearn.attacks.concept_inversion import ConceptInversion

    model = load_pipeline(pipelines["text"])
    target = _target(model, "text")
    attack = ConceptInversion(**SETTINGS)
    plain = model.encode(["the cat"])
    with torch.no_grad(), attack._placeholder(model, target.data.prompts) as (embedding, conditions):
        assert conditions == ["a photo of the <concept>", "the <concept>"]
        states = model.encode(["the <concept>"])
        embedding.vector.add_(1.0)
        moved = model.encode(["the <concept>"])
        assert not torch.equal(states, moved)
        assert torch.equal(states[:, :2], moved[:, :2])  # causal text encoder: tokens before it are unchanged
    assert torch.equal(model.encode(["the cat"]), plain)


def test_templates_replace_the_concept_word():
    from unlearn.attacks.concept_inversion import concept_templates

    prompts = ["three", "a handwritten digit three", "the threesome", "three", "a drawing of a Three"]
    assert concept_templates(prompts, "three") == [
        "{token}",
        "a handwritten digit {token}",
        "a drawing of a {token}",
    ]
    assert concept_templates(["a nude person {x}"], "nudity") == ["{token}"]


def test_refusals(pipelines, one_thread):
    from unlearn.attacks.concept_inversion import ConceptInversion
    from unlearn.errors import ConfigError

    model = load_pipeline(pipelines["text"])
    target = _target(model, "text")
    with pytest.raises(ConfigError, match="source"):
        ConceptInversion(source="web").check(target)
    with pytest.raises(ConfigError, match="already in the tokenizer"):
        ConceptInversion(token="<|endoftext|>", **SETTINGS).run(model, target, 0)


def test_images_from_the_original_model(pipelines, one_thread):
    """`source: original` fits the token to the original model's generations of the concept's prompts."""
    from unlearn.attacks.concept_inversion import ConceptInversion

    model = load_pipeline(pipelines["class"])
    target = _target(model, "class")
    attack = ConceptInversion(source="original", **SETTINGS)
    images = attack._concept_images(target, 0, torch.Generator().manual_seed(0))
    expected = model.generate(
        model.as_conditions([3] * 4), steps=2, guidance=target.harness.recipe.eval.guidance
    )
    assert torch.equal(images, expected)
    assert "original-model images" in attack.budget(target) and attack.run(model, target, 0).trials == 4
