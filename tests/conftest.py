"""Shared fixtures: every test session uses its own world cache, built once."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest


@contextmanager
def one_torch_thread():
    """One torch (OpenMP) thread: as fast for the tests' small models on an idle machine, and 6x faster (13 s
    against 83 s to build the digits world) when another process keeps one of two cores busy, where two OpenMP
    threads stall waiting for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with one_torch_thread():
        yield


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

    with one_torch_thread():
        return prepare("digits", verbose=False)


@pytest.fixture(scope="session")
def digits_task(digits_world):
    """The class-wise task of the digits world: forget class 3."""
    from unlearn.data import forget_classes
    from unlearn.datasets import load_dataset

    return forget_classes(load_dataset("digits", "train"), load_dataset("digits", "test"), [3])


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate's state is a process-wide singleton (an Accelerator with another mixed_precision than the
    first one raises ValueError): every test starts and leaves it empty."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
