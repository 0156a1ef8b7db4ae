"""One trial's training, in plain torch: no Ray here, so it runs and tests anywhere.

``train_trial`` fine-tunes one backbone with one set of hyperparameters, evaluates on the validation split
after every epoch, keeps the best epoch's weights and validation probabilities, stops early on a plateau and
hands each epoch to a ``report`` callback (Ray Tune or Ray Train at the edge) together with a checkpoint
directory from which an interrupted trial resumes exactly where it was.

A fully frozen backbone with a deterministic transform trains its head on pooled features computed once per
(data, backbone, image size) and shared by every such trial (``automl_tl.train.features``).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automl_tl.train.memory import peak_rss_bytes, reset_peak_rss
from automl_tl.train.trial_data import TrialData
from automl_tl.backbones import TransferNet, create_backbone, memory_format_for, resolve_spec
from automl_tl.evaluate.metrics import classification_metrics
from automl_tl.evaluate.ranking import metric_mode, rank_key
from automl_tl.train.trial_config import HYPERPARAMETERS, TrialConfig
from automl_tl.train.steps import (
    FeatureSteps, ImageSteps, ProbeSteps, Steps, amp_dtype, class_weights, probe_start, resolve_class_balance,
    select_device, seed_everything, train_epoch_with_backoff,
)  # fmt: skip
from automl_tl.train.checkpoint import load_checkpoint, save_checkpoint, write_best

__all__ = ["HYPERPARAMETERS", "TrialConfig", "TrialData", "EpochResult", "train_trial", "refit_head", "amp_dtype",
           "class_weights", "resolve_class_balance", "seed_everything", "memory_format_for", "select_device",
           "Reporter"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class EpochResult:
    epoch: int
    metrics: dict[str, Any]
    improved: bool


Reporter = Callable[[dict[str, Any], "Path | None"], None]


def train_trial(
    cfg: TrialConfig,
    data: TrialData,
    report: Reporter,
    out_dir: Path | None,
    resume_dir: Path | None = None,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    use_feature_cache: bool = True,
    max_seconds: float | None = None,
    deadline: float | None = None,
) -> EpochResult | None:
    """Train one trial to the end (max epochs or a plateau) and return its last epoch.

    ``use_feature_cache=False`` makes a frozen trial step through images anyway (for benchmarks);
    ``max_seconds`` ends training after the epoch that crosses it (a wall-clock budget). ``deadline`` (a
    ``time.time()`` value: the end of the sweep's budget) is a hard end: a trial that starts past it trains
    nothing, and the epoch that reaches it takes no further batch, is evaluated and reported as the last.
    """
    if world_size > 1:
        deadline = None  # ranks would cross it at different batches and wait on each other: Tune stops them
    if deadline is not None and time.time() >= deadline:
        return None
    started_at = time.perf_counter()
    reset_peak_rss()  # a reused trial actor: report this trial's own peak, not an earlier one's
    device = device or torch.device("cpu")
    seed_everything(cfg.seed + 1000 * rank)
    spec = resolve_spec(cfg.backbone)
    pre = cfg.preprocessing()
    num_classes = len(data.class_names)
    model = create_backbone(
        cfg.backbone,
        num_classes=num_classes,
        pretrained=cfg.pretrained,
        freeze_depth=min(cfg.freeze_depth, spec.max_freeze_depth),
        head=cfg.head,
        head_dropout=cfg.head_dropout,
        image_size=pre.input_size,
    )
    train_labels = data.labels[data.train_idx]
    balance = resolve_class_balance(cfg.class_balance, train_labels, num_classes)
    weight = torch.tensor(class_weights(train_labels, num_classes), dtype=torch.float32) if balance == "weighted_loss" else None

    feature_mode = use_feature_cache and cfg.frozen_features and cfg.pretrained
    scored: dict[str, float | None] = {}  # the backbone's transferability, where this trial has its features
    if feature_mode:
        from automl_tl.train.features import cached_features
        from automl_tl.train.transferability import train_logme

        features = cached_features(data, cfg.backbone, pre, model)
        scored["transferability"] = train_logme(data, cfg.backbone, pre, features.train)
        probe = cfg.is_probe  # the logistic-regression probe: the head fitted to convergence
        steps: Steps = (ProbeSteps if probe else FeatureSteps)(
            model.head, features.train, data.labels[data.train_idx], features.val,
            data.labels[data.val_idx], cfg, weight, balance,
        )  # fmt: skip
        cache_note = "hit" if features.hit else "miss"
    else:
        if cfg.optimizer == "lbfgs" and cfg.pretrained and resume_dir is None:
            probe_start(model, cfg.backbone, data, pre, weight)  # LP-FT: fine-tuning starts from a converged head
        steps = ImageSteps(model, pre, cfg, data, weight, balance, device, rank, world_size)
        cache_note = "unused"

    steps.deadline = deadline
    optimizer = _make_optimizer(model, cfg)
    schedule = _cosine_schedule(optimizer, cfg.max_epochs * steps.steps_per_epoch())
    state: dict[str, Any] = {"epoch": 0, "best_score": None, "best_epoch": 0, "since_best": 0}
    if resume_dir is not None:
        state = load_checkpoint(resume_dir, model, optimizer, schedule)
        steps.accumulation = int(state.get("accumulation_steps", 1))  # a back-off holds across a resume

    mode = metric_mode(cfg.metric)
    last: EpochResult | None = None
    ended = dict(state.get("last_metrics") or {})
    if ended.get("stop_reason"):
        # The trial had ended when the driver was killed, before Tune recorded it: its checkpoint is the last
        # one. Report that end again instead of training on past it (or reporting nothing).
        report(ended, None)
        return EpochResult(int(state["epoch"]), ended, False)
    for epoch in range(int(state["epoch"]) + 1, cfg.max_epochs + 1):
        started = time.perf_counter()
        train_loss, train_acc = train_epoch_with_backoff(steps, model, optimizer, schedule, epoch)
        state["accumulation_steps"] = steps.accumulation
        val_probs = steps.val_probs()
        val = classification_metrics(data.labels[data.val_idx], val_probs, data.class_names)
        scores = {"val_accuracy": val["accuracy"], "val_macro_f1": val["f1"]["macro"], "val_log_loss": val["log_loss"]}
        score = scores[cfg.metric]
        best = state["best_score"]
        # An epoch that only ties the best score still replaces it when its log loss is lower (the ranking
        # rule), but it does not reset the plateau count: the score did not move.
        improved = rank_key(score, None, mode)[:2] < rank_key(best, None, mode)[:2]
        if rank_key(score, scores["val_log_loss"], mode) < rank_key(best, state.get("best_log_loss"), mode):
            state.update(best_score=score, best_epoch=epoch, best_log_loss=scores["val_log_loss"])
            if rank == 0 and out_dir is not None:
                write_best(out_dir, model, val_probs, cfg, data, epoch, scores, steps.accumulation, steps.notes())
        state["since_best"] = 0 if improved else int(state["since_best"]) + 1
        state["epoch"] = epoch
        plateau = int(state["since_best"]) >= cfg.plateau_patience
        stop_reason = "plateau" if plateau and epoch < cfg.max_epochs else ("max_epochs" if epoch == cfg.max_epochs else "")
        stop_reason = "converged" if steps.converged else stop_reason
        if not stop_reason and _out_of_time(steps, started_at, max_seconds, deadline):
            stop_reason = "time_budget"
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            **scores,
            "best_epoch": state["best_epoch"],
            f"best_{cfg.metric}": state["best_score"],
            "epoch_s": time.perf_counter() - started,
            "feature_cache": cache_note,
            "workers": world_size,
            "peak_rss_mb": _mib(peak_rss_bytes()),
            # Above 1 after an out-of-memory back-off: each batch ran as this many smaller micro-batches.
            "accumulation_steps": steps.accumulation,
            "micro_batch_size": steps.micro_batch(),
            "stop_reason": stop_reason,
            **scored,
        }
        state["last_metrics"] = metrics  # a resume from this checkpoint knows whether the trial had ended
        with tempfile.TemporaryDirectory(prefix="automl_tl_ckpt_") as tmp:
            ckpt = Path(tmp) if rank == 0 else None
            if ckpt is not None:
                save_checkpoint(ckpt, model, optimizer, schedule, state, cfg)
            report(metrics, ckpt)
        last = EpochResult(epoch, metrics, improved)
        if stop_reason:
            break
    return last


def _out_of_time(steps: Steps, started_at: float, max_seconds: float | None, deadline: float | None) -> bool:
    """Whether the trial's own time or the sweep's deadline has run out (an epoch cut short at it counts)."""
    if steps.cut_short or (deadline is not None and time.time() >= deadline):
        return True
    return max_seconds is not None and time.perf_counter() - started_at >= max_seconds


def _mib(size: int | None) -> int | None:
    return None if size is None else round(size / 2**20)


# --- optimizer, checkpoints and the best epoch's files ---------------------------------------------------


def _cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def refit_head(cfg: TrialConfig, head: nn.Module, x: torch.Tensor, labels: np.ndarray, epochs: int,
               num_classes: int, probe_l2: float | None = None) -> None:  # fmt: skip
    """Train ``head`` on features ``x`` as the trial ``cfg`` trained its own, for ``epochs`` epochs (its best
    epoch): same optimizer, schedule, batches and class balance; a probe (``lbfgs``) at its chosen L2.

    Cross-validation trains one such head per fold, and the artifact one on train + validation together.
    """
    labels = np.asarray(labels, dtype=np.int64)
    balance = resolve_class_balance(cfg.class_balance, labels, num_classes)
    weight = torch.tensor(class_weights(labels, num_classes), dtype=torch.float32) if balance == "weighted_loss" else None
    if cfg.optimizer == "lbfgs":
        from automl_tl.train.probe import L2_GRID, fit_head

        fit_head(head, x, torch.from_numpy(labels), probe_l2 if probe_l2 is not None else L2_GRID[len(L2_GRID) // 2], weight)
        return
    steps = FeatureSteps(head, x, labels, x[:0], labels[:0], cfg, weight, balance)
    optimizer = _optimizer(list(head.parameters()), [], cfg)
    schedule = _cosine_schedule(optimizer, cfg.max_epochs * steps.steps_per_epoch())
    for epoch in range(1, epochs + 1):
        steps.train_epoch(optimizer, schedule, epoch)


def _make_optimizer(model: TransferNet, cfg: TrialConfig) -> torch.optim.Optimizer:
    head = [p for p in model.head.parameters() if p.requires_grad]
    return _optimizer(head, model.trainable_layers(), cfg)


def _optimizer(head: list[nn.Parameter], layers: list[list[nn.Parameter]], cfg: TrialConfig) -> torch.optim.Optimizer:
    """The head at ``learning_rate``; the trainable backbone ``layers`` (stem first) more slowly, each
    ``layer_decay`` times as fast as the one above it when that is below 1."""
    groups = [{"params": head, "lr": cfg.learning_rate}]
    body_lr = cfg.learning_rate * cfg.backbone_lr_ratio  # pretrained layers move more slowly than the new head
    if cfg.layer_decay == 1.0:
        body = [p for layer in layers for p in layer]
        if body:
            groups.append({"params": body, "lr": body_lr})
    else:  # the last stage learns at body_lr, each one below it layer_decay times slower
        deepest = len(layers) - 1
        groups += [{"params": layer, "lr": body_lr * cfg.layer_decay ** (deepest - i)}
                   for i, layer in enumerate(layers) if layer]  # fmt: skip
    if cfg.optimizer in ("adamw", "lbfgs"):  # lbfgs fits the head first; what trains after it uses AdamW
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
