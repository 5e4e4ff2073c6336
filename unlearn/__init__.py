"""unlearn-toolkit: machine unlearning and concept erasure behind one interface.

The public API is imported lazily, so `import unlearn` (and the `unlearn` CLI) stays fast: a name below is
imported from its module the first time it is used.

Two public functions share their name with the module that defines them: `unlearn.evaluate` and
`unlearn.bench`. They are, and stay, the functions. Python's import system binds a submodule to its package's
attribute when the submodule is first imported (`unlearn.evaluate` would become the module after the first
`unlearn.evaluate(...)`, or after any `from unlearn.evaluate import ...`); this package's module type keeps
those two attributes for the functions. Reach the modules themselves with `from unlearn.evaluate import ...`
or `importlib.import_module("unlearn.evaluate")`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_model": "unlearn.models",
    "Classifier": "unlearn.models",
    "Model": "unlearn.models",
    "wrap_classifier": "unlearn.models",
    "Diffusion": "unlearn.models.diffusion",
    "GAN": "unlearn.models.gan",
    "METHODS": "unlearn.methods",
    "Method": "unlearn.methods",
    "get_method": "unlearn.methods",
    "UnlearnData": "unlearn.data",
    "forget_classes": "unlearn.data",
    "forget_fraction": "unlearn.data",
    "forget_generated_concept": "unlearn.data",
    "ConceptPrompts": "unlearn.data",
    "ImageTensorDataset": "unlearn.datasets",
    "as_image_dataset": "unlearn.datasets",
    "load_dataset": "unlearn.datasets",
    "fit": "unlearn.train",
    "Phase": "unlearn.train",
    "ParamMask": "unlearn.params",
    "evaluate": "unlearn.evaluate",
    "gap": "unlearn.metrics",
    "HARNESSES": "unlearn.harness",
    "run": "unlearn.pipeline",
    "load_recipe": "unlearn.recipe",
    "bench": "unlearn.bench",
}

__all__ = [
    "HARNESSES",
    "METHODS",
    "GAN",
    "Classifier",
    "ConceptPrompts",
    "Diffusion",
    "ImageTensorDataset",
    "Method",
    "Model",
    "ParamMask",
    "Phase",
    "UnlearnData",
    "as_image_dataset",
    "bench",
    "evaluate",
    "fit",
    "forget_classes",
    "forget_fraction",
    "forget_generated_concept",
    "gap",
    "get_method",
    "load_dataset",
    "load_model",
    "load_recipe",
    "run",
    "wrap_classifier",
]

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names are imported on first use
    from .bench import bench as bench
    from .data import ConceptPrompts as ConceptPrompts
    from .data import UnlearnData as UnlearnData
    from .data import forget_classes as forget_classes
    from .data import forget_fraction as forget_fraction
    from .data import forget_generated_concept as forget_generated_concept
    from .datasets import ImageTensorDataset as ImageTensorDataset
    from .datasets import as_image_dataset as as_image_dataset
    from .datasets import load_dataset as load_dataset
    from .evaluate import evaluate as evaluate
    from .harness import HARNESSES as HARNESSES
    from .methods import METHODS as METHODS
    from .methods import Method as Method
    from .methods import get_method as get_method
    from .metrics import gap as gap
    from .models import Classifier as Classifier
    from .models import Model as Model
    from .models import load_model as load_model
    from .models import wrap_classifier as wrap_classifier
    from .models.diffusion import Diffusion as Diffusion
    from .models.gan import GAN as GAN
    from .params import ParamMask as ParamMask
    from .pipeline import run as run
    from .recipe import load_recipe as load_recipe
    from .train import Phase as Phase
    from .train import fit as fit


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # cached: the next access is a plain attribute lookup
        return value
    raise AttributeError(f"module 'unlearn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})


class _Package(types.ModuleType):
    """The module type of `unlearn`: it refuses to let the import system bind a submodule over a public
    function of the same name (`evaluate`, `bench`); every other attribute is set as usual."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
