"""Typed, frozen configuration, loaded from YAML once at the edge and validated there.

A config file has up to four sections; every key is optional and has a documented default::

    data:       {source: builtin:animal-shapes, val_fraction: 0.15, test_fraction: 0.15, seed: 0}
    space:      {backbones: [tf_efficientnet_lite0, mobilenetv2_100], learning_rate: {low: 1.0e-4, high: 3.0e-2}}
    search:     {time_budget_s: 600, scheduler: asha, metric: val_accuracy}
    resources:  {workers_per_trial: 1, gpus_per_trial: 0}

Run ``automl-tl config --show`` to print the full default config.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from automl_tl._validate import bounded, build_dataclass, coerce, to_plain
from automl_tl.errors import ConfigError

__all__ = [
    "FloatRange",
    "DataConfig",
    "SearchSpaceConfig",
    "SearchConfig",
    "ResourcesConfig",
    "ExperimentConfig",
    "load_config",
    "config_to_dict",
    "AUGMENTATIONS",
    "OPTIMIZERS",
    "HEADS",
]

Augmentation = Literal["none", "light", "medium", "heavy"]
# "lbfgs": the head is first fitted to convergence on frozen features (a logistic-regression probe, its L2
# strength chosen on validation); a trial that trains more than the head then goes on with AdamW (LP-FT).
Optimizer = Literal["adamw", "sgd", "lbfgs"]
Head = Literal["linear", "mlp"]
AUGMENTATIONS: tuple[str, ...] = ("none", "light", "medium", "heavy")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "lbfgs")
HEADS: tuple[str, ...] = ("linear", "mlp")
DEFAULT_TRIALS = 12  # the cap of a sweep that has neither num_samples nor a time budget


@dataclasses.dataclass(frozen=True)
class FloatRange:
    """A numeric search dimension: ``low == high`` fixes it; ``log`` samples log-uniformly.

    In YAML: a number (fixed), ``[low, high]``, or ``{low: .., high: .., log: true}``.
    """

    low: float
    high: float
    log: bool = False

    @classmethod
    def from_config(cls, raw: Any, where: str) -> FloatRange:
        if isinstance(raw, (int, float, str)) and not isinstance(raw, bool):
            value = coerce(float, raw, where)
            return cls._checked(value, value, False, where)
        if isinstance(raw, (list, tuple)):
            low, high = coerce(tuple[float, float], raw, where)
            return cls._checked(low, high, False, where)
        if isinstance(raw, Mapping):
            built = build_dataclass(cls, raw, where)
            return cls._checked(built.low, built.high, built.log, where)
        raise ConfigError(f"{where}: expected a number, [low, high] or {{low, high, log}}, got {raw!r}")

    @classmethod
    def _checked(cls, low: float, high: float, log: bool, where: str) -> FloatRange:
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ConfigError(f"{where}: bounds must be finite, got low={low}, high={high}")
        if low > high:
            raise ConfigError(f"{where}: low <= high must hold, but got low={low} and high={high}")
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0, got low={low}")
        return cls(low, high, log)

    @property
    def fixed(self) -> bool:
        return self.low == self.high


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split and cached."""

    source: str = "builtin:animal-shapes"
    test_source: str | None = None
    val_fraction: float = bounded(0.15, gt=0.0, lt=1.0)
    test_fraction: float = bounded(0.15, ge=0.0, lt=1.0)
    seed: int = bounded(0, ge=0)
    cache_max_side: int = bounded(320, ge=16, le=4096)
    max_image_pixels: int = bounded(89_478_485, ge=1)
    max_unreadable_fraction: float = bounded(0.2, ge=0.0, le=1.0)
    cache_dir: str | None = None
    # Identical files keep one copy per class; identical files under different classes are left out.
    drop_duplicates: bool = True
    # Threads decoding images on the first pass; None means one per CPU.
    decode_workers: int | None = bounded(None, ge=1, le=256)

    def __post_init__(self) -> None:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ConfigError(
                "data: val_fraction + test_fraction must be < 0.9 to leave images to train on, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )


@dataclasses.dataclass(frozen=True)
class SearchSpaceConfig:
    """Every dimension the sweep searches. A list is a categorical choice; one value fixes it."""

    backbones: tuple[str, ...] = bounded(("tf_efficientnet_lite0", "mobilenetv2_100"), min_len=1)
    # Freeze depths to try; empty means every valid value of each backbone (0 .. its stage count).
    freeze_depths: tuple[int, ...] = bounded((), ge=0)
    learning_rate: FloatRange = FloatRange(1e-4, 3e-2, log=True)
    # Pretrained layers learn at learning_rate * backbone_lr_ratio: smaller than the new head's rate.
    backbone_lr_ratio: FloatRange = FloatRange(0.01, 0.5, log=True)
    augmentations: tuple[Augmentation, ...] = bounded(("none", "light", "medium", "heavy"), min_len=1)
    optimizers: tuple[Optimizer, ...] = bounded(("adamw", "sgd", "lbfgs"), min_len=1)
    weight_decay: FloatRange = FloatRange(1e-6, 1e-2, log=True)
    label_smoothing: FloatRange = FloatRange(0.0, 0.2)
    batch_sizes: tuple[int, ...] = bounded((16, 32, 64), ge=1, min_len=1)
    max_epochs: int = bounded(8, ge=1, le=1000)
    # Image sizes to try; empty means each backbone's native size.
    image_sizes: tuple[int, ...] = bounded((), ge=16, le=1024)
    heads: tuple[Head, ...] = bounded(("linear", "mlp"), min_len=1)
    mlp_dropout: FloatRange = FloatRange(0.0, 0.5)

    def __post_init__(self) -> None:
        for name in ("learning_rate", "backbone_lr_ratio", "weight_decay"):
            rng: FloatRange = getattr(self, name)
            if rng.low <= 0:
                raise ConfigError(f"space.{name}: must be > 0, got low={rng.low}")
        if self.backbone_lr_ratio.high > 1.0:
            raise ConfigError(
                f"space.backbone_lr_ratio: must be <= 1 (pretrained layers learn no faster than the head), "
                f"got high={self.backbone_lr_ratio.high}"
            )
        if self.label_smoothing.low < 0 or self.label_smoothing.high >= 1:
            raise ConfigError(
                f"space.label_smoothing: must lie in [0, 1), got [{self.label_smoothing.low}, "
                f"{self.label_smoothing.high}]"
            )
        if self.mlp_dropout.low < 0 or self.mlp_dropout.high >= 1:
            raise ConfigError(
                f"space.mlp_dropout: must lie in [0, 1), got [{self.mlp_dropout.low}, {self.mlp_dropout.high}]"
            )


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How the sweep proposes, schedules and stops trials."""

    algorithm: Literal["tpe", "random"] = "tpe"
    scheduler: Literal["asha", "hyperband", "pbt", "none"] = "asha"
    metric: Literal["val_accuracy", "val_macro_f1", "val_log_loss"] = "val_accuracy"
    # Trials to run at most. None: as many as the time budget allows (DEFAULT_TRIALS when there is no budget).
    num_samples: int | None = bounded(None, ge=1, le=100_000)
    max_concurrent_trials: int | None = bounded(None, ge=1)
    time_budget_s: float | None = bounded(600.0, gt=0)
    seed: int = bounded(0, ge=0)
    grace_period_epochs: int = bounded(1, ge=1)
    plateau_patience_epochs: int = bounded(3, ge=1)
    ensemble_size: int = bounded(3, ge=1, le=50)
    ensemble_method: Literal["top_k", "greedy"] = "greedy"
    # Class imbalance: "auto" weights the loss when the largest class is over 3x the smallest.
    class_balance: Literal["auto", "weighted_loss", "sampler", "off"] = "auto"
    # Start with one frozen-feature-extractor trial per backbone (cheap through the feature cache), then search.
    frozen_first: bool = True
    # A validation split of fewer images than this is too small to choose on: heads on cached features are
    # then ranked, and the ensemble chosen, on cv_folds-fold cross-validated predictions over train + val.
    cv_below_images: int = bounded(500, ge=0)
    cv_folds: int = bounded(5, ge=2, le=20)

    def max_trials(self) -> int | None:
        """The trial cap: ``num_samples`` when given; none when a time budget bounds the sweep, else DEFAULT_TRIALS."""
        if self.num_samples is not None:
            return self.num_samples
        return None if self.time_budget_s is not None else DEFAULT_TRIALS


@dataclasses.dataclass(frozen=True)
class ResourcesConfig:
    """What each trial asks of the Ray cluster."""

    workers_per_trial: int = bounded(1, ge=1, le=1024)
    gpus_per_trial: float = bounded(0.0, ge=0.0)
    cpus_per_worker: float = bounded(1.0, gt=0.0)
    # "train": a Ray Train TorchTrainer per trial (DDP, GPUs, worker-level retries).
    # "inline": the trial trains inside Tune's reused trial actor: no worker group to launch per trial.
    # "auto": "train" when a trial wants several workers or a GPU, else "inline".
    trial_engine: Literal["auto", "train", "inline"] = "auto"
    max_failures: int = bounded(2, ge=0, le=100)
    # Host memory each trial (each worker, with the train engine) asks Ray for, so that trials which would not
    # fit side by side run one after the other. None: estimated per trial from its backbone, image size,
    # batch size and freeze depth (automl_tl.train.memory); 0: ask for none.
    memory_per_trial_gb: float | None = bounded(None, ge=0.0)

    def engine(self) -> str:
        """The trial engine this config resolves to."""
        if self.trial_engine != "auto":
            return self.trial_engine
        return "train" if self.workers_per_trial > 1 or self.gpus_per_trial > 0 else "inline"

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_trial > 0


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The whole run: data, search space, search algorithm and resources."""

    data: DataConfig = DataConfig()
    space: SearchSpaceConfig = SearchSpaceConfig()
    search: SearchConfig = SearchConfig()
    resources: ResourcesConfig = ResourcesConfig()

    def replace(self, section: str, **changes: Any) -> ExperimentConfig:
        """A copy with some fields of one section changed, validated like a file would be."""
        current = to_plain(getattr(self, section))
        current.update(changes)
        hint = type(getattr(self, section))
        return dataclasses.replace(self, **{section: build_dataclass(hint, current, section)})


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Load and validate a config from a YAML file path, a mapping, or None (all defaults)."""
    if source is None:
        return ExperimentConfig()
    if isinstance(source, Mapping):
        return build_dataclass(ExperimentConfig, source, "")
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return build_dataclass(ExperimentConfig, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The config as plain data, loadable again by :func:`load_config`."""
    plain: dict[str, Any] = to_plain(config)
    return plain
