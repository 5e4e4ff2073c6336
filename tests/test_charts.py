"""The PNG charts of report.md: drawn deterministically, written into the run folder, linked from the report; the
classifier's per-class numbers (torchmetrics) agree with its accuracies and carry Retrain's beside them; the
generative families keep their sample grids apart from the charts."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn.charts import loss_chart, per_class_chart, read_losses, recovery_chart
from unlearn.harness.base import Scores, chart_section
from unlearn.pipeline import run
from unlearn.recipe import load_recipe

RECIPES = "recipes/classifier/digits"
FAST = ["eval.metrics=[UA, RA, TA, per_class]", "data.forget_class=[3]"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        image.verify()


def linked_images(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


@pytest.fixture(scope="module")
def charted_run(digits_world, tmp_path_factory):
    """A short Retrain run and a random-label run (2 epochs) that names it as its reference."""
    folder = tmp_path_factory.mktemp("charted")
    retrain = load_recipe(f"{RECIPES}/retrain.yaml", [*FAST, "method.epochs=3"])
    run(retrain, folder / "retrain", log=lambda m: None)
    overrides = [*FAST, "method.epochs=2", f"eval.reference={folder / 'retrain'}"]
    metrics = run(load_recipe(f"{RECIPES}/random_label.yaml", overrides), folder / "rl", log=lambda m: None)
    return folder, metrics


def test_a_classifier_run_links_its_charts_and_each_is_a_png_in_the_run_folder(charted_run):
    folder, _ = charted_run
    for name in ("rl", "retrain"):
        report = (folder / name / "report.md").read_text()
        assert "## Charts" in report
        charts = [file for file in linked_images(report) if file.startswith("chart_")]
        assert charts == ["chart_per_class.png", "chart_training_loss.png"]
        for file in charts:
            assert_png(folder / name / file)


def test_per_class_accuracy_agrees_with_the_harness_accuracies_and_records_retrains(charted_run):
    folder, metrics = charted_run
    from unlearn.data import forget_classes
    from unlearn.datasets import load_dataset

    data = forget_classes(load_dataset("digits", "train"), load_dataset("digits", "test"), [3])
    counts = np.bincount([int(label) for _, label in data.test], minlength=10)
    per_class = np.array([metrics[f"acc_class_{c}"] for c in range(10)])
    # TA is over the test set without class 3: the per-class accuracies weighted by their test examples.
    kept = [c for c in range(10) if c != 3]
    assert np.average(per_class[kept], weights=counts[kept]) == pytest.approx(metrics["TA"], abs=1e-4)
    assert metrics["acc_class_3"] == pytest.approx(metrics["forget_test_acc"])
    assert metrics["original_acc_class_3"] == pytest.approx(metrics["original_forget_test_acc"])
    retrain = json.loads((folder / "retrain" / "metrics.json").read_text())
    for c in range(10):
        assert metrics[f"retrain_acc_class_{c}"] == retrain[f"acc_class_{c}"]
    assert (
        json.loads((folder / "rl" / "metrics.json").read_text())["retrain_acc_class_3"]
        == retrain["acc_class_3"]
    )
    report = (folder / "rl" / "report.md").read_text()
    assert "| Retrain | " + " | ".join(f"{retrain[f'acc_class_{c}']:.2f}" for c in range(10)) + " |" in report


def test_a_chart_drawn_again_from_the_same_numbers_has_the_same_bytes(tmp_path):
    accuracy = {
        "original": {c: 95.0 + c / 4 for c in range(10)},
        "unlearned": {c: 0.0 if c == 3 else 90.0 + c for c in range(10)},
        "Retrain": {c: 0.0 if c == 3 else 92.0 for c in range(10)},
    }
    first = per_class_chart(accuracy, [3], tmp_path / "a" / "per_class.png")
    second = per_class_chart(accuracy, [3], tmp_path / "b" / "per_class.png")
    assert_png(first)
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in first.parent.iterdir()) == ["per_class.png"]  # no temporaries left
    with Image.open(first) as image:
        assert image.size == (770, 330) and "Software" not in image.info
    many = per_class_chart({"unlearned": {c: 50.0 for c in range(100)}}, [7], tmp_path / "many.png")
    assert_png(many)  # past 20 classes: lines, not bars


def test_the_loss_chart_reads_every_stage_keeps_a_resumed_steps_last_value_and_skips_a_torn_line(tmp_path):
    log = tmp_path / "train.jsonl"
    records = [
        {"stage": "prune", "epoch": 1, "step": 10, "phase": "steps", "loss": 2.0, "lr": 0.1, "elapsed_s": 1},
        {"stage": "salun", "epoch": 1, "step": 5, "phase": "steps", "forget": 1.0, "retain": 0.5, "lr": 0.1},
        {"stage": "salun", "epoch": 1, "step": 10, "phase": "steps", "forget": 3.0, "retain": 0.4, "lr": 0.1},
        {"stage": "salun", "epoch": 1, "step": 10, "phase": "steps", "forget": 2.5, "retain": 0.3, "lr": 0.1},
    ]
    log.write_text("\n".join(json.dumps(r) for r in records) + '\n{"stage": "salun", "st')
    losses = read_losses(log)
    assert list(losses) == ["prune", "salun"]
    assert losses["salun"] == {"forget": [(5.0, 1.0), (10.0, 2.5)], "retain": [(5.0, 0.5), (10.0, 0.3)]}
    assert_png(loss_chart(log, tmp_path / "loss.png"))
    assert loss_chart(tmp_path / "absent.jsonl", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_the_recovery_chart_and_the_chart_section(tmp_path):
    curves = {"original": [(0, 97.0), (10, 98.0)], "retrain": [(0, 0.0), (10, 80.0)], "unlearned": [(0, 0.0)]}
    assert_png(recovery_chart(curves, tmp_path / "curve.png", "relearn (first seed)", "steps"))
    assert chart_section({}) == []
    lines = chart_section({"Training losses": "chart_training_loss.png"})
    assert "## Charts" in lines and "![Training losses](chart_training_loss.png)" in lines


def test_the_diffusion_report_shows_sample_grids_and_charts_apart(tmp_path):
    from unlearn.harness.diffusion import DiffusionHarness

    recipe = load_recipe("recipes/diffusion/digits_ddpm/esd.yaml", ["eval.reference=null"])
    harness = DiffusionHarness(recipe, "cpu", log=lambda m: None)
    record = {"stage": "esd", "epoch": 1, "step": 20, "phase": "steps", "loss": 0.1, "lr": 1e-4}
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
    images = torch.rand(12, 1, 8, 8)
    artifacts = harness.save_artifacts(
        tmp_path, Scores({}, {"forget": images}), Scores({}, {"forget": images})
    )
    assert artifacts["charts"] == {"Training losses as `train.jsonl` logged them": "chart_training_loss.png"}
    lines = harness.report_sections(None, {}, artifacts)
    assert [file for file in linked_images("\n".join(lines))] == [
        "samples_forget_original.png",
        "samples_forget.png",
    ]
    for file in ("samples_forget.png", "samples_forget_original.png", "chart_training_loss.png"):
        assert_png(tmp_path / file)
