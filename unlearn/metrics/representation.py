"""Representation metrics: is the forgotten data still inside the features, whatever the head says?

From "Are We Truly Forgetting? A Critical Re-examination of MU Evaluation Protocols" (Kim, Cha & Kim,
arXiv 2503.06991; code `yongwookim1/UUEF`) and the linear-probe check of "An Illusion of Unlearning?" (Gao et
al.). Logit metrics (UA, RA, TA) only see the head: a method that edits nothing but the classification layer
can reach UA = 100 while the feature extractor still separates the forgotten classes perfectly. These metrics
look at the penultimate features (`Classifier.features`, the input of the head) instead:

1. linear CKA between the unlearned model's features and a reference model's (the original, the retrained);
2. k-NN accuracy (5 neighbours, cosine) and linear-probe accuracy on the forgotten data, read out of frozen
   features.

Differences from the UUEF code, on purpose:
- CKA is computed over the whole set by default (`batch_size=None`); UUEF averages the CKA of consecutive
  batches of 512, which `batch_size=512` reproduces. Whole-set CKA does not depend on the batch size or on the
  order of the examples.
- k-NN and probe use penultimate features, not the network output (UUEF's `extract_features` returns the fc
  logits of a ResNet-50).

This module imports torchmetrics at the top: import it on demand (`unlearn.metrics` does not import it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader
from torchmetrics import Metric

from ..progress import progress

__all__ = [
    "LinearCKA",
    "knn_accuracy",
    "linear_cka",
    "linear_probe_accuracy",
    "representation_metrics",
]


def _as_matrix(x) -> torch.Tensor:
    x = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if x.ndim == 1:
        x = x.unsqueeze(1)
    if x.ndim != 2:
        x = x.flatten(1)
    return x.to(device="cpu", dtype=torch.float64)


def _cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (a fraction in [0, 1]) of two float64 matrices with the same rows."""
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    if d1 * d2 <= n * n:
        # Feature-space form: HSIC(XX^T, YY^T) = ||Yc^T Xc||_F^2 (up to the (n-1)^2 factor that cancels).
        cross = torch.linalg.matrix_norm(y.T @ x) ** 2
        norm_x = torch.linalg.matrix_norm(x.T @ x)
        norm_y = torch.linalg.matrix_norm(y.T @ y)
    else:
        # Fewer rows than features: the n x n Gram matrices of the centred features are the smaller products.
        gram_x, gram_y = x @ x.T, y @ y.T
        cross = (gram_x * gram_y).sum()
        norm_x = torch.linalg.matrix_norm(gram_x)
        norm_y = torch.linalg.matrix_norm(gram_y)
    denominator = float(norm_x * norm_y)
    if denominator == 0.0:  # a constant representation: CKA is undefined
        return math.nan
    return float(cross) / denominator


def linear_cka(x, y, batch_size: int | None = None) -> float:
    """Linear CKA between two representations of the same examples, in percent (as the UUEF code reports it).

    CKA(X, Y) = HSIC(XX^T, YY^T) / sqrt(HSIC(XX^T, XX^T) HSIC(YY^T, YY^T)) with HSIC(K, L) = sum(HKH * HLH)
    and H = I - 11^T/n. It is computed in the equivalent feature-space form
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) on column-centred features, in float64.
    It is invariant to orthogonal transforms and isotropic scaling of either side, and 100 for identical inputs.

    Args:
        x: features, shape (n, d1) (extra dimensions are flattened).
        y: features of the same n examples, shape (n, d2).
        batch_size: None (our default) computes CKA over all n rows at once. An int reproduces UUEF: CKA of
            consecutive, unshuffled batches of `batch_size` rows (the last one may be smaller), averaged over
            batches; UUEF uses 512.

    Returns:
        CKA times 100; NaN when there are fewer than two rows or a representation is constant.
    """
    x, y = _as_matrix(x), _as_matrix(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"linear_cka needs the same examples on both sides, got {x.shape[0]} and {y.shape[0]} rows"
        )
    if batch_size is not None and batch_size < 2:
        raise ValueError(f"batch_size must be None or at least 2, got {batch_size}")
    n = x.shape[0]
    if n < 2:
        return math.nan
    if batch_size is None:
        return 100.0 * _cka(x, y)
    values = [_cka(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]
    return 100.0 * float(np.mean(values))


class LinearCKA(Metric):
    """Linear CKA (percent) between two representations, accumulated over batches.

    `update(features_a, features_b)` appends the rows of one batch (the same examples on both sides);
    `compute()` returns `linear_cka` over all accumulated rows (or UUEF's per-batch average if `batch_size`
    is given; the batches are then re-cut from the accumulated rows, not the update calls).
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, batch_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.batch_size = batch_size
        self.add_state("features_a", default=[], dist_reduce_fx="cat")
        self.add_state("features_b", default=[], dist_reduce_fx="cat")

    def update(self, features_a: torch.Tensor, features_b: torch.Tensor) -> None:
        if len(features_a) != len(features_b):
            raise ValueError(
                f"LinearCKA.update needs the same examples on both sides, got {len(features_a)} and "
                f"{len(features_b)} rows"
            )
        self.features_a.append(features_a.detach().flatten(1).double())
        self.features_b.append(features_b.detach().flatten(1).double())

    def compute(self) -> torch.Tensor:
        a, b = _cat(self.features_a), _cat(self.features_b)
        return torch.tensor(linear_cka(a, b, batch_size=self.batch_size), dtype=torch.float64)


def _cat(states) -> torch.Tensor:
    if isinstance(states, torch.Tensor):
        return states
    return torch.cat(states) if states else torch.zeros(0, 1, dtype=torch.float64)


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = 5) -> float:
    """Accuracy (percent) of a k-nearest-neighbour classifier with cosine distance fitted on frozen features.

    As UUEF's `evaluate_knn`: `KNeighborsClassifier(n_neighbors=5, metric="cosine")`. NaN for an empty test set.
    """
    from sklearn.neighbors import KNeighborsClassifier

    test_labels = _numpy(test_labels)
    if len(test_labels) == 0:
        return math.nan
    train_feats = _numpy(train_feats).reshape(len(_numpy(train_labels)), -1).astype(np.float64)
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine")
    clf.fit(train_feats, _numpy(train_labels))
    test_feats = _numpy(test_feats).reshape(len(test_labels), -1).astype(np.float64)
    return 100.0 * float(clf.score(test_feats, test_labels))


def linear_probe_accuracy(
    train_feats, train_labels, test_feats, test_labels, max_iter: int = 5000, random_state: int = 0
) -> float:
    """Accuracy (percent) of a linear probe on frozen features: standardised features, multinomial logistic
    regression (scikit-learn defaults: lbfgs, C=1), fitted on the train features. NaN for an empty test set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    test_labels = _numpy(test_labels)
    if len(test_labels) == 0:
        return math.nan
    train_labels = _numpy(train_labels)
    train_feats = _numpy(train_feats).reshape(len(train_labels), -1).astype(np.float64)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=random_state))
    probe.fit(train_feats, train_labels)
    test_feats = _numpy(test_feats).reshape(len(test_labels), -1).astype(np.float64)
    return 100.0 * float(probe.score(test_feats, test_labels))


