"""Metrics: torchmetrics `Metric`s and the plain functions behind them. Which metrics a family's runs report,
and what each means, is the family's harness catalogue (`unlearn.harness`, `unlearn ls metrics`).

The `Metric` classes are imported on first use: importing torchmetrics takes seconds.
"""

from __future__ import annotations

import importlib

from .functional import gap, per_class_accuracy, svc_mia_efficacy, true_label_confidence

_LAZY = {
    "MIAEfficacy": ".classification",
    "PerClassAccuracy": ".classification",
    "LinearCKA": ".representation",
    "linear_cka": ".representation",
    "representation_metrics": ".representation",
    "judge_labels": ".generation",
    "judge_logits": ".generation",
    "load_judge": ".generation",
    "fid": ".generation",
    "fid_from_features": ".generation",
    "image_features": ".generation",
    "clip_score": ".generation",
    "grid_image": ".generation",
    "save_grid": ".generation",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MIAEfficacy",
    "PerClassAccuracy",
    "gap",
    "per_class_accuracy",
    "svc_mia_efficacy",
    "true_label_confidence",
]
