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

import itertools
import math
from typing import Any

from ray import tune
from ray.tune.search.sample import Categorical, Domain, Float

from automl_tl.backbones import resolve_spec
from automl_tl.config import ExperimentConfig, FloatRange
from automl_tl.errors import ConfigError
from automl_tl.train.loop import HYPERPARAMETERS
from automl_tl.train.trial_config import TrialConfig

__all__ = ["build_param_space", "count_points", "freeze_depth_choices", "frozen_start_points"]

_COUNTED = 20_000  # the most raw points count_points enumerates to find the distinct ones

# The trial each backbone starts with when ``search.frozen_first`` is on: a frozen feature extractor, no
# augmentation and a linear head. Its pooled features are computed once and shared (``automl_tl.train.features``),
# so it costs one pass over the images plus seconds of head training, and it gives TPE a strong baseline
# before the random start-up spends the budget on slow fine-tuning trials. Values outside a narrowed space
# are clipped into it.
_FROZEN_START: dict[str, Any] = {
    "learning_rate": 2e-3,
    "backbone_lr_ratio": 0.1,
    "augmentation": "none",
    "optimizer": "adamw",
    "weight_decay": 1e-4,
    "label_smoothing": 0.1,
    "batch_size": 32,
    "head": "linear",
    "head_dropout": 0.0,
    "feature_scale": 1.0,
}


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
    """Tune's ``param_space`` for the trial function: one key per :class:`TrialConfig` field.

    Each hyperparameter (:data:`HYPERPARAMETERS`) is drawn from its ``space`` field: a list is a choice, a
    range a distribution; the rest of the trial's settings are constants of the run.
    """
    space = config.space
    for name in space.backbones:
        resolve_spec(name)  # an unknown backbone fails here, naming it
    drawn = {name: _dimension(getattr(space, key)) for name, key in HYPERPARAMETERS.items()}
    drawn["freeze_depth"] = _choice(freeze_depth_choices(config))  # empty means every depth of the backbones
    drawn["image_size"] = _choice(space.image_sizes) if space.image_sizes else None  # empty: each one's own
    return {
        **drawn,
        "max_epochs": space.max_epochs,
        "seed": config.search.seed,
        "class_balance": config.search.class_balance,
        "plateau_patience": config.search.plateau_patience_epochs,
        "metric": config.search.metric,
    }


def _dimension(values: FloatRange | tuple[Any, ...]) -> Any:
    return _range(values) if isinstance(values, FloatRange) else _choice(values)


def count_points(param_space: dict[str, Any]) -> int | None:
    """How many distinct trials the space holds when it is finite, else None.

    Points that train the same model (equal :meth:`TrialConfig.identity`) count once, so a continuous
    dimension that no point's kind of trial reads (the learning rate of a space of probes) leaves the space
    finite. A space of more than ``_COUNTED`` combinations of its choices is not enumerated: its raw count is
    returned when it has no continuous dimension (an upper bound), else None.
    """
    searched = {name: dom for name, dom in param_space.items() if isinstance(dom, Domain)}
    choices = {name: list(dom.categories) for name, dom in searched.items() if isinstance(dom, Categorical)}
    continuous = {name: dom.sample() for name, dom in searched.items() if name not in choices}  # any value will do
    raw = math.prod(len(values) for values in choices.values())
    if raw > _COUNTED:
        return None if continuous else raw
    fixed = {**{k: v for k, v in param_space.items() if k not in searched}, **continuous}
    points = set()
    for combination in itertools.product(*choices.values()):
        identity = TrialConfig.from_params({**fixed, **dict(zip(choices, combination))}).identity()
        if any(name in continuous for name, _ in identity):
            return None  # a continuous dimension this trial reads: endless distinct points
        points.add(identity)
    return len(points)


def frozen_start_points(config: ExperimentConfig, param_space: dict[str, Any]) -> list[dict[str, Any]]:
    """Tune's ``points_to_evaluate``: the probe (optimizer ``lbfgs``) of each backbone, when the space offers
    that optimizer, at each feature scale it offers (1.0 first), then one AdamW-trained frozen-extractor
    trial per backbone, in the order configured.

    Only the searched dimensions appear (the searcher never sees constants). Empty when the space has no
    fully frozen depth or no ``none`` augmentation (such a start would not be cheap), and at most half of
    the trial cap (at least one) so the searcher keeps most trials to itself.
    """
    if not config.search.frozen_first:
        return []
    deepest = max(freeze_depth_choices(config))
    if deepest < max(resolve_spec(name).max_freeze_depth for name in config.space.backbones):
        return []
    if "none" not in config.space.augmentations:
        return []
    searched = {key: dom for key, dom in param_space.items() if isinstance(dom, Domain)}
    # The logistic-regression probe of each backbone first: the sweep's floor, which it must never end below.
    # Then the probe on each larger feature scale the space offers (are more pixels worth it?), then AdamW.
    probe = {**_FROZEN_START, "optimizer": "lbfgs"}
    probes = [probe, *({**probe, "feature_scale": s} for s in sorted(config.space.feature_scales) if s > 1.0)]
    starts = [*(probes if "lbfgs" in config.space.optimizers else []), _FROZEN_START]
    points: list[dict[str, Any]] = []
    for start in starts:
        for name in config.space.backbones:
            wanted = {**start, "backbone": name, "freeze_depth": deepest, "image_size": resolve_spec(name).input_size}
            point = {key: _nearest(dom, wanted[key]) for key, dom in searched.items()}
            if point not in points:
                points.append(point)
    cap = config.search.max_trials()
    return points[: max(1, cap // 2)] if cap else points


def _nearest(domain: Domain, value: Any) -> Any:
    """``value`` if ``domain`` holds it, else the closest value it does hold."""
    if isinstance(domain, Categorical):
        options = list(domain.categories)
        if value in options:
            return value
        numeric = [o for o in options if isinstance(o, (int, float)) and not isinstance(o, bool)]
        if isinstance(value, (int, float)) and numeric:
            return min(numeric, key=lambda o: abs(o - value))
        return options[0]
    if isinstance(domain, Float):
        return min(max(float(value), domain.lower), domain.upper)
    return value
