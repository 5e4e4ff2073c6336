"""A run folder is the truth about one run: reruns resume or reuse only the same recipe and input checkpoint,
a second writer is refused, and RTE sums the segments of a resumed run."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from unlearn.cli import main
from unlearn.errors import CheckpointError, ConfigError
from unlearn.pipeline import run
from unlearn.recipe import find_path, load_recipe
from unlearn.runfolder import RunFolder

RL = str(find_path("recipes/classifier/digits/random_label.yaml"))
QUICK = ["method.epochs=1", "eval.reference=null", "eval.metrics=[UA, RA, TA]"]


def quick(*overrides: str):
    return load_recipe(RL, [*QUICK, *overrides])


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_rerun_with_another_recipe_is_refused_and_changes_nothing(digits_world, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    first = run(quick(), out, log=lambda m: None)
    before = files(out)
    code = main(["erase", RL, "-o", str(out), *QUICK, "method.lr=0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "another recipe" in err and "method.lr" in err
    assert files(out) == before
    # another method into the same folder is refused as well; the same recipe reuses the folder
    with pytest.raises(ConfigError, match=r"another recipe \(method\."):
        run(load_recipe(find_path("recipes/classifier/digits/finetune.yaml"), QUICK), out, log=lambda m: None)
    messages = []
    assert run(quick(), out, log=messages.append) == first
    assert "already complete" in messages[0] and files(out) == before


def test_interrupted_run_resumes_only_its_own_recipe(digits_world, tmp_path, one_thread):
    out = tmp_path / "run"
    with RunFolder(out, quick()) as folder:  # a run that began unlearning and was killed before it finished
        folder.begin_segment()
    with pytest.raises(ConfigError, match="another recipe .*seed: 0 there, 7 here"):
        run(quick("seed=7"), out, log=lambda m: None)
    messages = []
    run(quick(), out, log=messages.append)
    assert any("continuing the interrupted run" in m for m in messages)
    assert "continuing the interrupted run" in (out / "run.log").read_text()


def test_a_run_that_failed_before_unlearning_does_not_claim_its_folder(digits_world, tmp_path, one_thread):
    out = tmp_path / "run"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")  # found only when the model loads, after the folder is opened
    with pytest.raises(CheckpointError, match="garbage.pt"):
        run(quick(f"model.checkpoint={garbage}"), out, log=lambda m: None)
    run(quick(), out, log=lambda m: None)  # another recipe may use the folder: nothing of the first one ran
    assert (out / "metrics.json").exists()


def test_a_run_scored_on_some_metrics_only_finishes(digits_world, tmp_path, one_thread):
    """The final log line names the metrics the run has (it used to raise KeyError without UA, TA or MIA)."""
    messages = []
    metrics = run(
        quick("eval.metrics=[RA]", "eval.reference=recipes/classifier/digits/retrain.yaml"),
        tmp_path / "r",
        log=messages.append,
    )
    assert "RA" in metrics and "UA" not in metrics and "avg_gap" not in metrics
    assert any(m.startswith("RA ") for m in messages)


def test_a_second_writer_is_refused(digits_world, tmp_path, one_thread):
    out = tmp_path / "run"
    with RunFolder(out, quick()):  # another run holds the folder
        with pytest.raises(ConfigError, match=f"another run \\(pid {os.getpid()}\\) is writing to"):
            run(quick(), out, log=lambda m: None)
    run(quick(), out, log=lambda m: None)  # free again once it is done
    assert not (out / ".lock").exists()


def test_a_folder_that_is_not_a_run_folder_is_refused(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(ConfigError, match="holds no run.json"):
        run(quick(), out, log=lambda m: None)
    assert (out / "thesis.tex").read_text() == "keep me"


def test_a_changed_input_checkpoint_is_refused(digits_world, tmp_path, one_thread):
    checkpoint = tmp_path / "classifier"
    shutil.copytree(digits_world["classifier"], checkpoint)
    recipe = quick(f"model.checkpoint={checkpoint}")
    run(recipe, tmp_path / "run", log=lambda m: None)
    (checkpoint / "world.json").write_text((checkpoint / "world.json").read_text() + "\n")
    with pytest.raises(ConfigError, match="another input checkpoint"):
        run(quick(f"model.checkpoint={checkpoint}"), tmp_path / "run", log=lambda m: None)


def test_rte_sums_the_segments_up_to_their_last_checkpoint(tmp_path):
    """A killed segment counts until its last training checkpoint (the work after it is done again)."""
    out = tmp_path / "run"
    with RunFolder(out, quick()) as folder:
        assert folder.begin_segment() == 0.0
    record = json.loads((out / "run.json").read_text())
    started = time.time() - 100.0
    record["segments"][0]["started"] = started
    (out / "run.json").write_text(json.dumps(record))
    saved = out / "checkpoints" / "stage" / "state.pt"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"x")
    os.utime(saved, (started + 40.0, started + 40.0))
    with RunFolder(out, quick()) as folder:
        assert folder.resuming
        assert folder.begin_segment() == pytest.approx(40.0)
        folder.finish(5.0)
    segments = json.loads((out / "run.json").read_text())["segments"]
    assert [s["seconds"] for s in segments] == [pytest.approx(40.0), 5.0]
