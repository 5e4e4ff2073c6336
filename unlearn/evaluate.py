"""`evaluate()`: score a classifier on an unlearning task (the library's one-call view of the classifier
harness; `unlearn.harness` scores every family)."""

from __future__ import annotations

from torch import nn

from .harness.classifier import ClassifierHarness, score_classifier
from .metrics import gap

__all__ = ["evaluate", "gap"]


def evaluate(
    model, data, names=ClassifierHarness.default_metrics, batch_size: int = 256, references=None
) -> dict:
    """Score a classifier on an unlearning task.

    Args:
        model: a `Classifier` adapter, or a plain classifier `nn.Module` (wrapped by `wrap_classifier`).
        data: the task's forget / retain / test sets.
        names: which metrics to compute (`unlearn ls metrics classifier`).
        batch_size: batch size of the forward passes.
        references: reference classifiers by name (e.g. {"original": ..., "retrain": ...}) for the
            representation metrics; without them "representation" is skipped.

    Returns:
        A flat dict: `UA`, `RA`, `TA`, `MIA` in percent, `forget_test_acc` (test accuracy on the forgotten
        classes, class-wise tasks) and `acc_class_<c>` per class.
    """
    from .models.base import Model
    from .models.wrap import as_model, as_task

    if isinstance(model, Model) or not isinstance(model, nn.Module):  # another family: said before the data
        model = as_model(model, ("classifier",), None, "evaluate")
    data = as_task(data, "classifier", "evaluate")
    model = as_model(model, ("classifier",), getattr(data, "num_classes", None), "evaluate")
    return score_classifier(model, data, names, batch_size, references)
