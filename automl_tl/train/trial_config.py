"""What one trial is: the searched hyperparameters and the typed trial config built from Tune's dict."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from automl_tl.config import Bool, Float, Int, config_error
from automl_tl.train.augment import is_deterministic
from automl_tl.backbones import resolve_spec
from automl_tl.inference.transforms import Preprocessing

__all__ = ["HYPERPARAMETERS", "PROBE_IGNORES", "TrialConfig"]

# The searched hyperparameters: the TrialConfig fields the sweep varies, each with the ``space`` section field
# that lists its values. The search space, leaderboard, summary, report and demo read the names from here.
HYPERPARAMETERS: dict[str, str] = {
    "backbone": "backbones", "freeze_depth": "freeze_depths", "learning_rate": "learning_rate",
    "backbone_lr_ratio": "backbone_lr_ratio", "augmentation": "augmentations", "optimizer": "optimizers",
    "weight_decay": "weight_decay", "label_smoothing": "label_smoothing", "batch_size": "batch_sizes",
    "image_size": "image_sizes", "head": "heads", "head_dropout": "mlp_dropout",
    "layer_decay": "layer_decay", "feature_scale": "feature_scales",
}  # fmt: skip

# What the logistic-regression probe (``lbfgs`` on cached features) never reads: it fits the head to
# convergence by full-batch L-BFGS without label smoothing, in eval mode (no dropout), chooses its own L2 on
# validation and ends after its first epoch, so no step size, batch, schedule or patience reaches it.
PROBE_IGNORES = frozenset({
    "learning_rate", "backbone_lr_ratio", "layer_decay", "weight_decay", "label_smoothing", "batch_size",
    "head_dropout", "max_epochs", "plateau_patience",
})  # fmt: skip


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
    # A frozen feature extractor reads images this many times the input size (a trial that trains the
    # backbone or augments ignores it): pretrained networks often see more detail above their training size.
    feature_scale: Annotated[Float, Field(ge=0.5, le=2.0)] = 1.0

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

    def preprocessing(self) -> Preprocessing:
        """The trial's input pipeline: its backbone's, at the image size and, for a frozen extractor, the
        feature scale (rounded to a multiple of 16 pixels)."""
        spec = resolve_spec(self.backbone)
        size = self.image_size or spec.input_size
        if self.feature_scale != 1.0 and self.frozen_features:
            size = max(16, 16 * round(size * self.feature_scale / 16))
        return Preprocessing.from_spec(spec, size)

    def identity(self) -> tuple[tuple[str, Any], ...]:
        """What this trial trains, as ``(field, value)`` pairs: two trials with the same identity train the
        same model. Every field counts except those this kind of trial ignores:

        * the freeze depth past the whole extractor and the image size or feature scale are folded into the
          depth and input side the trial really uses (:meth:`preprocessing`);
        * ``layer_decay`` needs two trained backbone layers (the deepest learns at the ratio's rate alone),
          ``backbone_lr_ratio`` one;
        * the probe on cached features reads none of :data:`PROBE_IGNORES`.
        """
        spec = resolve_spec(self.backbone)
        depth = min(self.freeze_depth, spec.max_freeze_depth)
        values = {**self.to_dict(), "freeze_depth": depth, "image_size": self.preprocessing().input_size}
        # The layers that train besides the head: the stem and every stage at depth 0, else the unfrozen stages.
        trained = spec.max_freeze_depth + 1 if depth == 0 else spec.max_freeze_depth - depth
        ignored = {"feature_scale"}  # folded into image_size
        if trained < 2:
            ignored.add("layer_decay")
        if trained == 0:
            ignored.add("backbone_lr_ratio")
        if self.is_probe:
            ignored |= PROBE_IGNORES
        return tuple((name, value) for name, value in values.items() if name not in ignored)

    @property
    def is_probe(self) -> bool:
        """Whether this trial is the logistic-regression probe: ``lbfgs`` on a pretrained extractor's cached
        features (``automl_tl.train.probe``)."""
        return self.optimizer == "lbfgs" and self.frozen_features and self.pretrained

    @property
    def frozen_features(self) -> bool:
        """Whether this trial only trains a head on cached features."""
        spec = resolve_spec(self.backbone)
        return self.freeze_depth >= spec.max_freeze_depth and is_deterministic(self.augmentation)


@functools.cache
def _trial_adapter() -> TypeAdapter[TrialConfig]:
    return TypeAdapter(TrialConfig)
