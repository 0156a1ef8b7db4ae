"""What a replica computes, in plain torch: which members answer, how images become their inputs, and how
their softmax outputs become one calibrated answer. No Ray here, so all of it is testable on its own.

The arithmetic is the :class:`~automl_tl.inference.predictor.Predictor`'s: each member gets the evaluation transform
stored in the manifest, member probabilities are averaged with the ensemble weights (``combine``) and
calibrated with the ensemble temperature; ``best`` mode uses one member and that member's own temperature.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from automl_tl.inference.artifact import Artifact
from automl_tl.backbones import memory_format_for, ready_for_inference
from automl_tl.evaluate.ensemble import apply_temperature, combine
from automl_tl.errors import ArtifactError
from automl_tl.inference.transforms import Preprocessing, eval_transform

__all__ = ["MemberRunner", "Preprocessor", "ServingPlan", "best_member_index", "plan_for"]


def best_member_index(artifact: Artifact) -> int:
    """The manifest's ``metrics.best_member`` (the best single trial), else the member of largest weight."""
    best = artifact.metrics.get("best_member")
    if isinstance(best, str) and best:
        return artifact.member_index(best)  # an unknown id is an ArtifactError naming the members
    return int(np.argmax(artifact.weights))


@dataclasses.dataclass(frozen=True)
class ServingPlan:
    """The members that answer (indices into the artifact), their weights and the calibration temperature."""

    artifact: Artifact
    mode: Literal["best", "ensemble"]
    member_indices: tuple[int, ...]
    weights: tuple[float, ...]
    temperature: float
    model_id: str

    @property
    def member_ids(self) -> tuple[str, ...]:
        return tuple(self.artifact.members[i].member_id for i in self.member_indices)

    @property
    def preprocessing(self) -> tuple[Preprocessing, ...]:
        return tuple(Preprocessing.from_dict(self.artifact.members[i].preprocessing) for i in self.member_indices)

    def calibrate(self, member_probs: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated (N, C) probabilities from each planned member's softmax (N, C), in plan order."""
        if len(member_probs) != len(self.member_indices):
            raise ValueError(f"need {len(self.member_indices)} member outputs, got {len(member_probs)}")
        return apply_temperature(combine(member_probs, self.weights), self.temperature)


def plan_for(artifact: Artifact, mode: str) -> ServingPlan:
    """``best``: the best single member; ``ensemble``: every member of non-zero weight."""
    if mode == "best":
        index = best_member_index(artifact)
        member = artifact.members[index]
        return ServingPlan(artifact, "best", (index,), (1.0,), member.temperature, member.member_id)
    if mode != "ensemble":
        raise ArtifactError(f"mode must be 'best' or 'ensemble', got {mode!r}")
    indices = tuple(i for i, w in enumerate(artifact.weights) if w > 0)
    digest = hashlib.sha256(
        json.dumps([[artifact.members[i].sha256, artifact.weights[i]] for i in indices] + [artifact.temperature])
        .encode("utf-8")
    ).hexdigest()
    return ServingPlan(
        artifact,
        "ensemble",
        indices,
        tuple(artifact.weights[i] for i in indices),
        artifact.temperature,
        f"ensemble-{digest[:12]}",
    )


class Preprocessor:
    """Pixels to one CHW input per planned member; members sharing a preprocessing share the tensor."""

    def __init__(self, preprocessing: Sequence[Preprocessing]) -> None:
        self.preprocessing = tuple(preprocessing)
        self._transforms = {pre: eval_transform(pre) for pre in self.preprocessing}

    def resized_pixels(self, height: int, width: int) -> int:
        """Pixels of the largest image the transforms make from a ``height`` x ``width`` one (the short side is
        resized before the centre crop, so a very elongated image would become enormous)."""
        short, long = max(1, min(height, width)), max(height, width)
        return max(pre.resize_side * int(long * pre.resize_side / short) for pre in self.preprocessing)

    def __call__(self, pixels: np.ndarray) -> tuple[torch.Tensor, ...]:
        done: dict[Preprocessing, torch.Tensor] = {}
        for pre in self.preprocessing:
            if pre not in done:
                done[pre] = self._transforms[pre](pixels)
        return tuple(done[pre] for pre in self.preprocessing)


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """Each planned member's softmax for a batch, and how long the forward passes took."""

    member_probs: tuple[np.ndarray, ...]
    forward_ms: float


class MemberRunner:
    """Built members in eval mode on one device; ``run`` forwards a batch through each under inference mode.

    Given each member's input size, a CPU member runs as a frozen TorchScript graph
    (:func:`~automl_tl.backbones.graph_of`)."""

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        device: str | torch.device = "cpu",
        input_sizes: Sequence[int] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self._format = memory_format_for(self.device)
        sizes = list(input_sizes) if input_sizes is not None else [None] * len(models)
        if len(sizes) != len(models):
            raise ValueError(f"{len(sizes)} input sizes for {len(models)} models")
        # batch norms folded; on CPU, given the input size, a frozen graph
        self.models = [ready_for_inference(m, self.device, size) for m, size in zip(models, sizes)]

    @classmethod
    def build(cls, artifact: Artifact, indices: Sequence[int], device: str | torch.device = "cpu") -> MemberRunner:
        sizes = [Preprocessing.from_dict(artifact.members[i].preprocessing).input_size for i in indices]
        return cls([artifact.build_model(i) for i in indices], device, sizes)

    def run(self, inputs: Sequence[Sequence[torch.Tensor]]) -> BatchResult:
        """``inputs[j][m]`` is image j's CHW input for member m; returns member m's (N, C) softmax."""
        start = time.perf_counter()
        out = tuple(self.forward(m, inputs) for m in range(len(self.models)))
        return BatchResult(out, (time.perf_counter() - start) * 1000.0)

    def forward(self, m: int, inputs: Sequence[Sequence[torch.Tensor]]) -> np.ndarray:
        """Member ``m``'s (N, C) softmax for ``inputs[j][m]``."""
        with torch.inference_mode():
            batch = torch.stack([item[m] for item in inputs]).to(self.device, memory_format=self._format, non_blocking=True)
            logits = self.models[m](batch).double()
            return torch.softmax(logits, dim=1).cpu().numpy()

