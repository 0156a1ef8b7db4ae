"""One ranking rule (automl_tl.evaluate.ranking) and one list of hyperparameter names (train.loop).

    .venv/bin/python -m pytest -q tests/test_ranking.py
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from automl_tl.config import SearchSpaceConfig, config_to_dict, load_config
from automl_tl.evaluate.ensemble import select_top_k
from automl_tl.evaluate.ranking import beats, metric_mode, rank_key, rank_rows
from automl_tl.train.loop import HYPERPARAMETERS, TrialConfig

# Accuracy and log loss disagree: "sharp" is more accurate, "calibrated" has the lower log loss.
SHARP = {"accuracy": 0.90, "f1": {"macro": 0.70}, "log_loss": 0.60}
CALIBRATED = {"accuracy": 0.85, "f1": {"macro": 0.80}, "log_loss": 0.30}


def _field_names(cls: Any) -> list[str]:
    """A config type's field names, whether it is a dataclass or a pydantic model."""
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return list(cls.model_fields)


def test_the_verdict_follows_the_search_metric_not_accuracy() -> None:
    assert beats(SHARP, CALIBRATED, "val_accuracy") and not beats(CALIBRATED, SHARP, "val_accuracy")
    assert beats(CALIBRATED, SHARP, "val_log_loss") and not beats(SHARP, CALIBRATED, "val_log_loss")
    assert beats(CALIBRATED, SHARP, "val_macro_f1") and not beats(SHARP, CALIBRATED, "val_macro_f1")
    assert not beats(SHARP, SHARP, "val_accuracy")  # strictly above: a tie on both does not beat


def test_the_leaderboard_ranks_on_the_search_metric() -> None:
    rows = [
        {"trial_id": "sharp", "best_val_accuracy": 0.90, "best_val_macro_f1": 0.70, "best_val_log_loss": 0.60},
        {"trial_id": "calibrated", "best_val_accuracy": 0.85, "best_val_macro_f1": 0.80, "best_val_log_loss": 0.30},
        {"trial_id": "none", "best_val_accuracy": None, "best_val_macro_f1": None, "best_val_log_loss": None},
    ]
    assert [r["trial_id"] for r in rank_rows(rows, "val_accuracy")] == ["sharp", "calibrated", "none"]
    assert [r["trial_id"] for r in rank_rows(rows, "val_macro_f1")] == ["calibrated", "sharp", "none"]
    assert [r["trial_id"] for r in rank_rows(rows, "val_log_loss")] == ["calibrated", "sharp", "none"]


def test_ties_on_the_metric_go_to_the_lower_log_loss_in_both_directions() -> None:
    assert rank_key(0.9, 0.1, "max") < rank_key(0.9, 0.2, "max") < rank_key(0.8, 0.0, "max")
    assert rank_key(0.2, 0.2, "min") < rank_key(0.3, 0.3, "min") < rank_key(None, None, "min")
    assert rank_key(float("nan"), 0.1, "max") == rank_key(None, None, "max")
    assert [metric_mode(m) for m in ("val_accuracy", "accuracy", "val_log_loss", "log_loss")] == ["max", "max", "min", "min"]


def test_ensemble_candidates_rank_by_the_same_rule() -> None:
    labels = np.array([0, 1, 1, 1])
    # "bold": 3 of 4 right, very sure of all; "shy": 3 of 4 right, barely sure: the same accuracy, lower log loss.
    bold = np.array([[0.99, 0.01], [0.01, 0.99], [0.01, 0.99], [0.99, 0.01]])
    shy = np.array([[0.6, 0.4], [0.4, 0.6], [0.4, 0.6], [0.6, 0.4]])
    assert select_top_k({"bold": bold, "shy": shy}, labels, k=1, metric="accuracy").members == ("shy",)


def test_hyperparameters_are_trial_config_fields_drawn_from_space_fields() -> None:
    assert set(HYPERPARAMETERS) <= set(_field_names(TrialConfig))
    assert set(HYPERPARAMETERS.values()) <= set(_field_names(SearchSpaceConfig))


def test_every_stage_reads_the_hyperparameter_names_from_one_place() -> None:
    from automl_tl.report._analysis import param_specs
    from automl_tl.runs.rundir import LEADERBOARD_COLUMNS
    from automl_tl.sweep.space import build_param_space

    config = load_config(None)
    space = build_param_space(config)
    assert set(space) == set(_field_names(TrialConfig)) - {"pretrained"}  # one key per trial setting
    assert list(LEADERBOARD_COLUMNS[2 : 2 + len(HYPERPARAMETERS)]) == list(HYPERPARAMETERS)
    names = [spec.name for spec in param_specs(config_to_dict(config)["space"], [])]
    assert names == list(HYPERPARAMETERS)


def test_the_sweep_progress_names_the_best_trial_by_the_same_rule() -> None:
    from types import SimpleNamespace

    from automl_tl.sweep.progress import SweepProgress

    progress = SweepProgress("val_accuracy", "max", 3)
    for trial_id, accuracy, loss in (("a", 0.9, 0.5), ("b", 0.9, 0.2), ("c", 0.9, 0.3), ("d", 0.8, 0.01)):
        trial = SimpleNamespace(trial_id=trial_id, config={})
        progress.on_trial_result(0, [], trial, {"epoch": 1, "val_accuracy": accuracy, "val_log_loss": loss})
    assert progress.best_trial == "b"
