"""The package `unlearn` behaves like a library: its public names resolve, stay what they are however often they
are used, are typed for IDEs, and importing it stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

import pytest

import unlearn
from unlearn.errors import ConfigError

PACKAGE = Path(unlearn.__file__).parent


def test_every_public_name_resolves():
    assert set(unlearn.__all__) == set(unlearn._EXPORTS)
    for name in unlearn.__all__:
        value = getattr(unlearn, name)
        assert not isinstance(value, types.ModuleType), name
        assert value is getattr(sys.modules[unlearn._EXPORTS[name]], name)
    assert set(unlearn.__all__) <= set(dir(unlearn))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        unlearn.nope  # noqa: B018


def test_type_checking_block_lists_every_public_name():
    """IDEs and type checkers see the names through `if TYPE_CHECKING:` imports: the same names, from the
    same modules, as the lazy table."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    block = next(
        n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"
    )
    seen = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names:
            assert alias.asname == alias.name  # `import x as x`: an explicit re-export
            seen[alias.name] = f"unlearn.{node.module}"
    assert seen == unlearn._EXPORTS


def test_py_typed_is_shipped():
    assert (PACKAGE / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["unlearn"]


def test_evaluate_can_be_called_again_and_again(digits_world, digits_task, one_thread):
    model = unlearn.load_model(str(digits_world["classifier"]), num_classes=10)
    results = [unlearn.evaluate(model, digits_task) for _ in range(3)]
    assert results[0]["TA"] > 50 and results[0] == results[1] == results[2]
    __import__("unlearn.evaluate")  # what `import unlearn.evaluate` does (binding the name `unlearn`)

    assert callable(unlearn.evaluate) and not isinstance(unlearn.evaluate, types.ModuleType)


def test_bench_can_be_called_again(tmp_path):
    """`unlearn.bench` stays the function: a module would raise TypeError (not callable) on the second call."""
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: x\nrecipes: recipes/classifier/digits\nmethods: [finetune]\ncolour: red\n")
    for _ in range(2):
        with pytest.raises(ConfigError):
            unlearn.bench(suite)


SCRIPT = """
import sys, types
import unlearn
assert "torch" not in sys.modules, "import unlearn imported torch"
from unlearn.bench import load_suite      # the submodules load first, by another route ...
from unlearn.evaluate import evaluate as direct
import importlib
assert isinstance(importlib.import_module("unlearn.evaluate"), types.ModuleType)
assert unlearn.evaluate is direct, unlearn.evaluate   # ... and the package's names stay the functions
assert unlearn.bench is sys.modules["unlearn.bench"].bench, unlearn.bench
from unlearn import bench, evaluate
assert bench is unlearn.bench and evaluate is direct
print("ok")
"""


def test_submodule_imports_never_replace_the_functions():
    """In a fresh interpreter, where nothing else has imported anything: `import unlearn` stays light, and
    importing the modules `unlearn.evaluate` / `unlearn.bench` leaves `unlearn.evaluate` / `unlearn.bench`
    the functions."""
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
