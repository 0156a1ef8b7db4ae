"""Sweep progress for people and for machines: one line per event (trial epoch, end, error).

Each line says what happened and where the sweep stands: trials running, finished, stopped early and
errored, the best score so far and the elapsed time, plus an estimate of the time left from the trial count.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from automl_tl.evaluate.ranking import metric_mode, rank_key

__all__ = ["SweepProgress", "read_stop_reasons"]


def read_stop_reasons(path: Path) -> dict[str, str]:
    """Stop reasons the sweep recorded for trials it stopped (later lines win)."""
    if not path.is_file():
        return {}
    reasons = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            reasons[str(entry["trial_id"])] = str(entry["stop_reason"])
    return reasons


class SweepProgress(Callback):
    """A Tune callback that reports progress through a ``log`` function (text, JSON lines or nothing)."""

    def __init__(
        self,
        log: Callable[[str], None],
        metric: str,
        mode: str,
        num_samples: int,
        scheduler: str = "asha",
        time_budget_s: float | None = None,
        reasons_file: Path | None = None,
    ) -> None:
        self.log, self.metric, self.mode, self.num_samples = log, metric, mode, num_samples
        self.scheduler, self.time_budget_s, self.reasons_file = scheduler, time_budget_s, reasons_file
        self.started = time.time()
        self.best: float | None = None
        self.best_log_loss: float | None = None
        self.best_trial = ""
        self.finished = self.stopped = self.errored = 0
        self.running: set[str] = set()

    def _better(self, value: float, log_loss: float | None) -> bool:
        mode = metric_mode(self.metric)
        return rank_key(value, log_loss, mode) < rank_key(self.best, self.best_log_loss, mode)

    def _status(self) -> str:
        elapsed = time.time() - self.started
        ended = self.finished + self.stopped + self.errored
        left: float | None = None
        capped = self.num_samples > 0  # Tune's -1: no trial cap, the time budget ends the sweep
        if capped and 0 < ended < self.num_samples:
            left = elapsed / ended * (self.num_samples - ended)
        if self.time_budget_s is not None and (not capped or ended < self.num_samples):  # the budget may end it first
            left = min(left if left is not None else math.inf, max(self.time_budget_s - elapsed, 0.0))
        eta = f", ~{_clock(left)} left" if left is not None else ""
        best = f"{self.best:.4f} ({self.best_trial})" if self.best is not None else "-"
        return (
            f"running {len(self.running)}, finished {self.finished}, stopped {self.stopped}, errored {self.errored}"
            f"{f' of {self.num_samples}' if capped else ''} | best {self.metric} {best} | {_clock(elapsed)}{eta}"
        )

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self.log(f"[search] trial {trial.trial_id} started: {_short(trial.config)}")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        value = result.get(self.metric)
        loss = result.get("val_log_loss")
        loss = float(loss) if isinstance(loss, (int, float)) else None
        if isinstance(value, (int, float)) and self._better(float(value), loss):
            self.best, self.best_log_loss, self.best_trial = float(value), loss, trial.trial_id
        self.log(f"[search] trial {trial.trial_id} epoch {result.get('epoch')}: {self.metric}={_fmt(value)} | {self._status()}")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        last = trial.last_result or {}
        if last.get("stop_reason"):
            self.finished += 1
            how = f"finished ({last['stop_reason']})"
        else:
            self.stopped += 1
            budget_over = self.time_budget_s is not None and time.time() - self.started >= self.time_budget_s - 1.0
            reason = "time_budget" if budget_over else f"early_stopped ({self.scheduler})"
            self._remember(trial.trial_id, reason)
            how = "stopped: the sweep's time budget ran out" if budget_over else "stopped early by the scheduler"
        self.log(f"[search] trial {trial.trial_id} {how} | {self._status()}")

    def _remember(self, trial_id: str, reason: str) -> None:
        """Why the sweep stopped a trial, kept on disk so a resumed sweep still knows."""
        if self.reasons_file is None:
            return
        with open(self.reasons_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"trial_id": trial_id, "stop_reason": reason}) + "\n")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.errored += 1
        self.log(f"[search] trial {trial.trial_id} failed (see leaderboard.csv) | {self._status()}")


def _short(config: dict[str, Any]) -> str:
    keys = ("backbone", "freeze_depth", "learning_rate", "augmentation", "optimizer", "batch_size", "head")
    return ", ".join(f"{k}={_fmt(config.get(k))}" for k in keys)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"
