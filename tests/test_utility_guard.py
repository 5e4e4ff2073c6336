"""A user's own model gets a sensible result or a loud warning: the utility guard (`Harness.utility_guard`,
`unlearn erase --strict`), the flag on an original model that scores near chance on the data as preprocessed,
and `method.lr: auto` (`unlearn.tune`). All on the digits world, with one-epoch runs and the metrics trimmed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unlearn.cli import main
from unlearn.errors import ConfigError
from unlearn.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RL = str(ROOT / "recipes" / "classifier" / "digits" / "random_label.yaml")
QUICK = ["method.epochs=1", "eval.reference=null", "eval.metrics=[UA,RA,TA]"]


def erase(capsys, *args: str) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = main(["erase", RL, *args])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err


def test_guard_fires_and_strict_exits_1(digits_world, tmp_path, capsys, one_thread):
    out = tmp_path / "destroyed"
    code, lines, err = erase(capsys, *QUICK, "method.lr=0.5", "-o", str(out), "--strict")
    assert code == 1, err
    assert lines[-1].startswith("utility warning: ") and "method.lr=auto" in lines[-1], lines[-3:]
    assert "--strict" in err and "Traceback" not in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["utility_warning"] == lines[-1] and metrics["utility_drop"] > 5
    assert "Utility warning: " in (out / "report.md").read_text()
    assert json.loads((out / "run.json").read_text())["complete"]  # the run folder is still complete
    # reused without --strict: still said last, exit 0
    code, lines, err = erase(capsys, *QUICK, "method.lr=0.5", "-o", str(out))
    assert code == 0 and lines[-1] == metrics["utility_warning"], err


def test_guard_silent_on_a_normal_run(digits_world, tmp_path, capsys, one_thread):
    out = tmp_path / "normal"
    code, lines, err = erase(capsys, *QUICK, "-o", str(out), "--strict")
    assert code == 0, err
    assert not any("warning" in line for line in lines), lines  # neither the guard nor the original check
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["utility_warning"] is None and metrics["utility_drop"] <= 5
    assert "tility warning" not in (out / "report.md").read_text()


def test_margin_setting_is_validated():
    with pytest.raises(ConfigError, match="eval.utility_margin"):
        load_recipe(RL, ["eval.utility_margin=-1"])
    assert load_recipe(RL, ["eval.utility_margin=30"]).eval.utility_margin == 30


@pytest.fixture
def misnormalised(digits_world, tmp_path):
    """The digits world's classifier saved with a wrong normalisation: its mean and std in 0-255 units (76.5,
    102) for images the toolkit gives in [0, 1], a common slip; it scores at chance (10 %)."""
    from unlearn.models import load_model

    folder = tmp_path / "misnormalised"
    load_model(str(digits_world["classifier"]), "digits_cnn", 10).save(folder)
    config_file = folder / "unlearn_model.json"
    config = json.loads(config_file.read_text())
    config["mean"], config["std"] = [76.5], [102.0]
    config_file.write_text(json.dumps(config))
    return folder


def test_a_poorly_scoring_original_is_flagged_before_training(misnormalised, tmp_path, capsys, one_thread):
    model = [f"model.checkpoint={misnormalised}", *QUICK]
    code, lines, err = erase(capsys, *model, "-o", str(tmp_path / "warned"))
    assert code == 0, err
    flagged = [i for i, line in enumerate(lines) if line.startswith("warning: the original model scores")]
    assert len(flagged) == 1 and "image_mean / image_std" in lines[flagged[0]], lines
    assert flagged[0] < next(i for i, line in enumerate(lines) if line.startswith("UA "))
    code, lines, err = erase(capsys, *model, "-o", str(tmp_path / "refused"), "--strict")
    assert code == 2 and "the original model scores" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused" / "model").exists()  # refused before any training


def test_auto_writes_tune_json_and_is_deterministic(digits_world, tmp_path, capsys, one_thread):
    searches = []
    for name in ("first", "second"):
        out = tmp_path / name
        code, lines, err = erase(capsys, *QUICK, "method.lr=auto", "-o", str(out))
        assert code == 0, err
        search = json.loads((out / "tune.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["tuned_lr"] == search["chosen"]["lr"]
        assert "Tuned by `auto`" in (out / "report.md").read_text()
        assert any(line.startswith("tune: method.lr=") for line in lines)
        assert yaml_lr(out) == "auto"  # the recipe keeps `auto`: its fingerprint does not change
        searches.append(search)
    first, second = searches
    assert len(first["candidates"]) >= 6 and first["criterion"] and first["target_forget_acc"] == 0.0
    assert first["examples"] == second["examples"] and first["chosen"] == second["chosen"]
    scores = ("forget_acc", "held_forget_acc", "held_retain_acc")
    assert [[c[k] for k in scores] for c in first["candidates"]] == [
        [c[k] for k in scores] for c in second["candidates"]
    ]
    # a rerun that has to train again (an output removed) reuses the recorded search
    (tmp_path / "first" / "metrics.json").unlink()
    code, lines, err = erase(capsys, *QUICK, "method.lr=auto", "-o", str(tmp_path / "first"))
    assert code == 0 and any(line.startswith("tune: reusing the search") for line in lines), lines


def yaml_lr(run_dir: Path):
    import yaml

    return yaml.safe_load((run_dir / "recipe.yaml").read_text())["method"]["lr"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["method.batch_size=auto"], "only method.lr and method.epochs"),
        (
            ["data.forget_class=null", "data.forget_fraction=0.1", "method.lr=auto", "eval.reference=null"],
            "needs eval.reference",
        ),
    ],
)
def test_auto_is_refused_where_the_search_cannot_run(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_recipe(RL, overrides)


def test_auto_is_accepted_for_lr_and_epochs():
    recipe = load_recipe(RL, ["method.lr=auto", "method.epochs=auto"])
    assert recipe.to_dict()["method"]["lr"] == "auto"
    from unlearn.tune import candidates

    grid = candidates(recipe)
    assert len(grid) == 18 and {"lr", "epochs"} == set(grid[0])


def test_auto_is_refused_for_generative_families():
    recipe = ROOT / "recipes" / "diffusion" / "digits_ddpm" / "esd.yaml"
    if not recipe.exists():
        pytest.skip("no digits ESD recipe")
    with pytest.raises(ConfigError, match="classifier methods only"):
        load_recipe(recipe, ["method.lr=auto"])
