"""U-LiRA / KLoM (`unlearn.attacks.ulira`): the statistics on synthetic numbers, and a tiny end-to-end budget on
the digits task (2 shadow runs of 1 epoch on a pool of 20: seconds, no world model needed)."""

from __future__ import annotations

import math
import types

import pytest
import torch

from unlearn.attacks.base import Target
from unlearn.attacks.ulira import ULiRA, auc, binned_kl, cross_fitted_scores, margins, tpr_at_fpr
from unlearn.errors import ConfigError


def test_margin_is_the_logit_of_the_true_class_probability():
    logits = torch.randn(3, 5, 10, dtype=torch.float64)
    labels = torch.randint(0, 10, (5,))
    p = logits.softmax(-1).gather(-1, labels.expand(3, 5).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(margins(logits, labels), (p / (1 - p)).log())


def test_binned_kl():
    same = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert binned_kl(same, same, 10) == 0.0
    assert binned_kl(torch.tensor([0.0]), torch.tensor([5.0]), 10) == pytest.approx(
        math.log(1 / 1e-5), rel=1e-3
    )


def test_likelihood_ratio_separates_shifted_sides_and_not_equal_ones():
    generator = torch.Generator().manual_seed(0)
    runs, pool = 16, 50
    forgotten = torch.rand(runs, pool, generator=generator) < 0.5
    per_example = 3 * torch.randn(pool, generator=generator)
    phi_out = per_example + torch.randn(runs, pool, generator=generator)
    shifted = per_example + 3 + torch.randn(runs, pool, generator=generator)
    same = per_example + torch.randn(runs, pool, generator=generator)
    scores_in, scores_out = cross_fitted_scores(shifted, phi_out, forgotten)
    assert ((scores_in > 0).float().mean() + (scores_out <= 0).float().mean()) / 2 > 0.85
    assert auc(scores_in, scores_out) > 90 and tpr_at_fpr(scores_in, scores_out, 0.01) > 20
    scores_in, scores_out = cross_fitted_scores(same, phi_out, forgotten)
    assert 40 < auc(scores_in, scores_out) < 60


def _target(role: str, overrides=()) -> Target:
    from unlearn.harness.classifier import classifier_task
    from unlearn.recipe import load_recipe

    recipe = load_recipe(
        "recipes/classifier/digits/random_label.yaml",
        [
            "data.forget_class=null",
            "data.forget_fraction=0.1",
            "method.lr=0.001",
            "method.epochs=1",
            *overrides,
        ],
    )
    harness = types.SimpleNamespace(recipe=recipe, family="classifier", device=torch.device("cpu"))
    return Target(harness, classifier_task(recipe), None, role=role, log=lambda *a: None)


@pytest.mark.parametrize("role", ["original", "retrain", "unlearned"])
def test_runs_end_to_end(one_thread, role):
    attack = ULiRA(shadows=2, epochs=1, pool=20)
    target = _target(role)
    attack.check(target)
    assert "shadow trainings" in attack.budget(target)
    probe = attack.run(None, target, seed=0)
    assert 0 <= probe.success <= 100 and probe.trials > 0 and probe.trials % 2 == 0
    assert probe.hits is not None and probe.success == pytest.approx(100 * probe.hits / probe.trials)
    assert set(probe.metrics) == set(ULiRA.metrics)
    assert probe.metrics["klom_floor"] >= 0


def test_refuses_class_wise_forgetting():
    target = _target("original", ["data.forget_fraction=null", "data.forget_class=[3]"])
    with pytest.raises(ConfigError, match="random-example forgetting"):
        ULiRA().check(target)


@pytest.mark.slow
def test_retrain_is_indistinguishable_and_random_labels_are_not(one_thread):
    """A smaller real budget (8 runs of 10 epochs, pool 100; about 80 s of CPU): Retrain's balanced accuracy
    stays near 50 %, while random labels (the digits_random10 setting) push the forgotten examples' margins below
    Retrain's, which the test sees (≈ 70 % at the default budget). KLoM is left out: with 8 runs each of its KLs
    compares 2 models against 2, too noisy to order the two."""
    attack = ULiRA(shadows=8, epochs=10, pool=100)
    retrain = attack.run(None, _target("retrain"), seed=0)
    unlearned = attack.run(None, _target("unlearned"), seed=0)
    assert 40 < retrain.success < 60
    assert unlearned.success > retrain.success + 5
