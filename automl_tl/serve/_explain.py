"""What ``POST /v1/explain`` answers: per image, the top-k labels of the serving plan and a PNG of where its
members looked for the top one (:mod:`automl_tl.inference.explain`).

The explanation needs gradients, which the batched, inference-mode forward lanes never compute: the ingress
builds its own copy of the plan's members on the first explanation it is asked for (none is built for a
replica that only predicts) and runs them one request at a time in a decode thread.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from automl_tl.inference.artifact import Artifact
from automl_tl.inference.core import Plan
from automl_tl.inference.explain import OVERLAY_MAX_SIDE, Explainer, overlay_png
from automl_tl.inference.predictor import top_predictions
from automl_tl.serve._schemas import ExplainResponse

__all__ = ["ExplainAnswers"]

Decoded = Sequence[tuple[str, np.ndarray, float]]  # name, HWC uint8 pixels, when its decoding started


class ExplainAnswers:
    """The plan's explanations, its members built on first use."""

    def __init__(self, artifact: Artifact, plan: Plan) -> None:
        self._artifact = artifact
        self._plan = plan
        self._explainer: Explainer | None = None
        self._lock = threading.Lock()

    def _built(self) -> Explainer:
        with self._lock:
            if self._explainer is None:
                self._explainer = Explainer(self._artifact, self._plan)
            return self._explainer

    def respond(self, decode: Callable[[], Decoded], top_k: int, start: float) -> ExplainResponse:
        """Decode the body's images (``decode`` raises a RequestError for a bad one), explain each, answer."""
        images = decode()
        found = self._built().explain([pixels for _, pixels, _ in images])
        names = self._artifact.class_names
        explanations = []
        for (name, pixels, _), item in zip(images, found):
            answer = top_predictions(item.probabilities[None, :], names, top_k)[0].to_dict()
            png = overlay_png(pixels, item.heatmap, OVERLAY_MAX_SIDE)
            explanations.append({"name": name, **answer, "explained": names[item.class_index],
                                 "overlay_png": base64.b64encode(png).decode("ascii")})  # fmt: skip
        return ExplainResponse.model_validate({
            "model_id": self._plan.model_id,
            "mode": self._plan.mode,
            "members": list(self._plan.member_ids),
            "explanations": explanations,
            "total_ms": round((time.perf_counter() - start) * 1000.0, 3),
        })  # fmt: skip
