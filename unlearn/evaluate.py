"""The evaluation harness: run a model over the forget / retain / test sets and score it."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from .data import UnlearnData
from .errors import ConfigError
from .metrics import METRICS, gap

CLASSIFIER_METRICS = ("UA", "RA", "TA", "MIA", "per_class")

__all__ = ["evaluate", "gap", "CLASSIFIER_METRICS"]


@torch.no_grad()
def _logits(model, dataset, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    outputs, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        outputs.append(model(images.to(device)).float().cpu())
        labels.append(targets)
    if not outputs:
        return torch.zeros(0, model.num_classes), torch.zeros(0, dtype=torch.long)
    return torch.cat(outputs), torch.cat(labels)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return math.nan
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


@torch.no_grad()
def evaluate(model, data: UnlearnData, names=CLASSIFIER_METRICS, batch_size: int = 256) -> dict[str, float]:
    """Score a classifier on an unlearning task.

    Args:
        model: a `Classifier` adapter.
        data: the task's forget / retain / test sets.
        names: which metrics to compute (see `unlearn.metrics.METRICS`).

    Returns:
        A flat dict: `UA`, `RA`, `TA`, `MIA` in percent, `forget_test_acc` (test accuracy on the forgotten
        classes, class-wise tasks) and `acc_class_<c>` per class.
    """
    from .metrics.classification import MEMBER, NONMEMBER, TARGET, MIAEfficacy, PerClassAccuracy

    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r}; known metrics: {', '.join(METRICS)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    forget = _logits(model, data.forget, batch_size, device)
    retain = _logits(model, data.retain, batch_size, device)
    test = _logits(model, data.test, batch_size, device)
    test_forget = _logits(model, data.test_forget, batch_size, device)
    results: dict[str, float] = {}
    if "UA" in names:
        results["UA"] = 100.0 - _accuracy(*forget)
    if "RA" in names:
        results["RA"] = _accuracy(*retain)
    if "TA" in names:
        results["TA"] = _accuracy(*test)
    if data.forget_classes:
        results["forget_test_acc"] = _accuracy(*test_forget)
    if "MIA" in names:
        # Members: the first |D_test| retain examples in dataset order (as the reference code takes them).
        members = min(len(data.test), len(data.retain))
        # No sync across processes: evaluate() sees the whole sets in one process (the pipeline scores on the
        # main process only), and a sync would wait forever for processes that are not computing.
        mia = MIAEfficacy(sync_on_compute=False)
        mia.update(retain[0][:members], retain[1][:members], MEMBER)
        mia.update(*test, NONMEMBER)
        mia.update(*forget, TARGET)
        results["MIA"] = float(mia.compute())
    if "per_class" in names:
        per_class = PerClassAccuracy(data.num_classes, sync_on_compute=False)
        per_class.update(torch.cat([test[0], test_forget[0]]), torch.cat([test[1], test_forget[1]]))
        for c, value in enumerate(per_class.compute().tolist()):
            results[f"acc_class_{c}"] = value
    model.train(was_training)
    return results
