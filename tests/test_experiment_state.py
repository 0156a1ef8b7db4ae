"""Mending the experiment state of a driver killed between Tune deleting a checkpoint and saving the state."""

from __future__ import annotations

import csv
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from automl_tl.sweep.state_mend import mend_stale_checkpoints
from automl_tl.config import load_config
from automl_tl.runs.storage import filesystem
from tests.scenarios._common import create_bucket, moto_server


@pytest.fixture(params=["local", "s3"])
def tune_location(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An empty experiment folder: a local path, or a prefix in a bucket of a local S3 server (moto)."""
    if request.param == "local":
        yield str(tmp_path)
        return
    with moto_server() as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        name = f"automl-tl-{uuid.uuid4().hex[:10]}"
        create_bucket(env["AWS_ENDPOINT_URL"], name)
        yield f"s3://{name}/run/tune"


def _write(fs: pafs.FileSystem, path: str, text: str) -> None:
    with fs.open_output_stream(path) as out:
        out.write(text.encode("utf-8"))


def _checkpoint(fs: pafs.FileSystem, trial_dir: str, index: int, epoch: int) -> str:
    path = f"{trial_dir}/checkpoint_{index:06d}"
    fs.create_dir(path)
    state = {"epoch": epoch, "last_metrics": {"epoch": epoch, "stop_reason": ""}}
    _write(fs, f"{path}/state.json", json.dumps({"state": state}))
    return path


def _result(path: str, iteration: int, fs: pafs.FileSystem | None = None) -> Any:
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint

    return _TrainingResult(Checkpoint(path, filesystem=fs), {"training_iteration": iteration, "epoch": iteration})


def _latest(tune_location: str) -> Any:
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    fs, root = filesystem(tune_location)
    infos = fs.get_file_info(pafs.FileSelector(root))
    (state_file,) = [i.path for i in infos if i.base_name.startswith("experiment_state-")]
    with fs.open_input_stream(state_file) as src:
        (entry,) = json.loads(src.read().decode("utf-8"))["trial_data"]
    manager = _TrainingRunMetadata.from_json_state(entry[1]).checkpoint_manager
    assert manager is not None
    return manager.latest_checkpoint_result


def _state_killed_between_delete_and_save(tune_location: str, newer: bool) -> str:
    """Tune's own checkpoint manager keeps one checkpoint: registering the second deletes the first on storage.
    The experiment state saved in between names the first, as a driver killed at that moment leaves it."""
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.tune import CheckpointConfig
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    fs, root = filesystem(tune_location)
    trial_dir = f"{root}/run_trial_t1"
    first = _checkpoint(fs, trial_dir, 0, epoch=1)
    meta = _TrainingRunMetadata()
    meta.checkpoint_manager = manager = _CheckpointManager(CheckpointConfig(num_to_keep=1))
    manager.register_checkpoint(_result(first, 1, fs))
    saved = meta.get_json_state()
    if newer:
        manager.register_checkpoint(_result(_checkpoint(fs, trial_dir, 1, epoch=2), 2, fs))
    else:
        fs.delete_dir(first)
    assert fs.get_file_info(f"{first}/state.json").type == pafs.FileType.NotFound
    trial = json.dumps({"trial_id": "t1", "status": "PENDING"})
    state = {"trial_data": [[trial, saved]], "runner_data": {}, "stats": {}}
    _write(fs, f"{root}/experiment_state-2026-11-30_00-00-00.json", json.dumps(state))
    return first


def test_a_trial_whose_checkpoint_was_deleted_resumes_from_the_newer_one(tune_location: str) -> None:
    gone = _state_killed_between_delete_and_save(tune_location, newer=True)
    assert _latest(tune_location).checkpoint.path == gone
    (note,) = mend_stale_checkpoints(tune_location)
    assert "t1" in note and "checkpoint_000001" in note and "epoch 2" in note
    latest = _latest(tune_location)
    assert latest.checkpoint.path == gone.replace("checkpoint_000000", "checkpoint_000001")
    assert latest.metrics["training_iteration"] == 2  # Tune counts on from the checkpoint's own epoch
    assert mend_stale_checkpoints(tune_location) == []  # nothing left to mend


def test_a_newer_checkpoint_without_a_readable_state_is_passed_over(tune_location: str) -> None:
    gone = _state_killed_between_delete_and_save(tune_location, newer=True)
    fs, _ = filesystem(tune_location)
    cut = gone.replace("checkpoint_000000", "checkpoint_000002")  # e.g. copied in part, by hand
    fs.create_dir(cut)
    _write(fs, f"{cut}/state.json", '{"state": {"ep')
    (note,) = mend_stale_checkpoints(tune_location)
    assert "checkpoint_000001" in note
    assert _latest(tune_location).checkpoint.path == gone.replace("checkpoint_000000", "checkpoint_000001")


def test_a_trial_with_no_checkpoint_left_restarts(tune_location: str) -> None:
    _state_killed_between_delete_and_save(tune_location, newer=False)
    (note,) = mend_stale_checkpoints(tune_location)
    assert "restarts" in note
    assert _latest(tune_location) is None


@pytest.mark.slow
def test_resume_after_the_kill_window_finishes_every_trial(
    ray_session: object, hymenoptera_dir: Path, data_cache_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real sweep, its saved state then set back to what a driver killed inside the window leaves: the
    trial unfinished and pointing at its first checkpoint, deleted once the second was reported."""
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.tune import CheckpointConfig
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    from automl_tl.sweep.driver import resume_search, run_search

    config = load_config({
        "data": {"source": str(hymenoptera_dir), "cache_dir": str(data_cache_dir)},
        "space": {"backbones": ["mobilenetv2_100"], "image_sizes": [64], "max_epochs": 2, "batch_sizes": [32],
                  "freeze_depths": [8], "augmentations": ["none"], "optimizers": ["adamw"]},  # epochs: no probe
        "search": {"num_samples": 1, "scheduler": "none"},
    })  # fmt: skip
    run_dir = tmp_path / "run"
    run_search(config, run_dir, progress=False)
    (state_file,) = (run_dir / "tune").glob("experiment_state-*.json")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    (entry,) = state["trial_data"]
    meta = _TrainingRunMetadata.from_json_state(entry[1])
    kept = _latest(str(run_dir / "tune")).checkpoint
    assert kept.path.endswith("checkpoint_000001")
    meta.checkpoint_manager = stale = _CheckpointManager(CheckpointConfig(num_to_keep=1))
    stale.register_checkpoint(_result(str(Path(kept.path).with_name("checkpoint_000000")), 1))
    trial = json.loads(entry[0])
    trial["status"] = "PENDING"
    state["trial_data"] = [[json.dumps(trial), meta.get_json_state()]]
    state_file.write_text(json.dumps(state), encoding="utf-8")
    (run_dir / "leaderboard.csv").unlink()

    caplog.set_level(logging.INFO, logger="automl_tl")
    resume_search(run_dir, progress=False)
    lines = [f"[{r.stage}] {r.getMessage()}" for r in caplog.records if hasattr(r, "stage")]
    with open(run_dir / "leaderboard.csv", newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["stop_reason"].startswith("max_epochs"), row["stop_reason"]  # unmended: "error: ... does not exist"
    assert row["epochs_run"] == "2"
    assert any(line.startswith("[resume] trial") and "checkpoint_000001" in line for line in lines), lines
