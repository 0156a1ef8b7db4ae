"""Out-of-memory back-off: an epoch that runs out of GPU or host memory runs again in smaller micro-batches.

The optimizer still steps once per configured batch: each batch is split into ``accumulation`` micro-batches
whose gradients add up (each loss weighted by its share of the batch), so the effective batch, and with it
the learning-rate schedule, stays what the search chose. Each retry halves the micro-batch, down to
:data:`MIN_MICRO_BATCH`; below it the trial fails with :class:`~automl_tl.errors.SearchError` naming the
memory it reached. The retried epoch starts from the weights, optimizer and schedule it started from.

Test hook: ``AUTOML_TL_INJECT_OOM=STEP:MICRO`` raises ``torch.cuda.OutOfMemoryError`` (on any device) in
every micro-batch of more than MICRO images from the trial's optimizer step STEP on (1-based)::

    AUTOML_TL_INJECT_OOM=2:16 .venv/bin/python -m pytest -q tests/test_oom.py
"""

from __future__ import annotations

import copy
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch

from automl_tl.errors import SearchError
from automl_tl.train.memory import peak_rss_bytes

__all__ = ["MIN_MICRO_BATCH", "OOM_ENV", "EpochStart", "is_out_of_memory", "maybe_inject_oom", "out_of_memory_error"]

OOM_ENV = "AUTOML_TL_INJECT_OOM"
MIN_MICRO_BATCH = 2  # BatchNorm in training mode needs two samples per batch


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error, Python's MemoryError, or a RuntimeError an allocator raised for the same."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _injection() -> tuple[int, int] | None:
    value = os.environ.get(OOM_ENV, "")
    if not value:
        return None
    step, _, micro = value.partition(":")
    return int(step), int(micro or 0)


def maybe_inject_oom(step: int, micro_batch: int) -> None:
    """Raise the injected out-of-memory error at optimizer ``step`` (1-based) if :data:`OOM_ENV` asks."""
    spec = _injection()
    if spec is not None and step >= spec[0] and micro_batch > spec[1]:
        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory (injected by {OOM_ENV}={os.environ[OOM_ENV]} at step {step}, micro-batch {micro_batch})"
        )


def next_micro_batch(batch_size: int, accumulation: int) -> int | None:
    """The accumulation that halves the micro-batch, or None when that would go below the floor."""
    current = -(-batch_size // accumulation)
    if current // 2 < MIN_MICRO_BATCH:
        return None
    return accumulation * 2


def _peak_mib(device: torch.device) -> int:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20)
    return round((peak_rss_bytes() or 0) / 2**20)


def out_of_memory_error(exc: BaseException, batch_size: int, accumulation: int, device: torch.device) -> SearchError:
    """The trial's end when even the smallest micro-batch does not fit: what it tried and what it reached."""
    where = "GPU" if device.type == "cuda" else "host"
    micro = -(-batch_size // accumulation)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return SearchError(
        f"the trial ran out of {where} memory even in micro-batches of {micro} images (batch_size {batch_size} "
        f"as {accumulation} accumulated steps; {MIN_MICRO_BATCH} is the floor): it needed more than the "
        f"{_peak_mib(device)} MiB it had reached ({first_line}). Lower the image size or batch_sizes, freeze "
        "more of the backbone, or give each trial more memory"
    )


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


@dataclass
class EpochStart:
    """The model, optimizer and schedule as an epoch found them (on the host), to run the epoch again."""

    model: dict[str, Any]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    step: int

    @classmethod
    def take(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, step: int) -> EpochStart:
        return cls(_to_cpu(model.state_dict()), _to_cpu(optimizer.state_dict()), copy.deepcopy(schedule.state_dict()), step)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, device: torch.device) -> None:
        gc.collect()  # the failed epoch's activations, before loading anything back
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        schedule.load_state_dict(self.schedule)
