"""Out-of-memory back-off: a trial that runs out of memory retries the epoch in half-size micro-batches (the
effective batch kept by gradient accumulation) and records it; below the floor it fails naming the memory.

The error is injected at a chosen optimizer step (``AUTOML_TL_INJECT_OOM``), on CPU; it is CUDA's own error
type, so the GPU takes the same path.

    .venv/bin/python -m pytest -q tests/test_oom.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from automl_tl.config import load_config
from automl_tl.errors import SearchError
from automl_tl.runs.rundir import RunDir
from automl_tl.train.loop import TrialConfig, TrialData, train_trial
from automl_tl.train.oom import MIN_MICRO_BATCH, OOM_ENV, is_out_of_memory, next_micro_batch

BATCH = 32


@pytest.fixture(scope="module")
def data(hymenoptera_dir: Path, data_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrialData:
    from automl_tl.sweep.driver import prepare_data

    config = load_config({"data": {"source": str(hymenoptera_dir / "train"), "cache_dir": str(data_cache_dir)}})
    run = tmp_path_factory.mktemp("run")
    return prepare_data(config, RunDir(run), None, progress=False)


def _cfg(**change: Any) -> TrialConfig:
    params = {"backbone": "mobilenetv2_100", "freeze_depth": 6, "learning_rate": 3e-3, "backbone_lr_ratio": 0.1,
              "augmentation": "none", "optimizer": "adamw", "weight_decay": 1e-4, "label_smoothing": 0.0,
              "batch_size": BATCH, "max_epochs": 2, "head": "linear", "head_dropout": 0.0, "image_size": 64}  # fmt: skip
    return TrialConfig.from_params({**params, **change})


def test_what_counts_as_out_of_memory() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes. Error code 12 (Cannot allocate memory) out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert next_micro_batch(32, 1) == 2 and next_micro_batch(32, 8) == 16
    assert next_micro_batch(2 * MIN_MICRO_BATCH, 2) is None  # halving again would go below the floor


@pytest.mark.parametrize("frozen", [False, True], ids=["images", "cached-features"])
def test_a_trial_out_of_memory_finishes_at_half_batch_and_says_so(
    data: TrialData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frozen: bool
) -> None:
    monkeypatch.setenv(OOM_ENV, f"2:{BATCH // 2}")  # from the 2nd step on, any micro-batch over 16 images
    reported: list[dict[str, Any]] = []
    cfg = _cfg(freeze_depth=8) if frozen else _cfg()
    assert cfg.frozen_features == frozen
    last = train_trial(cfg, data, lambda metrics, ckpt: reported.append(metrics), tmp_path / "out")
    assert last is not None and last.epoch == 2  # both epochs ran to the end
    assert [m["accumulation_steps"] for m in reported] == [2, 2]
    assert [m["micro_batch_size"] for m in reported] == [BATCH // 2] * 2
    assert all(m["train_loss"] == m["train_loss"] for m in reported)  # finite, trained
    trial = json.loads((tmp_path / "out" / "trial.json").read_text())
    assert trial["accumulation_steps"] == 2 and trial["batch_size"] == BATCH  # the effective batch is kept


def test_without_the_error_nothing_backs_off(data: TrialData, tmp_path: Path) -> None:
    reported: list[dict[str, Any]] = []
    train_trial(_cfg(max_epochs=1), data, lambda metrics, ckpt: reported.append(metrics), tmp_path / "out")
    assert reported[-1]["accumulation_steps"] == 1 and reported[-1]["micro_batch_size"] == BATCH


def test_below_the_floor_the_trial_fails_naming_the_memory(
    data: TrialData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(OOM_ENV, "1:0")  # every micro-batch runs out of memory
    with pytest.raises(SearchError) as info:
        train_trial(_cfg(max_epochs=1), data, lambda metrics, ckpt: None, tmp_path / "out")
    message = str(info.value)
    assert f"micro-batches of {MIN_MICRO_BATCH} images" in message and f"batch_size {BATCH}" in message
    assert "ran out of host memory" in message and " MiB it had reached" in message
