"""What to forget and what to keep."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .datasets import ImageTensorDataset
from .errors import DataError


@dataclass
class UnlearnData:
    """Forget / retain / test sets of one unlearning task.

    Attributes:
        forget: training examples to forget (D_f).
        retain: training examples to keep (D_r).
        test: held-out examples the model must still get right. For class-wise forgetting the forgotten
            classes are removed from it (the OPTML convention: TA is measured on the remaining classes).
        test_forget: held-out examples of the forgotten classes (empty for random forgetting).
        num_classes: number of classes of the classifier.
        forget_classes: the forgotten class ids, or () for random-example forgetting.
    """

    forget: ImageTensorDataset
    retain: ImageTensorDataset
    test: ImageTensorDataset
    test_forget: ImageTensorDataset
    num_classes: int
    forget_classes: tuple[int, ...] = ()

    def describe(self) -> str:
        what = f"classes {list(self.forget_classes)}" if self.forget_classes else "random examples"
        return f"forget {what}: {len(self.forget)} forget / {len(self.retain)} retain / {len(self.test)} test examples"


def forget_classes(
    train: ImageTensorDataset, test: ImageTensorDataset, classes: Sequence[int]
) -> UnlearnData:
    """Class-wise forgetting: every training example of `classes` is forgotten."""
    classes = tuple(sorted({int(c) for c in classes}))
    if not classes:
        raise DataError("the forget set is empty: name at least one class to forget")
    bad = [c for c in classes if not 0 <= c < train.num_classes]
    if bad:
        raise DataError(
            f"class id {bad[0]} is out of range: this dataset has classes 0..{train.num_classes - 1}"
        )
    if len(classes) == train.num_classes:
        raise DataError("cannot forget every class: nothing would be left to retain")
    forgotten = torch.tensor(classes)
    in_train = torch.isin(train.labels, forgotten)
    in_test = torch.isin(test.labels, forgotten)
    if not in_train.any():
        raise DataError(f"the forget set is empty: no training example has class {list(classes)}")
    return UnlearnData(
        forget=train.subset(in_train.nonzero().flatten()),
        retain=train.subset((~in_train).nonzero().flatten()),
        test=test.subset((~in_test).nonzero().flatten()),
        test_forget=test.subset(in_test.nonzero().flatten()),
        num_classes=train.num_classes,
        forget_classes=classes,
    )


def forget_fraction(
    train: ImageTensorDataset, test: ImageTensorDataset, fraction: float, seed: int = 0
) -> UnlearnData:
    """Random-example forgetting: a seeded random `fraction` of the training examples is forgotten."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"forget fraction must lie strictly between 0 and 1, got {fraction}")
    count = round(fraction * len(train))
    if count == 0:
        raise DataError(f"the forget set is empty: {fraction} of {len(train)} examples rounds to 0")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator)
    forget_idx, _ = order[:count].sort()
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[forget_idx] = False
    return UnlearnData(
        forget=train.subset(forget_idx),
        retain=train.subset(keep.nonzero().flatten()),
        test=test,
        test_forget=test.subset(torch.zeros(0, dtype=torch.long)),
        num_classes=train.num_classes,
        forget_classes=(),
    )
