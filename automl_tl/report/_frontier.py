"""The report's accuracy-against-latency plot: every trial, the ensemble and the cascade, and what is served.

Figures come from ``summary.json``'s ``latency`` (written by :func:`automl_tl.evaluate.results.build_results`):
each trial's batch-1 forward measured when the artifact was built, the ensemble's as the sum of its members'
(they run one after another) and the cascade's as its expected latency per image on validation. Accuracy is
on the predictions the selection used (validation, or cross-validated folds), so the points compare alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

from automl_tl.report import _svg as svg
from automl_tl.report._html import fmt, note, table
from automl_tl.report._inputs import RunInputs

__all__ = ["frontier_section"]


def frontier_section(run: RunInputs) -> str:
    figures: Mapping[str, Any] = run.summary.get("latency") or {}
    if not figures:
        return note("This run's summary predates latency measurement: no accuracy-latency plot.")
    served = "ensemble" if run.summary.get("selection", {}).get("served") != "best_member" else "best"
    points: list[tuple[svg.Point, str]] = []
    for tid, row in figures.get("trials", {}).items():
        title = f"{tid} (best single trial)" if tid == run.summary["best"]["trial_id"] else tid
        points.append((svg.Point(float(row["latency_ms"][figures["key"]]), float(row["accuracy"]), title), "trial"))
    ensemble = figures["ensemble"]
    names = {"ensemble": f"ensemble of {len(ensemble['members'])}"}
    points.append((svg.Point(float(ensemble["latency_ms"]), float(ensemble["accuracy"]), names["ensemble"]), "ensemble"))
    cascade = figures.get("cascade")
    if cascade:
        names["cascade"] = f"cascade from {cascade['member']}"
        points.append((svg.Point(float(cascade["latency_ms"]), float(cascade["accuracy"]), names["cascade"]), "cascade"))
    marked = names["ensemble"] if served == "ensemble" else f"{run.summary['best']['trial_id']} (best single trial)"
    chart = svg.frontier_chart(points, marked, f"latency ms ({figures['key'].replace('_', ' ')}, expected for the cascade)",
                               "accuracy")  # fmt: skip
    rows = [[escape(p.title), escape(kind), fmt(p.x, 2), fmt(p.y)] for p, kind in points if kind != "trial"]
    budget = figures.get("budget_ms")
    words = (f"Latency measured on {figures.get('measured_on', 'this machine')}; "
             + (f"ensemble selection kept within a budget of {budget:g} ms. " if budget else "no latency budget. ")
             + "Served by default (automl-tl serve): the ringed point; --mode cascade serves the cascade.")  # fmt: skip
    return chart + note(words) + table(["model", "kind", "latency ms", "accuracy"], rows)
