"""The run directory: where a sweep leaves everything later steps (ensemble, report, serving) build from."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from automl_tl.config import DataConfig, ExperimentConfig, config_to_dict, load_config
from automl_tl.train.loop import HYPERPARAMETERS

__all__ = ["RunDir", "SplitSettings", "split_settings", "write_leaderboard", "write_summary", "versions"]

LEADERBOARD_COLUMNS = (
    "rank", "trial_id", *HYPERPARAMETERS,
    "best_val_accuracy", "best_val_macro_f1", "best_val_log_loss", "best_epoch", "epochs_run", "stop_reason",
    "wall_s", "feature_cache", "workers", "peak_rss_mb", "accumulation_steps", "has_model", "transferability",
    "pruned_by_rank",
)  # fmt: skip


class RunDir:
    """Paths and small-file I/O inside one run directory.

    ``remote`` is set when the run directory lives on shared storage (``s3://...``): ``path`` is then the
    driver's local mirror, and :meth:`push` / :meth:`pull` move files between the two (see
    :mod:`automl_tl.runs.storage`). Both are no-ops for a local run directory.
    """

    def __init__(self, path: Path, remote: str | None = None) -> None:
        self.path = path
        self.remote = remote.rstrip("/") if remote else None

    @classmethod
    def open(cls, location: str | os.PathLike[str]) -> RunDir:
        """A local run directory, or the local mirror of one on shared storage."""
        from automl_tl.runs.storage import is_uri, local_mirror

        text = os.fspath(location)
        if is_uri(text):
            return cls(local_mirror(text), remote=text)
        return cls(Path(text))

    @property
    def location(self) -> str:
        """Where the run directory really is: its URI, or its absolute local path."""
        return self.remote or str(self.path.resolve())

    def push(self, *names: str) -> None:
        """Upload these files or folders of the local mirror to the remote run directory."""
        if self.remote is None:
            return
        from automl_tl.runs.storage import join, upload

        for name in names:
            if (self.path / name).exists():
                upload(self.path / name, join(self.remote, name))

    def pull(self, *names: str) -> None:
        """Download these files or folders of the remote run directory into the local mirror."""
        if self.remote is None:
            return
        from automl_tl.runs.storage import download, join

        for name in names:
            download(join(self.remote, name), self.path / name)

    def remote_exists(self, name: str) -> bool:
        """Whether ``name`` exists in the run directory (remote or local)."""
        if self.remote is None:
            return self.exists(name)
        from automl_tl.runs.storage import exists, join

        return exists(join(self.remote, name))

    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "trials").mkdir(exist_ok=True)

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def write_text(self, name: str, text: str) -> Path:
        from automl_tl.runs.storage import write_atomic

        target = self.path / name
        write_atomic(target, text)
        return target

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, default=str))

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def trial_dir(self, trial_id: str) -> Path:
        return self.path / "trials" / trial_id


def versions() -> dict[str, str]:
    import optuna
    import ray
    import timm
    import torch

    from automl_tl import __version__

    return {
        "automl_tl": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
    }


def write_leaderboard(run: RunDir, rows: list[dict[str, Any]]) -> Path:
    target = run.path / "leaderboard.csv"
    with open(target, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(LEADERBOARD_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return target


def write_summary(run: RunDir, config: ExperimentConfig, rows: list[dict[str, Any]], best: dict[str, Any], wall_s: float) -> Path:
    data = run.read_json("data.json")
    summary = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metric": config.search.metric,
        "best": {
            "trial_id": best["trial_id"],
            "config": {k: best.get(k) for k in HYPERPARAMETERS},
            "val": {k: best.get(f"best_val_{k}") for k in ("accuracy", "macro_f1", "log_loss")},
        },
        "trials": rows,
        "wall_s": round(wall_s, 2),
        "data": {
            "source": data["source"],
            "test_source": data.get("test_source"),
            "data_id": data["data_id"],
            "class_names": data["class_names"],
            "n_train": len(data["train"]),
            "n_val": len(data["val"]),
            "n_test": len(data["test"]),
        },
        "config": config_to_dict(config),
        "versions": versions(),
    }
    return run.write_json("summary.json", summary)


@dataclasses.dataclass(frozen=True)
class SplitSettings:
    """How to find one split of a data set as a run drew it: the data settings that draw it, and the run's
    own ``data.json`` (its exact rows) when there is one."""

    data: DataConfig
    origin: str  # where the settings came from, for the user
    recorded: dict[str, Any] | None  # the run's data.json

    def rows(self, split: str, data_id: str, drawn: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], str]:
        """The rows of ``split``: the run's own when the loaded data (``data_id``) is the run's, else ``drawn``
        (the split the settings draw on this data), with a line saying which."""
        if self.recorded is not None and self.recorded.get("data_id") == data_id:
            return np.asarray(self.recorded[split], dtype=np.int64), "the run's own (its data.json)"
        if self.recorded is not None:
            return drawn, f"drawn with {self.origin}; this data is not the data the run split"
        return drawn, f"drawn with {self.origin}"


def split_settings(artifact: str | os.PathLike[str], source: str, config_path: str | None = None) -> SplitSettings:
    """The data settings that draw ``source``'s train/val/test split for scoring ``artifact``.

    ``config_path``'s ``data`` section when given; else those of the run directory the artifact was built in
    (``RUN_DIR/config.yaml`` above ``RUN_DIR/artifact``), whose ``data.json`` also names the run's exact rows;
    else the defaults. Scoring ``test`` with settings other than the run's would mix training images into it.
    """
    from automl_tl.runs.locate import run_dir_of

    run = run_dir_of(artifact)
    # The run's rows only go with the run's settings: other settings (config_path) draw their own.
    recorded = RunDir(run).read_json("data.json") if run is not None and config_path is None else None
    if config_path is not None:
        data, origin = load_config(config_path).data, f"the data settings of {config_path}"
    elif run is not None:
        data, origin = load_config(run / "config.yaml").data, f"the run's data settings ({run / 'config.yaml'})"
    else:
        data, origin = DataConfig(), "the default data settings (the artifact is not inside a run directory)"
    test_source = recorded.get("test_source") if recorded is not None and recorded.get("source") == source else None
    # The run's cache folder may be another machine's: use this machine's. A cache file is named by its content,
    # so the run's data keeps its data_id in any folder.
    data = data.model_copy(update={"source": source, "test_source": test_source, "cache_dir": None})
    return SplitSettings(data, origin, recorded)
