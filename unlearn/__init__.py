"""unlearn-toolkit: machine unlearning and concept erasure behind one interface.

The public API is imported lazily, so `import unlearn` (and the `unlearn` CLI) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "unlearn.models",
    "Classifier": "unlearn.models",
    "Model": "unlearn.models",
    "METHODS": "unlearn.methods",
    "Method": "unlearn.methods",
    "get_method": "unlearn.methods",
    "UnlearnData": "unlearn.data",
    "forget_classes": "unlearn.data",
    "forget_fraction": "unlearn.data",
    "load_dataset": "unlearn.datasets",
    "fit": "unlearn.train",
    "Phase": "unlearn.train",
    "ParamMask": "unlearn.params",
    "evaluate": "unlearn.evaluate",
    "gap": "unlearn.metrics",
    "METRICS": "unlearn.metrics",
    "run": "unlearn.pipeline",
    "load_recipe": "unlearn.recipe",
    "bench": "unlearn.bench",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'unlearn' has no attribute {name!r}")
