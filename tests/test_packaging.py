"""Installable anywhere: the wheel ships the recipes and suites, short names and did-you-mean find them, a
recipe's relative `eval.reference` is checked before any training, and output files honour the umask.

The wheel test builds the wheel from a copy of the checkout, installs it into a fresh virtual environment
(never into the environment the tests run in, which holds the editable install) and runs the README's main job
and a tiny bench from an empty folder. The fast tests cover the same lookup logic in-process.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import unlearn
from unlearn.checkpoints import atomic_path, save_state_dict
from unlearn.cli import main
from unlearn.errors import CheckpointNotFoundError
from unlearn.recipe import check_reference, find_path, load_recipe, shipped_roots

ROOT = Path(__file__).resolve().parents[1]
# the checkout of the package these tests import (the same as ROOT, unless another editable install of the
# toolkit comes first on sys.path): where its lookup finds the shipped recipes and suites
CHECKOUT = Path(unlearn.__file__).resolve().parents[1]
RECIPES = CHECKOUT / "recipes"
QUICK_SUITE = {  # one method and its Retrain reference, one epoch each, one seed: seconds on the digits world
    "name": "tiny",
    "recipes": "classifier/digits",  # a shipped folder by its short name
    "methods": ["random_label"],
    "seeds": [0],
    "overrides": ["method.epochs=1"],
}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(item) for item in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------- lookup


def test_short_names_and_paths_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    salun = RECIPES / "classifier" / "digits" / "salun.yaml"
    assert find_path("classifier/digits/salun") == salun
    assert find_path("classifier/digits/salun.yaml", "recipe") == salun
    assert find_path("recipes/classifier/digits/salun.yaml") == salun
    assert find_path("digits_classwise", "suite") == CHECKOUT / "evals" / "digits_classwise.yaml"
    assert find_path("evals/digits_classwise.yaml") == CHECKOUT / "evals" / "digits_classwise.yaml"
    (tmp_path / "classifier" / "digits").mkdir(parents=True)
    mine = tmp_path / "classifier" / "digits" / "salun.yaml"
    mine.write_text("method: salun\n")
    assert find_path("classifier/digits/salun.yaml") == Path("classifier/digits/salun.yaml")  # as given first


def test_did_you_mean_for_a_recipe_or_suite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=r"did you mean classifier/digits/salun\b"):
        find_path("classifier/digits/salunn", "recipe")
    with pytest.raises(CheckpointNotFoundError, match="did you mean digits_classwise"):
        find_path("digits_clswise", "suite")
    with pytest.raises(CheckpointNotFoundError, match="`unlearn ls recipes` lists them"):
        find_path("zzzzzzzz", "recipe")


def test_cli_short_name_typo_is_one_sentence_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "erase", "classifier/digits/salunn")
    assert code == 2 and "did you mean classifier/digits/salun" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "bench", "digits_clswise")
    assert code == 2 and "did you mean digits_classwise" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_package_copy_is_searched_after_the_checkout(tmp_path, monkeypatch):
    """An installed package has no checkout above it: its own `_data/` copy answers."""
    from unlearn import recipe

    installed = tmp_path / "_data"
    (installed / "recipes" / "classifier" / "toy").mkdir(parents=True)
    (installed / "recipes" / "classifier" / "toy" / "only_here.yaml").write_text("method: retrain\n")
    monkeypatch.setattr(recipe, "shipped_roots", lambda: [installed])
    monkeypatch.chdir(tmp_path)
    assert find_path("classifier/toy/only_here") == installed / "recipes/classifier/toy/only_here.yaml"
    assert recipe.shipped_names("recipe") == ["classifier/toy/only_here"]
    assert recipe.shipped_folder("suite") is None


def test_site_packages_is_never_taken_for_a_checkout():
    """The checkout is the package's parent only where pyproject.toml is (site-packages may hold another
    package named `evals`)."""
    roots = shipped_roots()
    assert roots[0] == CHECKOUT and (CHECKOUT / "pyproject.toml").is_file()
    assert all(root == CHECKOUT or root.name == "_data" for root in roots)


def test_version_and_ls(tmp_path, monkeypatch, capsys):
    import unlearn

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert (
        exit_.value.code == 0 and capsys.readouterr().out.strip() == f"unlearn-toolkit {unlearn.__version__}"
    )
    code, out, _ = run_cli(capsys, "ls", "recipes")
    assert code == 0 and "classifier/digits/salun  " in out and "recipes/classifier/digits/salun.yaml" in out
    code, out, _ = run_cli(capsys, "ls", "suites")
    assert code == 0 and "evals/digits_classwise.yaml" in out


def test_suite_recipes_by_short_folder_and_beside_the_suite(tmp_path, monkeypatch):
    from unlearn.bench import check_suite, load_suite

    monkeypatch.chdir(tmp_path)
    (tmp_path / "suites" / "mine").mkdir(parents=True)
    suite_file = tmp_path / "suites" / "tiny.yaml"
    suite_file.write_text(yaml.safe_dump(QUICK_SUITE))
    assert check_suite(load_suite(suite_file)) == "classifier"
    shutil.copy(RECIPES / "classifier/digits/random_label.yaml", tmp_path / "suites/mine/random_label.yaml")
    shutil.copy(RECIPES / "classifier/digits/retrain.yaml", tmp_path / "suites/mine/retrain.yaml")
    suite_file.write_text(yaml.safe_dump({**QUICK_SUITE, "recipes": "mine"}))  # relative to the suite file
    assert check_suite(load_suite(suite_file)) == "classifier"


# -------------------------------------------------------------------------------------- eval.reference


def test_reference_beside_a_copied_recipe(tmp_path, monkeypatch, capsys):
    """A recipe copied without its sibling retrain.yaml is refused by `check` and by `erase` before anything is
    made, with the fix; beside it, or named by its shipped short name, it is found."""
    monkeypatch.chdir(tmp_path)
    copied = tmp_path / "my.yaml"
    shutil.copy(RECIPES / "classifier/digits/random_label.yaml", copied)
    with pytest.raises(CheckpointNotFoundError, match=r"eval\.reference=classifier/digits/retrain\b"):
        check_reference(load_recipe(copied))
    code, _, err = run_cli(capsys, "check", copied)
    assert code == 2 and "eval.reference 'retrain.yaml'" in err and "copy the Retrain recipe beside it" in err
    code, _, err = run_cli(capsys, "erase", copied, "-o", tmp_path / "out")
    assert code == 2 and "eval.reference" in err and not (tmp_path / "out").exists()

    named = tmp_path / "named.yaml"
    named.write_text(
        copied.read_text().replace("reference: retrain.yaml", "reference: classifier/digits/retrain")
    )
    code, out, err = run_cli(capsys, "check", named)
    assert code == 0, err

    shutil.copy(RECIPES / "classifier/digits/retrain.yaml", tmp_path / "retrain.yaml")
    code, _, err = run_cli(capsys, "check", copied)
    assert code == 0, err


def test_reference_resolves_beside_the_recipe_before_the_working_directory(tmp_path, monkeypatch):
    from unlearn.recipe import resolve_reference

    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "retrain.yaml").write_text("method: {name: retrain, epochs: 1}\n")  # a decoy
    monkeypatch.chdir(tmp_path / "here")
    recipe = load_recipe(RECIPES / "classifier/digits/random_label.yaml")
    assert resolve_reference(recipe) == RECIPES / "classifier/digits/retrain.yaml"


def test_a_reference_that_names_a_reference_is_refused_by_check(tmp_path, capsys):
    (tmp_path / "retrain.yaml").write_text(
        "method: retrain\ndata: {forget_class: [3]}\neval: {reference: other.yaml}\n"
    )
    (tmp_path / "rl.yaml").write_text(
        "method: random_label\ndata: {forget_class: [3]}\neval: {reference: retrain.yaml}\n"
    )
    code, _, err = run_cli(capsys, "check", tmp_path / "rl.yaml")
    assert code == 2 and "must not itself name a reference" in err


# ------------------------------------------------------------------------------------------ permissions


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_output_files_honour_the_umask(tmp_path, mask):
    """safetensors writes 0600 files; what `atomic_path` moves into place gets what `open()` would give."""
    import torch

    old = os.umask(mask)
    try:
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
        with atomic_path(tmp_path / "model") as tmp:
            tmp.mkdir()
            save_state_dict({"w": torch.zeros(2)}, tmp / "model.safetensors")
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(old)

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(tmp_path / "weights.safetensors") == mode(tmp_path / "plain.txt") == 0o666 & ~mask
    assert mode(tmp_path / "model" / "model.safetensors") == 0o666 & ~mask
    assert mode(tmp_path / "model") == 0o777 & ~mask
    assert mode(tmp_path / "model" / "run.sh") == 0o777 & ~mask


# ------------------------------------------------------------------------------------------------ wheel


def _copy_checkout(target: Path) -> Path:
    """The files a build needs: git's tracked and untracked-but-not-ignored files (no run folders, caches or
    build trees), else the tree without the usual ignored folders."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=False
    )
    if listed.returncode == 0 and listed.stdout:
        for name in filter(None, listed.stdout.decode().split("\0")):
            source = ROOT / name
            if source.is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
    else:
        skip = shutil.ignore_patterns(
            ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*cache", ".venv"
        )
        shutil.copytree(ROOT, target, ignore=skip, dirs_exist_ok=True)
    return target


