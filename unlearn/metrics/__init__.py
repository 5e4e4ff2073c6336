"""Metrics: torchmetrics `Metric`s and the plain functions behind them.

The `Metric` classes are imported on first use: importing torchmetrics takes seconds.
"""

from __future__ import annotations

import importlib

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
    "representation": "linear CKA of penultimate features to the original and Retrain models on forget and test "
    "data (CKA_forget_<ref>, CKA_test_<ref>), and a linear probe / 5-NN reading the forgotten data out of "
    "frozen features (probe_forget, knn_forget)",
    "erasure_rate": "percent of generations from the erased concept's prompts the judge still calls it "
    "(several concepts: per concept as erasure_rate:<concept>, and their mean)",
    "erasure_rate_paraphrase": "erasure_rate on paraphrased prompts of the erased concept (percent)",
    "retain_accuracy": "percent of generations from other concepts' prompts the judge calls the prompted one; "
    "also neighbor_accuracy (the classes next to the erased ones) and unrelated_accuracy (the rest)",
    "fid": "Frechet distance of generated to real images (clean-fid Inception or a custom extractor)",
    "clip_score": "100 x mean cosine of CLIP image and prompt embeddings, clamped at 0 (local CLIP folder)",
    "class_histogram": "GAN: percent of samples the judge assigns to each class (keys class_share_<c>)",
    "confident": "GAN: percent of samples the judge classifies with probability >= 0.9",
    "fid_original": "GAN: Frechet distance of retained-class samples to the original generator's (judge features)",
}

_LAZY = {
    "MIAEfficacy": ".classification",
    "PerClassAccuracy": ".classification",
    "LinearCKA": ".representation",
    "linear_cka": ".representation",
    "representation_metrics": ".representation",
    "ConceptRate": ".generation",
    "JudgeAccuracy": ".generation",
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
    "METRICS",
    "MIAEfficacy",
    "PerClassAccuracy",
    "gap",
    "per_class_accuracy",
    "svc_mia_efficacy",
    "true_label_confidence",
]
