"""Predicting with a saved artifact: plain torch, no Ray.

    from automl_tl.inference.predictor import Predictor
    predictor = Predictor.load("runs/my_run/artifact")       # mode="ensemble", or "best", or "cascade"
    predictor.predict(["ant.jpg", pil_image, uint8_array], top_k=2)   # -> [Prediction(labels, probabilities)]
    predictor.evaluate("data/labelled", split="test").accuracy         # -> Evaluation

Everything from pixels to calibrated probabilities is the inference core's (:mod:`automl_tl.inference.core`),
as in serving and export: which members answer (``mode``), each member's own evaluation transform, the
forward, the weighted average and the temperature. Images are decoded by the data set's decoder
(:mod:`automl_tl.inference.images`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from automl_tl.errors import DatasetError
from automl_tl.evaluate.outcome import Metrics
from automl_tl.evaluate.metrics import classification_metrics
from automl_tl.inference.artifact import Artifact, load_artifact
from automl_tl.inference.core import Members, Mode, Plan, plan_for
from automl_tl.inference.images import IMAGE_EXTENSIONS, ImageInput, expand_image_paths, load_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "Evaluation",
    "ImageInput",
    "Prediction",
    "Predictor",
    "Split",
    "expand_image_paths",
    "load_image",
    "match_class_names",
    "top_predictions",
]

Split = Literal["all", "train", "val", "test"]


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The top classes of one image, most probable first, with their calibrated probabilities."""

    labels: tuple[str, ...]
    probabilities: tuple[float, ...]

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def probability(self) -> float:
        return self.probabilities[0]

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "probabilities": list(self.probabilities)}


def top_predictions(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[Prediction]:
    """Per row of ``probs``: the ``k`` most probable classes (at most all of them; ties in class order)."""
    k = min(k, len(class_names))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        Prediction(tuple(class_names[j] for j in row), tuple(float(p[j]) for j in row)) for p, row in zip(probs, order)
    ]


def _chunks(items: Iterable[ImageInput], size: int) -> Iterator[list[ImageInput]]:
    """Consecutive lists of ``size`` items; a generator is read lazily, one chunk in memory at a time."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def match_class_names(artifact_names: Sequence[str], data_names: Sequence[str], data: str) -> np.ndarray:
    """For each class index of the data, the artifact's index of that class; a different set of classes raises.

    The order may differ (it is remapped); the names must be the same set.
    """
    missing = [c for c in artifact_names if c not in data_names]
    unknown = [c for c in data_names if c not in artifact_names]
    if missing or unknown:
        parts = []
        if unknown:
            parts.append(f"classes unknown to the artifact: {', '.join(unknown)}")
        if missing:
            parts.append(f"artifact classes absent from the data: {', '.join(missing)}")
        raise DatasetError(
            f"{data}: class names do not match the artifact's ({', '.join(artifact_names)}); {'; '.join(parts)}"
        )
    return np.array([list(artifact_names).index(c) for c in data_names], dtype=np.int64)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Evaluation(Metrics):
    """What :meth:`Predictor.evaluate` measured on one split: the metrics of a search's results
    (:class:`~automl_tl.evaluate.outcome.Metrics`), plus which split and which images were scored."""

    split: str
    rows: str  # which images were scored, in words (the run's own rows, or drawn with which settings)
    mode: str = "ensemble"
    escalation_rate: float | None = None  # a cascade's share of images that went past its cheap member

    @classmethod
    def from_metrics(
        cls, split: str, rows: str, metrics: Mapping[str, Any], mode: str = "ensemble",
        escalation_rate: float | None = None,
    ) -> Evaluation:  # fmt: skip
        base = Metrics.from_dict(metrics)
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Metrics)}, split=split, rows=rows,
                   mode=mode, escalation_rate=escalation_rate)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Every metric, JSON-ready (what ``automl-tl evaluate --json`` writes); for a cascade, also the mode
        and its escalation rate."""
        if self.escalation_rate is None:
            return dict(self.details)
        return {**self.details, "mode": self.mode, "escalation_rate": self.escalation_rate}


