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
import functools
import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from automl_tl.config import Bool, Float, Int, config_error
from automl_tl.train.memory import peak_rss_bytes, reset_peak_rss
from automl_tl.train.oom import EpochStart, is_out_of_memory, maybe_inject_oom, next_micro_batch, out_of_memory_error
from automl_tl.train.trial_data import TrialData
from automl_tl.train.augment import array_to_tensor, batch_mixer, is_deterministic, train_transform
from automl_tl.backbones import TransferNet, create_backbone, memory_format_for, resolve_spec
from automl_tl.evaluate.metrics import classification_metrics
from automl_tl.evaluate.ranking import metric_mode, rank_key
from automl_tl.runs.storage import atomic_path, write_atomic
from automl_tl.inference.transforms import Preprocessing

__all__ = ["HYPERPARAMETERS", "TrialConfig", "TrialData", "EpochResult", "train_trial", "refit_head", "amp_dtype",
           "memory_format_for", "select_device", "Reporter"]

# The searched hyperparameters: the TrialConfig fields the sweep varies, each with the ``space`` section field
# that lists its values. The search space, leaderboard, summary, report and demo read the names from here.
HYPERPARAMETERS: dict[str, str] = {
    "backbone": "backbones", "freeze_depth": "freeze_depths", "learning_rate": "learning_rate",
    "backbone_lr_ratio": "backbone_lr_ratio", "augmentation": "augmentations", "optimizer": "optimizers",
    "weight_decay": "weight_decay", "label_smoothing": "label_smoothing", "batch_size": "batch_sizes",
    "image_size": "image_sizes", "head": "heads", "head_dropout": "mlp_dropout",
    "layer_decay": "layer_decay",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    """One point of the search space, typed: the first thing a trial builds from Tune's dict."""

    backbone: str
    freeze_depth: Int
    learning_rate: Float
    backbone_lr_ratio: Float
    augmentation: Literal["none", "light", "medium", "heavy"]
    optimizer: Literal["adamw", "sgd", "lbfgs"]
    weight_decay: Float
    label_smoothing: Float
    batch_size: Int
    max_epochs: Int
    head: Literal["linear", "mlp"]
    head_dropout: Float
    image_size: Int | None = None
    seed: Int = 0
    class_balance: Literal["auto", "weighted_loss", "sampler", "off"] = "auto"
    plateau_patience: Int = 3
    metric: Literal["val_accuracy", "val_macro_f1", "val_log_loss"] = "val_accuracy"
    pretrained: Bool = True
    # Layer-wise learning-rate decay: each stage learns layer_decay times as fast as the one above it
    # (the stem slowest); 1.0 is off.
    layer_decay: Annotated[Float, Field(gt=0.0, le=1.0)] = 1.0

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TrialConfig:
        """The trial's own keys of ``params`` (Tune's dict may hold more), validated."""
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return _trial_adapter().validate_python({k: v for k, v in params.items() if k in known})
        except ValidationError as exc:
            raise config_error(exc, "trial", cls) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def frozen_features(self) -> bool:
        """Whether this trial only trains a head on cached features."""
        spec = resolve_spec(self.backbone)
        return self.freeze_depth >= spec.max_freeze_depth and is_deterministic(self.augmentation)


@functools.cache
def _trial_adapter() -> TypeAdapter[TrialConfig]:
    return TypeAdapter(TrialConfig)


@dataclasses.dataclass(frozen=True)
class EpochResult:
    epoch: int
    metrics: dict[str, Any]
    improved: bool


Reporter = Callable[[dict[str, Any], "Path | None"], None]


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on GPU: bf16 where the card supports it, else fp16 (with a grad scaler); none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def select_device(use_gpu: bool, local_rank: int = 0) -> torch.device:
    """The device a worker trains on; asking for a GPU where there is none is an error, not a silent CPU run."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu=True but CUDA is not available on this worker")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    counts[counts == 0] = 1.0
    weights: np.ndarray = counts.sum() / (num_classes * counts)
    return weights


def resolve_class_balance(mode: str, labels: np.ndarray, num_classes: int) -> str:
    """``auto`` turns on a weighted loss when the largest class is over 3x the smallest."""
    if mode != "auto":
        return mode
    counts = np.bincount(labels, minlength=num_classes)
    return "weighted_loss" if counts.max() > 3 * max(1, counts.min()) else "off"


@functools.lru_cache(maxsize=4)
def _images(cache_path: str) -> Any:
    from automl_tl.data import Dataset

    return Dataset.open(Path(cache_path))


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
) -> EpochResult | None:
    """Train one trial to the end (max epochs or a plateau) and return its last epoch.

    ``use_feature_cache=False`` makes a frozen trial step through images anyway (for benchmarks);
    ``max_seconds`` ends training after the epoch that crosses it (a wall-clock budget).
    """
    started_at = time.perf_counter()
    reset_peak_rss()  # a reused trial actor: report this trial's own peak, not an earlier one's
    device = device or torch.device("cpu")
    seed_everything(cfg.seed + 1000 * rank)
    spec = resolve_spec(cfg.backbone)
    pre = Preprocessing.from_spec(spec, cfg.image_size)
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
    if feature_mode:
        from automl_tl.train.features import cached_features

        features = cached_features(data, cfg.backbone, pre, model)
        probe = cfg.optimizer == "lbfgs"  # the logistic-regression probe: the head fitted to convergence
        steps: _Steps = (_ProbeSteps if probe else _FeatureSteps)(
            model.head, features.train, data.labels[data.train_idx], features.val,
            data.labels[data.val_idx], cfg, weight, balance,
        )  # fmt: skip
        cache_note = "hit" if features.hit else "miss"
    else:
        if cfg.optimizer == "lbfgs" and cfg.pretrained and resume_dir is None:
            _probe_start(model, cfg.backbone, data, pre, weight)  # LP-FT: fine-tuning starts from a converged head
        steps = _ImageSteps(model, pre, cfg, data, weight, balance, device, rank, world_size)
        cache_note = "unused"

    optimizer = _make_optimizer(model, cfg)
    schedule = _cosine_schedule(optimizer, cfg.max_epochs * steps.steps_per_epoch())
    state: dict[str, Any] = {"epoch": 0, "best_score": None, "best_epoch": 0, "since_best": 0}
    if resume_dir is not None:
        state = _load_checkpoint(resume_dir, model, optimizer, schedule)
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
        train_loss, train_acc = _train_epoch(steps, model, optimizer, schedule, epoch)
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
                _write_best(out_dir, model, val_probs, cfg, data, epoch, scores, steps.accumulation, steps.notes())
        state["since_best"] = 0 if improved else int(state["since_best"]) + 1
        state["epoch"] = epoch
        plateau = int(state["since_best"]) >= cfg.plateau_patience
        stop_reason = "plateau" if plateau and epoch < cfg.max_epochs else ("max_epochs" if epoch == cfg.max_epochs else "")
        stop_reason = "converged" if steps.converged else stop_reason
        if not stop_reason and max_seconds is not None and time.perf_counter() - started_at >= max_seconds:
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
        }
        state["last_metrics"] = metrics  # a resume from this checkpoint knows whether the trial had ended
        with tempfile.TemporaryDirectory(prefix="automl_tl_ckpt_") as tmp:
            ckpt = Path(tmp) if rank == 0 else None
            if ckpt is not None:
                _save_checkpoint(ckpt, model, optimizer, schedule, state, cfg)
            report(metrics, ckpt)
        last = EpochResult(epoch, metrics, improved)
        if stop_reason:
            break
    return last


def _mib(size: int | None) -> int | None:
    return None if size is None else round(size / 2**20)


# --- the two ways a trial steps through an epoch ---------------------------------------------------------


def _train_epoch(steps: _Steps, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, epoch: int) -> tuple[float, float]:
    """One epoch, run again from its start in micro-batches half as large each time it runs out of memory
    (``automl_tl.train.oom``); the optimizer still steps once per configured batch."""
    start = EpochStart.take(model, optimizer, schedule, steps.step)
    while True:
        try:
            return steps.train_epoch(optimizer, schedule, epoch)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            halved = next_micro_batch(steps.cfg.batch_size, steps.accumulation)
            if halved is None:
                raise out_of_memory_error(exc, steps.cfg.batch_size, steps.accumulation, steps.device) from exc
        # Past the handler, the failed epoch's frames and the tensors they held are released.
        steps.accumulation, steps.step = halved, start.step
        start.restore(model, optimizer, schedule, steps.device)


class _Steps:
    cfg: TrialConfig
    device = torch.device("cpu")
    accumulation = 1  # micro-batches per optimizer step; doubled by each out-of-memory back-off
    step = 0  # optimizer steps taken in this trial
    converged = False  # True once the trial has nothing left to train (a probe after its fit)

    def notes(self) -> dict[str, Any]:
        """What the trial's ``trial.json`` should also record about how it trained."""
        return {}

    def micro_batch(self) -> int:
        return -(-self.cfg.batch_size // self.accumulation)

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def train_epoch(self, optimizer: torch.optim.Optimizer, schedule: Any, epoch: int) -> tuple[float, float]:
        raise NotImplementedError

    def val_probs(self) -> np.ndarray:
        raise NotImplementedError


def _loss(logits: torch.Tensor, targets: torch.Tensor, cfg: TrialConfig, weight: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, weight=weight, label_smoothing=cfg.label_smoothing)


def _epoch_order(n: int, labels: np.ndarray, balance: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if balance == "sampler":
        w = class_weights(labels, int(labels.max()) + 1)[labels]
        return rng.choice(n, size=n, replace=True, p=w / w.sum())
    return rng.permutation(n)


class _FeatureSteps(_Steps):
    """Head-only training on cached pooled features: the fast path of feature-extraction trials."""

    def __init__(
        self,
        head: nn.Module,
        train_x: torch.Tensor,
        train_labels: np.ndarray,
        val_x: torch.Tensor,
        val_labels: np.ndarray,
        cfg: TrialConfig,
        weight: torch.Tensor | None,
        balance: str,
    ) -> None:
        self.head = head
        self.train_x, self.val_x = train_x, val_x
        self.train_y = torch.from_numpy(np.asarray(train_labels)).long()
        self.val_labels = val_labels
        self.cfg, self.weight, self.balance = cfg, weight, balance

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_x) / self.cfg.batch_size)

    def train_epoch(self, optimizer: torch.optim.Optimizer, schedule: Any, epoch: int) -> tuple[float, float]:
        self.head.train()
        order = _epoch_order(len(self.train_x), self.train_y.numpy(), self.balance, self.cfg.seed * 7919 + epoch)
        total, correct, count = 0.0, 0, 0
        for start in range(0, len(order), self.cfg.batch_size):
            idx = torch.from_numpy(order[start : start + self.cfg.batch_size])
            x, y = self.train_x[idx], self.train_y[idx]
            optimizer.zero_grad(set_to_none=True)
            for xs, ys in zip(x.split(self.micro_batch()), y.split(self.micro_batch())):
                maybe_inject_oom(self.step + 1, len(ys))
                logits = self.head(xs)
                loss = _loss(logits, ys, self.cfg, self.weight)
                (loss * (len(ys) / len(y))).backward()  # the micro-batches' gradients add up to the batch's
                total += loss.item() * len(ys)
                correct += int((logits.argmax(1) == ys).sum())
                count += len(ys)
            optimizer.step()
            schedule.step()
            self.step += 1
        return total / count, correct / count

    @torch.inference_mode()
    def val_probs(self) -> np.ndarray:
        self.head.eval()
        probs: np.ndarray = torch.softmax(self.head(self.val_x).float(), dim=1).numpy()
        return probs


class _ProbeSteps(_FeatureSteps):
    """The logistic-regression probe: one "epoch" fits the head to convergence on the cached features."""

    l2: float | None = None

    def train_epoch(self, optimizer: torch.optim.Optimizer, schedule: Any, epoch: int) -> tuple[float, float]:
        from automl_tl.train.probe import fit_probe, head_probs

        val_y = self.val_labels
        fit = fit_probe(self.head, self.train_x, self.train_y, self.val_x, val_y, self.weight)
        self.l2, self.converged = fit.l2, True
        probs = head_probs(self.head, self.train_x)
        y = self.train_y.numpy()
        return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()), float(np.mean(probs.argmax(1) == y))

    def notes(self) -> dict[str, Any]:
        return {"probe_l2": self.l2}


