"""The report's "where the model looked" section: Grad-CAM overlays of the served ensemble
(:mod:`automl_tl.inference.explain`) on its most confident mistakes and on a sample of its right answers, each
map showing the evidence for the class the ensemble chose.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path

import numpy as np

from automl_tl.errors import AutoMLError
from automl_tl.report._analysis import Predictions, thumbnail_base64
from automl_tl.report._html import note
from automl_tl.report._inputs import RunInputs

__all__ = ["MISTAKES", "RIGHT", "explanation_section", "picks"]

MISTAKES, RIGHT = 6, 6  # overlays of each kind
_SIDE = 140  # thumbnail side in pixels


def picks(preds: Predictions, mistakes: int = MISTAKES, right: int = RIGHT) -> list[tuple[int, bool]]:
    """(index into the predictions, whether the ensemble was right): the ``mistakes`` most confident wrong
    answers, then ``right`` right ones spread evenly over the confidence ranking (the surest to the least sure)."""
    predicted = preds.ensemble.argmax(axis=1)
    confidence = preds.ensemble[np.arange(len(predicted)), predicted]
    wrong = np.flatnonzero(predicted != preds.labels)
    correct = np.flatnonzero(predicted == preds.labels)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:mistakes]
    ranked = correct[np.argsort(-confidence[correct], kind="stable")]
    spread = ranked[np.unique(np.linspace(0, len(ranked) - 1, num=min(right, len(ranked))).round().astype(int))]
    return [(int(k), False) for k in worst] + [(int(k), True) for k in spread]


def explanation_section(run: RunInputs, preds: Predictions | None) -> str:
    """The section's HTML: one card per picked image, its overlay, true and predicted class."""
    if preds is None:
        return note("No predictions are available, so there is nothing to explain.")
    cache = run.data.get("cache_path")
    chosen = picks(preds)
    if not cache or not chosen:
        return note("The image cache is unavailable, so no explanation can be drawn.")
    from automl_tl.data import Dataset
    from automl_tl.inference.explain import Explainer, overlay

    predicted = preds.ensemble.argmax(axis=1)
    try:
        images = Dataset.open(Path(cache))
        pixels = [images.image(int(preds.rows[k])) for k, _ in chosen]
        explainer = Explainer.load(run.path)  # the run directory's artifact, as served (ensemble)
        found = explainer.explain(pixels, classes=[int(predicted[k]) for k, _ in chosen])
    except (AutoMLError, OSError) as exc:
        return note(f"Explanations are unavailable: {exc}")
    names = run.class_names
    cards = []
    for (k, right), image, item in zip(chosen, pixels, found):
        png = thumbnail_base64(overlay(image, item.heatmap), _SIDE)
        truth, guess = names[int(preds.labels[k])], names[int(predicted[k])]
        border = "#59a14f" if right else "#e15759"
        verdict = f"<b>{escape(guess)}</b> ✓" if right else f"<b>{escape(truth)}</b> → {escape(guess)}"
        cards.append(f'<figure class="cam" data-right="{str(right).lower()}"><div class="thumb">'
                     f'<img src="data:image/png;base64,{png}" alt="Grad-CAM of {escape(guess)}" '
                     f'style="border-color:{border}"></div>{verdict} ({preds.ensemble[k, predicted[k]]:.0%})</figure>')  # fmt: skip
    return _layout(cards, chosen, preds, len(explainer.plan.member_indices))


def _layout(cards: Sequence[str], chosen: Sequence[tuple[int, bool]], preds: Predictions, members: int) -> str:
    wrong = sum(1 for _, right in chosen if not right)
    parts = []
    if wrong:
        parts.append(f'<h3>Most confident mistakes</h3><div class="grid">{"".join(cards[:wrong])}</div>')
    if len(cards) > wrong:
        parts.append(f'<h3>Right answers, from the surest to the least sure</h3><div class="grid">{"".join(cards[wrong:])}</div>')
    return "".join(parts) + note(
        f"Grad-CAM heatmaps (red: strongest evidence) of the served ensemble's {members} member(s), each member's "
        f"map weighted by its ensemble weight, for the class the ensemble chose, on {preds.split} images. A map "
        "on the object means the right reason; one on the background or an artefact of the photos means the "
        "model learnt a shortcut.")
