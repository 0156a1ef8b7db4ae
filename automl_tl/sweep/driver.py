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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from automl_tl._owned import start_embedded_ray
from automl_tl.sweep.state_mend import mend_stale_checkpoints
from automl_tl.train.memory import malloc_env, scoped_env
from automl_tl.backbones import check_backbones as check_backbone_weights
from automl_tl.config import ExperimentConfig, config_to_dict, load_config
from automl_tl.errors import SearchError
from automl_tl.runs.rundir import RunDir, write_leaderboard, write_summary
from automl_tl.evaluate.ranking import metric_mode, rank_rows
from automl_tl.train.loop import HYPERPARAMETERS
from automl_tl.train.trial_data import TrialData

__all__ = [
    "RAY_ENV", "SearchOutcome", "run_search", "resume_search", "check_backbones", "check_search", "check_storage",
    "ray_for_search",
]

Log = Callable[[str], None]
STOP_REASONS = "stop_reasons.jsonl"
LEFTOVER_WAIT_S = 10.0  # a finished trial's Ray Train worker group shuts itself down in about 3 s


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
}


@contextlib.contextmanager
def ray_for_search(log: Log) -> Iterator[None]:
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
                log(f"[search] joining the Ray cluster at {address}")
                ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
            else:
                cpus = os.cpu_count() or 1
                log(f"[search] starting an embedded Ray with {cpus} CPUs")
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


def prepare_data(config: ExperimentConfig, run: RunDir, test_source: str | None, progress: bool) -> TrialData:
    """Validate and cache the data once, fix the splits, and describe them in ``data.json``."""
    from automl_tl.data import load_dataset

    data_cfg = config.data if test_source is None else config.data.model_copy(update={"test_source": test_source})
    dataset = load_dataset(data_cfg.source, data_cfg, progress=progress)
    train_idx, val_idx, test_idx = (np.asarray(dataset.indices(s), dtype=np.int64) for s in ("train", "val", "test"))
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
    )


