"""The Python API (automl_tl.api): typed results, and one pipeline that the API, the CLI and the demo run.

The API's sweeps run in tests/test_storage.py (into S3) and tests/test_examples.py; here, without Ray, the
shape of the code and of the results.

    .venv/bin/python -m pytest -q tests/test_api.py
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import automl_tl
from automl_tl.api import SearchResult, _result
from automl_tl.evaluate.outcome import BestTrial, LeaderboardRow, Metrics
from automl_tl.train.loop import HYPERPARAMETERS

PACKAGE = Path(automl_tl.__file__).resolve().parent
PIPELINE_STEPS = {"run_search", "resume_search", "build_results"}


def _callers() -> dict[str, set[str]]:
    """Called name -> the package's functions (``module.function``) whose body calls it."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for call in ast.walk(node):
                if isinstance(call, ast.Call):
                    func = call.func
                    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
                    if name:
                        found.setdefault(name, set()).add(f"{module}.{node.name}")
    return found


def test_one_pipeline_function_runs_search_results_and_report() -> None:
    callers = _callers()
    for step in PIPELINE_STEPS:  # sweep, resume and results run in one place only
        assert callers.get(step) == {"automl_tl.api.run_pipeline"}, (step, callers.get(step))
    # ...which the API, `automl-tl search`, `automl-tl resume` and the demo all call
    assert callers["run_pipeline"] == {
        "automl_tl.api.search", "automl_tl.api.resume", "automl_tl.cli._cmd_search", "automl_tl.cli._cmd_resume",
        "automl_tl.demo.run_demo",
    }  # fmt: skip
    # and the report is written by the pipeline, or on its own by `automl-tl report`
    assert callers["write_report"] == {"automl_tl.api._write_report", "automl_tl.cli._cmd_report"}


def _metrics(accuracy: float) -> dict[str, object]:
    return {"n": 4, "class_names": ["ants", "bees"], "accuracy": accuracy, "balanced_accuracy": accuracy,
            "f1": {"macro": accuracy}, "log_loss": 0.3, "ece": 0.1, "confusion_matrix": [[2, 0], [1, 1]]}  # fmt: skip


def test_a_search_result_is_typed_from_what_the_run_records() -> None:
    params = {name: None for name in HYPERPARAMETERS} | {"backbone": "mobilenetv2_100", "freeze_depth": 8}
    rows = [{"rank": 1, "trial_id": "t1", **params, "best_val_accuracy": 0.75, "best_val_macro_f1": 0.7,
             "best_val_log_loss": 0.4, "best_epoch": 2, "epochs_run": 2, "stop_reason": "max_epochs",
             "wall_s": 3.5, "has_model": True, "peak_rss_mb": 900}]  # fmt: skip
    results = {
        "metric": "val_accuracy",
        "best": {"trial_id": "t1", "config": params, "val": {}, "temperature": 1.2, "val_calibrated": _metrics(0.75),
                 "test": None},
        "ensemble": {"method": "greedy", "selection_metric": "log_loss", "members": ["t1"], "weights": [1.0],
                     "temperature": 1.1, "val": _metrics(0.75), "test": _metrics(0.8), "beat_best": True},
        "artifact": "s3://bucket/run/artifact",
    }  # fmt: skip
    result = _result("s3://bucket/run/", rows, results, None, 12.0)
    assert isinstance(result, SearchResult) and result.run_dir == "s3://bucket/run"
    assert result.artifact == "s3://bucket/run/artifact" and result.metric == "val_accuracy"
    (row,) = result.leaderboard
    assert isinstance(row, LeaderboardRow) and row.params["backbone"] == "mobilenetv2_100"
    assert set(row.params) == set(HYPERPARAMETERS) and row.val_accuracy == 0.75 and row.has_model
    assert isinstance(result.best, BestTrial) and result.best.params["freeze_depth"] == 8 and result.best.test is None
    assert result.ensemble.test == Metrics.from_dict(_metrics(0.8)) and result.ensemble.test.macro_f1 == 0.8
    assert result.ensemble.test.confusion_matrix == ((2, 0), (1, 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.best.trial_id = "t2"  # type: ignore[misc]


def test_the_docstring_examples_read_fields_that_exist() -> None:
    """The examples skip the sweep itself (minutes), so what they read from its result is checked here."""
    import doctest

    import automl_tl.api as api

    result = _result("runs/x", [], {
        "metric": "val_accuracy", "artifact": "runs/x/artifact",
        "best": {"trial_id": "t1", "config": {"backbone": "mobilenetv2_100"}, "temperature": 1.0,
                 "val_calibrated": _metrics(0.7), "test": _metrics(0.7)},
        "ensemble": {"method": "greedy", "members": ["t1"], "weights": [1.0], "temperature": 1.0,
                     "val": _metrics(0.7), "test": _metrics(0.9), "beat_best": True},
    }, None, 1.0)  # fmt: skip
    reads = [ex.source.strip() for doc in (api.__doc__, api.search.__doc__)
             for ex in doctest.DocTestParser().get_examples(doc or "") if ex.source.startswith(("result.", "print(result."))]  # fmt: skip
    assert len(reads) >= 2
    for source in reads:
        if ".predictor()" not in source:  # loads the artifact: the S3 test calls it for real
            eval(source.removeprefix("print"), {"result": result})


def test_the_package_exports_the_api() -> None:
    for name in ("search", "resume", "SearchResult", "LeaderboardRow", "BestTrial", "EnsembleResult", "Metrics"):
        assert name in automl_tl.__all__ and getattr(automl_tl, name) is not None
    assert callable(automl_tl.SearchResult.predictor)
