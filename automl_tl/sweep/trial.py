"""The Ray edge of one trial: Tune's dict in, ``training.train_trial`` run by one of two engines.

* ``train`` engine: the trial builds a Ray Train ``TorchTrainer`` (``ScalingConfig`` from the config, DDP over
  its workers, GPUs where asked, ``FailureConfig`` retries that resume from the last checkpoint) and Ray
  Train's ``TuneReportCallback`` forwards each epoch's metrics and checkpoint path to Tune.
* ``inline`` engine: the trial trains inside Tune's own trial actor. Tune reuses that actor across trials
  (``reuse_actors``), so torch, timm, the memory-mapped data cache and the backbone weights are loaded once
  per process instead of once per trial, and no worker group is launched. Tune's ``FailureConfig`` restarts
  a failed trial from its last checkpoint.

``auto`` picks ``train`` when a trial asks for several workers or a GPU and ``inline`` otherwise; the
benchmark ``benchmarks/bench_trial_overhead.py`` measures what each costs per trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from automl_tl.train.memory import GIB, estimate_trial_bytes, trim_heap
from automl_tl.backbones import resolve_spec
from automl_tl.config import ResourcesConfig
from automl_tl.runs.storage import discard_staging, join, localize_data, trial_output
from automl_tl.train.loop import Reporter, TrialConfig, select_device, train_trial
from automl_tl.train.trial_data import TrialData

__all__ = ["TrialSetup", "run_trial", "trial_memory_bytes", "trial_resources", "FAULT_ENV"]

# Test hook: a path; the first trial that manages to create this file raises (exercises failure handling).
FAULT_ENV = "AUTOML_TL_INJECT_TRIAL_FAILURE"


@dataclasses.dataclass(frozen=True)
class TrialSetup:
    """What every trial of one sweep shares besides the data."""

    run_dir: str
    engine: str
    resources: ResourcesConfig
    fault_marker: str | None = None  # test hook, from $AUTOML_TL_INJECT_TRIAL_FAILURE on the driver
    memory_cap_bytes: int | None = None  # the most memory one node offers Ray: no request may exceed it
    deadline: float | None = None  # time.time() at which the sweep's budget ends: trials stop by themselves


def trial_memory_bytes(cfg: TrialConfig, resources: ResourcesConfig, val_images: int, cap_bytes: int | None) -> int:
    """Host memory one trial (one worker, with the train engine) asks Ray for: ``memory_per_trial_gb`` when it
    is set, else the estimate for this trial, never more than ``cap_bytes`` (a request no node can grant would
    leave the trial pending for ever)."""
    if resources.memory_per_trial_gb is not None:
        need = int(resources.memory_per_trial_gb * GIB)
    else:
        spec = resolve_spec(cfg.backbone)
        need = estimate_trial_bytes(
            spec.train_kb_per_pixel,
            cfg.image_size or spec.input_size,
            cfg.batch_size,
            min(cfg.freeze_depth, spec.max_freeze_depth),
            spec.max_freeze_depth,
            val_images,
            cfg.frozen_features,
            on_gpu=resources.use_gpu,
        )
    return min(need, cap_bytes) if cap_bytes else need


def trial_resources(setup: TrialSetup, val_images: int) -> Callable[[dict[str, Any]], Any]:
    """Tune's per-trial resource request: CPU, GPU and the trial's memory estimate for an inline trial; a
    token CPU for a train-engine trial, whose TorchTrainer workers reserve the real resources."""
    res = setup.resources

    def request(params: dict[str, Any]) -> Any:
        if setup.engine == "train":
            return tune.PlacementGroupFactory([{"CPU": 0.001}])
        bundle = {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_trial,
                  "memory": trial_memory_bytes(TrialConfig.from_params(params), res, val_images, setup.memory_cap_bytes)}  # fmt: skip
        return tune.PlacementGroupFactory([{k: v for k, v in bundle.items() if v}])

    return request


def run_trial(params: dict[str, Any], data: TrialData, setup: TrialSetup) -> None:
    """Tune's function trainable (wrapped with ``tune.with_parameters``)."""
    cfg = TrialConfig.from_params(params)  # the first line: Tune's dict becomes a typed object
    trial_id = tune.get_context().get_trial_id()
    # A remote run directory: write into a node-local staging folder, publish each new best epoch.
    out_dir, publish = trial_output(setup.run_dir, str(trial_id))
    _maybe_inject_failure(setup.fault_marker, out_dir)
    if setup.engine == "train":
        _run_with_ray_train(cfg, data, setup, out_dir, str(trial_id))
        discard_staging(setup.run_dir, out_dir)
        return
    torch.set_num_threads(max(1, int(setup.resources.cpus_per_worker)))
    device = select_device(setup.resources.use_gpu)
    data = localize_data(data)  # the data cache on this node, fetched once from shared storage if needed
    node_id = ray.get_runtime_context().get_node_id()
    try:
        with _restored(tune.get_checkpoint()) as resume_dir:
            # Read once: with local storage resume_dir *is* the stored checkpoint, which Tune deletes
            # (num_to_keep=1) as soon as this trial reports its next one.
            resumed_from = _resumed_epoch(resume_dir)

            def send(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None)

            report = _reporter(send, publish, resumed_from, node_id, writes=True)
            train_trial(cfg, data, report, out_dir, resume_dir=resume_dir, device=device, deadline=setup.deadline)
    finally:
        discard_staging(setup.run_dir, out_dir)  # a remote run's staging: published at every new best
        trim_heap(collect=True)  # Tune reuses this actor: the next trial should not start at this one's peak


