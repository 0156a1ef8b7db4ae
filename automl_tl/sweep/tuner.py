"""Ray Tune for one sweep: the Tuner (Optuna proposing, ASHA stopping, trials bounded by the budget), fitted
with the leftovers of Ray Train worker groups cleaned up after it."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any


from automl_tl.config import ExperimentConfig
from automl_tl.errors import SearchError
from automl_tl.runs.rundir import RunDir
from automl_tl.evaluate.ranking import metric_mode
from automl_tl.train.trial_data import TrialData

__all__ = ["LEFTOVER_WAIT_S", "STOP_REASONS", "build_tuner", "fit", "sweep_end", "trial_deadline"]

STOP_REASONS = "stop_reasons.jsonl"  # why each trial stopped, one JSON line per trial
LEFTOVER_WAIT_S = 10.0  # a finished trial's Ray Train worker group shuts itself down in about 3 s


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


def build_tuner(
    config: ExperimentConfig, run: RunDir, data: TrialData, param_space: dict[str, Any], restore: bool,
    progress: bool = False,
) -> Any:
    """The sweep's Tuner; ``progress`` draws a bar of the trials on a terminal (the log records come anyway)."""
    from ray import tune

    from automl_tl.sweep.progress import SweepProgress
    from automl_tl.sweep.trial import FAULT_ENV, TrialSetup, run_trial, trial_resources

    search, res = config.search, config.resources
    deadline = trial_deadline(config, restore)
    setup = TrialSetup(run.location, res.engine(), res, fault_marker=os.environ.get(FAULT_ENV),
                       memory_cap_bytes=_largest_node_memory(), deadline=deadline)  # fmt: skip
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
            search_alg=_search_alg(config, param_space, run),
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
            stop=_deadline_stopper(deadline) if deadline is not None else None,
            callbacks=[SweepProgress(search.metric, mode, _trial_cap(config, param_space), search.scheduler,
                                     search.time_budget_s, run.path / STOP_REASONS, progress=progress)],  # fmt: skip
            failure_config=tune.FailureConfig(max_failures=res.max_failures if res.engine() == "inline" else 0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )


def trial_deadline(config: ExperimentConfig, restore: bool) -> float | None:
    """When the sweep's time budget ends (``time.time()``), for trials to stop at by themselves.

    Tune's own budget stops the experiment, but it waits for trials to stop gracefully, and a trial actor
    that does not (a reused actor whose previous trial still runs) held a sweep past its budget. A resumed
    sweep has only what Tune's restored budget says is left, which Tune alone knows: no deadline then.
    """
    budget = config.search.time_budget_s
    return None if budget is None or restore else time.time() + budget


def _deadline_stopper(deadline: float) -> Any:
    """A Tune stopper that ends the experiment at the trials' deadline: Tune's own budget clock starts only at
    its first step, so without it Tune would go on proposing trials that the deadline ends at once."""
    from ray.tune.stopper import Stopper

    class DeadlineStopper(Stopper):
        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return False

        def stop_all(self) -> bool:
            return time.time() >= deadline

    return DeadlineStopper()


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
        reason = (f"space_exhausted: each of the search space's {points} distinct point(s) ran (proposals that "
                  "train the same model count as one point)")
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


def _search_alg(config: ExperimentConfig, param_space: dict[str, Any], run: RunDir) -> Any:
    import optuna

    from automl_tl.sweep.searcher import RANKING_FILE, ranked_search

    from automl_tl.sweep.space import frozen_start_points

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = config.search.seed
    if config.search.algorithm == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        cap = config.search.max_trials()
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, cap // 3)) if cap else 5)
    return ranked_search(config, param_space, run.path / RANKING_FILE, sampler=sampler,
                         points_to_evaluate=frozen_start_points(config, param_space) or None)  # fmt: skip


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
