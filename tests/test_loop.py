"""One trial's training loop against the sweep's deadline: the budget is the limit.

    .venv/bin/python -m pytest -q tests/test_loop.py
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from automl_tl.backbones import create_backbone, resolve_spec
from automl_tl.inference.transforms import Preprocessing
from automl_tl.train.loop import TrialConfig, TrialData, train_trial
from automl_tl.train.steps import ImageSteps

from .test_oom import _cfg as _oom_cfg
from .test_oom import data  # noqa: F401  (the module's fixture: hymenoptera's train split, decoded once)


def _few(data: TrialData) -> TrialData:
    """Three batches of training images and a few validation images: epochs of a second or two."""
    return dataclasses.replace(data, train_idx=data.train_idx[::4][:48], val_idx=data.val_idx[:8])


def _cfg(**change: Any) -> TrialConfig:
    return _oom_cfg(**{"batch_size": 16, "max_epochs": 3, **change})


def test_a_feature_scale_enlarges_the_input_of_frozen_extractors_only() -> None:
    native = resolve_spec("tf_efficientnet_lite0").input_size
    frozen = _cfg(backbone="tf_efficientnet_lite0", freeze_depth=8, image_size=None, feature_scale=1.25)
    assert frozen.frozen_features and frozen.preprocessing().input_size == 16 * round(native * 1.25 / 16) > native
    assert _cfg(backbone="tf_efficientnet_lite0", freeze_depth=8, image_size=None).preprocessing().input_size == native
    tuned = _cfg(backbone="tf_efficientnet_lite0", freeze_depth=4, image_size=None, feature_scale=1.25)
    assert tuned.preprocessing().input_size == native  # a backbone that trains keeps its size
    augmented = _cfg(backbone="tf_efficientnet_lite0", freeze_depth=8, augmentation="light", feature_scale=1.25)
    assert augmented.preprocessing().input_size == 64


def test_a_trial_that_starts_past_the_deadline_trains_nothing(data: TrialData, tmp_path: Path) -> None:
    reported: list[dict[str, Any]] = []
    last = train_trial(_cfg(), data, lambda m, c: reported.append(m), tmp_path / "out", deadline=time.time() - 1)
    assert last is None and reported == []
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_an_epoch_reaching_the_deadline_takes_no_further_batch(data: TrialData) -> None:
    cfg, data = _cfg(), _few(data)
    spec = resolve_spec(cfg.backbone)
    pre = Preprocessing.from_spec(spec, cfg.image_size)
    model = create_backbone(cfg.backbone, num_classes=len(data.class_names), pretrained=False,
                            freeze_depth=cfg.freeze_depth, image_size=pre.input_size)  # fmt: skip
    steps = ImageSteps(model, pre, cfg, data, None, "off", torch.device("cpu"), 0, 1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    steps.train_epoch(optimizer, schedule, 1)
    assert steps.step == steps.steps_per_epoch() > 1 and not steps.cut_short  # no deadline: the whole epoch
    steps.deadline = time.time() - 1
    steps.train_epoch(optimizer, schedule, 2)
    assert steps.cut_short and steps.step == steps.steps_per_epoch() + 1  # one batch, then the deadline


def test_a_trial_ends_at_the_deadline_with_its_last_epoch_evaluated(data: TrialData, tmp_path: Path) -> None:
    reported: list[dict[str, Any]] = []
    deadline = time.time() + 6.0  # past model building; the trial alone would run 200 epochs
    cfg = _cfg(max_epochs=200, plateau_patience=200)
    last = train_trial(cfg, _few(data), lambda m, c: reported.append(m), tmp_path / "out", deadline=deadline)
    assert time.time() < deadline + 5.0  # one batch and one evaluation past it, at most
    assert last is not None and reported[-1]["stop_reason"] == "time_budget" and 1 <= last.epoch < 200
    assert (tmp_path / "out" / "model.safetensors").is_file()  # its best epoch is a usable model
