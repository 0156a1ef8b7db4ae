"""The report's account of how the served model was chosen: on which images, and how far apart the leaders are.

With a small validation split the sweep's results decide on k-fold cross-validated predictions
(:mod:`automl_tl.evaluate.crossval`). Every trial there is scored on the same folds, so two trials can be
compared fold by fold: when the mean of their per-fold differences lies within two standard errors of zero,
the folds cannot tell them apart, and the table says so rather than implying a winner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from automl_tl.report._html import fmt, note, table
from automl_tl.report._inputs import RunInputs

__all__ = ["indistinguishable", "selection_section"]

SHOWN = 10  # cross-validated trials listed, best first


def indistinguishable(leader: Sequence[float], other: Sequence[float]) -> bool:
    """Whether paired per-fold accuracies leave the two trials' difference within two standard errors of 0."""
    diffs = [a - b for a, b in zip(leader, other)]
    if len(diffs) < 2:
        return diffs == [0.0] or not diffs
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    return abs(mean) <= 2 * sd / math.sqrt(len(diffs))


def selection_section(run: RunInputs) -> str:
    selection: Mapping[str, Any] = run.summary.get("selection") or {}
    if not selection:
        return note("This run's summary predates the record of how the served model was chosen.")
    served = str(selection.get("served", "")).replace("_", " ")
    head = note(f"Decided on {selection.get('on', 'the validation split')}; the artifact serves the {served}: "
                f"{selection.get('why', '')}.")  # fmt: skip
    folds: Mapping[str, Any] | None = selection.get("cross_validation")
    if not folds:
        return head + note("The validation split was large enough to decide on (search.cv_below_images), "
                           "so no cross-validation ran.")  # fmt: skip
    trials: Mapping[str, Mapping[str, Any]] = folds.get("trials") or {}
    extra = note(f"Cross-validation: {folds.get('why', '')}.")
    if not trials:
        return head + extra
    by_id = {str(r.get("trial_id")): r for r in run.trials}
    ranked = list(trials.items())
    leader = [float(a) for a in ranked[0][1]["fold_accuracy"]]
    rows = []
    for tid, score in ranked[:SHOWN]:
        accs = [float(a) for a in score["fold_accuracy"]]
        row = by_id.get(tid, {})
        same = tid == ranked[0][0] or indistinguishable(leader, accs)
        rows.append([escape(tid), escape(str(row.get("backbone", "–"))), fmt(float(score["accuracy_mean"])),
                     fmt(float(score["accuracy_std"])), f"{fmt(min(accs))} – {fmt(max(accs))}",
                     fmt(float(score["log_loss"])), "leader" if tid == ranked[0][0] else ("yes" if same else "no")])  # fmt: skip
    tied = sum(1 for r in rows[1:] if r[-1] == "yes")
    verdict = note(f"{tied} of the next {len(rows) - 1} trial(s) cannot be told apart from the leader on these "
                   f"{folds.get('folds')} folds (paired per-fold difference within two standard errors of 0).")  # fmt: skip
    header = ["trial", "backbone", "fold accuracy mean", "sd", "min – max", "log loss", "within noise of the leader"]
    return head + extra + table(header, rows, left=2) + verdict
