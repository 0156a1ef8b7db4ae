"""Sweep progress for people and for machines: one log record per event (trial start, epoch, end, error).

Each record says what happened and where the sweep stands: trials running, finished, stopped early and
errored, the best score so far and the elapsed time, plus an estimate of the time left from the trial count.
The same figures travel as the record's fields (``stage``, ``event``, ``trial_id``, ...), so ``--log-format
json`` writes them as data. Tune calls this callback in the driver, so the records are emitted there, whatever
node a trial runs on. On a terminal a tqdm bar counts the trials that ended, the best score in its postfix.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from automl_tl.evaluate.ranking import metric_mode, rank_key

__all__ = ["SweepProgress", "read_stop_reasons"]

logger = logging.getLogger(__name__)

_POSTFIX_EVERY_S = 1.0  # how often the bar's budget figure is refreshed between trial events


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
    """A Tune callback that logs each trial event (``automl_tl.sweep.progress``, stage ``search``) and, with
    ``progress`` on a terminal, draws a bar of the trials that ended."""

    def __init__(
        self,
        metric: str,
        mode: str,
        num_samples: int,
        scheduler: str = "asha",
        time_budget_s: float | None = None,
        reasons_file: Path | None = None,
        progress: bool = False,
    ) -> None:
        self.metric, self.mode, self.num_samples = metric, mode, num_samples
        self.scheduler, self.time_budget_s, self.reasons_file = scheduler, time_budget_s, reasons_file
        self.progress = progress
        self.started = time.time()
        self.best: float | None = None
        self.best_log_loss: float | None = None
        self.best_trial = ""
        self.finished = self.stopped = self.errored = 0
        self.running: set[str] = set()
        self._bar: Any = None
        self._postfix_at = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config, callbacks included, to restore a sweep: a terminal bar cannot travel.
        return {**self.__dict__, "_bar": None}

    def _better(self, value: float, log_loss: float | None) -> bool:
        mode = metric_mode(self.metric)
        return rank_key(value, log_loss, mode) < rank_key(self.best, self.best_log_loss, mode)

    def _state(self) -> dict[str, Any]:
        """Where the sweep stands, as the fields of every record (and the source of the text status)."""
        elapsed = time.time() - self.started
        ended = self.finished + self.stopped + self.errored
        left: float | None = None
        capped = self.num_samples > 0  # Tune's -1: no trial cap, the time budget ends the sweep
        if capped and 0 < ended < self.num_samples:
            left = elapsed / ended * (self.num_samples - ended)
        if self.time_budget_s is not None and (not capped or ended < self.num_samples):  # the budget may end it first
            left = min(left if left is not None else math.inf, max(self.time_budget_s - elapsed, 0.0))
        return {
            "running": len(self.running), "finished": self.finished, "stopped": self.stopped,
            "errored": self.errored, "trial_cap": self.num_samples if capped else None, "metric": self.metric,
            "best": self.best, "best_trial": self.best_trial or None, "elapsed_s": round(elapsed, 1),
            "left_s": round(left, 1) if left is not None else None,
        }  # fmt: skip

    def _status(self) -> str:
        state = self._state()
        eta = f", ~{_clock(state['left_s'])} left" if state["left_s"] is not None else ""
        best = f"{self.best:.4f} ({self.best_trial})" if self.best is not None else "-"
        cap = f" of {state['trial_cap']}" if state["trial_cap"] is not None else ""
        return (
            f"running {state['running']}, finished {self.finished}, stopped {self.stopped}, errored {self.errored}"
            f"{cap} | best {self.metric} {best} | {_clock(state['elapsed_s'])}{eta}"
        )

    def _log(self, text: str, event: str, trial: Any, **fields: Any) -> None:
        """One record: ``text`` for people; the event, the trial and the sweep's state as fields for machines."""
        extra = {"stage": "search", "event": event, "trial_id": trial.trial_id, **fields, **self._state()}
        logger.info(f"trial {trial.trial_id} {text}", extra=extra)

    def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None,
              **info: Any) -> None:
        if self.progress and self._bar is None:
            from tqdm import tqdm

            total = self.num_samples if self.num_samples > 0 else None
            # disable=None: drawn only when stderr is a terminal; leave=False: the sweep's summary line replaces it
            self._bar = tqdm(total=total, desc="search", unit="trial", disable=None, leave=False, dynamic_ncols=True)

    def _draw(self, ended: int = 0) -> None:
        if self._bar is None:
            return
        if ended:
            self._bar.update(ended)
        self._postfix_at = time.monotonic()
        postfix = {"best": f"{self.best:.4f}" if self.best is not None else "-"}
        if self.time_budget_s:
            postfix["budget"] = f"{min(1.0, (time.time() - self.started) / self.time_budget_s):.0%}"
        self._bar.set_postfix(postfix)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self._bar is not None and time.monotonic() - self._postfix_at >= _POSTFIX_EVERY_S:
            self._draw()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        config = {k: trial.config.get(k) for k in _SHOWN}
        self._log(f"started: {_short(config)}", "trial_start", trial, config=config)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        value = result.get(self.metric)
        loss = result.get("val_log_loss")
        loss = float(loss) if isinstance(loss, (int, float)) else None
        if isinstance(value, (int, float)) and self._better(float(value), loss):
            self.best, self.best_log_loss, self.best_trial = float(value), loss, trial.trial_id
        epoch = result.get("epoch")
        self._log(f"epoch {epoch}: {self.metric}={_fmt(value)} | {self._status()}", "trial_result", trial,
                  epoch=epoch, value=value, val_log_loss=loss)  # fmt: skip
        self._draw()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        last = trial.last_result or {}
        if last.get("stop_reason"):
            self.finished += 1
            reason = str(last["stop_reason"])
            how = f"finished ({reason})"
        else:
            self.stopped += 1
            budget_over = self.time_budget_s is not None and time.time() - self.started >= self.time_budget_s - 1.0
            reason = "time_budget" if budget_over else f"early_stopped ({self.scheduler})"
            self._remember(trial.trial_id, reason)
            how = "stopped: the sweep's time budget ran out" if budget_over else "stopped early by the scheduler"
        self._log(f"{how} | {self._status()}", "trial_end", trial, stop_reason=reason)
        self._draw(ended=1)

    def _remember(self, trial_id: str, reason: str) -> None:
        """Why the sweep stopped a trial, kept on disk so a resumed sweep still knows."""
        if self.reasons_file is None:
            return
        with open(self.reasons_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"trial_id": trial_id, "stop_reason": reason}) + "\n")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.errored += 1
        self._log(f"failed (see leaderboard.csv) | {self._status()}", "trial_error", trial)
        self._draw(ended=1)


_SHOWN = ("backbone", "freeze_depth", "learning_rate", "augmentation", "optimizer", "batch_size", "head")


def _short(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(config.get(k))}" for k in _SHOWN)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"
