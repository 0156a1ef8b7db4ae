"""Metrics against hand-computed cases, and against scikit-learn where the definitions agree."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from automl_tl.evaluate.metrics import (
    classification_metrics,
    expected_calibration_error,
    format_metrics_table,
    log_loss,
    reliability_bins,
    top_k_accuracy,
)

NAMES = ["ant", "bee", "wasp"]
# Six examples, three classes. Predictions (arg-max): 0, 1, 1, 1, 2, 0.
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.2, 0.7],
        [0.5, 0.1, 0.4],
    ]
)


def test_hand_computed_case() -> None:
    m = classification_metrics(LABELS, PROBS, NAMES, top_k=(1, 2, 5))
    assert m["n"] == 6
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision: ant 1/2, bee 2/3, wasp 1/1; recall: ant 1/2, bee 2/2, wasp 1/2
    assert m["precision"]["per_class"] == pytest.approx({"ant": 0.5, "bee": 2 / 3, "wasp": 1.0})
    assert m["recall"]["per_class"] == pytest.approx({"ant": 0.5, "bee": 1.0, "wasp": 0.5})
    f1 = {"ant": 0.5, "bee": 0.8, "wasp": 2 / 3}
    assert m["f1"]["per_class"] == pytest.approx(f1)
    assert m["precision"]["macro"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert m["recall"]["weighted"] == pytest.approx(4 / 6)  # equal supports: weighted recall == accuracy
    assert m["f1"]["macro"] == pytest.approx(sum(f1.values()) / 3)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["support"] == {"ant": 2, "bee": 2, "wasp": 2}
    # ranks of the true class: 1, 2, 1, 1, 1, 2
    assert m["top_k_accuracy"] == {"1": pytest.approx(4 / 6), "2": pytest.approx(1.0)}  # 5 >= C is left out
    expected_ll = -np.mean(np.log([0.7, 0.3, 0.8, 0.5, 0.7, 0.4]))
    assert m["log_loss"] == pytest.approx(expected_ll)
    json.dumps(m, allow_nan=False)  # plain JSON, no NaN


def test_ece_hand_computed() -> None:
    # Confidences 0.6 (right), 0.7 (wrong), 0.8 (right), 0.9 (wrong).
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8], [0.1, 0.9]])
    # bin (0.5, 1]: conf mean (0.6+0.7+0.8+0.9)/4 = 0.75, accuracy 2/4 -> ECE 0.25
    assert expected_calibration_error(labels, probs, n_bins=2) == pytest.approx(0.25)
    # ten bins: 0.6 right (|1-0.6|), 0.7 wrong (0.7), 0.8 right (0.2), 0.9 wrong (0.9), each weighing 1/4
    assert expected_calibration_error(labels, probs, n_bins=10) == pytest.approx((0.4 + 0.7 + 0.2 + 0.9) / 4)


def test_reliability_bins_add_up_to_ece() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=200)
    labels = rng.integers(0, 4, size=200)
    bins = reliability_bins(labels, probs, n_bins=15)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 200
    ece = sum(b["count"] / 200 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert ece == pytest.approx(expected_calibration_error(labels, probs, n_bins=15))
    assert all(b["confidence"] is None for b in bins if b["count"] == 0)
    json.dumps(bins, allow_nan=False)


def test_top_k_ties_follow_argmax() -> None:
    labels = np.array([1, 0])
    probs = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    # np.argmax picks class 0 on the tie: example 0 (label 1) is wrong, example 1 (label 0) is right.
    assert top_k_accuracy(labels, probs, 1) == pytest.approx(0.5)
    assert classification_metrics(labels, probs, NAMES)["accuracy"] == pytest.approx(0.5)
    assert top_k_accuracy(labels, probs, 2) == 1.0


def test_absent_class_is_not_averaged_and_zero_division_is_zero() -> None:
    labels = np.array([0, 0, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])  # wasp neither true nor predicted
    m = classification_metrics(labels, probs, NAMES)
    assert m["recall"]["per_class"]["wasp"] == 0.0 and m["support"]["wasp"] == 0
    assert m["recall"]["macro"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["balanced_accuracy"] == pytest.approx(0.75)


def test_log_loss_clips_certain_misses() -> None:
    value = log_loss(np.array([0]), np.array([[0.0, 1.0]]))
    assert math.isfinite(value) and value == pytest.approx(-math.log(1e-15))


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="labels must have shape"):
        classification_metrics(np.array([0, 1]), PROBS, NAMES)
    with pytest.raises(ValueError, match="labels must lie in"):
        classification_metrics(np.array([3]), PROBS[:1], NAMES)
    with pytest.raises(ValueError, match="class names"):
        classification_metrics(LABELS, PROBS, NAMES[:2])
    with pytest.raises(ValueError, match="at least one"):
        classification_metrics(np.zeros(0, int), np.zeros((0, 3)), NAMES)


def test_table_lists_rows_and_skips_missing_columns() -> None:
    best = classification_metrics(LABELS, PROBS, NAMES)
    ens = classification_metrics(LABELS, (PROBS + np.eye(3)[LABELS]) / 2, NAMES)
    table = format_metrics_table({"best": best, "ensemble": ens})
    lines = table.splitlines()
    assert len(lines) == 3 and lines[1].startswith("best") and lines[2].startswith("ensemble")
    assert "acc" in lines[0] and "log_loss" in lines[0] and "ece" in lines[0]
    assert "top5" not in lines[0]  # three classes: top-5 means nothing
    assert f"{best['accuracy']:.4f}" in lines[1]


sklearn = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = 300, 7
    logits = rng.normal(size=(n, c)) * 2
    labels = rng.integers(0, c, size=n)
    logits[np.arange(n), labels] += 1.5  # better than chance
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    preds = probs.argmax(axis=1)
    names = [f"c{i}" for i in range(c)]
    m = classification_metrics(labels, probs, names, top_k=(1, 3, 5))
    assert m["accuracy"] == pytest.approx(sklearn.accuracy_score(labels, preds))
    assert m["balanced_accuracy"] == pytest.approx(sklearn.balanced_accuracy_score(labels, preds))
    for key, fn in (("precision", sklearn.precision_score), ("recall", sklearn.recall_score), ("f1", sklearn.f1_score)):
        assert m[key]["macro"] == pytest.approx(fn(labels, preds, average="macro", zero_division=0))
        assert m[key]["weighted"] == pytest.approx(fn(labels, preds, average="weighted", zero_division=0))
        per_class = fn(labels, preds, average=None, labels=list(range(c)), zero_division=0)
        assert [m[key]["per_class"][name] for name in names] == pytest.approx(list(per_class))
    assert m["log_loss"] == pytest.approx(sklearn.log_loss(labels, probs, labels=list(range(c))))
    for k in (3, 5):
        expected = sklearn.top_k_accuracy_score(labels, probs, k=k, labels=list(range(c)))
        assert m["top_k_accuracy"][str(k)] == pytest.approx(expected)
    assert m["confusion_matrix"] == sklearn.confusion_matrix(labels, preds, labels=list(range(c))).tolist()
