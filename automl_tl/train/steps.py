"""How a trial steps through an epoch: on cached features (a head, or the probe) or on images (with
augmentation, AMP and DDP), in micro-batches after running out of memory."""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automl_tl.train.oom import EpochStart, is_out_of_memory, maybe_inject_oom, next_micro_batch, out_of_memory_error
from automl_tl.train.trial_data import TrialData
from automl_tl.train.augment import array_to_tensor, batch_mixer, train_transform
from automl_tl.backbones import TransferNet, memory_format_for
from automl_tl.inference.transforms import Preprocessing
from automl_tl.train.trial_config import TrialConfig

__all__ = ["FeatureSteps", "ImageSteps", "ProbeSteps", "Steps", "amp_dtype", "class_weights", "epoch_order",
           "probe_start", "resolve_class_balance", "select_device", "seed_everything", "train_epoch_with_backoff"]


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
def cached_images(cache_path: str) -> Any:
    from automl_tl.data import Dataset

    return Dataset.open(Path(cache_path))


# --- the two ways a trial steps through an epoch ---------------------------------------------------------


def train_epoch_with_backoff(steps: Steps, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, epoch: int) -> tuple[float, float]:
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


class Steps:
    cfg: TrialConfig
    device = torch.device("cpu")
    accumulation = 1  # micro-batches per optimizer step; doubled by each out-of-memory back-off
    step = 0  # optimizer steps taken in this trial
    converged = False  # True once the trial has nothing left to train (a probe after its fit)
    deadline: float | None = None  # wall clock (time.time()) past which an epoch takes no further batch
    cut_short = False  # True once an epoch ended early at the deadline

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


def epoch_order(n: int, labels: np.ndarray, balance: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if balance == "sampler":
        w = class_weights(labels, int(labels.max()) + 1)[labels]
        return rng.choice(n, size=n, replace=True, p=w / w.sum())
    return rng.permutation(n)


class FeatureSteps(Steps):
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
        order = epoch_order(len(self.train_x), self.train_y.numpy(), self.balance, self.cfg.seed * 7919 + epoch)
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


class ProbeSteps(FeatureSteps):
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


def probe_start(model: TransferNet, backbone: str, data: TrialData, pre: Preprocessing, weight: torch.Tensor | None) -> None:
    """Fit ``model``'s head as the probe on its frozen pretrained features (computed once, shared)."""
    from automl_tl.train.features import cached_features
    from automl_tl.train.probe import fit_probe

    features = cached_features(data, backbone, pre, model)
    train_y = torch.from_numpy(data.labels[data.train_idx]).long()
    fit_probe(model.head, features.train, train_y, features.val, data.labels[data.val_idx], weight)


class ImageSteps(Steps):
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
        self.images = cached_images(data.cache_path)
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
        order = epoch_order(len(train_idx), self.data.labels[train_idx], self.balance, self.cfg.seed * 7919 + epoch)
        mine = order[self.rank :: self.world_size]  # every rank sees its own share of the same permutation
        if self.data.shards is not None:  # stream mode: this share, read shard by shard in a seeded order
            from automl_tl.train.trial_data import stream_batches

            rows = train_idx[mine]
            yield from stream_batches(self.data.shards, self.images.file_rows(rows), self.data.labels[rows],
                                      self.cfg.batch_size, self.cfg.seed * 7919 + epoch, self.augment)  # fmt: skip
            return
        for start in range(0, len(mine), self.cfg.batch_size):
            if start > 0 and self._past_deadline():
                self.cut_short = True  # the sweep's budget is spent: evaluate what this epoch has trained
                return
            rows = train_idx[mine[start : start + self.cfg.batch_size]]
            if len(rows) == 1 and start > 0:
                continue  # a norm over pooled features (MobileNetV4, HGNetV2 heads) needs two values per channel
            x = torch.stack([self.augment(array_to_tensor(self.images.image(int(i)))) for i in rows])
            y = torch.from_numpy(self.data.labels[rows]).long()
            yield x, y

    def _past_deadline(self) -> bool:
        """Whether the deadline has passed; never with several ranks, which must all take the same batches."""
        return self.deadline is not None and self.world_size == 1 and time.time() >= self.deadline

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
