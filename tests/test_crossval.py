"""k-fold cross-validation of heads on features, the logistic-regression probe and the budget-bound trial count.

No Ray here: folds, probes and heads are plain numpy and torch, fitted on constructed features whose right
answer is known (and, for the probe, checked against scikit-learn, a test-only dependency).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from automl_tl.config import DEFAULT_TRIALS, load_config
from automl_tl.evaluate.crossval import (
    HeadTrial,
    cross_validate_heads,
    fold_accuracies,
    head_trial,
    out_of_fold,
    refit_state,
    stratified_folds,
    use_cross_validation,
)
from automl_tl.evaluate.ensemble import select_ensemble
from automl_tl.train.probe import L2_GRID, fit_head, fit_probe, head_probs
from automl_tl.train.trial_data import TrialData

WIDTH = 1280  # mobilenetv2_100's feature width: the heads below are built for that backbone


def _blobs(n: int, classes: int, separation: float, seed: int, width: int = WIDTH) -> tuple[torch.Tensor, np.ndarray]:
    """Gaussian clusters, one per class, whose centres lie ``separation`` apart in a few directions."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = np.zeros((classes, width))
    centres[np.arange(classes), np.arange(classes)] = separation
    x = centres[labels] + rng.normal(size=(n, width))
    return torch.from_numpy(x.astype(np.float32)), labels.astype(np.int64)


def _params(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "backbone": "mobilenetv2_100", "freeze_depth": 8, "learning_rate": 2e-3, "backbone_lr_ratio": 0.1,
        "augmentation": "none", "optimizer": "lbfgs", "weight_decay": 1e-4, "label_smoothing": 0.0,
        "batch_size": 32, "max_epochs": 4, "head": "linear", "head_dropout": 0.0, "seed": 0,
    }  # fmt: skip
    return {**base, **changes}


# --- folds -------------------------------------------------------------------------------------------------