def test_wheel_installed_elsewhere_runs_from_an_empty_directory(tmp_path, digits_world):
    """Build the wheel, install it into a fresh venv (never the test environment), then from an empty folder:
    `--version`, `ls recipes`, `check` by short name, the README's main job (fast) and a tiny bench."""
    source = _copy_checkout(tmp_path / "source")
    wheels = tmp_path / "wheels"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(source),
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(wheels),
    ]
    subprocess.run(build, check=True, capture_output=True, env=env, timeout=300)
    (wheel,) = wheels.glob("unlearn_toolkit-*.whl")
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
        timeout=300,
    )
    python = venv / "bin" / "python"
    # this environment's pip installs into the venv (`--python`): no pip of its own to set up there
    install = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "--no-deps",
        "--no-index",
        "-q",
    ]
    install.append(str(wheel))
    subprocess.run(install, check=True, capture_output=True, env=env, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()

    def unlearn(*argv, timeout=300):
        proc = subprocess.run(
            [str(venv / "bin" / "unlearn"), *map(str, argv)], cwd=empty, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    where = subprocess.run(
        [str(python), "-c", "import unlearn; print(unlearn.__file__)"], cwd=empty, env=env, capture_output=True,
        text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(venv), f"the test must run the installed wheel, not {where}"

    import unlearn as here

    assert unlearn("--version").strip() == f"unlearn-toolkit {here.__version__}"
    listing = unlearn("ls", "recipes")
    assert "recipes/classifier/digits/random_label.yaml" in listing and "classifier/digits/salun " in listing
    assert "digits_classwise" in unlearn("ls", "suites")
    assert "ok  classifier/digits/random_label" in unlearn("check", "classifier/digits/random_label")
    unlearn(
        "erase",
        "recipes/classifier/digits/random_label.yaml",
        "method.epochs=1",
        "eval.reference=null",
        "-o",
        "out",
    )
    run = empty / "out"
    assert (run / "metrics.json").is_file() and (run / "model").is_dir()
    weights = [path for path in (run / "model").iterdir() if path.suffix == ".safetensors"]
    assert weights and all(
        stat.S_IMODE(w.stat().st_mode) == stat.S_IMODE((run / "metrics.json").stat().st_mode) for w in weights
    )

    # the shipped suite, cut to one method, one seed and one epoch (its `recipes: recipes/classifier/digits`
    # is found only in the installed package from here)
    shipped = yaml.safe_load((ROOT / "evals" / "digits_classwise.yaml").read_text())
    tiny = {**shipped, "methods": ["random_label"], "seeds": [0]}
    tiny["overrides"] = [*shipped.get("overrides", []), "method.epochs=1"]
    (empty / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    unlearn("bench", "tiny.yaml", "-o", "bench")
    assert (empty / "bench" / "results.json").is_file()
    assert sorted(p.name for p in empty.iterdir()) == [
        "bench",
        "out",
        "tiny.yaml",
    ]  # nothing else written here
