"""Representation metrics: CKA against NumPy's Gram-matrix form, k-NN / probe against scikit-learn, and the
digits world classifier (a head-only edit must be visible: CKA to the original stays 100, the probe still
reads the forgotten class)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearn.data import forget_classes, forget_fraction
from unlearn.datasets import load_dataset
from unlearn.evaluate import evaluate
from unlearn.metrics.representation import (
    LinearCKA,
    knn_accuracy,
    linear_cka,
    linear_probe_accuracy,
    representation_metrics,
)
from unlearn.models import build_classifier, load_model


def _numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    """UUEF's Gram-matrix form: HSIC(K, L) = sum(HKH * HLH), H = I - 11^T/n, linear kernels; in percent."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(a, b):
        return np.sum((h @ a @ h) * (h @ b @ h))

    gram_x, gram_y = x @ x.T, y @ y.T
    return 100.0 * hsic(gram_x, gram_y) / np.sqrt(hsic(gram_x, gram_x) * hsic(gram_y, gram_y))


def _random_pair(n: int, d1: int, d2: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) + rng.normal(size=d1)  # non-zero column means: centring matters
    y = x @ rng.normal(size=(d1, d2)) + 0.5 * rng.normal(size=(n, d2))  # related, not identical
    return x, y


@pytest.mark.parametrize(("n", "d1", "d2"), [(200, 16, 24), (30, 64, 80), (50, 7, 7)])
def test_linear_cka_matches_numpy_gram_form(n, d1, d2):
    # (30, 64, 80) takes the Gram branch (fewer rows than features), the others the feature-space form.
    x, y = _random_pair(n, d1, d2)
    expected = _numpy_cka(x, y)
    assert 0.0 < expected < 100.0
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-10)
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-10)  # NumPy input
    assert linear_cka(torch.from_numpy(x).float(), torch.from_numpy(y).float()) == pytest.approx(
        expected, rel=1e-5
    )


def test_linear_cka_identities():
    x, y = _random_pair(120, 12, 20, seed=1)
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    base = linear_cka(x, y)
    assert linear_cka(x, x) == pytest.approx(100.0, abs=1e-10)
    assert linear_cka(x, y @ q) == pytest.approx(base, rel=1e-10)  # orthogonal transform
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)  # isotropic scaling
    assert linear_cka(x + 5.0, y - 2.0) == pytest.approx(base, rel=1e-10)  # translation (centring)
    assert linear_cka(y, x) == pytest.approx(base, rel=1e-10)  # symmetric


def test_linear_cka_per_batch_average_and_errors():
    x, y = _random_pair(130, 10, 6, seed=3)
    batches = [(0, 50), (50, 100), (100, 130)]  # UUEF: consecutive unshuffled batches, the last one smaller
    expected = np.mean([_numpy_cka(x[a:b], y[a:b]) for a, b in batches])
    assert linear_cka(x, y, batch_size=50) == pytest.approx(expected, rel=1e-10)
    assert linear_cka(x, y, batch_size=1000) == pytest.approx(linear_cka(x, y), rel=1e-12)
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(x, y[:-1])
    with pytest.raises(ValueError, match="batch_size"):
        linear_cka(x, y, batch_size=1)
    assert np.isnan(linear_cka(x, np.ones_like(y)))  # a constant representation


def test_linear_cka_metric_accumulates():
    x, y = _random_pair(150, 9, 11, seed=4)
    x, y = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    metric = LinearCKA()
    for start in range(0, 150, 40):
        metric.update(x[start : start + 40], y[start : start + 40])
    assert float(metric.compute()) == pytest.approx(linear_cka(x, y), rel=1e-12)
    metric.reset()
    metric.update(x, x)
    assert float(metric.compute()) == pytest.approx(100.0, abs=1e-10)
    per_batch = LinearCKA(batch_size=64)
    per_batch.update(x, y)
    assert float(per_batch.compute()) == pytest.approx(linear_cka(x, y, batch_size=64), rel=1e-12)


