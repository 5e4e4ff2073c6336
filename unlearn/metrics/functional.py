"""Plain functions behind the metrics (NumPy / scikit-learn), so each can be checked on its own."""

from __future__ import annotations

import numpy as np
import torch

GAP_KEYS = ("UA", "RA", "TA", "MIA")


def true_label_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the true label, p_y (the MIA's `confidence` feature)."""
    probs = torch.softmax(logits.float(), dim=1)
    return probs.gather(1, labels.long().view(-1, 1)).flatten()


def svc_mia_efficacy(member: np.ndarray, nonmember: np.ndarray, target: np.ndarray) -> float:
    """MIA-Efficacy in percent, as the Sparse/SalUn code computes it (`evaluation/SVC_MIA.py`).

    An RBF SVC (C=3, gamma="auto") is fitted on true-label confidences of members (label 1) and
    non-members (label 0); the efficacy is the share of `target` (the forget set) it calls non-member.
    """
    from sklearn.svm import SVC

    member = np.asarray(member, dtype=np.float64).reshape(-1, 1)
    nonmember = np.asarray(nonmember, dtype=np.float64).reshape(-1, 1)
    target = np.asarray(target, dtype=np.float64).reshape(-1, 1)
    if len(target) == 0 or len(member) == 0 or len(nonmember) == 0:  # nothing to judge, or nothing to fit on
        return float("nan")
    x = np.concatenate([member, nonmember])
    y = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(x, y)
    return float(100.0 * (1.0 - clf.predict(target).mean()))


def per_class_accuracy(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy in percent per class (NaN for classes absent from `labels`)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        chosen = labels == c
        if chosen.any():
            out[c] = 100.0 * float((preds[chosen] == c).mean())
    return out


def gap(results: dict, reference: dict, keys=GAP_KEYS) -> dict[str, float]:
    """|metric - reference metric| per key, and `avg_gap`, their mean (SalUn's Avg. Gap)."""
    gaps = {f"gap_{k}": abs(float(results[k]) - float(reference[k])) for k in keys}
    gaps["avg_gap"] = float(np.mean(list(gaps.values())))
    return gaps
