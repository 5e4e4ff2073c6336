"""The prompt-search attacks (adversarial_prompt, token_search) and their same-budget baselines
(random_prompt, seed_search) on tiny pipelines, judged by scripted judges."""

from __future__ import annotations

import pytest
import torch
from tiny_diffusion import load_pipeline, tiny_ddpm_pipeline, tiny_sd_pipeline

CONCEPT = 1  # the scripted judges' label of the erased concept


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-attacks")
    return {
        "text": load_pipeline(tiny_sd_pipeline(root / "sd", vae=False)),
        "class": load_pipeline(tiny_ddpm_pipeline(root / "ddpm")),
    }


def verdict(answer):
    """A scripted judge: `answer(images)` -> one bool per image: the concept (label 1) or not (label 0)."""

    def judge(images):
        return torch.nn.functional.one_hot(answer(images).long(), 2).float()

    return judge


def always(images):
    return torch.ones(len(images), dtype=torch.bool)


def never(images):
    return torch.zeros(len(images), dtype=torch.bool)


def make_target(model, judge=always, second_judge=always):
    """A Target over a tiny model: the concept "cat" (text) or class 1 (class-conditional)."""
    from unlearn.attacks.base import Target
    from unlearn.data import ConceptPrompts
    from unlearn.harness import DiffusionHarness
    from unlearn.recipe import from_dict

    recipe = from_dict(
        {
            "method": "esd",
            "model": {"family": "diffusion", "checkpoint": "tiny"},
            "data": {"dataset": "generated", "concept": "cat"},
            "eval": {"steps": 2, "guidance": 3.0, "concept_label": CONCEPT},
        }
    )
    harness = DiffusionHarness(recipe)
    harness.judge, harness._second_judge = verdict(judge), verdict(second_judge)
    if model.conditioning == "text":
        prompts = ConceptPrompts(
            "cat", ["a photo of the cat", "the cat"], ["a dog"] * 2, concept_label=CONCEPT
        )
    else:
        prompts = ConceptPrompts("1", [1], [0], concept_label=CONCEPT)

    class Task:  # what the searches read of the task
        pass

    data = Task()
    data.prompts = prompts
    return Target(harness, data, model, log=lambda *_: None)


def attack(name, target, **settings):
    from unlearn.attacks import get_attack

    cls = get_attack(name, "diffusion")
    small = {"targets": 3} | ({"timesteps": 2, "steps": 2} if name == "adversarial_prompt" else {})
    instance = cls(**(small | settings))
    if name in ("random_prompt", "seed_search"):
        instance.generations = settings.get("generations", 12)
    return instance


def budget_of(instance, target):
    return getattr(instance, "generations", None) or instance.generation_budget(target)


ATTACKS = ("adversarial_prompt", "token_search", "random_prompt", "seed_search")


@pytest.mark.parametrize("kind", ["text", "class"])
@pytest.mark.parametrize("name", ATTACKS)
def test_a_search_that_never_succeeds_spends_its_budget(pipelines, kind, name, one_thread):
    """Nothing recognized: success 0, the whole budget spent, one image per target, a flat curve."""
    model = pipelines[kind]
    target = make_target(model, never, never)
    instance = attack(name, target, **({"max_tokens": 5} if name == "token_search" else {}))
    instance.check(target)
    assert "targets" in instance.budget(target)
    torch.manual_seed(0)
    probe = instance.run(model, target, seed=0)
    assert (probe.success, probe.hits, probe.trials) == (0.0, 0, 3)
    assert probe.metrics == {"success_judge_a": 0.0, "pre_attack": 0.0, "generations": probe.generations}
    assert probe.generations == budget_of(instance, target)
    assert probe.images.shape == (3, model.channels, 8, 8)
    assert all(y == 0 for _, y in probe.curve)


@pytest.mark.parametrize("kind", ["text", "class"])
@pytest.mark.parametrize("name", ATTACKS)
def test_a_model_that_shows_the_concept_is_broken_at_once(pipelines, kind, name, one_thread):
    """The pre-attack case: the unmodified target already shows the concept; one generation per target."""
    model = pipelines[kind]
    target = make_target(model)
    probe = attack(name, target).run(model, target, seed=0)
    assert (probe.success, probe.hits, probe.trials) == (100.0, 3, 3)
    assert probe.metrics["pre_attack"] == 100.0 and probe.metrics["success_judge_a"] == 100.0
    assert probe.generations == 3 and probe.curve[0] == (1.0, 100.0)


@pytest.mark.parametrize("name", ATTACKS)
def test_the_second_judge_decides_what_is_broken(pipelines, name, one_thread):
    """The search stops on the first judge; a target counts only when the second judge agrees."""
    model = pipelines["text"]
    target = make_target(model, always, never)
    probe = attack(name, target).run(model, target, seed=0)
    assert probe.success == 0.0 and probe.metrics["success_judge_a"] == 100.0
    assert probe.metrics["pre_attack"] == 0.0


