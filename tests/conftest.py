"""Shared fixtures: every test session uses its own world cache, built once."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def world_cache(tmp_path_factory):
    """Point UNLEARN_CACHE at a fresh folder for the whole session (the digits world trains there once)."""
    folder = tmp_path_factory.mktemp("unlearn-cache")
    old = os.environ.get("UNLEARN_CACHE")
    os.environ["UNLEARN_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("UNLEARN_CACHE", None)
    else:
        os.environ["UNLEARN_CACHE"] = old


@pytest.fixture(scope="session")
def digits_world(world_cache):
    """Paths of the digits world's models (trained on first use, about 15 s on 2 cores)."""
    from unlearn.worlds import prepare

    return prepare("digits", verbose=False)
