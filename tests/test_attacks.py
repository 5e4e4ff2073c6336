"""The attack runner: the rules that make attack numbers honest (same attack on original, Retrain and the
unlearned model; R; Wilson intervals; baselines; caching that cannot mix models), the `unlearn attack` command,
`eval.attacks` in recipes, re-scoring with `unlearn eval`, the bench columns, and the classifier sanity controls
(the original scores R = 1, Retrain R = 0, and a fake that only pushes the forgotten logit down is exposed)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from unlearn.attacks import ATTACKS, attack_names, get_attack, residual, wilson
from unlearn.attacks.run import attack_columns, attack_info, attack_models, attack_run
from unlearn.bench import results_table
from unlearn.cli import main
from unlearn.errors import ConfigError
from unlearn.harness import HARNESSES
from unlearn.pipeline import run
from unlearn.recipe import load_recipe

RECIPES = "recipes/classifier/digits"
FAST = ["eval.metrics=[UA, RA, TA]", "data.forget_class=[3]"]
RELEARN = {"name": "relearn", "steps": 6, "shots": [0, 2], "eval_every": 3}


def test_residual_is_zero_at_retrain_one_at_the_original_and_undefined_when_they_agree():
    assert residual(30.0, 30.0, 90.0) == 0.0
    assert residual(90.0, 30.0, 90.0) == 1.0
    assert residual(60.0, 30.0, 90.0) == pytest.approx(0.5)
    assert math.isnan(residual(60.0, 50.0, 50.5))  # original and Retrain within a point: no verdict


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson(5, 10)
    assert low == pytest.approx(23.66, abs=0.01) and high == pytest.approx(76.34, abs=0.01)
    low, high = wilson(0, 20)
    assert low == 0.0 and high == pytest.approx(16.11, abs=0.01)
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_every_attack_is_documented_and_search_attacks_have_registered_baselines():
    assert {"relearn", "feature_probe"} <= set(attack_names())
    for name, cls in ATTACKS.items():
        assert cls.__doc__ and cls.success_meaning and cls.families, name
        for baseline in cls.baselines:
            assert set(get_attack(baseline).families) >= set(cls.families), (name, baseline)
            assert "generations" in get_attack(baseline).__dataclass_fields__, (name, baseline)


@pytest.mark.parametrize(
    "attacks, message",
    [
        ("[relearm]", "unknown attack 'relearm'; did you mean relearn"),
        ("[latent_search]", "does not apply to the classifier family"),
        ("[{name: relearn, stepz: 3}]", "unknown setting of attack 'relearn' 'stepz'"),
        ("[{name: relearn, shots: 3}]", "attack relearn.shots must be list"),
        ("[relearn, relearn]", "listed twice"),
        ("relearn", "must be list"),
    ],
)
def test_recipes_refuse_bad_attacks_in_one_sentence(attacks, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_recipe(f"{RECIPES}/random_label.yaml", [f"eval.attacks={attacks}"])


def test_attacks_without_a_retrain_reference_are_refused_before_anything_trains(tmp_path):
    recipe = load_recipe(
        f"{RECIPES}/random_label.yaml", [*FAST, "eval.reference=null", "eval.attacks=[feature_probe]"]
    )
    with pytest.raises(ConfigError, match="need the Retrain reference"):
        run(recipe, tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run" / "model").exists()


@pytest.fixture(scope="module")
def attacked_run(digits_world, tmp_path_factory):
    """A short Retrain run and a random-label run that names it as reference and runs two attacks."""
    folder = tmp_path_factory.mktemp("attacked")
    retrain = load_recipe(f"{RECIPES}/retrain.yaml", [*FAST, "method.epochs=4"])
    run(retrain, folder / "retrain", log=lambda m: None)
    overrides = [
        *FAST,
        "method.epochs=1",
        f"eval.reference={folder / 'retrain'}",
        f"eval.attacks=[feature_probe, {json.dumps(RELEARN)}]",
        "eval.attack_seeds=2",
    ]
    metrics = run(load_recipe(f"{RECIPES}/random_label.yaml", overrides), folder / "rl", log=lambda m: None)
    return folder, metrics


def test_a_run_with_eval_attacks_reports_each_attack_on_original_retrain_and_unlearned(attacked_run):
    folder, metrics = attacked_run
    for name in ("feature_probe", "relearn"):
        for prefix in ("", "original_", "retrain_"):
            assert 0.0 <= metrics[f"{prefix}{name}.success"] <= 100.0
        assert f"{name}.R" in metrics and f"{name}.R_std" in metrics
    low, high = metrics["feature_probe.success_low"], metrics["feature_probe.success_high"]
    assert low <= metrics["feature_probe.success"] <= high
    expected = residual(
        metrics["relearn.success"], metrics["retrain_relearn.success"], metrics["original_relearn.success"]
    )
    assert metrics["relearn.R"] == pytest.approx(expected, nan_ok=True)
    assert json.loads((folder / "rl" / "metrics.json").read_text())["feature_probe.R"] == pytest.approx(
        metrics["feature_probe.R"], nan_ok=True
    )
    report = (folder / "rl" / "report.md").read_text()
    assert "## Is it really gone?" in report and "### relearn" in report and "### feature_probe" in report
    assert "attack_relearn_curve.png" in report and (folder / "rl" / "attack_relearn_curve.png").exists()
    # The original's and Retrain's results are cached in the Retrain folder, one file per role and seed.
    cached = sorted(p.name for p in (folder / "retrain" / "attacks").iterdir())
    assert len([c for c in cached if c.startswith("relearn-original-")]) == 2
    assert len([c for c in cached if c.startswith("relearn-retrain-")]) == 2


def test_unlearn_eval_and_unlearn_attack_reproduce_the_attack_numbers(attacked_run, capsys):
    folder, metrics = attacked_run
    assert main(["eval", str(folder / "rl"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    attack_keys = [k for k in metrics if "." in k]
    assert attack_keys and all(again[k] == pytest.approx(metrics[k], nan_ok=True) for k in attack_keys)
    # Without the cache the original and Retrain are attacked afresh: the same numbers (seeded).
    for cached in (folder / "retrain" / "attacks").iterdir():
        cached.unlink()
    assert main(["attack", str(folder / "rl"), "--attack", "feature_probe", "--json"]) == 0
    fresh = json.loads(capsys.readouterr().out)
    for key in ("feature_probe.success", "original_feature_probe.success", "retrain_feature_probe.success"):
        assert fresh[key] == metrics[key]


def test_unlearn_attack_takes_settings_and_refuses_bad_ones_with_status_2(attacked_run, capsys):
    folder, _ = attacked_run
    assert main(["attack", str(folder / "rl"), "--attack", "feature_probe", "shots=2", "--json"]) == 0
    assert "feature_probe.R" in json.loads(capsys.readouterr().out)
    assert main(["attack", str(folder / "rl"), "--attack", "latent_search"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not apply to the classifier family" in err
    assert main(["attack", str(folder / "retrain" / "model")]) == 2
    assert "is not a run folder (no run.json in it)" in capsys.readouterr().err


def test_attack_keys_have_catalogue_entries_and_bench_columns(attacked_run):
    _, metrics = attacked_run
    assert attack_info("relearn.R").better == "lower"
    assert attack_info("original_feature_probe.success").title == "feature_probe"
    assert attack_info("relearn.final_k2").title.startswith("final")
    unlearned, original, retrain = attack_columns(metrics)
    assert set(unlearned) == {"feature_probe.success", "feature_probe.R", "relearn.success", "relearn.R"}
    assert original["relearn.R"] == 1.0 and retrain["relearn.R"] == 0.0
    assert original["relearn.success"] == metrics["original_relearn.success"]
    # The bench table puts them before RTE, titled from the catalogue, and says what they mean.
    stats = {"mean": 1.0, "std": 0.0}
    row = {k: stats for k in ("UA", "RA", "TA", "MIA", "RTE_s", *unlearned)}
    summary = {"original": row, "retrain": row, "salun": row}
    results = {"suite": "s", "family": "classifier", "seeds": [0], "reference": "retrain", "summary": summary}
    header = results_table(results).splitlines()[2]
    assert "| relearn | relearn R |" in header and header.index("relearn R") < header.index("RTE (s)")
    assert "R = (method − Retrain) / (original − Retrain)" in results_table(results)


def test_sanity_controls_original_scores_one_retrain_zero_and_a_pushed_down_logit_is_exposed(attacked_run):
    """The classifier controls of the issue: on the original every attack gives R = 1 and on Retrain R = 0
    by construction; a fake that erases only the output (class 3's bias pushed down until no example of it is
    predicted: UA 100 %) fools the forget accuracy and is exposed by the feature probe (R = 1)."""
    folder, _ = attacked_run
    recipe = load_recipe(folder / "rl" / "recipe.yaml")
    harness = HARNESSES["classifier"](recipe, "cpu", lambda m: None)
    original, data = harness.setup()
    harness.before(original, data, None)
    retrain = harness.load_output(folder / "retrain" / "model", data)
    fake = copy.deepcopy(original)
    with torch.no_grad():
        fake.head.bias[3] -= 100.0
    assert harness.recognized(fake, data).rate == 0.0  # "forgotten": not one held-out 3 is called a 3
    attacks = recipe.build_attacks(["feature_probe"])
    for unlearned, expected in ((original, 1.0), (retrain, 0.0), (fake, 1.0)):
        models = {"original": original, "retrain": retrain, "unlearned": unlearned}
        metrics, _ = attack_models(attacks, harness, data, models, [0, 1])
        assert metrics["feature_probe.R"] == pytest.approx(expected), expected


def test_attack_run_refuses_a_folder_without_its_retrain_model(attacked_run, tmp_path):
    folder, _ = attacked_run
    import shutil

    copied = tmp_path / "rl"
    shutil.copytree(folder / "rl", copied)
    recipe = (copied / "recipe.yaml").read_text().replace(str(folder / "retrain"), str(tmp_path / "gone"))
    (copied / "recipe.yaml").write_text(recipe)
    with pytest.raises(ConfigError, match="Retrain reference"):
        attack_run(copied, ["feature_probe"], log=lambda m: None)
