"""Build hook: the wheel carries copies of the top-level `recipes/` and `evals/` inside the package.

The recipes (how to erase) and suites (how to judge) stay at the repository's top level, where a user of the
checkout reads and edits them. A wheel is built from the package alone, so `build_py` also copies both folders
to `unlearn/_data/` in the build tree; `unlearn.recipe.shipped_roots` looks in the checkout first and in
`unlearn/_data/` second, so `unlearn ls recipes` and short names work after any install. A build hook rather
than a package-dir mapping in pyproject.toml: the folders are not Python packages, and a mapping would also
redirect editable installs. Editable builds skip the copy (the checkout's own folders are found first).
Everything else about the build is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED_DATA = ("recipes", "evals")  # top-level folders copied into the package


class build_py_with_shipped_data(build_py):
    """`build_py`, then a copy of each of `SHIPPED_DATA` into `<build_lib>/unlearn/_data/`."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        here = Path(__file__).resolve().parent
        for name in SHIPPED_DATA:
            target = Path(self.build_lib) / "unlearn" / "_data" / name
            if target.exists():
                shutil.rmtree(target)  # a stale build tree must not keep files removed from the checkout
            shutil.copytree(here / name, target, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.pyc"))


setup(cmdclass={"build_py": build_py_with_shipped_data})
