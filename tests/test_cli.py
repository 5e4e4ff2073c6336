"""The `unlearn` command line end to end: run folders, every checkpoint format, bad inputs, check / ls, resume.

Runs are kept to seconds with overrides (one or two epochs, no Retrain reference unless that is the point).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from unlearn.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RL = str(RECIPES / "classifier" / "digits" / "random_label.yaml")
FAST = ["method.epochs=1", "eval.reference=null", "eval.original=false"]
# The (a) run; task and batch size spelt out because the resume test counts batches.
RL_ARGS = [
    "method.epochs=2",
    "method.batch_size=64",
    "data.forget_class=[3]",
    "data.forget_fraction=null",
    "eval.reference=null",
]


def tree_hashes(path: Path) -> dict[str, str]:
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def unlearn_script() -> list[str]:
    """The installed console script (beside this Python), else `python -m unlearn`."""
    script = Path(sys.executable).with_name("unlearn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "unlearn"]


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*unlearn_script(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=os.environ.copy(),
    )


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("unlearn ") and "error:" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_code_pickle(path: Path, marker: Path) -> None:
    """A .pt file holding real weights next to an object whose unpickling would create `marker`."""
    from unlearn.models.zoo import DigitsCNN

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": DigitsCNN().state_dict(), "hook": RunsCode()}, path)


def tiny_vit(path: Path, num_labels: int = 10, processor: bool = True) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=num_labels,
    )
    ViTForImageClassification(config).save_pretrained(str(path))
    if processor:
        spec = {
            "image_processor_type": "ViTImageProcessor",
            "image_mean": [0.3],
            "image_std": [0.4],
            "size": {"height": 8, "width": 8},
        }
        (path / "preprocessor_config.json").write_text(json.dumps(spec))
    return path


def epoch_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]


# ------------------------------------------------------------------------ (a) a run folder, via the script


@pytest.fixture(scope="module")
def rl_run(digits_world, tmp_path_factory):
    """`unlearn erase random_label.yaml -o DIR method.epochs=2` through the real console script."""
    out = tmp_path_factory.mktemp("cli") / "rl"
    proc = run_script("erase", RL, "-o", str(out), *RL_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    return out


def test_erase_writes_a_complete_run_folder(rl_run):
    from unlearn.models.classifier import load_classifier
    from unlearn.models.zoo import DigitsCNN
    from unlearn.recipe import load_recipe

    names = {p.name for p in rl_run.iterdir()}
    assert {"model", "recipe.yaml", "metrics.json", "report.md", "train.jsonl", "run.log"} <= names
    assert "checkpoints" not in names  # resume state is dropped once the run is finished
    assert not [n for n in names if n.startswith(".")]  # no temporary files left behind

    metrics = json.loads((rl_run / "metrics.json").read_text())
    assert all(isinstance(v, (int, float, str, type(None))) for v in metrics.values())  # flat
    assert metrics["utility_warning"] is None  # the guard ran and found RA and TA within the margin
    for key in ("UA", "RA", "TA", "MIA"):
        assert 0.0 <= metrics[key] <= 100.0 and f"original_{key}" in metrics
    assert metrics["RTE_s"] > 0 and "avg_gap" not in metrics
    assert metrics["original_UA"] < metrics["UA"]  # two epochs of RL already forget some of class 3
    assert all(f"acc_class_{c}" in metrics for c in range(10))

    recipe = load_recipe(rl_run / "recipe.yaml")  # the resolved recipe is itself a valid recipe
    given = load_recipe(RL)
    assert recipe.method == "random_label" and recipe.method_args["epochs"] == 2
    assert recipe.method_args["lr"] == given.method_args["lr"] and recipe.eval.reference is None
    assert "momentum" in recipe.method_args  # defaults are spelt out
    assert recipe.data.forget_class == [3]

    report = (rl_run / "report.md").read_text()
    assert "random_label" in report and "| UA (%) |" in report
    assert "| class | 0 | 1 | 2 | 3* | 4 |" in report  # per-class accuracy, the forgotten class starred
    epochs = [r["epoch"] for r in epoch_records(rl_run) if r["phase"] == "epoch"]
    assert epochs == [1, 2]
    assert "wrote" in (rl_run / "run.log").read_text()

    model = load_classifier(rl_run / "model", None, 10).eval()
    bare = DigitsCNN(num_classes=10).eval()
    bare.load_state_dict(load_file(str(rl_run / "model" / "model.safetensors")))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(bare(model.prepare(x)), model(x))


def test_rerun_of_finished_folder_and_eval(rl_run, capsys):
    before = tree_hashes(rl_run)
    code, out, _ = run_main(capsys, "erase", RL, "-o", str(rl_run), *RL_ARGS)
    assert code == 0 and "already complete" in out
    assert tree_hashes(rl_run) == before

    code, out, _ = run_main(capsys, "eval", str(rl_run), "--json")
    assert code == 0
    scores, metrics = json.loads(out), json.loads((rl_run / "metrics.json").read_text())
    assert {"UA", "RA", "TA", "MIA", "original_UA", "CKA_forget_original"} <= set(scores)
    assert scores == {k: metrics[k] for k in scores}  # the run's own numbers, exactly
    code, out, _ = run_main(capsys, "eval", str(rl_run))
    assert code == 0 and f"{len(scores)} of {len(scores)} metrics equal the run's metrics.json" in out


def test_reference_run_folder_gives_avg_gap(rl_run, tmp_path, capsys):
    """`eval.reference` may name a finished run folder: the gaps are taken against its metrics."""
    out = tmp_path / "ga"
    code, _, err = run_main(
        capsys,
        "erase",
        RL,
        "-o",
        str(out),
        "method.name=grad_ascent",
        "method.lr=0.001",
        "method.batch_size=256",
        f"eval.reference={rl_run}",
        "eval.original=false",
        "method.epochs=1",
    )
    assert code == 0, err
    metrics, reference = (json.loads((p / "metrics.json").read_text()) for p in (out, rl_run))
    gaps = [abs(metrics[k] - reference[k]) for k in ("UA", "RA", "TA", "MIA")]
    assert metrics["avg_gap"] == pytest.approx(sum(gaps) / 4)
    assert metrics["retrain_UA"] == reference["UA"]


# ---------------------------------------------------------------- (b) (c) checkpoints brought by the user


@pytest.mark.parametrize("processor", [True, False], ids=["with-processor", "config-only"])
def test_erase_transformers_folder(tmp_path, capsys, processor):
    from transformers import AutoModelForImageClassification

    source = tiny_vit(tmp_path / "vit", processor=processor)
    before = tree_hashes(source)
    out = tmp_path / "run"
    code, _, err = run_main(
        capsys,
        "erase",
        RL,
        "-o",
        str(out),
        "--checkpoint",
        str(source),
        "model.arch=null",
        "method.batch_size=256",
        *FAST,
    )
    assert code == 0, err
    assert tree_hashes(source) == before  # the input is never modified

    edited = AutoModelForImageClassification.from_pretrained(str(out / "model"), local_files_only=True)
    original = AutoModelForImageClassification.from_pretrained(str(source), local_files_only=True)
    assert edited.config.num_labels == 10 and edited.config.model_type == "vit"
    assert (out / "model" / "preprocessor_config.json").exists() == processor
    changed = [k for k, v in original.state_dict().items() if not torch.equal(v, edited.state_dict()[k])]
    assert changed  # unlearning edited the weights
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"UA", "RA", "TA", "MIA"} <= set(metrics)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["model"]["checkpoint"] == str(source)


def test_erase_torchvision_weights(tmp_path, capsys):
    import torchvision

    from unlearn.models.classifier import load_classifier

    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    weights = tmp_path / "resnet18.safetensors"
    save_file(net.state_dict(), str(weights))
    before = tree_hashes(weights)
    out = tmp_path / "run"
    # Gradient ascent touches only the 146 forget examples: one step at batch 256 keeps ResNet-18 quick on CPU.
    code, _, err = run_main(
        capsys,
        "erase",
        RL,
        "-o",
        str(out),
        "--checkpoint",
        str(weights),
        "--arch",
        "torchvision:resnet18",
        "method.name=grad_ascent",
        "method.lr=0.001",
        "method.batch_size=256",
        "eval.batch_size=512",
        *FAST,
    )
    assert code == 0, err
    assert tree_hashes(weights) == before

    bare = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    bare.load_state_dict(load_file(str(out / "model" / "model.safetensors")))
    assert not torch.equal(bare.fc.weight, net.fc.weight)  # the head moved
    model = load_classifier(out / "model", None, 10).eval()
    assert model.head is model.network.fc
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(bare(model.prepare(x)), model(x))
    assert json.loads((out / "model" / "unlearn_model.json").read_text())["arch"] == "torchvision:resnet18"


def test_erase_builtin_pt_weights_comes_back_as_pt(tmp_path, capsys):
    """A `.pt` in, a `.pt` out; also `--forget-class N` followed by overrides (nargs="+" must not eat them)."""
    from unlearn.models.zoo import DigitsCNN

    torch.manual_seed(0)
    weights = tmp_path / "cnn.pt"
    torch.save({"state_dict": DigitsCNN().state_dict()}, weights)
    out = tmp_path / "run"
    code, _, err = run_main(
        capsys,
        "erase",
        RL,
        "-o",
        str(out),
        "--checkpoint",
        str(weights),
        "--arch",
        "digits_cnn",
        "--forget-class",
        "5",
        "1",
        "method.name=grad_ascent",
        "method.lr=0.001",
        "method.batch_size=256",
        *FAST,
    )
    assert code == 0, err
    state = torch.load(out / "model" / "model.pt", weights_only=True)
    DigitsCNN().load_state_dict(state)
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["data"]["forget_class"] == [5, 1]
    assert resolved["method"]["name"] == "grad_ascent" and resolved["method"]["epochs"] == 1
    assert resolved["eval"]["reference"] is None


# -------------------------------------------------------------------------------------- (d) bad inputs


@pytest.fixture
def bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 definitely not safetensors")
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("method: {name: random_label\ndata: [\n")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- just\n- a list\n")
    return {"corrupt": corrupt, "invalid": invalid, "list": not_mapping, "missing": tmp_path / "absent.yaml"}


BAD_INPUTS = {
    "unknown method": (
        ["method.name=random_lable", *FAST],
        ["unknown method 'random_lable'", "random_label"],
    ),
    "unknown hyperparameter": (["method.epoch=1"], ["'epoch'", "Did you mean epochs"]),
    "unknown data key": (["data.forget_clss=[1]"], ["'forget_clss'", "Did you mean forget_class"]),
    "unknown section": (["modle.arch=digits_cnn"], ["'modle'", "Did you mean model"]),
    "wrong type": (["method.epochs=two"], ["method.epochs must be int"]),
    "class out of range": (["--forget-class", "12"], ["class id 12 is out of range", "0..9"]),
    "class id not a number": (["--forget-class", "three", *FAST], ["--forget-class takes integer class ids"]),
    "class out of range (override)": (["data.forget_class=[12]", *FAST], ["class id 12 is out of range"]),
    "empty forget set": (["data.forget_class=[]"], ["forget set is empty"]),
    "override without =": (["method.epochs"], ["must look like section.key=value"]),
    "override too deep": (["method.lr.max=1"], ["must be section.key"]),
    "override bad yaml": (["method.epochs=[1"], ["not valid YAML"]),
    "unknown dataset": (["data.dataset=mnist"], ["unknown dataset 'mnist'"]),
    "unknown architecture": (["model.arch=resnet99", "model.checkpoint=null", *FAST], ["resnet99"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_status_2(case, tmp_path, capsys):
    extra, fragments = BAD_INPUTS[case]
    code, _, err = run_main(capsys, "erase", RL, "-o", str(tmp_path / "run"), *extra)
    assert_one_line_error(code, err, *fragments)


@pytest.mark.parametrize("which", ["missing", "corrupt", "corrupt-folder", "plain-folder"])
def test_bad_checkpoint_is_one_line_and_status_2(which, bad_files, tmp_path, capsys):
    path = {"corrupt": bad_files["corrupt"], "missing": tmp_path / "absent.safetensors"}.get(which)
    expected = {"missing": "does not exist", "corrupt": "not a readable"}.get(which, "")
    if which == "corrupt-folder":  # a transformers folder whose weights are garbage
        path = tiny_vit(tmp_path / "vit")
        (path / "model.safetensors").write_bytes(b"garbage" * 20)
        expected = "cannot load transformers image classifier"
    elif which == "plain-folder":
        path = tmp_path / "plain"
        path.mkdir()
        expected = "neither a transformers model folder"
    code, _, err = run_main(
        capsys,
        "erase",
        RL,
        "-o",
        str(tmp_path / "run"),
        "--checkpoint",
        str(path),
        "--arch",
        "digits_cnn",
        *FAST,
    )
    assert_one_line_error(code, err, str(path), expected)
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("which", ["missing", "invalid", "list"])
def test_unreadable_recipe_is_one_line_and_status_2(which, bad_files, tmp_path, capsys):
    code, _, err = run_main(capsys, "erase", str(bad_files[which]), "-o", str(tmp_path / "run"))
    assert_one_line_error(code, err, str(bad_files[which]))
    code, _, err = run_main(capsys, "check", str(bad_files[which]))
    assert_one_line_error(code, err, str(bad_files[which]))


def test_pickled_code_checkpoint_is_refused_by_the_script(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    write_code_pickle(evil, marker)
    proc = run_script(
        "erase", RL, "-o", str(tmp_path / "run"), "--checkpoint", str(evil), "--arch", "digits_cnn", *FAST
    )
    assert_one_line_error(proc.returncode, proc.stderr, "refusing to unpickle code")
    assert not marker.exists()


def test_pickled_code_checkpoint_is_refused_in_process(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    write_code_pickle(evil, marker)
    code, _, err = run_main(
        capsys,
        "erase",
        RL,
        "-o",
        str(tmp_path / "run"),
        "--checkpoint",
        str(evil),
        "--arch",
        "digits_cnn",
        *FAST,
    )
    assert_one_line_error(code, err, "refusing to unpickle code")
    assert not marker.exists()


def test_output_folder_holding_the_input_is_refused(tmp_path, capsys):
    source = tiny_vit(tmp_path / "vit")
    code, _, err = run_main(
        capsys, "erase", RL, "-o", str(source.parent), "--checkpoint", str(source), "model.arch=null", *FAST
    )
    assert_one_line_error(code, err, "holds the input checkpoint")


# ------------------------------------------------------------------------------- (e) check, ls, --help


def test_check_every_recipe(capsys):
    recipes = sorted(RECIPES.rglob("*.yaml"))
    assert recipes
    code, out, err = run_main(capsys, "check", *map(str, recipes))
    assert code == 0, err
    assert out.count("ok  ") == len(recipes)


@pytest.mark.parametrize(
    "what, expected",
    [
        ("methods", ["random_label", "retrain", "[classifier]"]),
        ("metrics", ["UA", "MIA", "RTE_s"]),
        ("recipes", ["recipes/classifier/digits/random_label.yaml"]),
    ],
)
def test_ls(what, expected, capsys):
    code, out, _ = run_main(capsys, "ls", what)
    assert code == 0
    for item in expected:
        assert item in out


def test_help_and_usage_errors():
    proc = run_script("--help", timeout=60)
    assert proc.returncode == 0
    for command in ("erase", "eval", "ls", "check", "prepare"):
        assert command in proc.stdout
    proc = run_script("frobnicate", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ (f) resume


def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(rl_run, tmp_path, capsys, monkeypatch):
    """Interrupt `erase` in epoch 2, rerun the same command: it continues from the epoch-1 checkpoint and ends
    with the same weights and the same training log as the uninterrupted run of `rl_run`."""
    import unlearn.methods.baselines as baselines

    out = tmp_path / "rl"
    args = ["erase", RL, "-o", str(out), *RL_ARGS]
    real_loss, calls = baselines.cross_entropy, {"n": 0}
    from unlearn.datasets import load_dataset

    retain = int((load_dataset("digits", "train").labels != 3).sum())
    retain_batches = math.ceil(retain / 64)  # batches of the retain pass in one epoch

    def interrupt_in_epoch_two(model, batch):
        calls["n"] += 1
        if calls["n"] == retain_batches + 5:
            raise KeyboardInterrupt
        return real_loss(model, batch)

    monkeypatch.setattr(baselines, "cross_entropy", interrupt_in_epoch_two)
    code, _, err = run_main(capsys, *args)
    assert code == 130 and "rerun the same command to resume" in err
    assert calls["n"] == retain_batches + 5
    assert not (out / "metrics.json").exists()
    state = torch.load(out / "checkpoints" / "random_label" / "state.pt", weights_only=True)
    assert state["unit"] == "epoch" and state["position"] == 1
    interrupted_log = epoch_records(out)
    assert [r["epoch"] for r in interrupted_log if r["phase"] == "epoch"] == [1]

    monkeypatch.setattr(baselines, "cross_entropy", real_loss)
    code, stdout, err = run_main(capsys, *args)
    assert code == 0, err
    assert "resuming stage 'random_label' after epoch 1" in stdout
    assert not (out / "checkpoints").exists()

    log = epoch_records(out)
    assert log[: len(interrupted_log)] == interrupted_log
    assert [r["epoch"] for r in log if r["phase"] == "epoch"] == [1, 2]  # epoch 1 was not trained again
    reference_log = epoch_records(rl_run)
    assert [(r["epoch"], r["step"], r["phase"]) for r in log] == [
        (r["epoch"], r["step"], r["phase"]) for r in reference_log
    ]
    for mine, theirs in zip(log, reference_log):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)

    resumed = load_file(str(out / "model" / "model.safetensors"))
    uninterrupted = load_file(str(rl_run / "model" / "model.safetensors"))
    assert set(resumed) == set(uninterrupted)
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6, msg=key)
    ours, theirs = (json.loads((p / "metrics.json").read_text()) for p in (out, rl_run))
    for key in ("UA", "RA", "TA"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6)


def test_interrupted_run_keeps_no_partial_model(tmp_path, capsys, monkeypatch):
    """An interruption before the first checkpoint leaves no model and no metrics; the rerun starts at epoch 1."""
    import unlearn.methods.baselines as baselines

    def interrupt(model, batch):
        raise KeyboardInterrupt

    out = tmp_path / "rl"
    args = ["erase", RL, "-o", str(out), "method.name=grad_ascent", "method.lr=0.001", *FAST]
    monkeypatch.setattr(baselines, "cross_entropy", interrupt)
    code, _, _ = run_main(capsys, *args)
    assert code == 130
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    assert not (out / "checkpoints").exists()
    monkeypatch.undo()
    code, stdout, err = run_main(capsys, *args)
    assert code == 0, err
    assert "resuming" not in stdout and (out / "metrics.json").exists()
