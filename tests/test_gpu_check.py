"""The GPU code path, checked without a GPU: device placement, AMP dtype and memory layout, the DDP trainer a
GPU trial builds, and the plan of ``benchmarks/gpu_check.py`` (which itself runs on a CUDA machine only)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from automl_tl.config import load_config
from automl_tl.train.loop import TrialConfig, amp_dtype, memory_format_for, select_device
from automl_tl.train.trial_data import TrialData

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int = 2, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_device_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_device(False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="use_gpu=True but CUDA is not available"):
        select_device(True)  # never a silent CPU run when a GPU was asked for
    _fake_cuda(monkeypatch, count=2)
    assert select_device(True) == torch.device("cuda", 0)
    assert select_device(True, local_rank=3) == torch.device("cuda", 1)  # local ranks wrap over visible GPUs


def test_amp_dtype_and_memory_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_dtype(cpu) is None and memory_format_for(cpu) == torch.channels_last
    _fake_cuda(monkeypatch, bf16=True)
    assert amp_dtype(gpu) == torch.bfloat16  # Ampere and later: no grad scaler needed
    _fake_cuda(monkeypatch, bf16=False)
    assert amp_dtype(gpu) == torch.float16  # older cards: fp16, which the loop pairs with a GradScaler
    assert memory_format_for(gpu) == torch.channels_last


def test_a_gpu_trial_builds_ddp_over_every_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ray.train.torch
    import ray.tune.integration.ray_train

    from automl_tl.sweep import trial as trainable

    built: dict[str, Any] = {}

    class FakeTrainer:
        def __init__(self, loop: Any, **kwargs: Any) -> None:
            built.update(kwargs, loop=loop)

        def fit(self) -> None:
            built["fitted"] = True

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    class FakeReport(ray.train.UserCallback):  # the real one needs a Tune session
        pass

    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback", FakeReport)
    config = load_config({"resources": {"workers_per_trial": 4, "gpus_per_trial": 4, "cpus_per_worker": 6}})
    res = config.resources
    assert res.engine() == "train" and res.use_gpu
    setup = trainable.TrialSetup(str(tmp_path), res.engine(), res)
    cfg = TrialConfig.from_params({"backbone": "mobilenetv2_100", "freeze_depth": 0, "learning_rate": 1e-3,
                                   "backbone_lr_ratio": 0.1, "augmentation": "light", "optimizer": "adamw",
                                   "weight_decay": 1e-4, "label_smoothing": 0.0, "batch_size": 64, "max_epochs": 2,
                                   "head": "linear", "head_dropout": 0.0})  # fmt: skip
    data = TrialData("/nowhere.arrow", "k", ("a", "b"), np.arange(4), np.arange(2), np.zeros(6, np.int64), "/f")
    trainable._run_with_ray_train(cfg, data, setup, tmp_path / "trials" / "t1", "t1")
    scaling = built["scaling_config"]
    assert built["fitted"] and scaling.num_workers == 4 and scaling.use_gpu
    # One GPU per DDP worker, and host memory for the process and the validation tensor only: on a GPU the
    # activations live in device memory (1 GiB + 1.25 x 2 images at 160 px, rounded up to 1.5 GiB).
    assert scaling.resources_per_worker == {"CPU": 6.0, "GPU": 1.0, "memory": 1.5 * 2**30}
    assert built["train_loop_config"]["use_gpu"] is True and built["train_loop_config"]["trial_id"] == "t1"
    assert built["run_config"].failure_config.max_failures == res.max_failures  # retries resume from checkpoints


def test_gpu_check_plans_one_ddp_sweep_per_backbone() -> None:
    gpu_check = _gpu_check()
    plans = gpu_check.plan_checks(["mobilenetv2_100", "tf_efficientnet_lite0"], 4, "builtin:animal-shapes", "/tmp/c",
                                  epochs=3, batch_size=64, image_size=None, cpus=32)  # fmt: skip
    assert [p.backbone for p in plans] == ["mobilenetv2_100", "tf_efficientnet_lite0"]
    for plan in plans:
        res, space = plan.config.resources, plan.config.space
        assert res.engine() == "train" and res.use_gpu and res.workers_per_trial == 4 and res.gpus_per_trial == 4
        assert res.cpus_per_worker == 7 and space.freeze_depths == (0,) and space.max_epochs == 3
        assert plan.config.search.num_samples == 1 and space.backbones == (plan.backbone,)
    assert gpu_check.images_per_s_per_gpu(1000, 2.0, 4) == 125.0
    with pytest.raises(ValueError, match="gpus must be >= 1"):
        gpu_check.plan_checks(["mobilenetv2_100"], 0, "x", "/tmp/c", 1, 8, None, 2)


def test_gpu_check_on_a_machine_without_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = _gpu_check()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run benchmarks/gpu_check.py itself")
    before = os.environ.get("AUTOML_TL_WEIGHTS_DIR")
    assert gpu_check.main(["--dry-run", "--backbones", "mobilenetv2_100"]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv2_100: 1 DDP worker(s), 1 GPU(s)" in out
    # The current backbone passed the sweep's pre-flight on the random-init file its dry run wrote
    current = next(line for line in out.splitlines() if line.startswith(gpu_check.CURRENT_BACKBONE + ":"))
    assert "1 DDP worker(s), 1 GPU(s)" in current and "weights: local file" in current
    assert current.endswith("/weights/eva02_tiny_patch14_224.mim_in22k.safetensors"), current
    assert os.environ.get("AUTOML_TL_WEIGHTS_DIR") == before  # set for that check alone
    assert gpu_check.main(["--backbones", "mobilenetv2_100"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().out