def test_knn_and_probe_match_sklearn():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, y_train, x_test, y_test = x[:1200], y[:1200], x[1200:], y[1200:]
    knn = KNeighborsClassifier(n_neighbors=5, metric="cosine").fit(x_train, y_train)
    expected_knn = 100.0 * knn.score(x_test, y_test)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=0)).fit(
        x_train, y_train
    )
    expected_probe = 100.0 * probe.score(x_test, y_test)
    assert knn_accuracy(x_train, y_train, x_test, y_test) == pytest.approx(expected_knn)
    assert linear_probe_accuracy(x_train, y_train, x_test, y_test) == pytest.approx(expected_probe)
    as_tensors = [torch.from_numpy(a) for a in (x_train, y_train, x_test, y_test)]
    assert knn_accuracy(*as_tensors) == pytest.approx(expected_knn)
    assert linear_probe_accuracy(*as_tensors) == pytest.approx(expected_probe)
    assert expected_knn > 90 and expected_probe > 90
    assert np.isnan(knn_accuracy(x_train, y_train, x_test[:0], y_test[:0]))
    assert np.isnan(linear_probe_accuracy(x_train, y_train, x_test[:0], y_test[:0]))


@pytest.fixture(scope="module")
def digits_task():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    return train, test, forget_classes(train, test, [3])


def test_original_against_itself(digits_world, digits_task):
    *_, data = digits_task
    original = load_model("world:digits", "digits_cnn", 10)
    results = representation_metrics(
        original, data, {"original": original, "copy": load_model("world:digits")}
    )
    assert set(results) == {
        "CKA_forget_original",
        "CKA_test_original",
        "CKA_forget_copy",
        "CKA_test_copy",
        "probe_forget",
        "knn_forget",
    }
    for key in ("CKA_forget_original", "CKA_test_original", "CKA_forget_copy", "CKA_test_copy"):
        assert results[key] == pytest.approx(100.0, abs=1e-6)
    assert results["probe_forget"] > 80 and results["knn_forget"] > 80


def test_head_only_change_is_visible(digits_world, digits_task):
    """A model whose head no longer predicts class 3 (UA = 100) but whose features are the original's."""
    *_, data = digits_task
    original = load_model("world:digits", "digits_cnn", 10)
    edited = load_model("world:digits", "digits_cnn", 10)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a different head altogether, and class 3 can never win
        edited.head.weight.add_(0.1 * torch.randn(edited.head.weight.shape, generator=generator))
        edited.head.bias[3] = -1e4
    logits = evaluate(edited, data, names=("UA", "TA"))
    assert logits["UA"] == 100.0 and logits["forget_test_acc"] == 0.0 and logits["TA"] > 90
    edited.train()  # representation_metrics must switch to eval mode and back
    results = representation_metrics(edited, data, {"original": original})
    assert edited.training
    assert results["CKA_forget_original"] == pytest.approx(100.0, abs=1e-6)
    assert results["CKA_test_original"] == pytest.approx(100.0, abs=1e-6)
    assert results["probe_forget"] > 80  # the forgotten class is still read out of the representation
    assert results["knn_forget"] > 80


def test_untrained_network_is_far_from_the_original(digits_world, digits_task):
    *_, data = digits_task
    original = load_model("world:digits", "digits_cnn", 10)
    torch.manual_seed(0)
    fresh = build_classifier("digits_cnn", 10)
    itself = representation_metrics(original, data, {"original": original})
    results = representation_metrics(fresh, data, {"original": original})
    assert itself["CKA_test_original"] - results["CKA_test_original"] > 20
    assert itself["CKA_forget_original"] - results["CKA_forget_original"] > 20


def test_random_forgetting_probes_the_forget_set(digits_world, digits_task):
    train, test, _ = digits_task
    data = forget_fraction(train, test, 0.1, seed=1)
    original = load_model("world:digits", "digits_cnn", 10)
    results = representation_metrics(original, data, {"original": original})
    assert results["CKA_forget_original"] == pytest.approx(100.0, abs=1e-6)
    # Fitted on retain features, scored on the (trained-on) forget examples: near perfect for the original.
    assert results["probe_forget"] > 90 and results["knn_forget"] > 90