@contextlib.contextmanager
def _restored(checkpoint: Any) -> Iterator[Path | None]:
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as path:
        yield Path(path)


def _resumed_epoch(resume_dir: Path | None) -> int:
    if resume_dir is None:
        return 0
    import json

    state = json.loads((resume_dir / "state.json").read_text(encoding="utf-8"))
    return int(state["state"]["epoch"])


def _maybe_inject_failure(marker: str | None, out_dir: Path) -> None:
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(out_dir).encode())
    os.close(fd)
    raise RuntimeError(f"injected failure ({FAULT_ENV}) in trial {out_dir.name}")


# --- the Ray Train engine ----------------------------------------------------------------------------------


def _run_with_ray_train(cfg: TrialConfig, data: TrialData, setup: TrialSetup, out_dir: Path, trial_id: str) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = setup.resources
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_trial / res.workers_per_trial
    memory = trial_memory_bytes(cfg, res, len(data.val_idx), setup.memory_cap_bytes)  # every rank: a full batch
    if memory:
        per_worker["memory"] = memory
    trainer = TorchTrainer(
        _train_worker_loop,
        train_loop_config={"trial": cfg.to_dict(), "data": data, "run_dir": setup.run_dir, "trial_id": trial_id,
                           "use_gpu": res.use_gpu, "cpus": res.cpus_per_worker, "deadline": setup.deadline},  # fmt: skip
        scaling_config=ScalingConfig(
            num_workers=res.workers_per_trial, use_gpu=res.use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=f"train-{trial_id}",
            storage_path=join(setup.run_dir, "train"),  # run_dir is a URI or an absolute local path
            failure_config=FailureConfig(max_failures=res.max_failures),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
        ),
    )
    trainer.fit()


def _train_worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; rank 0 writes the best model and the checkpoints."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["cpus"])))
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    cfg = TrialConfig.from_params(config["trial"])
    data = localize_data(config["data"])
    out_dir, publish = trial_output(config["run_dir"], config["trial_id"])
    node_id = ray.get_runtime_context().get_node_id()

    with _restored(ray.train.get_checkpoint()) as resume_dir:
        resumed_from = _resumed_epoch(resume_dir)  # once: the stored checkpoint may be deleted later

        def send(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None)

        report = _reporter(send, publish, resumed_from, node_id, writes=rank == 0)
        train_trial(
            cfg, data, report, out_dir, resume_dir=resume_dir, device=device,
            rank=rank, world_size=world, deadline=config.get("deadline"),
        )  # fmt: skip
    discard_staging(config["run_dir"], out_dir)


def _reporter(
    send: Reporter, publish: Callable[[], None], resumed_from: int, node_id: str, writes: bool
) -> Reporter:
    """What both engines report per epoch: the epoch's metrics plus where the trial resumed and ran.

    ``writes`` marks the worker that writes the trial's files; it publishes each new best epoch (a remote run
    directory's staging upload) before the result is reported, so a finished trial's files are already shared.
    """

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        if writes and metrics.get("best_epoch") == metrics.get("epoch"):
            publish()
        send({**metrics, "resumed_from_epoch": resumed_from, "node_id": node_id}, ckpt_dir)

    return report


def ray_is_local() -> bool:
    """Whether the connected Ray cluster is a single node (a local run directory is then fine)."""
    return len([n for n in ray.nodes() if n.get("Alive")]) <= 1
