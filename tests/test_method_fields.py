"""Every method documents its hyperparameters where it declares them, and `unlearn ls methods NAME` shows them."""

from __future__ import annotations

import dataclasses

import pytest

from unlearn.cli import main
from unlearn.methods import METHODS


def _classes():
    return [
        pytest.param(cls, id=f"{name}-{cls.__name__}") for name, classes in METHODS.items() for cls in classes
    ]


def _default(field):
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@pytest.mark.parametrize("cls", _classes())
def test_every_field_has_a_one_line_help_text(cls):
    assert dataclasses.fields(cls), f"{cls.__name__} declares no hyperparameter"
    for field in dataclasses.fields(cls):
        text = field.metadata.get("help", "")
        assert text.strip(), f"{cls.__name__}.{field.name} has no help text: declare it with hyperparameter()"
        assert "\n" not in text, f"{cls.__name__}.{field.name}: the help text must be one line"


def test_ls_methods_salun_prints_every_field_with_its_default(capsys):
    assert main(["ls", "methods", "salun"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(METHODS["salun"]) == 2
    for cls in METHODS["salun"]:
        summary = cls.__doc__.strip().splitlines()[0]
        start = next(i for i, line in enumerate(lines) if summary in line)
        block = lines[start + 1 : start + 1 + len(dataclasses.fields(cls))]
        for field, line in zip(dataclasses.fields(cls), block):
            words = line.split()
            assert words[0] == field.name, line
            assert _default(field) in words, f"{field.name}: default {_default(field)} not in {line!r}"
            assert line.rstrip().endswith(field.metadata["help"]), line


def test_ls_methods_refuses_an_unknown_name_in_one_sentence(capsys):
    assert main(["ls", "methods", "salon"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown method 'salon'" in err and "salun" in err


def test_ls_methods_without_a_name_lists_every_method(capsys):
    assert main(["ls", "methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS)
