"""Every custom metric against an independent scikit-learn / NumPy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, recall_score
from sklearn.svm import SVC

from unlearn.data import forget_classes, forget_fraction
from unlearn.datasets import load_dataset
from unlearn.evaluate import evaluate
from unlearn.metrics import (
    MIAEfficacy,
    PerClassAccuracy,
    gap,
    per_class_accuracy,
    svc_mia_efficacy,
    true_label_confidence,
)
from unlearn.metrics.classification import MEMBER, NONMEMBER, TARGET
from unlearn.models.classifier import load_classifier


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return _softmax(logits.astype(np.float64))[np.arange(len(labels)), labels]


def _reference_mia(member, nonmember, target) -> float:
    """The SalUn / Sparse SVC attack, written out independently: members are label 1, non-members 0."""
    x = np.concatenate([member, nonmember]).reshape(-1, 1).astype(np.float64)
    y = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    predicted = clf.predict(np.asarray(target, dtype=np.float64).reshape(-1, 1))
    return 100.0 * float(np.mean(predicted == 0))


def _synthetic_confidences(seed: int = 0):
    rng = np.random.default_rng(seed)
    member = rng.beta(8, 1, size=300)  # confident on training data
    nonmember = rng.beta(2, 2, size=200)  # less so on held-out data
    target = np.concatenate([rng.beta(8, 1, size=60), rng.beta(2, 2, size=90)])
    return member, nonmember, target


# ---------------------------------------------------------------------------------------------- MIA


def test_svc_mia_efficacy_matches_sklearn_svc():
    member, nonmember, target = _synthetic_confidences()
    expected = _reference_mia(member, nonmember, target)
    assert 0.0 < expected < 100.0  # a non-trivial case
    assert svc_mia_efficacy(member, nonmember, target) == pytest.approx(expected, abs=1e-9)


def test_svc_mia_efficacy_extremes_and_empty_target():
    member, nonmember, _ = _synthetic_confidences(1)
    assert svc_mia_efficacy(member, nonmember, np.full(20, 0.999)) == 0.0  # looks like members
    assert svc_mia_efficacy(member, nonmember, np.full(20, 0.3)) == 100.0  # looks like non-members
    assert math.isnan(svc_mia_efficacy(member, nonmember, np.zeros(0)))
    # No non-members (a test split holding only forgotten classes) or no members: nothing to fit an attack on.
    assert math.isnan(svc_mia_efficacy(member, np.zeros(0), np.full(5, 0.5)))
    assert math.isnan(svc_mia_efficacy(np.zeros(0), nonmember, np.full(5, 0.5)))


def _logits_with_confidence(
    conf: np.ndarray, labels: np.ndarray, num_classes: int, seed: int
) -> torch.Tensor:
    """Logits whose softmax puts exactly `conf` on `labels` and spreads the rest unevenly."""
    rng = np.random.default_rng(seed)
    rest = rng.dirichlet(np.ones(num_classes - 1), size=len(conf)) * (1.0 - conf)[:, None]
    probs = np.empty((len(conf), num_classes))
    for i, (c, y) in enumerate(zip(conf, labels)):
        probs[i] = np.insert(rest[i], y, c)
    return torch.tensor(np.log(probs) + rng.normal(size=(len(conf), 1)), dtype=torch.float64)


def test_mia_efficacy_metric_matches_sklearn_svc():
    member, nonmember, target = _synthetic_confidences(2)
    rng = np.random.default_rng(3)
    groups = {MEMBER: member, NONMEMBER: nonmember, TARGET: target}
    metric = MIAEfficacy()
    expected_conf = {}
    for group, conf in groups.items():
        labels = rng.integers(0, 10, size=len(conf))
        logits = _logits_with_confidence(conf, labels, 10, seed=group)
        expected_conf[group] = _confidence(logits.numpy(), labels)
        np.testing.assert_allclose(expected_conf[group], conf, atol=1e-9)
        # Several updates per group, interleaved order must not matter.
        half = len(conf) // 2
        metric.update(logits[:half], torch.tensor(labels[:half]), group)
        metric.update(logits[half:], torch.tensor(labels[half:]), group)
    value = float(metric.compute())
    expected = _reference_mia(expected_conf[MEMBER], expected_conf[NONMEMBER], expected_conf[TARGET])
    assert 0.0 < expected < 100.0
    assert value == pytest.approx(expected, abs=1e-4)  # compute() returns a float32 tensor
    assert value == pytest.approx(svc_mia_efficacy(member, nonmember, target), abs=1e-4)

    metric.reset()
    labels = torch.zeros(5, dtype=torch.long)
    metric.update(torch.tensor([[9.0, 0.0]] * 5), labels, MEMBER)
    metric.update(torch.tensor([[0.0, 0.0]] * 5), labels, NONMEMBER)
    metric.update(torch.tensor([[0.0, 0.0]] * 5), labels, TARGET)
    assert float(metric.compute()) == 100.0  # targets look exactly like the non-members after reset


# ------------------------------------------------------------------------------------- per class


def test_per_class_accuracy_matches_recall_and_confusion_matrix():
    rng = np.random.default_rng(4)
    num_classes = 6
    labels = rng.choice([0, 1, 2, 4, 5], size=400)  # class 3 never occurs
    logits = rng.normal(size=(400, num_classes))
    logits[np.arange(400), labels] += rng.uniform(0, 3, size=400)  # mostly right, not always
    preds = logits.argmax(1)

    recall = 100.0 * recall_score(
        labels, preds, labels=range(num_classes), average=None, zero_division=np.nan
    )
    cm = confusion_matrix(labels, preds, labels=range(num_classes))
    with np.errstate(invalid="ignore"):
        from_cm = 100.0 * np.diag(cm) / cm.sum(axis=1)
    np.testing.assert_allclose(recall, from_cm, equal_nan=True)
    assert np.isnan(recall[3]) and not np.isnan(recall[[0, 1, 2, 4, 5]]).any()

    metric = PerClassAccuracy(num_classes)
    for chunk in np.array_split(np.arange(400), 3):
        metric.update(torch.tensor(logits[chunk]), torch.tensor(labels[chunk]))
    np.testing.assert_allclose(metric.compute().numpy(), recall, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(per_class_accuracy(preds, labels, num_classes), recall, equal_nan=True)


def test_true_label_confidence_matches_numpy_softmax():
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=4.0, size=(64, 7)).astype(np.float32)
    logits[0] += 80.0  # large values: a naive exp would overflow in float32
    labels = rng.integers(0, 7, size=64)
    got = true_label_confidence(torch.tensor(logits), torch.tensor(labels)).numpy()
    np.testing.assert_allclose(got, _confidence(logits, labels), rtol=1e-5, atol=1e-7)
    half = true_label_confidence(torch.tensor(logits).half(), torch.tensor(labels))
    assert half.dtype == torch.float32  # computed in float32 even for half-precision logits


def test_gap_matches_numpy():
    results = {"UA": 12.5, "RA": 99.0, "TA": 91.25, "MIA": 30.0, "other": 1.0}
    reference = {"UA": 20.0, "RA": 100.0, "TA": 93.0, "MIA": 10.0}
    got = gap(results, reference)
    diffs = np.abs(np.array([12.5, 99.0, 91.25, 30.0]) - np.array([20.0, 100.0, 93.0, 10.0]))
    assert [got[f"gap_{k}"] for k in ("UA", "RA", "TA", "MIA")] == pytest.approx(diffs.tolist())
    assert got["avg_gap"] == pytest.approx(float(np.mean(diffs)))
    assert set(got) == {"gap_UA", "gap_RA", "gap_TA", "gap_MIA", "avg_gap"}


# ------------------------------------------------------------------------------------- evaluate()


def _batched_logits(model, dataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Logits in the same batches as the harness, so the numbers agree bit for bit."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]) if len(dataset) else None
    if images is None:
        return np.zeros((0, model.num_classes)), np.zeros(0, dtype=np.int64)
    with torch.no_grad():
        out = torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    return out.float().numpy(), dataset.labels.numpy()


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(logits.argmax(1) == labels))


@pytest.fixture(scope="module")
def damaged_world_classifier(digits_world):
    """The digits world classifier with a noisy head, so that no metric sits at 0 or 100."""
    model = load_classifier(digits_world["classifier"], None, 10)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.head.weight.add_(torch.randn(model.head.weight.shape, generator=generator) * 0.25)
    return model.eval()


@pytest.mark.parametrize("task", ["class", "random"])
def test_evaluate_matches_numpy(damaged_world_classifier, task):
    model = damaged_world_classifier
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    data = (
        forget_classes(train, test, [3, 7]) if task == "class" else forget_fraction(train, test, 0.1, seed=1)
    )
    model.train()  # evaluate() must switch to eval mode and back
    results = evaluate(model, data)
    assert model.training
    model.eval()

    forget = _batched_logits(model, data.forget)
    retain = _batched_logits(model, data.retain)
    held_out = _batched_logits(model, data.test)
    assert results["UA"] == pytest.approx(100.0 - _accuracy(*forget), abs=1e-4)
    assert results["RA"] == pytest.approx(_accuracy(*retain), abs=1e-4)
    assert results["TA"] == pytest.approx(_accuracy(*held_out), abs=1e-4)
    for key in ("UA", "RA", "TA", "MIA"):
        assert 0.0 <= results[key] <= 100.0

    # MIA: members are the first |test| retain examples in dataset order, non-members the test set.
    members = len(data.test)
    expected_mia = _reference_mia(
        _confidence(retain[0][:members], retain[1][:members]),
        _confidence(*held_out),
        _confidence(*forget),
    )
    assert results["MIA"] == pytest.approx(expected_mia, abs=1e-6)

    # Per class: test accuracy over the whole test split, forgotten classes included.
    everything = np.concatenate([held_out[0], _batched_logits(model, data.test_forget)[0]])
    labels = np.concatenate([held_out[1], data.test_forget.labels.numpy()])
    recall = 100.0 * recall_score(labels, everything.argmax(1), labels=range(10), average=None)
    per_class = np.array([results[f"acc_class_{c}"] for c in range(10)])
    np.testing.assert_allclose(per_class, recall, atol=1e-4)

    if task == "class":
        forget_test = _batched_logits(model, data.test_forget)
        assert results["forget_test_acc"] == pytest.approx(_accuracy(*forget_test), abs=1e-4)
        assert set(np.unique(forget[1])) == {3, 7}
        assert not np.isin(held_out[1], [3, 7]).any()
    else:
        assert "forget_test_acc" not in results
    # A damaged head keeps the numbers away from the trivial corners.
    assert 0.0 < results["UA"] < 100.0 and results["RA"] < 100.0


def test_evaluate_selected_metrics_and_unknown_name(damaged_world_classifier):
    from unlearn.errors import ConfigError

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    data = forget_classes(train, test, [0])
    results = evaluate(damaged_world_classifier, data, names=["UA", "TA"])
    assert {"UA", "TA"} <= set(results) and not {"RA", "MIA", "acc_class_0"} & set(results)
    with pytest.raises(ConfigError, match="'UAX' is not a metric of the classifier family"):
        evaluate(damaged_world_classifier, data, names=["UAX"])


def test_evaluate_with_an_empty_test_set(damaged_world_classifier):
    """A test split holding only the forgotten class: TA and MIA are undefined (NaN), nothing crashes."""
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    only_three = test.subset((test.labels == 3).nonzero().flatten())
    data = forget_classes(train, only_three, [3])
    assert len(data.test) == 0
    results = evaluate(damaged_world_classifier, data)
    assert math.isnan(results["TA"]) and math.isnan(results["MIA"])
    assert not math.isnan(results["UA"]) and not math.isnan(results["forget_test_acc"])
    assert not math.isnan(results["acc_class_3"]) and math.isnan(results["acc_class_0"])
