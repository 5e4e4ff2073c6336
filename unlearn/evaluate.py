"""`evaluate()`: score a classifier on an unlearning task (the library's one-call view of the classifier
harness; `unlearn.harness` scores every family)."""

from __future__ import annotations

from .harness.classifier import ClassifierHarness, score_classifier
from .metrics import gap

__all__ = ["evaluate", "gap"]


def evaluate(
    model, data, names=ClassifierHarness.default_metrics, batch_size: int = 256, references=None
) -> dict:
    """Score a classifier on an unlearning task.

    Args:
        model: a `Classifier` adapter.
        data: the task's forget / retain / test sets.
        names: which metrics to compute (`unlearn ls metrics classifier`).
        batch_size: batch size of the forward passes.
        references: reference classifiers by name (e.g. {"original": ..., "retrain": ...}) for the
            representation metrics; without them "representation" is skipped.

    Returns:
        A flat dict: `UA`, `RA`, `TA`, `MIA` in percent, `forget_test_acc` (test accuracy on the forgotten
        classes, class-wise tasks) and `acc_class_<c>` per class.
    """
    return score_classifier(model, data, names, batch_size, references)
