"""The hardening corpus: bad values, hostile files, hostile paths, amplification and faults, as a careless or
hostile user would try them. Every case must end in one sentence on stderr that names the problem, exit status 2
(or the library's typed `unlearn.errors` exception), no traceback, no input file modified and nothing
half-written left behind that looks finished.

Each case is one function below, registered with `@case(phrase)`: it builds its hostile inputs under `tmp` and
returns the `unlearn` command line (a list; run in this process, or as a script with `script=True` where a hang
or a second process is the point), or a zero-argument callable for a library case (which must raise an
`UnlearnError` whose message contains the phrase).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from unlearn.cli import main
from unlearn.errors import UnlearnError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RL = str(RECIPES / "classifier" / "digits" / "random_label.yaml")
T2I_UCE = str(RECIPES / "diffusion" / "digits_t2i" / "uce.yaml")
FAST = ["method.epochs=1", "eval.reference=null", "eval.original=false"]


@dataclass
class Case:
    name: str
    build: Callable[[Path], list | Callable]
    phrase: str
    exit: int
    script: bool
    timeout: int


CASES: list[Case] = []


def case(phrase: str, *, exit: int = 2, script: bool = False, timeout: int = 120, slow: bool = False):
    """Register the decorated `build(tmp)` as a corpus case whose message must contain `phrase`."""

    def register(build):
        entry = Case(build.__name__, build, phrase, exit, script, timeout)
        CASES.append(pytest.param(entry, id=build.__name__, marks=[pytest.mark.slow] if slow else []))
        return build

    return register


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every regular file under `root` (FIFOs and other special files are skipped, never opened)."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def run_cli(argv: list, capsys, script: bool, timeout: int) -> tuple[int, str]:
    argv = [str(item) for item in argv]
    if script:
        proc = subprocess.run(
            [sys.executable, "-m", "unlearn", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        return proc.returncode, proc.stderr
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ values


# ------------------------------------------------------------------------------------------------- files


# ------------------------------------------------------------------------------------------------- paths


# ----------------------------------------------------------------------------------------- amplification


# ------------------------------------------------------------------------------------------------ faults


# -------------------------------------------------------------------------------------------------- test


@pytest.mark.parametrize("entry", CASES)
def test_case(entry: Case, tmp_path, capsys, digits_world, one_thread):
    built = entry.build(tmp_path)
    before = file_hashes(tmp_path)
    if callable(built):
        with pytest.raises(UnlearnError) as raised:
            built()
        message = str(raised.value)
        assert entry.phrase in message, message
    else:
        code, err = run_cli(built, capsys, entry.script, entry.timeout)
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert code == entry.exit, err
        assert lines and "error:" in lines[-1], err
        assert len([line for line in lines if "error:" in line]) == 1, err  # said once
        assert entry.phrase in lines[-1], lines[-1]
    after = file_hashes(tmp_path)
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"inputs modified or removed: {changed}"
    finished = [p for p in tmp_path.rglob("metrics.json") if str(p) not in before]
    assert not finished, f"a failed run left a folder that looks finished: {finished}"
