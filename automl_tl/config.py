"""Typed, frozen configuration, loaded from YAML once at the edge and validated there.

A config file has up to four sections; every key is optional and has a documented default::

    data:       {source: builtin:animal-shapes, val_fraction: 0.15, test_fraction: 0.15, seed: 0}
    space:      {backbones: [tf_efficientnet_lite0, mobilenetv2_100], learning_rate: {low: 1.0e-4, high: 3.0e-2}}
    search:     {time_budget_s: 600, scheduler: asha, metric: val_accuracy}
    resources:  {workers_per_trial: 1, gpus_per_trial: 0}

Run ``automl-tl config --show`` to print the full default config. A top-level ``preset: fast|balanced|best``
fills every field the file leaves unset from the hardware at hand (:mod:`automl_tl.sweep.presets`).

Every section is a frozen pydantic model that refuses unknown keys. A file with several mistakes gets all of
them in one :class:`ConfigError`, one line each, naming the dotted field, the bad value and what is allowed::

    search.num_samples: must be >= 1, got 0
    space: unknown key 'learnin_rate'; allowed: augmentations, backbones, ... (did you mean 'learning_rate'?)

:func:`describe_validation_error` is the one way a pydantic error reads in automl_tl: the serving arguments
and the artifact manifest use it too.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from automl_tl.errors import ConfigError, config_error, describe_validation_error, shown

__all__ = [
    "FloatRange",
    "DataConfig",
    "SearchSpaceConfig",
    "SearchConfig",
    "ResourcesConfig",
    "ExperimentConfig",
    "load_config",
    "config_to_dict",
    "config_error",
    "describe_validation_error",
    "AUGMENTATIONS",
    "OPTIMIZERS",
    "HEADS",
    "PRESETS",
]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

_NUMBER_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _number_text(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: such text is the number it spells."""
    if isinstance(value, str) and _NUMBER_TEXT.match(value.strip()):
        return float(value)
    return value


def _listed(value: Any) -> Any:
    """A single value stands for a one-element list."""
    return [value] if value is not None and not isinstance(value, (list, tuple)) else value


# Strict scalars: true is not 1, "3" is not 3. A number may come as YAML 1.1 text.
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, Strict(), BeforeValidator(_number_text)]
# A list dimension of the search space; one value fixes it.
Choices = Annotated[tuple[T, ...], BeforeValidator(_listed)]

Augmentation = Literal["none", "light", "medium", "heavy"]
# "lbfgs": the head is first fitted to convergence on frozen features (a logistic-regression probe, its L2
# strength chosen on validation); a trial that trains more than the head then goes on with AdamW (LP-FT).
Optimizer = Literal["adamw", "sgd", "lbfgs"]
Head = Literal["linear", "mlp"]
Preset = Literal["fast", "balanced", "best"]
AUGMENTATIONS: tuple[Augmentation, ...] = get_args(Augmentation)
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)
HEADS: tuple[Head, ...] = get_args(Head)
PRESETS: tuple[Preset, ...] = get_args(Preset)
DEFAULT_TRIALS = 12  # the cap of a sweep that has neither num_samples nor a time budget


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Section(_Model):
    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, raw: Any) -> Any:
        return {} if raw is None else raw  # `search:` with nothing under it


class FloatRange(_Model):
    """A numeric search dimension: ``low == high`` fixes it; ``log`` samples log-uniformly.

    In YAML: a number (fixed), ``[low, high]``, or ``{low: .., high: .., log: true}``.
    """

    low: Annotated[Float, Field(allow_inf_nan=False)]
    high: Annotated[Float, Field(allow_inf_nan=False)]
    log: Bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, raw: Any) -> Any:
        if isinstance(raw, (Mapping, FloatRange)):
            return raw
        if isinstance(raw, (int, float)) and not isinstance(raw, bool) or (
            isinstance(raw, str) and _NUMBER_TEXT.match(raw.strip())
        ):
            return {"low": raw, "high": raw}
        if isinstance(raw, (list, tuple)) and len(raw) == 2:
            return {"low": raw[0], "high": raw[1]}
        raise ValueError(f"expected a number, [low, high] or {{low, high, log}}, got {shown(raw)}")

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low <= high must hold, but got low={self.low} and high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got low={self.low}")
        return self

    @property
    def fixed(self) -> bool:
        return self.low == self.high


