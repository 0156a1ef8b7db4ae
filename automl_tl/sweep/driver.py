"""The sweep: Ray Tune over the search space, Optuna proposing, ASHA stopping weak trials early.

``run_search`` validates everything that can be validated before a single trial starts (config, backbone
weights, data), joins the Ray cluster in ``RAY_ADDRESS`` or starts an embedded one sized to the machine,
runs the trials and leaves a run directory::

    RUN_DIR/config.yaml         the validated config
    RUN_DIR/data.json           data cache, class names and the exact train/val/test rows
    RUN_DIR/tune/               the Tune experiment (what ``automl-tl resume`` restores)
    RUN_DIR/trials/<id>/        best epoch per trial: model.safetensors, val_probs.npy, trial.json
    RUN_DIR/leaderboard.csv     one row per trial
    RUN_DIR/summary.json        best trial, every trial, wall time, data and code versions

``RUN_DIR`` may be a URI (``s3://bucket/prefix``): Tune then keeps its experiment and checkpoints there, the
data cache is shared through ``RUN_DIR/data/`` and trials upload their best epoch (``automl_tl.runs.storage``).
On a multi-node cluster a local ``RUN_DIR`` is refused unless every node mounts it (``shared_fs``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from automl_tl._owned import start_embedded_ray
from automl_tl.sweep.state_mend import mend_stale_checkpoints
from automl_tl.sweep.presets import resolve_preset
from automl_tl.sweep.tuner import STOP_REASONS, build_tuner, fit, sweep_end
from automl_tl.train.memory import malloc_env, scoped_env
from automl_tl.backbones import check_backbones as check_backbone_weights
from automl_tl.config import ExperimentConfig, config_to_dict, load_config
from automl_tl.errors import SearchError
from automl_tl.runs.rundir import RunDir, write_leaderboard, write_summary
from automl_tl.evaluate.ranking import rank_rows
from automl_tl.train.loop import HYPERPARAMETERS
from automl_tl.train.trial_data import TrialData

__all__ = [
    "RAY_ENV", "SearchOutcome", "run_search", "resume_search", "check_backbones", "check_search", "check_storage",
    "data_then_ray", "ray_for_search",
]

logger = logging.getLogger(__name__)
_SEARCH = {"stage": "search"}


@dataclasses.dataclass(frozen=True)
class SearchOutcome:
    run_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    wall_s: float


def check_backbones(config: ExperimentConfig) -> None:
    """Every backbone of the space must have its weights before anything trains (hub lookups bounded)."""
    check_backbone_weights(config.space.backbones)


def check_search(config: ExperimentConfig) -> dict[str, Any]:
    """Everything a sweep refuses before it reads data (backbones, the space); returns Tune's param space.

    ``automl-tl config FILE`` runs it too, so that it accepts exactly what ``search`` would start with.
    """
    check_backbones(config)  # before Ray Tune is imported: an unreachable backbone fails in seconds
    from automl_tl.sweep.space import build_param_space

    return build_param_space(config)


# Ray and Tune settings of a sweep, unless the environment names its own: the driver's Tune reads some (its
# progress tables, the checkpoint-sync warning), the processes Ray starts the others (usage stats, Ray Train's
# health check).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_AIR_NEW_OUTPUT": "0",  # our SweepProgress reports; no Tune tables
    # A reused trial actor first waits for the previous trial's thread to end; when that takes longer than
    # Tune's short default (a loaded machine, the heap trimmed at a trial's end), Tune errors the next trial
    # and its concurrency limiter then holds the sweep idle until a ten-minute wait in Tune runs out.
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "120",
    # Tune waits this long for a trial actor it stops to stop by itself before killing it, and a stopping
    # actor keeps its resources meanwhile. Tune's default (ten minutes) is what held a 900 s sweep idle past
    # its budget after one such reuse failed; trials end at the budget by themselves (``trial_deadline``).
    "TUNE_FORCE_TRIAL_CLEANUP_S": "30",
}


@contextlib.contextmanager
def ray_for_search() -> Iterator[None]:
    """Ray for the block: the one this process is connected to, the cluster in ``RAY_ADDRESS``, or an embedded
    one sized to this machine, stopped at the end when started here.

    The processes Ray starts get :data:`RAY_ENV` and the allocator settings (:func:`malloc_env`) through the
    job's runtime environment; this process's own environment is back as it was when the block ends.
    """
    import ray

    worker_env = {**{k: v for k, v in RAY_ENV.items() if k not in os.environ}, **malloc_env()}
    with scoped_env(RAY_ENV):
        started = not ray.is_initialized()
        if started:
            address = os.environ.get("RAY_ADDRESS")
            runtime_env = {"env_vars": worker_env}
            if address:
                logger.info(f"joining the Ray cluster at {address}", extra=_SEARCH)
                ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
            else:
                cpus = os.cpu_count() or 1
                logger.info(f"starting an embedded Ray with {cpus} CPUs", extra=_SEARCH)
                start_embedded_ray(num_cpus=cpus, log_to_driver=False, logging_level=logging.WARNING,
                                   runtime_env=runtime_env)
        try:
            yield
        finally:
            if started:
                ray.shutdown()


def check_storage(run: RunDir, shared_fs: bool) -> None:
    """A sweep over several nodes needs a run directory that every node can reach."""
    if run.remote is not None or shared_fs:
        return
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise SearchError(
            f"the run directory {run.path} is a local path, but the Ray cluster has {len(nodes)} nodes and trials "
            "on the other nodes cannot write there: use shared storage (--out s3://bucket/prefix), or pass "
            "--shared-fs if every node mounts this path (NFS, EFS, a shared volume)"
        )


def prepare_data(
    config: ExperimentConfig, run: RunDir, test_source: str | None, progress: bool
) -> TrialData:
    """Validate and cache the data once, fix the splits (less near-duplicate leaks), describe them in ``data.json``."""
    from automl_tl.data import load_dataset
    from automl_tl.data.deep import leak_free_splits

    data_cfg = config.data if test_source is None else config.data.model_copy(update={"test_source": test_source})
    # stream mode: the shards go to the run's storage, where every node reads them
    dataset = load_dataset(data_cfg.source, data_cfg, progress=progress, shard_root=f"{run.location}/data/shards")
    train_idx, val_idx, test_idx = leak_free_splits(dataset, config)
    cache_path = str(dataset.cache_path)
    data_id = Path(cache_path).stem
    shared_cache = None
    if run.remote is not None:  # nodes fetch the data from the run's shared storage, once each
        from automl_tl.runs.storage import join, share_file

        shared_cache = join(run.remote, "data", f"{data_id}.arrow")
        share_file(Path(cache_path), shared_cache)
    run.write_json(
        "data.json",
        {
            "source": data_cfg.source,
            "test_source": data_cfg.test_source,
            "cache_path": cache_path,
            "data_id": data_id,
            "shared_cache": shared_cache,
            "shards": dataset.shards,
            "class_names": list(dataset.class_names),
            "train": train_idx.tolist(),
            "val": val_idx.tolist(),
            "test": test_idx.tolist(),
            "labels": np.asarray(dataset.labels).tolist(),
        },
    )
    return TrialData(
        cache_path=cache_path,
        data_id=data_id,
        class_names=tuple(dataset.class_names),
        train_idx=train_idx,
        val_idx=val_idx,
        labels=np.asarray(dataset.labels, dtype=np.int64),
        feature_cache_dir=str(Path(cache_path).parent / "features"),
        shared_cache=shared_cache,
        shards=dataset.shards,
        shared_features=f"{run.remote.rstrip('/')}/features" if run.remote is not None and dataset.shards else None,
    )


@contextlib.contextmanager
def data_then_ray(
    config: ExperimentConfig, run: RunDir, test_source: str | None, progress: bool
) -> Iterator[TrialData]:
    """The sweep's data (:func:`prepare_data`), then Ray for the sweep (:func:`ray_for_search`), held for the
    block. With ``data.mode: stream`` Ray comes first: the ingest runs on Ray Data, so the one Ray serves both.
    Otherwise a data set that fails validation fails before any Ray starts."""
    with contextlib.ExitStack() as stack:
        if config.data.mode == "stream":
            stack.enter_context(ray_for_search())
        data = prepare_data(config, run, test_source, progress)
        if config.data.mode != "stream":
            stack.enter_context(ray_for_search())
        yield data


def _stream_features(config: ExperimentConfig, data: TrialData) -> None:
    """Stream mode: the frozen trials' features, computed once for the cluster before the trials start."""
    from automl_tl.train.features import frozen_combinations, stream_features

    space = config.space
    pairs = frozen_combinations(space.backbones, space.image_sizes, space.freeze_depths, space.augmentations)
    stream_features(data, pairs, use_gpu=config.resources.use_gpu)


