"""Ensemble selection on constructed predictions whose right answer is known, and temperature scaling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from automl_tl.evaluate.ensemble import EnsembleSelection, select_ensemble, select_greedy, select_top_k
from automl_tl.inference.calibrate import T_MAX, T_MIN, apply_temperature, combine, fit_temperature
from automl_tl.errors import ConfigError, SearchError
from automl_tl.evaluate.metrics import log_loss


def _binary(p_true: list[float], labels: np.ndarray) -> np.ndarray:
    """Two-class probabilities giving the true class of each example probability ``p_true``."""
    p1 = np.where(labels == 1, p_true, 1 - np.asarray(p_true))
    return np.stack([1 - p1, p1], axis=1)


ALL_ONE = np.ones(10, dtype=np.int64)
# A is sure and right on the first half, slightly wrong on the second; B the mirror image; C is poor.
EXPERT_A = _binary([1.0] * 5 + [0.45] * 5, ALL_ONE)
EXPERT_B = _binary([0.45] * 5 + [1.0] * 5, ALL_ONE)
POOR_C = _binary([0.2] * 10, ALL_ONE)


def test_combine_is_a_weighted_average() -> None:
    a, b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    assert combine([a, b], [3, 1]) == pytest.approx(np.array([[0.75, 0.25]]))
    with pytest.raises(ValueError, match="one weight per member"):
        combine([a, b], [1.0])


@pytest.mark.parametrize("metric", ["log_loss", "accuracy"])
def test_greedy_finds_complementary_experts(metric: str) -> None:
    pool = {"C": POOR_C, "A": EXPERT_A, "B": EXPERT_B}
    sel = select_greedy(pool, ALL_ONE, size=5, metric=metric)
    # Each expert alone is right on half; averaged they are right everywhere. Further picks only hurt, so the
    # best prefix of the five picks is A then B, with equal weights.
    assert sel.members == ("A", "B") and sel.weights == (0.5, 0.5)
    assert sel.method == "greedy" and sel.metric == metric
    if metric == "accuracy":
        assert sel.val_score == 1.0
    else:
        assert sel.val_score == pytest.approx(-np.log(0.725))


def test_greedy_with_replacement_reaches_the_best_grid_weights() -> None:
    labels = np.ones(9, dtype=np.int64)
    a = _binary([0.95] * 6 + [0.4] * 3, labels)
    b = _binary([0.5] * 6 + [0.9] * 3, labels)
    sel = select_greedy({"a": a, "b": b}, labels, size=6, metric="log_loss")
    # The best mixture on the 1/6 grid, found by brute force, is 5 parts a to 1 part b.
    grid = [(k, log_loss(labels, combine([a, b], [k, 6 - k]))) for k in range(7)]
    best_k = min(grid, key=lambda g: g[1])[0]
    assert best_k == 5
    assert sel.members == ("a", "b") and sel.weights == pytest.approx((5 / 6, 1 / 6))
    assert sel.val_score == pytest.approx(min(g[1] for g in grid))


def test_greedy_never_worse_than_the_best_single_trial() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=60)
    pool = {f"t{i}": rng.dirichlet(np.ones(3), size=60) for i in range(6)}
    best_single = min(log_loss(labels, p) for p in pool.values())
    sel = select_greedy(pool, labels, size=10, metric="log_loss")
    assert sel.val_score <= best_single + 1e-12
    assert sum(sel.weights) == pytest.approx(1.0)
    # weights are pick counts over the number of picks
    picks = round(1 / min(sel.weights))
    assert all(abs(w * picks - round(w * picks)) < 1e-9 for w in sel.weights) or len(sel.weights) == 1
    assert sel.val_score == pytest.approx(log_loss(labels, combine([pool[m] for m in sel.members], sel.weights)))


def test_greedy_init_best_seeds_with_the_top_trials() -> None:
    pool = {"C": POOR_C, "A": EXPERT_A, "B": EXPERT_B}
    sel = select_greedy(pool, ALL_ONE, size=2, metric="log_loss", init_best=2)
    assert set(sel.members) == {"A", "B"}
    with pytest.raises(ConfigError, match="init_best"):
        select_greedy(pool, ALL_ONE, size=2, init_best=3)


def test_top_k_ranks_by_metric_and_breaks_ties_by_log_loss() -> None:
    labels = np.ones(4, dtype=np.int64)
    pool = {
        "meh": _binary([0.6] * 4, labels),  # accuracy 1, log loss 0.51
        "sure": _binary([0.9] * 4, labels),  # accuracy 1, log loss 0.11: wins the tie
        "wrong": _binary([0.3] * 4, labels),  # accuracy 0
    }
    sel = select_top_k(pool, labels, k=2, metric="accuracy")
    assert sel == EnsembleSelection(("sure", "meh"), (0.5, 0.5), "top_k", "accuracy", 1.0)
    assert select_top_k(pool, labels, k=1, metric="log_loss").members == ("sure",)
    assert select_top_k(pool, labels, k=10).members == ("sure", "meh", "wrong")  # k larger than the pool


def test_select_ensemble_dispatches_and_checks() -> None:
    pool = {"C": POOR_C, "A": EXPERT_A, "B": EXPERT_B}
    assert select_ensemble(pool, ALL_ONE, "greedy", 5).method == "greedy"
    assert select_ensemble(pool, ALL_ONE, "top_k", 2).members == ("A", "B")
    assert select_top_k(pool, ALL_ONE, 1, metric="val_log_loss").metric == "log_loss"  # config names work
    with pytest.raises(ConfigError, match="ensemble metric must be one of"):
        select_greedy(pool, ALL_ONE, 3, metric="auc")
    with pytest.raises(SearchError, match="nothing to ensemble"):
        select_greedy({}, ALL_ONE, 3)
    with pytest.raises(SearchError, match="trial B: val_probs has shape"):
        select_top_k({"A": EXPERT_A, "B": EXPERT_B[:5]}, ALL_ONE, 2)
    for metric in ("balanced_accuracy", "macro_f1"):
        assert select_greedy(pool, ALL_ONE, 3, metric=metric).members[:2] in (("A", "B"), ("B", "A"))


def test_temperature_recovers_known_overconfidence() -> None:
    rng = np.random.default_rng(0)
    n, c = 20_000, 4
    logits = rng.normal(size=(n, c)) * 1.5
    true_p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(c, p=p) for p in true_p])
    overconfident = apply_temperature(true_p, 0.5)  # logits doubled
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(2.0, rel=0.05)
    calibrated = apply_temperature(overconfident, t)
    assert log_loss(labels, calibrated) < log_loss(labels, overconfident)
    assert np.array_equal(calibrated.argmax(axis=1), overconfident.argmax(axis=1))


def test_temperature_is_bounded_and_robust() -> None:
    labels = np.array([0, 1, 0, 1])
    right = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])
    assert fit_temperature(right, labels) == pytest.approx(T_MIN, rel=1e-3)  # sharper is always better here
    assert fit_temperature(right[:, ::-1], labels) == pytest.approx(T_MAX, rel=1e-3)  # always wrong: flatten
    uniform = np.full((4, 2), 0.5)
    assert fit_temperature(uniform, labels) == 1.0  # nothing to gain: T stays 1
    one_hot = np.eye(2)[labels]
    assert T_MIN <= fit_temperature(one_hot, labels) <= T_MAX


def test_apply_temperature() -> None:
    p = np.array([[0.7, 0.2, 0.1]])
    assert apply_temperature(p, 1.0) == pytest.approx(p)
    soft, sharp = apply_temperature(p, 2.0), apply_temperature(p, 0.5)
    assert soft[0, 0] < 0.7 < sharp[0, 0] and soft.sum() == pytest.approx(1.0)
    expected = np.sqrt(p) / np.sqrt(p).sum()  # T = 2 is the normalised square root
    assert soft == pytest.approx(expected)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(p, 0.0)


def test_selection_does_not_depend_on_pool_order_when_scores_differ() -> None:
    pool = {"C": POOR_C, "A": EXPERT_A, "B": _binary([0.45] * 5 + [0.99] * 5, ALL_ONE)}
    results = {
        select_greedy(dict(order), ALL_ONE, 4).members for order in itertools.permutations(pool.items())
    }
    assert results == {("A", "B")}


# --- the ensemble never serves worse than its best member -----------------------------------------------------


def test_an_ensemble_that_does_not_beat_its_best_member_serves_the_member_alone() -> None:
    from automl_tl.evaluate.ensemble import no_worse_than_best

    labels = np.array([1] * 10)
    strong = _binary([0.9] * 10, labels)  # right everywhere
    weak = _binary([0.05] * 10, labels)  # so wrong everywhere that the average is wrong too
    forced = EnsembleSelection(("strong", "weak"), (0.5, 0.5), "top_k", "log_loss", 0.0)
    served, why = no_worse_than_best(forced, {"strong": strong, "weak": weak}, labels, "strong")
    assert served.members == ("strong",) and served.weights == (1.0,) and served.method == "best_member"
    assert "did not beat its best member strong" in why and "accuracy 0.0000 vs 1.0000" in why


def test_an_ensemble_that_beats_its_best_member_is_kept() -> None:
    from automl_tl.evaluate.ensemble import no_worse_than_best

    pool = {"a": EXPERT_A, "b": EXPERT_B, "c": POOR_C}
    chosen = select_greedy(pool, ALL_ONE, size=4, metric="log_loss")
    assert set(chosen.members) == {"a", "b"}  # the two experts complement each other
    served, why = no_worse_than_best(chosen, pool, ALL_ONE, "a")
    assert served == chosen and "beat its best member a" in why
    alone = select_top_k(pool, ALL_ONE, 1)
    assert no_worse_than_best(alone, pool, ALL_ONE, alone.members[0])[0] == alone  # nothing to compare