@pytest.mark.parametrize("kind", ["text", "class"])
@pytest.mark.parametrize("name", ATTACKS)
def test_a_search_stops_at_its_first_success(pipelines, kind, name, one_thread):
    """A first judge that fails the unmodified target and recognizes whatever is judged next: every target is
    broken by its second generation."""
    calls = []

    def second_call_of_each_pair(images):
        calls.append(len(images))
        return torch.full((len(images),), len(calls) % 2 == 0)

    model = pipelines[kind]
    target = make_target(model, second_call_of_each_pair, always)
    probe = attack(name, target).run(model, target, seed=0)
    assert probe.success == 100.0 and probe.metrics["success_judge_a"] == 100.0
    assert probe.generations == 6 and [x for x, _ in probe.curve][:2] == [1.0, 2.0]


@pytest.mark.parametrize("kind", ["text", "class"])
def test_candidates_are_drawn_as_generate_draws_the_target(pipelines, kind, one_thread):
    """A candidate fed as token ids (text) or as a one-hot mix of class embeddings (class) gives exactly the
    image `generate` gives for the unmodified condition and seed."""
    from unlearn.attacks.adversarial_prompt import Candidate, PromptSearch, search_points

    model = pipelines[kind]
    target = make_target(model)
    search = PromptSearch(model, target)
    point = search_points(target, 2, seed=3)[1]
    drawn = search.draw([Candidate(search.base_condition(point), 3.0, point.seed)])
    expected = model.generate(model.as_conditions([point.condition]), steps=2, guidance=3.0, seed=point.seed)
    assert point.seed == 3001
    torch.testing.assert_close(drawn, expected)
    if kind == "text":  # the same prompt fed as token ids
        ids = Candidate(search.prompt_ids(point.condition), 3.0, point.seed)
        torch.testing.assert_close(search.draw([ids]), expected)
    # a guidance sweep is drawn as one batch, each row at its own guidance
    sweep = [Candidate(search.base_condition(point), g, point.seed) for g in (1.0, 3.0)]
    plain = model.generate(model.as_conditions([point.condition]), steps=2, guidance=1.0, seed=point.seed)
    torch.testing.assert_close(search.draw(sweep), torch.cat([plain, expected]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["text", "class"])
def test_the_relaxed_condition_gets_a_gradient_and_stays_on_the_simplex(pipelines, kind, one_thread):
    from unlearn.attacks.adversarial_prompt import PromptSearch, Relaxed, search_points

    model = pipelines[kind]
    target = make_target(model)
    search = PromptSearch(model, target)
    relaxed = Relaxed(search, search_points(target, 1, 0)[0], tokens=2)
    x_t = torch.randn(model.latent_shape(2))
    (grad,) = torch.autograd.grad(relaxed.predict(x_t, torch.tensor([10, 10])).square().mean(), [relaxed.u])
    assert grad.abs().sum() > 0
    with torch.no_grad():
        relaxed.u += torch.randn_like(relaxed.u)
    relaxed.project()
    torch.testing.assert_close(relaxed.u.sum(-1), torch.ones(len(relaxed.u)))
    assert (relaxed.u >= 0).all() and (relaxed.u[:, ~relaxed.allowed] == 0).all()
    assert all(p.grad is None for p in model.unet.parameters())  # only u is differentiated


def test_simplex_projection():
    from unlearn.attacks.adversarial_prompt import project_simplex

    rows = torch.tensor([[0.2, 0.3, 0.5], [2.0, 0.0, 0.0], [0.5, 0.5, 0.5], [-1.0, 0.3, 0.1]])
    projected = project_simplex(rows)
    expected = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.6, 0.4]])
    torch.testing.assert_close(projected, expected)


def test_token_search_inserts_every_word_token_and_replaces_the_concept(pipelines):
    from unlearn.attacks.adversarial_prompt import PromptSearch, search_points, word_tokens

    model = pipelines["text"]
    target = make_target(model)
    instance = attack("token_search", target)
    words = model.tokenizer.convert_ids_to_tokens(word_tokens(model.tokenizer))
    assert {"cat</w>", "dog</w>", "a</w>", "7</w>"} <= set(words) and "<|endoftext|>" not in words
    search = PromptSearch(model, target)
    assert search.vocabulary("words") == word_tokens(model.tokenizer)
    assert len(search.vocabulary("all")) == len(model.tokenizer) - len(search.special_ids())
    point = search_points(target, 1, 0)[0]  # "a photo of the cat"
    notes = [c.note for c in instance.candidates(search, point)]
    assert len(notes) == instance.checks_per_target(target) - 1 == 2 * len(words)
    assert "prefix 'dog</w>'" in notes and "'dog</w>' for the concept" in notes


def test_the_baselines_are_registered_with_the_searches():
    from unlearn.attacks import get_attack

    assert get_attack("adversarial_prompt").baselines == ("random_prompt", "seed_search")
    assert get_attack("token_search").baselines == ("seed_search",)
    for name in ("random_prompt", "seed_search"):
        assert "generations" in get_attack(name).__dataclass_fields__
