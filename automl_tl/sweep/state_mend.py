"""Mending the Tune experiment state a killed driver left behind, before ``automl-tl resume`` restores it.

Tune keeps one checkpoint per trial (``CheckpointConfig(num_to_keep=1)``). When a trial reports checkpoint
*k+1*, the driver deletes checkpoint *k* at once and writes the experiment state that names *k+1* a moment
later. A driver killed between the two leaves a saved state whose unfinished trial points at a deleted
checkpoint, and Tune's restore then fails that trial: "Could not recover from checkpoint as it does not exist
on storage anymore" (seen in CI: a resumed sweep reported one of four trials as an error).

The newer checkpoint is complete on storage by then (the trial persists it before reporting it), so the mend
points the trial at the newest checkpoint left in its folder, with that checkpoint's own epoch as Tune's
iteration count. A trial with no checkpoint left restarts from its first epoch.

The state is Tune's own format, read and written back through Tune's own classes (``ray`` is pinned).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from automl_tl.errors import SearchError
from automl_tl.runs.storage import filesystem, write_atomic_fs

__all__ = ["mend_stale_checkpoints"]

_STATE_FILE = re.compile(r"experiment_state-.*\.json$")
_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)$")


def mend_stale_checkpoints(tune_location: str) -> list[str]:
    """Point every unfinished trial whose saved checkpoint is gone at the newest checkpoint it left.

    ``tune_location`` is the experiment folder (``RUN_DIR/tune``, a path or a URI). Returns one line per
    mended trial, saying what it now resumes from.
    """
    fs, root = filesystem(tune_location)
    try:
        names = [i.path for i in fs.get_file_info(pafs.FileSelector(root)) if _STATE_FILE.search(i.base_name)]
        notes: list[str] = []
        for path in names:
            with fs.open_input_stream(path) as src:
                state = json.loads(src.read().decode("utf-8"))
            mended = [note for entry in state["trial_data"] if (note := _mend_trial(entry))]
            if mended:
                write_atomic_fs(fs, path, json.dumps(state).encode("utf-8"))  # a kill mid-write loses nothing
                notes += mended
        return notes
    except (OSError, pa.ArrowException) as exc:
        raise SearchError(f"cannot read the experiment state in {tune_location}: {exc}") from None


def _mend_trial(entry: list[str]) -> str | None:
    """Mend one ``[trial state, run metadata]`` pair in place; a note when it changed."""
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    trial = json.loads(entry[0])
    if trial.get("status") == "TERMINATED":
        return None
    meta = _TrainingRunMetadata.from_json_state(entry[1])
    manager = meta.checkpoint_manager
    if manager is None or manager.latest_checkpoint_result is None:
        return None
    latest = manager.latest_checkpoint_result
    gone = latest.checkpoint
    fs: pafs.FileSystem | None = gone.filesystem if gone is not None else None
    if gone is None or fs is None or fs.get_file_info(gone.path).type != pafs.FileType.NotFound:
        return None
    fresh = _CheckpointManager(manager.checkpoint_config)
    newest = _newest_checkpoint(fs, gone.path.rsplit("/", 1)[0])
    trial_id = trial.get("trial_id", "?")
    if newest is None:
        note = f"trial {trial_id}: its checkpoint {gone.path} is gone and none is left; it restarts"
    else:
        path, saved = newest
        last = dict(saved["state"].get("last_metrics") or {})
        epoch = int(saved["state"]["epoch"])
        metrics = {**latest.metrics, **last, "training_iteration": epoch}
        fresh.register_checkpoint(_TrainingResult(Checkpoint(path, filesystem=fs), metrics))
        note = f"trial {trial_id}: its checkpoint {gone.path} is gone; it resumes from {path} (epoch {epoch})"
    meta.checkpoint_manager = fresh
    entry[1] = meta.get_json_state()
    return note


def _newest_checkpoint(fs: pafs.FileSystem, trial_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The highest-numbered ``checkpoint_*`` folder holding our ``state.json``, with that file's contents."""
    found = []
    for info in fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True)):
        match = _CHECKPOINT_DIR.search(info.base_name)
        if match and info.type == pafs.FileType.Directory:
            found.append((int(match.group(1)), info.path))
    for _, path in sorted(found, reverse=True):
        try:
            with fs.open_input_stream(f"{path}/state.json") as src:
                saved = json.loads(src.read().decode("utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            continue  # not one of ours, or cut short: an older one may do
        if isinstance(saved, dict) and isinstance(saved.get("state"), dict) and "epoch" in saved["state"]:
            return path, saved
    return None
