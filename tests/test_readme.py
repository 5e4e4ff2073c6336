"""Every Python example in the README runs, twice in one process (a library is called more than once)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs_twice(index, digits_world, one_thread, tmp_path, monkeypatch):
    """Run where the README's commands would have left their run folders (a tiny GAN stands in for the one
    `unlearn erase recipes/gan/digits/...` writes)."""
    from unlearn.models.gan import build_gan

    monkeypatch.chdir(tmp_path)
    build_gan("dcgan_digits", latent_dim=8, width=8).save(tmp_path / "runs" / "gan-erase-8" / "model")
    code = compile(EXAMPLES[index], f"README.md python example {index + 1}", "exec")
    for _ in range(2):
        exec(code, {"__name__": "__readme__"})
