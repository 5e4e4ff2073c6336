"""Classification unlearning metrics as torchmetrics `Metric`s (update / compute)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader
from torchmetrics import Metric

from ..progress import progress
from .functional import per_class_accuracy, svc_mia_efficacy, true_label_confidence

MEMBER, NONMEMBER, TARGET = 0, 1, 2


@torch.no_grad()
def predict_logits(model, dataset, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits (float32, on the CPU) and the labels of a dataset of (image, label), in order."""
    outputs, labels = [], []
    for images, targets in progress(DataLoader(dataset, batch_size=batch_size, shuffle=False), "evaluating"):
        outputs.append(model(images.to(device)).float().cpu())
        labels.append(targets)
    if not outputs:
        return torch.zeros(0, model.num_classes), torch.zeros(0, dtype=torch.long)
    return torch.cat(outputs), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of rows whose largest logit is the label's (NaN for none)."""
    if len(labels) == 0:
        return math.nan
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def dataset_accuracy(model, dataset, batch_size: int) -> float:
    """Percent of `dataset` the model classifies correctly, in eval mode (its mode restored after; NaN for an
    empty set)."""
    was_training = model.training
    model.eval()
    try:
        return accuracy(*predict_logits(model, dataset, batch_size, next(model.parameters()).device))
    finally:
        model.train(was_training)


class MIAEfficacy(Metric):
    """MIA-Efficacy (percent): the SVC membership-inference attack on true-label confidence.

    Feed logits and labels of three groups: `MEMBER` (the first |D_test| retain examples), `NONMEMBER`
    (the test set) and `TARGET` (the forget set). `compute` fits the SVC on members vs non-members and
    returns the share of targets it calls non-member, times 100.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("confidence", default=[], dist_reduce_fx="cat")
        self.add_state("group", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, group: int) -> None:
        conf = true_label_confidence(logits, labels)
        self.confidence.append(conf)
        self.group.append(torch.full_like(conf, group, dtype=torch.long))

    def compute(self) -> torch.Tensor:
        conf = _cat(self.confidence).cpu().numpy()
        group = _cat(self.group).cpu().numpy()
        value = svc_mia_efficacy(conf[group == MEMBER], conf[group == NONMEMBER], conf[group == TARGET])
        return torch.tensor(value)


class PerClassAccuracy(Metric):
    """Top-1 accuracy per class in percent (NaN for classes never seen)."""

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("correct", default=torch.zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        preds = logits.argmax(dim=1)
        self.total += torch.bincount(labels, minlength=self.num_classes).float()
        self.correct += torch.bincount(labels[preds == labels], minlength=self.num_classes).float()

    def compute(self) -> torch.Tensor:
        return 100.0 * self.correct / self.total  # 0/0 -> NaN for absent classes


def _cat(states) -> torch.Tensor:
    if isinstance(states, torch.Tensor):
        return states
    return torch.cat(states) if states else torch.zeros(0)


__all__ = ["MIAEfficacy", "PerClassAccuracy", "per_class_accuracy", "MEMBER", "NONMEMBER", "TARGET"]