def _probe_start(model: TransferNet, backbone: str, data: TrialData, pre: Preprocessing, weight: torch.Tensor | None) -> None:
    """Fit ``model``'s head as the probe on its frozen pretrained features (computed once, shared)."""
    from automl_tl.train.features import cached_features
    from automl_tl.train.probe import fit_probe

    features = cached_features(data, backbone, pre, model)
    train_y = torch.from_numpy(data.labels[data.train_idx]).long()
    fit_probe(model.head, features.train, train_y, features.val, data.labels[data.val_idx], weight)


class _ImageSteps(_Steps):
    """Full training on images from the decoded cache, with augmentation, AMP and DDP where available."""

    def __init__(
        self,
        model: TransferNet,
        pre: Preprocessing,
        cfg: TrialConfig,
        data: TrialData,
        weight: torch.Tensor | None,
        balance: str,
        device: torch.device,
        rank: int,
        world_size: int,
    ) -> None:
        self.images = _images(data.cache_path)
        self.cfg, self.data, self.balance, self.device = cfg, data, balance, device
        self.rank, self.world_size = rank, world_size
        self.weight = weight.to(device) if weight is not None else None
        self.amp = amp_dtype(device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.memory_format = memory_format_for(device)
        self.model = model.to(device).to(memory_format=self.memory_format)
        self.train_model: nn.Module = self.model
        if world_size > 1:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.augment = train_transform(cfg.augmentation, pre)
        self.mixer = batch_mixer(cfg.augmentation, len(data.class_names))
        self.eval_tf = train_transform("none", pre)
        self._val: torch.Tensor | None = None

    def steps_per_epoch(self) -> int:
        per_rank = math.ceil(len(self.data.train_idx) / self.world_size)
        return math.ceil(per_rank / self.cfg.batch_size)

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        train_idx = self.data.train_idx
        order = _epoch_order(len(train_idx), self.data.labels[train_idx], self.balance, self.cfg.seed * 7919 + epoch)
        mine = order[self.rank :: self.world_size]  # every rank sees its own share of the same permutation
        for start in range(0, len(mine), self.cfg.batch_size):
            rows = train_idx[mine[start : start + self.cfg.batch_size]]
            x = torch.stack([self.augment(array_to_tensor(self.images.image(int(i)))) for i in rows])
            y = torch.from_numpy(self.data.labels[rows]).long()
            yield x, y

    def train_epoch(self, optimizer: torch.optim.Optimizer, schedule: Any, epoch: int) -> tuple[float, float]:
        self.train_model.train()
        total, correct, count = 0.0, 0, 0
        for x, y in self._batches(epoch):
            targets: torch.Tensor = y
            if self.mixer is not None and len(y) > 1:
                x, targets = self.mixer(x, y)
            optimizer.zero_grad(set_to_none=True)
            size = self.micro_batch()
            for xs, ts, ys in zip(x.split(size), targets.split(size), y.split(size)):
                maybe_inject_oom(self.step + 1, len(ys))
                xs = xs.to(self.device, memory_format=self.memory_format, non_blocking=True)
                ts, ys = ts.to(self.device), ys.to(self.device)
                with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    logits = self.train_model(xs)
                loss = _loss(logits, ts, self.cfg, self.weight)
                share = loss * (len(ys) / len(y))  # the micro-batches' gradients add up to the batch's
                if self.scaler is not None:
                    self.scaler.scale(share).backward()
                else:
                    share.backward()
                total += loss.item() * len(ys)
                correct += int((logits.argmax(1) == ys).sum())
                count += len(ys)
            if self.scaler is not None:
                self.scaler.step(optimizer)
                self.scaler.update()
            else:
                optimizer.step()
            schedule.step()
            self.step += 1
        return total / max(count, 1), correct / max(count, 1)

    @torch.inference_mode()
    def val_probs(self) -> np.ndarray:
        if self._val is None:  # the evaluation transform is fixed: build the validation tensor once
            self._val = torch.stack([self.eval_tf(array_to_tensor(self.images.image(int(i)))) for i in self.data.val_idx])
        self.model.eval()
        out = []
        step = self.micro_batch()  # the training micro-batch: it fits
        for start in range(0, len(self._val), step):
            x = self._val[start : start + step].to(self.device, memory_format=self.memory_format)
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                out.append(torch.softmax(self.model(x).float(), dim=1).cpu())
        probs: np.ndarray = torch.cat(out).numpy()
        return probs


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
    steps = _FeatureSteps(head, x, labels, x[:0], labels[:0], cfg, weight, balance)
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


def _flat_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as named tensors (for safetensors) plus JSON scalars: no pickles in checkpoints."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars["state"].setdefault(str(pid), {})[key] = value
    return tensors, scalars


def _save_checkpoint(path: Path, model: TransferNet, optimizer: torch.optim.Optimizer, schedule: Any, state: dict[str, Any], cfg: TrialConfig) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    tensors, scalars = _flat_optimizer_state(optimizer)
    save_file(tensors, str(path / "optimizer.safetensors"))
    meta = {"state": state, "optimizer": scalars, "schedule": schedule.state_dict(), "trial": cfg.to_dict()}
    (path / "state.json").write_text(json.dumps(meta, default=_json_default), encoding="utf-8")


def _load_checkpoint(path: Path, model: TransferNet, optimizer: torch.optim.Optimizer, schedule: Any) -> dict[str, Any]:
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta["optimizer"]["state"].items():
        state.setdefault(int(pid), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    schedule.load_state_dict(meta["schedule"])
    resumed: dict[str, Any] = meta["state"]
    return resumed


def _write_best(
    out_dir: Path, model: TransferNet, val_probs: np.ndarray, cfg: TrialConfig, data: TrialData, epoch: int,
    scores: dict[str, float], accumulation_steps: int = 1, notes: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as partial:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(partial))
    np.save(out_dir / "val_probs.npy", val_probs.astype(np.float32))
    spec = resolve_spec(cfg.backbone)
    info = {
        **cfg.to_dict(),
        "num_classes": len(data.class_names),
        "class_names": list(data.class_names),
        "preprocessing": Preprocessing.from_spec(spec, cfg.image_size).to_dict(),
        "spec": spec.to_dict(),
        "best_epoch": epoch,
        "val_metrics": scores,
        "accumulation_steps": accumulation_steps,  # above 1: trained in micro-batches after running out of memory
        "data_id": data.data_id,
        **(notes or {}),
    }
    write_atomic(out_dir / "trial.json", json.dumps(info, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
