"""automl_tl: AutoML for transfer-learning image classification on Ray.

>>> import automl_tl
>>> "tf_efficientnet_lite0" in automl_tl.list_backbones()
True

``search`` runs a sweep end to end and returns a typed :class:`SearchResult`; its ``predictor()`` loads
what the search produced (as ``Predictor.load(result.artifact)`` does); ``resume`` finishes a stopped one::

    result = automl_tl.search("my_images/", "runs/first", time_budget_s=300)
    print(result.best.params["backbone"], result.ensemble.val.accuracy)
    result.predictor().predict(["photo.jpg"], top_k=3)
    automl_tl.resume("runs/first")
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from automl_tl.config import (
    DataConfig,
    ExperimentConfig,
    FloatRange,
    ResourcesConfig,
    SearchConfig,
    SearchSpaceConfig,
    load_config,
)
from automl_tl.errors import (
    ArtifactError,
    AutoMLError,
    BackboneError,
    ConfigError,
    DatasetError,
    SearchError,
)

if TYPE_CHECKING:
    from automl_tl.api import SearchResult, resume, search
    from automl_tl.evaluate.outcome import BestTrial, EnsembleResult, LeaderboardRow, Metrics
    from automl_tl.backbones import create_backbone, list_backbones
    from automl_tl.inference.predictor import Predictor

__version__ = "0.1.0"

# Progress and stage messages go to the "automl_tl" loggers; what shows, and where, is the caller's choice.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "search",
    "resume",
    "SearchResult",
    "LeaderboardRow",
    "BestTrial",
    "EnsembleResult",
    "Metrics",
    "Predictor",
    "list_backbones",
    "create_backbone",
    "load_config",
    "ExperimentConfig",
    "DataConfig",
    "SearchSpaceConfig",
    "SearchConfig",
    "ResourcesConfig",
    "FloatRange",
    "AutoMLError",
    "ConfigError",
    "DatasetError",
    "BackboneError",
    "ArtifactError",
    "SearchError",
]

# torch, timm and Ray load only when these are first used, so `import automl_tl` and the CLI start fast.
_LAZY = {
    "search": "automl_tl.api",
    "resume": "automl_tl.api",
    "SearchResult": "automl_tl.api",
    "LeaderboardRow": "automl_tl.evaluate.outcome",
    "BestTrial": "automl_tl.evaluate.outcome",
    "EnsembleResult": "automl_tl.evaluate.outcome",
    "Metrics": "automl_tl.evaluate.outcome",
    "Predictor": "automl_tl.inference.predictor",
    "list_backbones": "automl_tl.backbones",
    "create_backbone": "automl_tl.backbones",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'automl_tl' has no attribute {name!r}")
