"""kill -9 at a random moment of a run, then the same command again: it resumes from its last checkpoint (the
log says from where) and its metrics.json equals an uninterrupted run's. One step-based diffusion run, one LAF
run and one GAN run, through the real console script."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from test_cli import unlearn_script

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def ddpm_recipe(tmp_path: Path) -> list[str]:
    from tiny_diffusion import tiny_ddpm_pipeline

    checkpoint = tiny_ddpm_pipeline(tmp_path / "ddpm", num_classes=10)
    recipe = {
        "method": {"name": "salun", "steps": 60, "batch_size": 16},
        "model": {"family": "diffusion", "checkpoint": str(checkpoint)},
        "data": {"forget_class": [3]},
        "train": {"checkpoint_every_steps": 5},
        "eval": {"samples": 10, "steps": 2},
    }
    (tmp_path / "ddpm.yaml").write_text(yaml.safe_dump(recipe))
    return [str(tmp_path / "ddpm.yaml")]


def laf_recipe(tmp_path: Path) -> list[str]:
    return [str(ROOT / "recipes/classifier/digits/laf.yaml"), "eval.reference=null", "method.epochs=12"]


def gan_recipe(tmp_path: Path) -> list[str]:
    from test_gan import tiny

    tiny().save(tmp_path / "gan")
    return [
        str(ROOT / "recipes/gan/digits/adapt_then_unlearn.yaml"),
        "--forget-class=3",
        f"--checkpoint={tmp_path / 'gan'}",
        "method.feedback=test_gan:toy_judge",
        "eval.judge=test_gan:toy_judge",
        "method.negatives=20",
        "method.positives=300",
        "method.adapt_steps=40",
        "method.steps=60",
        "method.batch_size=16",
        "method.fisher_samples=4",
        "train.checkpoint_every_steps=5",
        "eval.samples=200",
    ]


def start(args: list[str], out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [*unlearn_script(), "erase", *args, "-o", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize("recipe", [ddpm_recipe, laf_recipe, gan_recipe], ids=["ddpm", "laf", "gan"])
def test_killed_run_resumes_to_the_uninterrupted_result(recipe, tmp_path, digits_world):
    args = recipe(tmp_path)
    whole = start(args, tmp_path / "whole")
    assert whole.wait(timeout=900) == 0, whole.stdout.read()

    killed = start(args, tmp_path / "killed")
    deadline = time.time() + 600
    while not list((tmp_path / "killed" / "checkpoints").rglob("state.pt")):  # at least one checkpoint
        assert killed.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists(), "killed too late: the run had finished"

    again = start(args, tmp_path / "killed")
    output = again.communicate(timeout=900)[0]
    assert again.returncode == 0, output
    assert "continuing the interrupted run" in output and "resuming stage" in output
    assert "resuming stage" in (tmp_path / "killed" / "run.log").read_text()
    ours, theirs = (
        json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("killed", "whole")
    )
    timing = {"RTE_s", "retrain_RTE_s"}
    assert {k: v for k, v in ours.items() if k not in timing} == {
        k: v for k, v in theirs.items() if k not in timing
    }
    segments = json.loads((tmp_path / "killed" / "run.json").read_text())["segments"]
    assert len(segments) == 2 and ours["RTE_s"] == pytest.approx(sum(s["seconds"] for s in segments))
