"""Reading a finished run directory into typed values: summary, leaderboard, per-epoch curves, splits.

Only files are read here (no Ray): ``summary.json`` after :func:`automl_tl.evaluate.results.build_results`,
``data.json``, and each Tune trial's ``result.json`` (JSON lines) or ``progress.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from automl_tl.errors import SearchError

__all__ = ["Curve", "Epoch", "RunInputs", "load_run"]

CURVE_KEYS = ("train_loss", "train_accuracy", "val_accuracy", "val_macro_f1", "val_log_loss")


@dataclasses.dataclass(frozen=True)
class Epoch:
    epoch: int
    values: dict[str, float]  # the CURVE_KEYS this epoch reported, finite only


@dataclasses.dataclass(frozen=True)
class Curve:
    """One trial's epochs in order (a resumed trial's repeated epochs keep their last report)."""

    trial_id: str
    epochs: tuple[Epoch, ...]

    def points(self, key: str) -> list[tuple[int, float]]:
        return [(e.epoch, e.values[key]) for e in self.epochs if key in e.values]


@dataclasses.dataclass(frozen=True)
class RunInputs:
    path: Path
    summary: dict[str, Any]
    trials: list[dict[str, Any]]  # leaderboard rows, best first
    curves: dict[str, Curve]
    data: dict[str, Any]  # data.json: cache path, labels, split rows

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.summary["data"]["class_names"]]

    @property
    def max_epochs(self) -> int:
        configured = int(self.summary.get("config", {}).get("space", {}).get("max_epochs") or 1)
        seen = max((e.epoch for c in self.curves.values() for e in c.epochs), default=1)
        return max(configured, seen)

    @property
    def has_test(self) -> bool:
        return self.summary["ensemble"].get("test") is not None


def load_run(run_dir: str | Path) -> RunInputs:
    """Everything the report shows that lives in files; the run must have been through build_results."""
    path = Path(run_dir)
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise SearchError(
            f"{path} is not a finished run directory of automl_tl (no summary.json); "
            "run `automl-tl search --out RUN_DIR` first"
        )
    summary = _read_json(summary_path)
    if "ensemble" not in summary:
        raise SearchError(
            f"{summary_path} has no ensemble results: the sweep stopped before build_results; "
            f"run `automl-tl resume {path}` to finish it"
        )
    data_path = path / "data.json"
    data = _read_json(data_path) if data_path.is_file() else {}
    trials = sorted(summary.get("trials", []), key=lambda r: int(r.get("rank") or 1_000_000))
    ids = [str(r["trial_id"]) for r in trials]
    return RunInputs(path, summary, trials, _read_curves(path / "tune", ids), data)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SearchError(f"{path}: cannot be read as JSON ({exc})") from None


def _read_curves(tune_dir: Path, trial_ids: list[str]) -> dict[str, Curve]:
    """Each trial's epochs from the Tune trial folder whose name holds its id."""
    if not tune_dir.is_dir():
        return {}
    folders = sorted(p for p in tune_dir.iterdir() if p.is_dir())
    curves = {}
    for tid in trial_ids:
        rows: list[dict[str, Any]] = []
        for folder in folders:
            if f"_{tid}_" in f"_{folder.name}_":
                rows.extend(_result_rows(folder))
        by_epoch: dict[int, Epoch] = {}
        for row in rows:
            if str(row.get("trial_id") or tid) != tid:
                continue
            epoch = _number(row.get("epoch")) or _number(row.get("training_iteration"))
            if epoch is None:
                continue
            values = {k: v for k in CURVE_KEYS if (v := _number(row.get(k))) is not None}
            by_epoch[int(epoch)] = Epoch(int(epoch), values)
        curves[tid] = Curve(tid, tuple(by_epoch[e] for e in sorted(by_epoch)))
    return curves


def _result_rows(folder: Path) -> list[dict[str, Any]]:
    """The trial's reports: ``result.json`` (one JSON object a line), else ``progress.csv``."""
    result = folder / "result.json"
    if result.is_file():
        rows = []
        for line in result.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed driver
            if isinstance(row, dict):
                rows.append(row)
        return rows
    progress = folder / "progress.csv"
    if progress.is_file():
        with open(progress, newline="", encoding="utf-8", errors="replace") as fh:
            return list(csv.DictReader(fh))
    return []


def _number(value: Any) -> float | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
