"""The one inference path: which members answer (:class:`Plan`), how pixels become their inputs
(:class:`Preprocessor`), how a member forwards a batch (:class:`MemberRunner`), and how their softmax outputs
become one calibrated answer (:meth:`Plan.calibrate`). Plain torch, no Ray.

The :class:`~automl_tl.inference.predictor.Predictor`, the Serve replicas, export and the test scoring of a
finished search all go through here, so they agree by construction:

* ``mode="ensemble"``: every member of non-zero weight (a weight-0 member, kept in the artifact to be served
  alone as the best trial, is never built nor run), averaged with the ensemble weights and calibrated with
  the ensemble temperature;
* ``mode="best"``: the best single member (the manifest's ``metrics.best_member``), with its own temperature;
* ``mode="cascade"``: the manifest's cheap member answers a row alone, with its own temperature, when its
  calibrated top probability reaches the manifest's threshold; the other rows go on to the ensemble, which
  reuses the cheap member's output when it is one of its members (:func:`cascade_forward`);
* ``member=ID`` names one specific member instead, again with its own temperature.

Each member gets the evaluation transform stored in the manifest; members sharing a preprocessing share it.

    .venv/bin/python -m pytest -q tests/test_predictor.py tests/test_export.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import numpy as np
import torch

from automl_tl.backbones import memory_format_for, ready_for_inference
from automl_tl.errors import ConfigError
from automl_tl.inference.artifact import Artifact
from automl_tl.inference.calibrate import apply_temperature, combine
from automl_tl.inference.transforms import Preprocessing, eval_transform

__all__ = [
    "MODES",
    "BatchResult",
    "MemberRunner",
    "Members",
    "Mode",
    "Plan",
    "Preprocessor",
    "best_member_index",
    "cascade_forward",
    "plan_for",
]

Mode = Literal["best", "ensemble", "cascade"]
MODES: tuple[str, ...] = get_args(Mode)


def best_member_index(artifact: Artifact) -> int:
    """The manifest's ``metrics.best_member`` (the best single trial), else the member of largest weight."""
    best = artifact.metrics.get("best_member")
    if isinstance(best, str) and best:
        return artifact.member_index(best)  # an unknown id is an ArtifactError naming the members
    return int(np.argmax(artifact.weights))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The members that answer (indices into the artifact), their weights and the calibration temperature.

    ``mode`` is ``"best"``, ``"ensemble"`` or ``"cascade"``, or ``"member"`` for one member named by its id.
    A cascade's first member is the cheap one: ``first_temperature`` calibrates it alone and ``threshold`` is
    the confidence at which it answers alone; ``weights`` and ``temperature`` are the ensemble's (the cheap
    member's weight is 0 when it is not an ensemble member).
    """

    artifact: Artifact
    mode: Literal["best", "ensemble", "member", "cascade"]
    member_indices: tuple[int, ...]
    weights: tuple[float, ...]
    temperature: float
    model_id: str
    first_temperature: float = 1.0
    threshold: float | None = None  # None: not a cascade, every member answers every row

    @property
    def member_ids(self) -> tuple[str, ...]:
        return tuple(self.artifact.members[i].member_id for i in self.member_indices)

    @property
    def preprocessing(self) -> tuple[Preprocessing, ...]:
        return tuple(Preprocessing.from_dict(self.artifact.members[i].preprocessing) for i in self.member_indices)

    def confident(self, first_probs: np.ndarray) -> np.ndarray:
        """The rows a cascade's cheap member answers alone: its calibrated top probability reaches the threshold."""
        if self.threshold is None:
            return np.zeros(len(first_probs), dtype=bool)
        calibrated = apply_temperature(first_probs, self.first_temperature)
        confident: np.ndarray = calibrated.max(axis=1) >= self.threshold
        return confident

    def calibrate(self, member_probs: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated (N, C) probabilities from each planned member's softmax (N, C), in plan order. In a
        cascade, the rows the cheap member answers alone may be NaN in the other members' outputs."""
        if len(member_probs) != len(self.member_indices):
            raise ValueError(f"need {len(self.member_indices)} member outputs, got {len(member_probs)}")
        if self.threshold is None:
            return apply_temperature(combine(member_probs, self.weights), self.temperature)
        out = apply_temperature(member_probs[0], self.first_temperature)
        rest = ~self.confident(member_probs[0])
        if rest.any():
            out[rest] = apply_temperature(combine([p[rest] for p in member_probs], self.weights), self.temperature)
        return out


def cascade_forward(
    plan: Plan, forward: Callable[[int, np.ndarray | None], np.ndarray]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Each planned member's softmax, and which rows went past the first member.

    ``forward(m, rows)`` is member m's softmax on those rows of the batch (``None``: every row). Outside a
    cascade every member runs on every row and no row counts as escalated. In a cascade the first (cheap)
    member runs on every row and the others only on the rows it is not confident about, NaN elsewhere, so a
    row's answer never depends on the rows batched with it.
    """
    first = forward(0, None)
    if plan.threshold is None:
        return [first, *(forward(m, None) for m in range(1, len(plan.member_indices)))], np.zeros(len(first), bool)
    escalated = ~plan.confident(first)
    rows = np.flatnonzero(escalated)
    out = [first]
    for m in range(1, len(plan.member_indices)):
        full = np.full_like(first, np.nan)
        if rows.size:
            full[rows] = forward(m, rows)
        out.append(full)
    return out, escalated


def plan_for(artifact: Artifact, mode: str = "ensemble", member: str | None = None) -> Plan:
    """``member`` alone when given; else by ``mode``: ``best``, the best single member; ``ensemble``, every
    member of non-zero weight."""
    if member is not None:
        index = artifact.member_index(member)  # an unknown id is an ArtifactError naming the members
        return _single(artifact, "member", index)
    if mode == "best":
        return _single(artifact, "best", best_member_index(artifact))
    if mode == "cascade":
        return _cascade(artifact)
    if mode != "ensemble":
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    indices = tuple(i for i, w in enumerate(artifact.weights) if w > 0)
    digest = hashlib.sha256(
        json.dumps([[artifact.members[i].sha256, artifact.weights[i]] for i in indices] + [artifact.temperature])
        .encode("utf-8")
    ).hexdigest()
    weights = tuple(artifact.weights[i] for i in indices)
    return Plan(artifact, "ensemble", indices, weights, artifact.temperature, f"ensemble-{digest[:12]}")


def _cascade(artifact: Artifact) -> Plan:
    """The manifest's cheap member first, then the ensemble's other members."""
    rule = artifact.cascade
    if not rule:
        raise ConfigError(
            f"{artifact.path}: mode 'cascade' needs the manifest's cascade section, and this artifact has none (no "
            "member was cheaper than the ensemble and accurate enough, or it was built before cascades); use "
            "mode 'ensemble' or 'best'"
        )
    ensemble = plan_for(artifact, "ensemble")
    first = artifact.member_index(str(rule["member_id"]))
    indices = (first, *(i for i in ensemble.member_indices if i != first))
    threshold = float(rule["threshold"])
    digest = hashlib.sha256(json.dumps([ensemble.model_id, artifact.members[first].sha256, threshold]).encode()).hexdigest()
    return Plan(artifact, "cascade", indices, tuple(artifact.weights[i] for i in indices), artifact.temperature,
                f"cascade-{digest[:12]}", artifact.members[first].temperature, threshold)  # fmt: skip


def _single(artifact: Artifact, mode: Literal["best", "member"], index: int) -> Plan:
    record = artifact.members[index]
    return Plan(artifact, mode, (index,), (1.0,), record.temperature, record.member_id)


class Preprocessor:
    """Pixels to one input per planned member; members sharing a preprocessing share the tensor."""

    def __init__(self, preprocessing: Sequence[Preprocessing]) -> None:
        self.preprocessing = tuple(preprocessing)
        self._transforms = {pre: eval_transform(pre) for pre in self.preprocessing}

    def resized_pixels(self, height: int, width: int) -> int:
        """Pixels of the largest image the transforms make from a ``height`` x ``width`` one (the short side is
        resized before the centre crop, so a very elongated image would become enormous)."""
        short, long = max(1, min(height, width)), max(height, width)
        return max(pre.resize_side * int(long * pre.resize_side / short) for pre in self.preprocessing)

    def __call__(self, pixels: np.ndarray) -> tuple[torch.Tensor, ...]:
        """One image's CHW input for each member."""
        done: dict[Preprocessing, torch.Tensor] = {}
        for pre in self.preprocessing:
            if pre not in done:
                done[pre] = self._transforms[pre](pixels)
        return tuple(done[pre] for pre in self.preprocessing)

    def batches(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """The images as one NCHW batch for each member."""
        done: dict[Preprocessing, torch.Tensor] = {}
        for pre in self.preprocessing:
            if pre not in done:
                transform = self._transforms[pre]
                done[pre] = torch.stack([transform(image) for image in images])
        return [done[pre] for pre in self.preprocessing]


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """Each member's softmax for a batch, and how long the forward passes took."""

    member_probs: tuple[np.ndarray, ...]
    forward_ms: float
    escalated: int = 0  # rows a cascade sent past its cheap member


class MemberRunner:
    """Built members in eval mode on one device: the only code that forwards a member.

    Each member is made ready with :func:`~automl_tl.backbones.ready_for_inference`."""

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self._format = memory_format_for(self.device)
        self.models = [ready_for_inference(m, self.device) for m in models]

    @classmethod
    def build(cls, artifact: Artifact, indices: Sequence[int], device: str | torch.device = "cpu") -> MemberRunner:
        """The artifact's members ``indices``, rebuilt from their verified weights."""
        return cls([artifact.build_model(i) for i in indices], device)

    def run(self, inputs: Sequence[Sequence[torch.Tensor]], plan: Plan | None = None) -> BatchResult:
        """``inputs[j][m]`` is image j's CHW input for member m; returns member m's (N, C) softmax. With a
        cascade ``plan`` (whose members these are, in order), only the uncertain rows go past member 0."""
        start = time.perf_counter()
        if plan is None or plan.threshold is None:
            out = tuple(self.forward(m, inputs) for m in range(len(self.models)))
            return BatchResult(out, (time.perf_counter() - start) * 1000.0)
        probs, escalated = cascade_forward(
            plan, lambda m, rows: self.forward(m, inputs if rows is None else [inputs[j] for j in rows])
        )
        return BatchResult(tuple(probs), (time.perf_counter() - start) * 1000.0, int(escalated.sum()))

    def forward(self, m: int, inputs: Sequence[Sequence[torch.Tensor]]) -> np.ndarray:
        """Member ``m``'s (N, C) softmax for ``inputs[j][m]``."""
        with torch.inference_mode():
            return self.forward_batch(m, torch.stack([item[m] for item in inputs]))

    def forward_batch(self, m: int, batch: torch.Tensor) -> np.ndarray:
        """Member ``m``'s (N, C) softmax, in float64, for one NCHW batch."""
        with torch.inference_mode():
            batch = batch.to(self.device, memory_format=self._format, non_blocking=True)
            logits = self.models[m](batch).double()
            return torch.softmax(logits, dim=1).cpu().numpy()


class Members:
    """An artifact's members on one device, each built on first use (a member no plan names is never built)."""

    def __init__(self, artifact: Artifact, device: str | torch.device = "cpu") -> None:
        self.artifact = artifact
        self.device = torch.device(device)
        self._runners: dict[int, MemberRunner] = {}

    def build(self, indices: Sequence[int]) -> None:
        """Build these members now (a broken one fails here, not at the first prediction)."""
        for i in indices:
            if i not in self._runners:
                self._runners[i] = MemberRunner.build(self.artifact, [i], self.device)

    def preprocess(self, images: Sequence[np.ndarray], indices: Sequence[int]) -> list[torch.Tensor]:
        """One NCHW batch of ``images`` per member in ``indices``."""
        pres = [Preprocessing.from_dict(self.artifact.members[i].preprocessing) for i in indices]
        return Preprocessor(pres).batches(images)

    def forward(self, batches: Sequence[torch.Tensor], indices: Sequence[int]) -> list[np.ndarray]:
        """Each member's uncalibrated softmax on its own batch (as :meth:`preprocess` returns them)."""
        if len(batches) != len(indices):
            raise ValueError(f"need {len(indices)} preprocessed batches (one per member), got {len(batches)}")
        self.build(indices)
        return [self._runners[i].forward_batch(0, batch) for i, batch in zip(indices, batches)]

    def probabilities(self, images: Sequence[np.ndarray], indices: Sequence[int]) -> list[np.ndarray]:
        """Each member's uncalibrated softmax (N, C) for a batch of RGB images, in ``indices`` order."""
        return self.forward(self.preprocess(images, indices), indices)

    def answer(self, images: Sequence[np.ndarray], plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """The plan's calibrated probabilities (N, C) for a batch of RGB images, and which rows a cascade
        sent past its cheap member."""
        indices = plan.member_indices
        batches = self.preprocess(images, indices)
        self.build(indices)

        def forward(m: int, rows: np.ndarray | None) -> np.ndarray:
            batch = batches[m] if rows is None else batches[m][torch.from_numpy(rows)]
            return self._runners[indices[m]].forward_batch(0, batch)

        probs, escalated = cascade_forward(plan, forward)
        return plan.calibrate(probs), escalated