def test_stratified_folds_spread_every_class_evenly() -> None:
    labels = np.array([0] * 23 + [1] * 11 + [2] * 6)
    folds = stratified_folds(labels, 5, seed=3)
    assert set(folds.tolist()) == set(range(5))
    for cls in range(3):
        per_fold = np.bincount(folds[labels == cls], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1  # the remainders of the classes fall into different folds
    assert np.array_equal(folds, stratified_folds(labels, 5, seed=3))
    assert not np.array_equal(folds, stratified_folds(labels, 5, seed=4))
    with pytest.raises(ValueError, match="k >= 2"):
        stratified_folds(labels, 1)


def test_out_of_fold_predicts_each_row_once_from_a_model_that_never_saw_it() -> None:
    folds = stratified_folds(np.arange(20) % 2, 4)
    seen: list[tuple[set[int], set[int]]] = []

    def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        seen.append((set(train.tolist()), set(test.tolist())))
        out = np.zeros((test.size, 2))
        out[:, 0] = test  # the row's own index: shows which call predicted it
        return out

    oof = out_of_fold(fit_predict, folds)
    assert np.array_equal(oof[:, 0], np.arange(20))
    assert all(not (train & test) and len(train | test) == 20 for train, test in seen)
    assert len(seen) == 4
    probs = np.eye(2)[np.arange(20) % 2]
    probs[0] = probs[0][::-1]  # one miss, in row 0's fold
    accuracies = fold_accuracies(np.arange(20) % 2, probs, folds)
    assert sorted(accuracies) == [0.8, 1.0, 1.0, 1.0]


def test_cross_validation_switches_on_below_the_threshold() -> None:
    assert use_cross_validation(36, 500)
    assert not use_cross_validation(600, 500)
    assert not use_cross_validation(36, 0)  # 0 turns it off
    assert not use_cross_validation(0, 500)  # no validation split: nothing to replace


# --- the probe ---------------------------------------------------------------------------------------------


def test_probe_head_converges_to_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(120, 3, 2.0, seed=0, width=16)
    l2 = 0.05
    head = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    fit_head(head, x, torch.from_numpy(y), l2)
    # sklearn minimises C * sum(CE) + ||W||^2 / 2, the same optimum as mean(CE) + l2 / 2 ||W||^2 at C = 1/(l2 n)
    reference = LogisticRegression(C=1.0 / (l2 * len(y)), max_iter=1000, tol=1e-8).fit(x.numpy(), y)
    ours = head_probs(head, x)
    assert np.abs(ours - reference.predict_proba(x.numpy())).max() < 1e-3


def test_probe_chooses_a_stronger_penalty_for_noisier_data() -> None:
    chosen = []
    for separation in (6.0, 0.6):  # clean clusters, then heavily overlapping ones
        x, y = _blobs(300, 2, separation, seed=1, width=64)
        head = torch.nn.Linear(64, 2)
        fit = fit_probe(head, x[:200], torch.from_numpy(y[:200]), x[200:], y[200:])
        assert fit.l2 in L2_GRID and len(fit.path) == len(L2_GRID)
        assert fit.l2 == min(fit.path, key=lambda step: step[1])[0]  # the lowest validation log loss
        assert np.allclose(fit.val_probs, head_probs(head, x[200:]))  # the head is left at the chosen strength
        chosen.append(fit.l2)
    assert chosen[1] > chosen[0]


def test_a_frozen_lbfgs_trial_is_a_refittable_head_and_a_fine_tuning_one_is_not() -> None:
    probe = head_trial("p", {**_params(), "best_epoch": 1, "probe_l2": 0.01})
    assert probe is not None and probe.probe_l2 == 0.01 and probe.best_epoch == 1
    assert head_trial("f", {**_params(freeze_depth=3), "best_epoch": 2}) is None  # trains the backbone
    assert head_trial("a", {**_params(augmentation="light"), "best_epoch": 2}) is None  # sees augmented images


# --- k-fold selection --------------------------------------------------------------------------------------


def test_folds_rank_the_converged_probe_above_an_untrained_head_and_select_on_all_rows() -> None:
    x, y = _blobs(90, 3, 8.0, seed=2)
    trials = [
        HeadTrial("probe", _params(), best_epoch=1, probe_l2=1e-3),
        # one epoch at a vanishing rate: about as good as its random initialisation
        HeadTrial("untrained", _params(optimizer="adamw", learning_rate=1e-9), best_epoch=1, probe_l2=None),
    ]
    folds = stratified_folds(y, 5)
    scores = cross_validate_heads(trials, lambda trial: x, y, folds, num_classes=3)
    assert scores["probe"].mean > 0.9 > scores["untrained"].mean
    assert len(scores["probe"].fold_accuracy) == 5 and scores["probe"].std >= 0.0
    assert scores["probe"].oof_probs.shape == (90, 3)
    assert scores["probe"].to_dict()["fold_accuracy"] == list(scores["probe"].fold_accuracy)
    chosen = select_ensemble({t: s.oof_probs for t, s in scores.items()}, y, "greedy", 3, "log_loss")
    assert chosen.members[0] == "probe" and chosen.weights[0] > 0.5


def test_test_time_flip_is_chosen_only_where_it_helps_on_the_folds() -> None:
    """A second view with fresh noise averages it away (chosen); one from other rows misleads (refused)."""
    from automl_tl.evaluate.crossval import choose_tta

    x, y = _blobs(120, 3, 3.0, seed=4)
    rng = np.random.default_rng(5)
    centres = np.zeros((3, WIDTH))
    centres[np.arange(3), np.arange(3)] = 3.0
    second_view = torch.from_numpy((centres[y] + rng.normal(size=(120, WIDTH))).astype(np.float32))
    trials = [HeadTrial("probe", _params(), best_epoch=1, probe_l2=1e-2)]
    folds = stratified_folds(y, 4)
    helped = cross_validate_heads(trials, lambda t: x, y, folds, 3, flipped=lambda t: second_view)["probe"]
    assert helped.tta_probs is not None and helped.tta_probs.shape == helped.oof_probs.shape
    assert choose_tta(y, helped) == ("hflip",)
    assert helped.to_dict()["tta_log_loss"] < helped.to_dict()["log_loss"]  # the report shows both
    misled = cross_validate_heads(trials, lambda t: x, y, folds, 3, flipped=lambda t: x[rng.permutation(120)])["probe"]
    assert choose_tta(y, misled) == ()
    plain = cross_validate_heads(trials, lambda t: x, y, folds, 3)["probe"]
    assert plain.tta_probs is None and choose_tta(y, plain) == () and "tta_log_loss" not in plain.to_dict()
    np.testing.assert_allclose(plain.oof_probs, helped.oof_probs)  # the plain answer does not change


def test_refit_on_all_rows_is_keyed_as_the_trials_network() -> None:
    from automl_tl.backbones import create_backbone

    x, y = _blobs(60, 2, 8.0, seed=4)
    state = refit_state(HeadTrial("probe", _params(), 1, 1e-3), x, y, num_classes=2)
    net = create_backbone("mobilenetv2_100", num_classes=2, pretrained=False)
    assert set(state) < set(net.state_dict()) and len(state) == 2  # the linear head's weight and bias
    net.load_state_dict({**net.state_dict(), **state})
    logits = net.net.get_classifier()(x)  # type: ignore[operator]
    assert float((logits.argmax(1).numpy() == y).mean()) > 0.95


# --- the budget bounds the trial count ---------------------------------------------------------------------


def test_a_time_budget_bounds_trials_and_an_explicit_count_caps_them() -> None:
    assert load_config(None).search.num_samples is None
    assert load_config(None).search.max_trials() is None  # the default 600 s budget ends the sweep
    assert load_config({"search": {"num_samples": 7}}).search.max_trials() == 7
    assert load_config({"search": {"time_budget_s": None}}).search.max_trials() == DEFAULT_TRIALS


# --- the probe as a trial ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hymenoptera_data(hymenoptera_dir: Path, data_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrialData:
    """hymenoptera's train folder split as a search splits it, prepared once for the trials below."""
    from automl_tl.runs.rundir import RunDir
    from automl_tl.sweep.driver import prepare_data

    config = load_config({"data": {"source": str(hymenoptera_dir / "train"), "cache_dir": str(data_cache_dir)}})
    run = RunDir(tmp_path_factory.mktemp("probe-run"))
    run.prepare()
    return prepare_data(config, run, None, progress=False)


@pytest.mark.slow
def test_the_probe_trial_converges_in_one_step_and_records_its_penalty(hymenoptera_data: TrialData, tmp_path: Path) -> None:
    from automl_tl.train.loop import TrialConfig, train_trial

    data = hymenoptera_data
    reports: list[dict[str, object]] = []
    cfg = TrialConfig.from_params({**_params(label_smoothing=0.1), "image_size": 64})
    last = train_trial(cfg, data, lambda metrics, ckpt: reports.append(metrics), tmp_path / "probe")
    assert last is not None and len(reports) == 1  # one fit to convergence, not max_epochs epochs
    assert reports[0]["stop_reason"] == "converged" and float(reports[0]["val_accuracy"]) > 0.7  # type: ignore[arg-type]
    info = json.loads((tmp_path / "probe" / "trial.json").read_text(encoding="utf-8"))
    assert info["optimizer"] == "lbfgs" and info["probe_l2"] in L2_GRID
    trial = head_trial("probe", info)
    assert trial is not None and trial.probe_l2 == info["probe_l2"]


@pytest.mark.slow
def test_an_lp_ft_trial_fine_tunes_the_model_its_probe_was_fitted_on(hymenoptera_data: TrialData, tmp_path: Path) -> None:
    from automl_tl.train.loop import TrialConfig, train_trial

    data = hymenoptera_data
    reports: list[dict[str, object]] = []
    # freeze depth 3 trains most of the network: the probe's feature pass and the fine-tuning share one model
    cfg = TrialConfig.from_params({**_params(freeze_depth=3, max_epochs=1), "image_size": 64})
    last = train_trial(cfg, data, lambda metrics, ckpt: reports.append(metrics), tmp_path / "lpft")
    assert last is not None and len(reports) == 1 and reports[0]["epoch"] == 1
    assert float(reports[0]["val_accuracy"]) > 0.6  # type: ignore[arg-type]