@torch.no_grad()
def _features(model, dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (float64, CPU) and labels of a dataset, the model in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, labels = [], []
    try:
        batches = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for images, targets in progress(batches, "features"):
            feats.append(model.features(images.to(device)).double().cpu())
            labels.append(targets)
    finally:
        model.train(was_training)
    if not feats:
        return torch.zeros(0, 1, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def _stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a seeded `fraction` of the examples of each class."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        order = idx[torch.randperm(len(idx), generator=generator)]
        chosen.append(order[: max(1, round(fraction * len(idx)))])
    return torch.cat(chosen).sort().values


def representation_metrics(
    model,
    data,
    references: Mapping[str, object],
    batch_size: int = 256,
    probe_fraction: float = 0.8,
    seed: int = 0,
) -> dict[str, float]:
    """Representation metrics of an unlearned classifier, on its penultimate features (`model.features`).

    Args:
        model: the unlearned `Classifier`.
        data: the task's `UnlearnData`.
        references: reference classifiers by name, e.g. {"original": ..., "retrain": ...}.
        batch_size: batch size of the feature extraction (CKA is computed over whole sets).
        probe_fraction: share of each class's training examples the class-wise probe / k-NN are fitted on.
        seed: seed of that split.

    Returns:
        A flat dict, in percent:
        - `CKA_forget_<name>`, `CKA_test_<name>`: linear CKA between the model's features and reference
          `<name>`'s on the forget set and on the test set (all classes: `data.test` plus `data.test_forget`).
        - `probe_forget`, `knn_forget`: can the forgotten data still be read out of the representation?
          Class-wise forgetting: a linear probe (5-NN with cosine distance) fitted on frozen features of a
          seeded `probe_fraction` of each class's training examples, all classes (retain and forget), scored
          on the test examples of the forgotten classes. Random forgetting: fitted on the retain set, scored on
          the forget set. High values mean the forgotten classes are still linearly (locally) separable.
    """
    if not 0.0 < probe_fraction <= 1.0:
        raise ValueError(f"probe_fraction must lie in (0, 1], got {probe_fraction}")
    test_all = ConcatDataset([data.test, data.test_forget])
    forget_feats, forget_labels = _features(model, data.forget, batch_size)
    test_feats, _ = _features(model, test_all, batch_size)
    results: dict[str, float] = {}
    for name, reference in references.items():
        results[f"CKA_forget_{name}"] = linear_cka(
            forget_feats, _features(reference, data.forget, batch_size)[0]
        )
        results[f"CKA_test_{name}"] = linear_cka(test_feats, _features(reference, test_all, batch_size)[0])

    retain_feats, retain_labels = _features(model, data.retain, batch_size)
    if data.forget_classes:
        train_feats = torch.cat([retain_feats, forget_feats])
        train_labels = torch.cat([retain_labels, forget_labels])
        keep = _stratified_split(train_labels, probe_fraction, seed)
        train_feats, train_labels = train_feats[keep], train_labels[keep]
        eval_feats, eval_labels = _features(model, data.test_forget, batch_size)
    else:
        train_feats, train_labels = retain_feats, retain_labels
        eval_feats, eval_labels = forget_feats, forget_labels
    results["probe_forget"] = linear_probe_accuracy(train_feats, train_labels, eval_feats, eval_labels)
    results["knn_forget"] = knn_accuracy(train_feats, train_labels, eval_feats, eval_labels)
    return results
