"""Progress as log records: what the library emits, and how the command line writes it (text, JSON, quiet)."""

from __future__ import annotations

import io
import json
import pickle
import logging
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from automl_tl._logs import JsonFormatter, log_to
from automl_tl.cli import main
from automl_tl.data._cache import CACHE_ENV
from tests.test_data import make_class_folders

logger = logging.getLogger("automl_tl.test")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("logs") / "data", {"cats": 4, "dogs": 4})


def test_text_lines_carry_the_stage_and_quiet_keeps_warnings_only() -> None:
    package = logging.getLogger("automl_tl")
    before = (list(package.handlers), package.level, package.propagate)
    out = io.StringIO()
    with log_to(out):
        logger.info("done in 3s", extra={"stage": "search", "trial_id": "a"})
        logger.info("no stage here")
    with log_to(out, quiet=True):
        logger.info("hidden", extra={"stage": "search"})
        logger.warning("not written", extra={"stage": "report"})
    assert out.getvalue().splitlines() == ["[search] done in 3s", "no stage here", "[report] not written"]
    assert (list(package.handlers), package.level, package.propagate) == before  # as it was after each block


def test_json_writes_one_object_per_record_with_its_fields() -> None:
    out = io.StringIO()
    with log_to(out, "json"):
        logger.info("trial a epoch 2", extra={"stage": "search", "trial_id": "a", "epoch": 2, "value": float("nan"),
                                              "config": {"backbone": "mobilenetv2_100"}, "_private": 1})  # fmt: skip
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed", extra={"stage": "report"})
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["stage"] == "search" and first["message"] == "trial a epoch 2" and first["level"] == "INFO"
    assert first["logger"] == "automl_tl.test" and datetime.fromisoformat(first["time"]).tzinfo is not None
    assert (first["trial_id"], first["epoch"], first["value"]) == ("a", 2, None)  # NaN is not JSON: null
    assert first["config"] == {"backbone": "mobilenetv2_100"}
    assert not {"msg", "args", "lineno", "pathname", "thread", "_private"} & set(first)  # the event's, not logging's
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


def test_cli_inspect_log_format_json_writes_json_records_beside_the_report(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert main(["inspect", str(folder), "--log-format", "json"]) == 0
    captured = capsys.readouterr()
    assert "cats" in captured.out and "{" not in captured.out  # the report on stdout, records on stderr
    records = [json.loads(line) for line in captured.err.splitlines()]
    assert [r["stage"] for r in records] == ["data", "data"] and "\r" not in captured.err  # no bar in JSON mode
    assert records[0]["message"].startswith("validating images") and records[0]["files"] == 8
    assert "8/8 done in" in records[1]["message"] and records[1]["logger"] == "automl_tl.data._ingest"
    assert main(["inspect", str(folder), "--log-format", "json", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_sweep_events_carry_the_trial_and_the_sweep_state_as_fields(caplog: pytest.LogCaptureFixture) -> None:
    from automl_tl.sweep.progress import SweepProgress

    caplog.set_level(logging.INFO, logger="automl_tl")
    progress = SweepProgress("val_accuracy", "max", 2, time_budget_s=600.0)
    trial = SimpleNamespace(trial_id="t1", config={"backbone": "mobilenetv2_100", "learning_rate": 0.01},
                            last_result={"stop_reason": "max_epochs"})  # fmt: skip
    progress.on_trial_start(0, [], trial)
    progress.on_trial_result(0, [], trial, {"epoch": 1, "val_accuracy": 0.75, "val_log_loss": 0.5})
    progress.on_trial_complete(0, [], trial)
    start, result, end = caplog.records
    assert [r.event for r in (start, result, end)] == ["trial_start", "trial_result", "trial_end"]
    assert all(r.stage == "search" and r.trial_id == "t1" for r in caplog.records)
    assert start.config["backbone"] == "mobilenetv2_100"
    assert (result.epoch, result.value, result.best, result.best_trial) == (1, 0.75, 0.75, "t1")
    assert result.running == 1 and end.running == 0 and end.finished == 1
    assert end.stop_reason == "max_epochs" and end.elapsed_s >= 0 and end.left_s is not None
    assert result.getMessage().startswith("trial t1 epoch 1: val_accuracy=0.75 | running 1, finished 0")
    assert json.loads(JsonFormatter().format(end))["best"] == 0.75


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_sweep_bar_counts_ended_trials_with_the_best_score_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from automl_tl.sweep.progress import SweepProgress

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = SweepProgress("val_accuracy", "max", 3, time_budget_s=600.0, progress=True)
    quiet = SweepProgress("val_accuracy", "max", 3, progress=False)
    for callback in (progress, quiet):
        callback.setup(num_samples=3)
        for trial_id, accuracy in (("a", 0.8), ("b", 0.9)):
            trial = SimpleNamespace(trial_id=trial_id, config={}, last_result={"stop_reason": "max_epochs"})
            callback.on_trial_start(0, [], trial)
            callback.on_trial_result(0, [], trial, {"epoch": 1, "val_accuracy": accuracy})
            callback.on_trial_complete(0, [], trial)
        callback.on_step_end(0, [])
        callback.on_experiment_end([])
    shown = terminal.getvalue()
    assert "search:" in shown and "2/3" in shown and "best=0.9000" in shown and "budget=0%" in shown
    assert shown.count("\n") == 0  # one line, rewritten in place; closed without leaving it
    last = [part for part in shown.split("\r") if part.strip()][-1]  # the bar as drawn last, before it was cleared
    assert "2/3" in last and "best=0.9000" in last
    assert quiet._bar is None  # progress=False: no bar, only the records
    assert pickle.loads(pickle.dumps(progress)).finished == 2  # Tune pickles its callbacks to restore a sweep


_CALLER = r"""
import json, logging, sys
import automl_tl
from automl_tl.data import load_dataset

load_dataset(sys.argv[1], progress=True)  # logs its start and end; a bar only if stderr were a terminal
root = logging.getLogger()
print(json.dumps([len(root.handlers), root.level, [type(h).__name__ for h in logging.getLogger("automl_tl").handlers]]))
"""


def test_the_library_adds_no_handler_and_prints_nothing_by_itself(folder: Path, tmp_path: Path) -> None:
    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", _CALLER, str(folder)], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [0, logging.WARNING, ["NullHandler"]]  # root untouched; ours: a NullHandler
    assert done.stderr == ""  # the records went nowhere the caller did not send them
