"""Metrics: torchmetrics `Metric`s and the plain functions behind them."""

from .classification import MIAEfficacy, PerClassAccuracy
from .functional import gap, per_class_accuracy, svc_mia_efficacy, true_label_confidence

# name -> what it measures (shown by `unlearn ls metrics`)
METRICS = {
    "UA": "unlearning accuracy: 100 - accuracy on the forget set (percent)",
    "RA": "remaining accuracy: accuracy on the retain set (percent)",
    "TA": "testing accuracy: accuracy on the test set, forgotten classes removed (percent)",
    "MIA": "MIA-efficacy: share of forget examples an SVC attack on true-label confidence calls non-member",
    "RTE_s": "run-time of the unlearning call, seconds",
    "per_class": "test accuracy per class (keys acc_class_<c>), forgotten classes included",
    "avg_gap": "mean |metric - Retrain| over UA, RA, TA, MIA (needs a Retrain reference)",
}

__all__ = [
    "METRICS",
    "MIAEfficacy",
    "PerClassAccuracy",
    "gap",
    "per_class_accuracy",
    "svc_mia_efficacy",
    "true_label_confidence",
]
