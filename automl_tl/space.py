"""The search space: the validated :class:`SearchSpaceConfig` turned into Ray Tune's distributions.

Dimensions with one value become constants, so Optuna only models what is really searched. Freeze depth
takes every valid value of the chosen backbones (0 = fine-tune everything, the backbone's
``max_freeze_depth`` = frozen feature extractor); a trial clips it to its own backbone's maximum.

>>> from automl_tl.config import load_config
>>> space = build_param_space(load_config({"space": {"backbones": ["mobilenetv2_100"]}}))
>>> space["backbone"], sorted(space["freeze_depth"].categories)[-1]
('mobilenetv2_100', 8)
"""

from __future__ import annotations

from typing import Any

from ray import tune

from automl_tl.backbones import resolve_spec
from automl_tl.config import ExperimentConfig, FloatRange
from automl_tl.errors import ConfigError

__all__ = ["build_param_space", "freeze_depth_choices"]


def freeze_depth_choices(config: ExperimentConfig) -> tuple[int, ...]:
    """The freeze depths to search: the configured ones, or every valid value of the backbones."""
    deepest = max(resolve_spec(name).max_freeze_depth for name in config.space.backbones)
    if not config.space.freeze_depths:
        return tuple(range(deepest + 1))
    bad = [d for d in config.space.freeze_depths if d > deepest]
    if bad:
        raise ConfigError(
            f"space.freeze_depths: {bad[0]} is deeper than any chosen backbone allows (max {deepest}; "
            f"0 fine-tunes everything, {deepest} freezes the whole feature extractor)"
        )
    return tuple(sorted(set(config.space.freeze_depths)))


def _choice(values: tuple[Any, ...]) -> Any:
    return values[0] if len(values) == 1 else tune.choice(list(values))


def _range(rng: FloatRange) -> Any:
    if rng.fixed:
        return rng.low
    return tune.loguniform(rng.low, rng.high) if rng.log else tune.uniform(rng.low, rng.high)


def build_param_space(config: ExperimentConfig) -> dict[str, Any]:
    """Tune's ``param_space`` for the trial function: one key per :class:`TrialConfig` field."""
    space = config.space
    for name in space.backbones:
        resolve_spec(name)  # an unknown backbone fails here, naming it
    return {
        "backbone": _choice(space.backbones),
        "freeze_depth": _choice(freeze_depth_choices(config)),
        "learning_rate": _range(space.learning_rate),
        "backbone_lr_ratio": _range(space.backbone_lr_ratio),
        "augmentation": _choice(space.augmentations),
        "optimizer": _choice(space.optimizers),
        "weight_decay": _range(space.weight_decay),
        "label_smoothing": _range(space.label_smoothing),
        "batch_size": _choice(space.batch_sizes),
        "max_epochs": space.max_epochs,
        "image_size": _choice(space.image_sizes) if space.image_sizes else None,
        "head": _choice(space.heads),
        "head_dropout": _range(space.mlp_dropout),
        "seed": config.search.seed,
        "class_balance": config.search.class_balance,
        "plateau_patience": config.search.plateau_patience_epochs,
        "metric": config.search.metric,
    }