class DataConfig(_Section):
    """Where the images come from and how they are split and cached."""

    source: str = "builtin:animal-shapes"
    test_source: str | None = None
    val_fraction: Annotated[Float, Field(gt=0.0, lt=1.0)] = 0.15
    test_fraction: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.15
    seed: Annotated[Int, Field(ge=0)] = 0
    cache_max_side: Annotated[Int, Field(ge=16, le=4096)] = 320
    max_image_pixels: Annotated[Int, Field(ge=1)] = 89_478_485
    max_unreadable_fraction: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.2
    cache_dir: str | None = None
    # Identical files keep one copy per class; identical files under different classes are left out.
    drop_duplicates: Bool = True
    # drop-across-splits: a val or test image that nearly duplicates a train image (by a frozen backbone's
    # features) leaves its split, so it cannot inflate the scores; keep: no such check.
    near_duplicates: Literal["drop-across-splits", "keep"] = "drop-across-splits"
    # Threads decoding images on the first pass; None means one per CPU.
    decode_workers: Annotated[Int, Field(ge=1, le=256)] | None = None
    # cache: decode once into one Arrow file every node maps; stream: resize into Parquet shards of encoded
    # images on the run's storage, decoded by Ray Data while trials read them; auto: stream when the decoded
    # cache would exceed stream_above_gb (images x cache_max_side^2 x 3 bytes, an upper bound).
    mode: Literal["auto", "cache", "stream"] = "auto"
    stream_above_gb: Annotated[Float, Field(gt=0.0)] = 50.0

    @model_validator(mode="after")
    def _leaves_training_images(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                "val_fraction + test_fraction must be < 0.9 to leave images to train on, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        return self


class SearchSpaceConfig(_Section):
    """Every dimension the sweep searches. A list is a categorical choice; one value fixes it."""

    backbones: Annotated[Choices[str], Field(min_length=1)] = ("tf_efficientnet_lite0", "mobilenetv2_100")
    # Freeze depths to try; empty means every valid value of each backbone (0 .. its stage count).
    freeze_depths: Choices[Annotated[Int, Field(ge=0)]] = ()
    learning_rate: FloatRange = FloatRange(low=1e-4, high=3e-2, log=True)
    # Pretrained layers learn at learning_rate * backbone_lr_ratio: smaller than the new head's rate.
    backbone_lr_ratio: FloatRange = FloatRange(low=0.01, high=0.5, log=True)
    augmentations: Annotated[Choices[Augmentation], Field(min_length=1)] = AUGMENTATIONS
    optimizers: Annotated[Choices[Optimizer], Field(min_length=1)] = OPTIMIZERS
    weight_decay: FloatRange = FloatRange(low=1e-6, high=1e-2, log=True)
    label_smoothing: FloatRange = FloatRange(low=0.0, high=0.2)
    batch_sizes: Annotated[Choices[Annotated[Int, Field(ge=1)]], Field(min_length=1)] = (16, 32, 64)
    max_epochs: Annotated[Int, Field(ge=1, le=1000)] = 8
    # Image sizes to try; empty means each backbone's native size.
    image_sizes: Choices[Annotated[Int, Field(ge=16, le=1024)]] = ()
    # A frozen feature extractor reads images this many times its input size (1.0: as it was trained);
    # [1.0, 1.25] also probes each backbone at the larger size.
    feature_scales: Annotated[Choices[Annotated[Float, Field(ge=0.5, le=2.0)]], Field(min_length=1)] = (1.0,)
    heads: Annotated[Choices[Head], Field(min_length=1)] = HEADS
    mlp_dropout: FloatRange = FloatRange(low=0.0, high=0.5)
    # Layer-wise learning-rate decay: each backbone stage learns this many times as fast as the one above it;
    # 1.0 (the default, fixed) is off. A range such as {low: 0.6, high: 1.0} searches it.
    layer_decay: FloatRange = FloatRange(low=1.0, high=1.0)

    @field_validator("learning_rate", "backbone_lr_ratio", "weight_decay")
    @classmethod
    def _positive(cls, rng: FloatRange) -> FloatRange:
        if rng.low <= 0:
            raise ValueError(f"must be > 0, got low={rng.low}")
        return rng

    @field_validator("backbone_lr_ratio")
    @classmethod
    def _no_faster_than_the_head(cls, rng: FloatRange) -> FloatRange:
        if rng.high > 1.0:
            raise ValueError(f"must be <= 1 (pretrained layers learn no faster than the head), got high={rng.high}")
        return rng

    @field_validator("layer_decay")
    @classmethod
    def _a_decay(cls, rng: FloatRange) -> FloatRange:
        if rng.low <= 0 or rng.high > 1:
            raise ValueError(f"must lie in (0, 1], got [{rng.low}, {rng.high}]")
        return rng

    @field_validator("label_smoothing", "mlp_dropout")
    @classmethod
    def _a_fraction(cls, rng: FloatRange) -> FloatRange:
        if rng.low < 0 or rng.high >= 1:
            raise ValueError(f"must lie in [0, 1), got [{rng.low}, {rng.high}]")
        return rng


class SearchConfig(_Section):
    """How the sweep proposes, schedules and stops trials."""

    algorithm: Literal["tpe", "random"] = "tpe"
    scheduler: Literal["asha", "hyperband", "pbt", "none"] = "asha"
    metric: Literal["val_accuracy", "val_macro_f1", "val_log_loss"] = "val_accuracy"
    # Trials to run at most. None: as many as the time budget allows (DEFAULT_TRIALS when there is no budget).
    num_samples: Annotated[Int, Field(ge=1, le=100_000)] | None = None
    max_concurrent_trials: Annotated[Int, Field(ge=1)] | None = None
    time_budget_s: Annotated[Float, Field(gt=0)] | None = 600.0
    seed: Annotated[Int, Field(ge=0)] = 0
    grace_period_epochs: Annotated[Int, Field(ge=1)] = 1
    plateau_patience_epochs: Annotated[Int, Field(ge=1)] = 3
    ensemble_size: Annotated[Int, Field(ge=1, le=50)] = 3
    ensemble_method: Literal["top_k", "greedy"] = "greedy"
    # Greedy selection starts from this many of the best single trials (Caruana's sorted initialisation), so
    # the ensemble keeps at least that many members; it is served only where it beats the best trial alone.
    ensemble_init_best: Annotated[Int, Field(ge=1, le=50)] = 1
    # Class imbalance: "auto" weights the loss when the largest class is over 3x the smallest.
    class_balance: Literal["auto", "weighted_loss", "sampler", "off"] = "auto"
    # Start with one frozen-feature-extractor trial per backbone (cheap through the feature cache), then search.
    frozen_first: Bool = True
    # Rank backbones by the LogME transferability of their frozen features (scored by the frozen-first
    # trials) and stop proposing trials that step through images for a backbone whose score trails the best
    # by more than rank_margin. "auto": on when the space has more than two backbones.
    rank_backbones: Literal["auto", "on", "off"] = "auto"
    rank_margin: Annotated[Float, Field(ge=0.0)] = 0.3
    # A validation split of fewer images than this is too small to choose on: heads on cached features are
    # then ranked, and the ensemble chosen, on cv_folds-fold cross-validated predictions over train + val.
    cv_below_images: Annotated[Int, Field(ge=0)] = 500
    cv_folds: Annotated[Int, Field(ge=2, le=20)] = 5
    # Test-time augmentation: on cross-validated heads, also score each one averaged with its answer on the
    # mirrored images (one more feature pass per backbone) and serve it so where that is better.
    test_time_augmentation: Bool = False
    # Ensemble selection skips members whose added batch-1 forward latency (measured when the artifact is
    # built) would take the ensemble past this many milliseconds. None: no budget.
    latency_budget_ms: Annotated[Float, Field(gt=0)] | None = None
    # mode=cascade: the cheap member's confidence threshold is the lowest that keeps validation accuracy
    # within this many percentage points of the ensemble's.
    cascade_tolerance: Annotated[Float, Field(ge=0, le=100)] = 0.5

    @model_validator(mode="after")
    def _init_within_size(self) -> SearchConfig:
        if self.ensemble_init_best > self.ensemble_size:
            raise ValueError(f"ensemble_init_best <= ensemble_size must hold, but got ensemble_init_best="
                             f"{self.ensemble_init_best} and ensemble_size={self.ensemble_size}")  # fmt: skip
        return self

    def max_trials(self) -> int | None:
        """The trial cap: ``num_samples`` when given; none when a time budget bounds the sweep, else DEFAULT_TRIALS."""
        if self.num_samples is not None:
            return self.num_samples
        return None if self.time_budget_s is not None else DEFAULT_TRIALS


class ResourcesConfig(_Section):
    """What each trial asks of the Ray cluster."""

    workers_per_trial: Annotated[Int, Field(ge=1, le=1024)] = 1
    gpus_per_trial: Annotated[Float, Field(ge=0.0)] = 0.0
    cpus_per_worker: Annotated[Float, Field(gt=0.0)] = 1.0
    # "train": a Ray Train TorchTrainer per trial (DDP, GPUs, worker-level retries).
    # "inline": the trial trains inside Tune's reused trial actor: no worker group to launch per trial.
    # "auto": "train" when a trial wants several workers or a GPU, else "inline".
    trial_engine: Literal["auto", "train", "inline"] = "auto"
    max_failures: Annotated[Int, Field(ge=0, le=100)] = 2
    # Host memory each trial (each worker, with the train engine) asks Ray for, so that trials which would not
    # fit side by side run one after the other. None: estimated per trial from its backbone, image size,
    # batch size and freeze depth (automl_tl.train.memory); 0: ask for none.
    memory_per_trial_gb: Annotated[Float, Field(ge=0.0)] | None = None

    def engine(self) -> str:
        """The trial engine this config resolves to."""
        if self.trial_engine != "auto":
            return self.trial_engine
        return "train" if self.workers_per_trial > 1 or self.gpus_per_trial > 0 else "inline"

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_trial > 0


class ExperimentConfig(_Section):
    """The whole run: data, search space, search algorithm and resources."""

    data: DataConfig = DataConfig()
    space: SearchSpaceConfig = SearchSpaceConfig()
    search: SearchConfig = SearchConfig()
    resources: ResourcesConfig = ResourcesConfig()
    # Fills the fields the sections leave unset from the hardware found when the sweep starts.
    preset: Preset | None = None

    def replace(self, section: str, **changes: Any) -> ExperimentConfig:
        """A copy with some fields of one section changed, validated like a file would be; the fields set
        before stay the only ones set besides ``changes`` (what a preset must not overwrite)."""
        current: BaseModel = getattr(self, section)
        sections = {name: getattr(self, name) for name in type(self).model_fields}
        changed = {**current.model_dump(exclude_unset=True), **changes}
        return _validated(ExperimentConfig, {**sections, section: changed})


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Load and validate a config from a YAML file path, a mapping, or None (all defaults)."""
    if source is None:
        return ExperimentConfig()
    if isinstance(source, Mapping):
        return _validated(ExperimentConfig, source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return _validated(ExperimentConfig, raw, where=str(path))


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The config as plain data, loadable again by :func:`load_config`."""
    plain: dict[str, Any] = _lists(config.model_dump())
    return plain


def _lists(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _validated(model: type[M], raw: Any, where: str = "") -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise config_error(exc, where, model) from None