def run_search(
    config: ExperimentConfig,
    out: str | os.PathLike[str],
    test_source: str | None = None,
    log: Log = print,
    progress: bool = True,
    shared_fs: bool = False,
) -> SearchOutcome:
    """Run a whole sweep into ``out`` and return its leaderboard and best trial.

    ``out`` is a local path or a URI (``s3://...``); ``shared_fs`` says a local ``out`` is mounted on every node.
    """
    started = time.time()
    run = RunDir.open(out)
    param_space = check_search(config)  # a bad backbone or space fails here, before Ray, data or the run directory
    run.prepare()
    run.write_text("config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    data = prepare_data(config, run, test_source, progress)
    run.push("config.yaml", "data.json")
    log(f"[search] {len(data.train_idx)} train / {len(data.val_idx)} val images, {len(data.class_names)} classes")
    with ray_for_search(log):
        check_storage(run, shared_fs)
        tuner = _build_tuner(config, run, data, param_space, log, restore=False)
        fit_started = time.time()
        grid = fit(tuner, run)
        return _finish(config, run, grid, started, log, sweep_end(config, param_space, len(grid), time.time() - fit_started))


def resume_search(
    out: str | os.PathLike[str], log: Log = print, progress: bool = True, shared_fs: bool = False
) -> SearchOutcome:
    """Continue a sweep whose driver stopped: finished trials are kept, unfinished ones resume."""
    from automl_tl.sweep.space import build_param_space

    started = time.time()
    run = RunDir.open(out)
    run.pull("config.yaml", "data.json", STOP_REASONS)
    if not run.exists("config.yaml") or not run.remote_exists("tune"):
        raise SearchError(f"{out} is not a run directory of automl_tl (no config.yaml or tune/)")
    config = load_config(run.path / "config.yaml")
    data_info = run.read_json("data.json")
    data = prepare_data(config, run, data_info.get("test_source"), progress)
    with ray_for_search(log):
        check_storage(run, shared_fs)
        for note in mend_stale_checkpoints(f"{run.location}/tune"):  # a driver killed mid-checkpoint
            log(f"[resume] {note}")
        param_space = build_param_space(config)
        tuner = _build_tuner(config, run, data, param_space, log, restore=True)
        fit_started = time.time()
        grid = fit(tuner, run)
        return _finish(config, run, grid, started, log, sweep_end(config, param_space, len(grid), time.time() - fit_started))


def fit(tuner: Any, run: RunDir) -> Any:
    """``tuner.fit()``, with Ray's out-of-memory kill of a trial turned into a SearchError that says what to do.

    Tune 2.60 does not treat a trial actor killed by Ray's memory monitor as a failed trial: the sweep stops.
    Finished trials are saved, so the message says how to continue and how to need less memory next time.
    """
    from ray.exceptions import OutOfMemoryError

    try:
        with _removing_leftover_worker_groups():
            return tuner.fit()
    except RuntimeError as exc:
        if not isinstance(exc.__cause__, OutOfMemoryError):
            raise
        first = str(exc.__cause__).strip().splitlines()[0]
        raise SearchError(
            f"Ray stopped a trial because the machine ran out of memory ({first}). Finished trials are kept and "
            f"'automl-tl resume {run.location}' continues the sweep; for a new search lower "
            "search.max_concurrent_trials or space.batch_sizes, or give each trial more memory"
        ) from None


def _live_placement_groups() -> dict[str, Any]:
    """This job's placement groups that still hold or wait for resources.

    A placement group id ends with the id of the job that created it (Ray's id layout), so a driver that shares
    the cluster with other jobs only ever sees its own.
    """
    import ray

    job = ray.get_runtime_context().get_job_id()
    table = ray.util.placement_group_table()
    return {pg_id: info for pg_id, info in table.items() if info["state"] != "REMOVED" and pg_id.endswith(job)}


@contextlib.contextmanager
def _removing_leftover_worker_groups() -> Iterator[None]:
    """Remove the placement groups the sweep's Ray Train worker groups leave behind.

    Tune stops a trial at its last report, before its ``TorchTrainer`` has shut its worker group down, so the
    group's reservation outlives the trial by a few seconds (measured: still there when ``fit`` returns, gone 3 s
    later). A sweep started right after in the same driver could then not place its own workers: the tests saw
    two 0.5-CPU workers wait on 0.999 free CPUs, and the test failed or hung. Everything this job reserved during
    the sweep is a leftover once ``fit`` has returned.

    The groups get ``LEFTOVER_WAIT_S`` to go by themselves before they are removed: removing one whose
    ``TorchTrainer`` is still finishing kills its workers, and its controller then starts a new group (a retry of
    its ``FailureConfig``) that no one removes. A test saw exactly that: the next sweep's 2 workers waited
    5 minutes on the new group's 1 CPU.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    before = set(_live_placement_groups())
    try:
        yield
    finally:
        deadline = time.monotonic() + LEFTOVER_WAIT_S
        while (leftover := set(_live_placement_groups()) - before) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pg_id in leftover:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))


def _build_tuner(
    config: ExperimentConfig, run: RunDir, data: TrialData, param_space: dict[str, Any], log: Log, restore: bool
) -> Any:
    from ray import tune

    from automl_tl.sweep.progress import SweepProgress
    from automl_tl.sweep.trial import FAULT_ENV, TrialSetup, run_trial, trial_resources

    search, res = config.search, config.resources
    setup = TrialSetup(run.location, res.engine(), res, fault_marker=os.environ.get(FAULT_ENV),
                       memory_cap_bytes=_largest_node_memory())  # fmt: skip
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data, setup=setup), trial_resources(setup, len(data.val_idx))
    )
    if restore:
        return tune.Tuner.restore(
            f"{run.location}/tune", trainable=trainable, param_space=param_space,
            resume_unfinished=True, resume_errored=True,
        )  # fmt: skip
    mode = metric_mode(search.metric)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=mode,
            search_alg=_search_alg(config, param_space),
            scheduler=_scheduler(config, mode),
            num_samples=_trial_cap(config, param_space),
            max_concurrent_trials=search.max_concurrent_trials or _default_concurrency(res),
            time_budget_s=search.time_budget_s,
            reuse_actors=res.engine() == "inline",
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=run.location,
            verbose=0,
            callbacks=[SweepProgress(log, search.metric, mode, _trial_cap(config, param_space), search.scheduler,
                                     search.time_budget_s, run.path / STOP_REASONS)],  # fmt: skip
            failure_config=tune.FailureConfig(max_failures=res.max_failures if res.engine() == "inline" else 0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )


def _trial_cap(config: ExperimentConfig, param_space: dict[str, Any]) -> int:
    """Tune's ``num_samples``: the config's trial cap, at most the space's distinct points; -1 (no cap) when the
    time budget alone ends the sweep."""
    from automl_tl.sweep.space import count_points

    caps = [n for n in (config.search.max_trials(), count_points(param_space)) if n is not None]
    return min(caps) if caps else -1


def sweep_end(config: ExperimentConfig, param_space: dict[str, Any], trials: int, fit_s: float) -> dict[str, Any]:
    """Why the sweep stopped and how much of its time budget it used (``summary.json``'s ``sweep``)."""
    from automl_tl.sweep.space import count_points

    budget, cap, points = config.search.time_budget_s, config.search.max_trials(), count_points(param_space)
    if points is not None and trials >= points and (cap is None or points <= cap):
        reason = f"space_exhausted: the search space has {points} distinct point(s) and each ran"
    elif cap is not None and trials >= cap:
        reason = f"trial_cap: search.num_samples={cap} trials ran"
    elif budget is not None and fit_s >= 0.9 * budget:
        reason = "time_budget"
    else:
        reason = "trials_ended: every trial ended before the budget or the cap (errors or a finished searcher)"
    return {"stop_reason": reason, "trials": trials, "fit_s": round(fit_s, 1), "time_budget_s": budget,
            "budget_used": round(fit_s / budget, 3) if budget else None}  # fmt: skip


def _largest_node_memory() -> int | None:
    """The most ``memory`` resource one live node offers Ray (None when no node reports it)."""
    import ray

    offered = [int(n["Resources"].get("memory", 0)) for n in ray.nodes() if n.get("Alive")]
    return max(offered, default=0) or None


def _default_concurrency(res: Any) -> int:
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    return max(1, int(cpus // (res.cpus_per_worker * res.workers_per_trial)))


def _search_alg(config: ExperimentConfig, param_space: dict[str, Any]) -> Any:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from automl_tl.sweep.space import frozen_start_points

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = config.search.seed
    if config.search.algorithm == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        cap = config.search.max_trials()
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, cap // 3)) if cap else 5)
    return OptunaSearch(sampler=sampler, points_to_evaluate=frozen_start_points(config, param_space) or None)


def _scheduler(config: ExperimentConfig, mode: str) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, PopulationBasedTraining

    search, max_t = config.search, config.space.max_epochs
    if search.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=min(search.grace_period_epochs, max_t), reduction_factor=3)
    if search.scheduler == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=max_t, reduction_factor=3)
    if search.scheduler == "pbt":
        from ray import tune

        lr = config.space.learning_rate
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=max(1, search.grace_period_epochs),
            hyperparam_mutations={"learning_rate": tune.loguniform(lr.low, lr.high) if not lr.fixed else [lr.low]},
        )
    return FIFOScheduler()


def _finish(
    config: ExperimentConfig, run: RunDir, grid: Any, started: float, log: Log, end: dict[str, Any]
) -> SearchOutcome:
    from automl_tl.sweep.progress import read_stop_reasons

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
    rows = rank_rows(rows, metric)
    best = rows[0]
    wall_s = time.time() - started
    write_leaderboard(run, rows)
    write_summary(run, config, rows, best, wall_s)
    run.write_json("summary.json", {**run.read_json("summary.json"), "sweep": end})
    run.push("leaderboard.csv", "summary.json", STOP_REASONS)
    used = f", {end['budget_used']:.0%} of the time budget" if end["budget_used"] is not None else ""
    log(f"[search] the sweep stopped: {end['stop_reason']} ({end['trials']} trials in {end['fit_s']:.0f}s{used})")
    log(f"[search] done in {wall_s:.0f}s: {len(done)} of {len(rows)} trials finished; best {best['trial_id']} "
        f"{metric}={best[f'best_{metric}']:.4f} ({best['backbone']}, freeze {best['freeze_depth']})")  # fmt: skip
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
    }
    return row