def run_search(
    config: ExperimentConfig,
    out: str | os.PathLike[str],
    test_source: str | None = None,
    progress: bool = True,
    shared_fs: bool = False,
) -> SearchOutcome:
    """Run a whole sweep into ``out`` and return its leaderboard and best trial.

    ``out`` is a local path or a URI (``s3://...``); ``shared_fs`` says a local ``out`` is mounted on every node.
    Progress goes to this package's loggers (stage ``search``); ``progress`` adds bars on a terminal.
    """
    started = time.time()
    run = RunDir.open(out)
    config = resolve_preset(config)  # the run directory keeps the resolved config: resume does not re-detect
    param_space = check_search(config)  # a bad backbone or space fails here, before Ray, data or the run directory
    run.prepare()
    run.write_text("config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    with data_then_ray(config, run, test_source, progress) as data:
        run.push("config.yaml", "data.json")
        logger.info(f"{len(data.train_idx)} train / {len(data.val_idx)} val images, {len(data.class_names)} classes",
                    extra=_SEARCH)  # fmt: skip
        check_storage(run, shared_fs)
        _stream_features(config, data)
        tuner = build_tuner(config, run, data, param_space, restore=False, progress=progress)
        fit_started = time.time()
        grid = fit(tuner, run)
        return _finish(config, run, grid, started, sweep_end(config, param_space, len(grid), time.time() - fit_started))


def resume_search(
    out: str | os.PathLike[str], progress: bool = True, shared_fs: bool = False
) -> SearchOutcome:
    """Continue a sweep whose driver stopped: finished trials are kept, unfinished ones resume."""
    from automl_tl.sweep.searcher import RANKING_FILE
    from automl_tl.sweep.space import build_param_space

    started = time.time()
    run = RunDir.open(out)
    run.pull("config.yaml", "data.json", STOP_REASONS, RANKING_FILE)
    if not run.exists("config.yaml") or not run.remote_exists("tune"):
        raise SearchError(f"{out} is not a run directory of automl_tl (no config.yaml or tune/)")
    config = load_config(run.path / "config.yaml")
    data_info = run.read_json("data.json")
    with data_then_ray(config, run, data_info.get("test_source"), progress) as data:
        check_storage(run, shared_fs)
        for note in mend_stale_checkpoints(f"{run.location}/tune"):  # a driver killed mid-checkpoint
            logger.warning(note, extra={"stage": "resume"})
        param_space = build_param_space(config)
        _stream_features(config, data)
        tuner = build_tuner(config, run, data, param_space, restore=True, progress=progress)
        fit_started = time.time()
        grid = fit(tuner, run)
        return _finish(config, run, grid, started, sweep_end(config, param_space, len(grid), time.time() - fit_started))


def _finish(
    config: ExperimentConfig, run: RunDir, grid: Any, started: float, end: dict[str, Any]
) -> SearchOutcome:
    from automl_tl.sweep.progress import read_stop_reasons
    from automl_tl.sweep.searcher import RANKING_FILE, ranking_summary, with_ranking

    metric = config.search.metric
    run.pull("trials")  # a remote run: the trials' best epochs, uploaded from their nodes
    stopped = read_stop_reasons(run.path / STOP_REASONS)
    rows = []
    for result in grid:
        rows.append(_row(run, result, config, stopped))
    done = [r for r in rows if r.get(f"best_{metric}") is not None]
    if not done:
        errors = "; ".join(sorted({str(r["stop_reason"]) for r in rows})) or "no trial ran"
        raise SearchError(f"no trial finished an epoch: {errors}")
    ranking = ranking_summary(config, rows, run.path / RANKING_FILE)  # LogME per backbone, and what it pruned
    end = {**end, "duplicates_skipped": ranking["duplicates_skipped"]}  # proposals that repeated a trial
    rows = with_ranking(rank_rows(rows, metric), ranking)
    best = rows[0]
    wall_s = time.time() - started
    write_leaderboard(run, rows)
    write_summary(run, config, rows, best, wall_s)
    run.write_json("summary.json", {**run.read_json("summary.json"), "sweep": end, "transferability": ranking})
    run.push("leaderboard.csv", "summary.json", STOP_REASONS, RANKING_FILE)
    used = f", {end['budget_used']:.0%} of the time budget" if end["budget_used"] is not None else ""
    logger.info(f"the sweep stopped: {end['stop_reason']} ({end['trials']} trials in {end['fit_s']:.0f}s{used})",
                extra={**_SEARCH, "event": "sweep_end", **end})  # fmt: skip
    logger.info(f"done in {wall_s:.0f}s: {len(done)} of {len(rows)} trials finished; best {best['trial_id']} "
                f"{metric}={best[f'best_{metric}']:.4f} ({best['backbone']}, freeze {best['freeze_depth']})",
                extra={**_SEARCH, "event": "search_end", "wall_s": round(wall_s, 1), "best_trial": best["trial_id"],
                       "metric": metric, "best": best[f"best_{metric}"]})  # fmt: skip
    return SearchOutcome(run.path, rows, best, wall_s)


def _row(run: RunDir, result: Any, config: ExperimentConfig, stopped: dict[str, str]) -> dict[str, Any]:
    metrics = dict(result.metrics or {})
    params = dict(result.config or {})
    trial_id = str(metrics.get("trial_id") or Path(str(result.path)).name)
    info_path = run.path / "trials" / trial_id / "trial.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    # The trial's own epoch count: Tune's iteration counts reports, and a trial that had ended when the driver
    # was killed reports its last epoch once more on resume.
    epochs = int(metrics.get("epoch") or metrics.get("training_iteration") or 0)
    if result.error is not None:
        first = str(result.error).strip().splitlines()
        reason = f"error: {type(result.error).__name__}: {first[-1] if first else ''}"[:300]
    elif metrics.get("stop_reason"):
        reason = str(metrics["stop_reason"])
    else:
        reason = stopped.get(trial_id, f"early_stopped ({config.search.scheduler})")
    if metrics.get("resumed_from_epoch"):
        reason += f"; resumed from epoch {metrics['resumed_from_epoch']} checkpoint"
    val = info.get("val_metrics", {})
    row: dict[str, Any] = {
        "trial_id": trial_id,
        **{k: params.get(k) for k in HYPERPARAMETERS},
        "best_val_accuracy": val.get("val_accuracy"),
        "best_val_macro_f1": val.get("val_macro_f1"),
        "best_val_log_loss": val.get("val_log_loss"),
        "best_epoch": info.get("best_epoch"),
        "epochs_run": epochs,
        "stop_reason": reason,
        "wall_s": round(float(metrics.get("time_total_s") or 0.0), 2),
        "feature_cache": metrics.get("feature_cache"),
        "workers": metrics.get("workers"),
        "peak_rss_mb": metrics.get("peak_rss_mb"),
        "accumulation_steps": metrics.get("accumulation_steps") or 1,  # above 1: backed off after out of memory
        "has_model": (run.path / "trials" / trial_id / "model.safetensors").is_file(),
        "transferability": metrics.get("transferability"),  # LogME of the features it trained a head on
    }
    return row