class Predictor:
    """An artifact's members on one device and the plan that combines them (``mode``: ensemble, best or
    cascade)."""

    def __init__(self, artifact: Artifact, mode: Mode = "ensemble", device: str | torch.device = "cpu") -> None:
        self.artifact = artifact
        self.mode = mode
        self.plan: Plan = plan_for(artifact, mode)
        self.device = torch.device(device)
        self._members = Members(artifact, self.device)
        self._members.build(self.plan.member_indices)  # a broken member fails now; one the plan skips is not built

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], mode: Mode = "ensemble", device: str | torch.device = "cpu"
    ) -> Predictor:
        """Load and verify the artifact at ``path`` and rebuild the members ``mode`` uses (no pretrained files
        needed): ``ensemble``, every member of non-zero weight; ``best``, the best single member; ``cascade``,
        the manifest's cheap member, then the ensemble for the images it is unsure of."""
        return cls(load_artifact(path), mode, device)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.artifact.class_names

    def _plan(self, member: str | None) -> Plan:
        return self.plan if member is None else plan_for(self.artifact, member=member)

    def _indices(self, member: str | None) -> list[int]:
        """``member`` alone, else every member of the artifact (the per-member methods score each on its own)."""
        return list(range(len(self.artifact.members))) if member is None else [self.artifact.member_index(member)]

    def preprocess(self, images: Sequence[ImageInput], member: str | None = None) -> list[torch.Tensor]:
        """One normalised NCHW batch per member of the artifact (``member`` alone if given), in member order."""
        arrays = [load_image(img, self.artifact.decode_max_side) for img in images]
        return self._members.preprocess(arrays, self._indices(member))

    def member_probabilities(self, batches: Sequence[torch.Tensor], member: str | None = None) -> list[np.ndarray]:
        """Each member's uncalibrated softmax on its own preprocessed batch (as :meth:`preprocess` returns):
        every member of the artifact, to score each alone, or ``member``. A prediction runs only its plan's."""
        return self._members.forward(batches, self._indices(member))

    def predict_proba(
        self, images: Iterable[ImageInput], batch_size: int = 32, member: str | None = None
    ) -> np.ndarray:
        """Calibrated probabilities (N, C) in ``class_names`` order, from the members of this predictor's
        ``mode``; ``member`` names one member to answer alone, with its own temperature.

        ``images`` may be a generator: only ``batch_size`` images are decoded at a time.
        """
        return self._answers(images, batch_size, member)[0]

    def _answers(
        self, images: Iterable[ImageInput], batch_size: int, member: str | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict_proba`'s probabilities, and which images a cascade sent past its cheap member."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        plan = self._plan(member)
        parts = [
            self._members.answer([load_image(img, self.artifact.decode_max_side) for img in chunk], plan)
            for chunk in _chunks(images, batch_size)
        ]
        if not parts:
            return np.zeros((0, len(self.class_names))), np.zeros(0, dtype=bool)
        return np.concatenate([p for p, _ in parts]), np.concatenate([e for _, e in parts])

    def predict(
        self, images: Iterable[ImageInput], top_k: int = 5, batch_size: int = 32, member: str | None = None
    ) -> list[Prediction]:
        """The ``top_k`` most probable classes of each image (at most the number of classes)."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        return top_predictions(self.predict_proba(images, batch_size, member), self.class_names, top_k)

    def evaluate(
        self,
        data: str,
        split: Split = "all",
        *,
        config: str | None = None,
        batch_size: int = 32,
        member: str | None = None,
        progress: bool = False,
    ) -> Evaluation:
        """Score this predictor on the labelled data at ``data`` (any ``--data`` form of search).

        ``split`` ``train``, ``val`` or ``test`` draws the split as the run that built the artifact drew it
        (its own rows when ``data`` is the run's data; ``config`` names other data settings); ``all`` scores
        every image. Class names are matched by name; a different set of classes raises.
        """
        from automl_tl.data import load_dataset
        from automl_tl.runs.rundir import split_settings

        if split not in ("all", "train", "val", "test"):
            raise DatasetError(f"split must be one of all, train, val, test, got {split!r}")
        if split == "all":
            dataset = load_dataset(data, progress=progress)
            rows, origin = np.arange(len(dataset)), "every image"
        else:
            settings = split_settings(self.artifact.path, data, config)
            dataset = load_dataset(data, settings.data, progress=progress)
            rows, origin = settings.rows(split, Path(dataset.cache_path).stem, dataset.indices(split))
        to_artifact = match_class_names(self.class_names, dataset.class_names, data)
        plan = self._plan(member)
        probs, escalated = self._answers((dataset.image(int(i)) for i in rows), batch_size, member)
        labels = to_artifact[np.asarray(dataset.labels)[rows]]
        rate = float(escalated.mean()) if plan.threshold is not None and escalated.size else None
        metrics = classification_metrics(labels, probs, self.class_names)
        return Evaluation.from_metrics(split, origin, metrics, plan.mode, rate)
