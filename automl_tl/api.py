"""The small Python API: one call runs the sweep, the ensemble, the evaluation and the report.

>>> from automl_tl import search
>>> result = search("../shared/datasets/hymenoptera/train", "runs/ants",
...                 test="../shared/datasets/hymenoptera/val", time_budget_s=120)  # doctest: +SKIP
>>> result.best["trial_id"], result.ensemble["test"]["accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from automl_tl.config import ExperimentConfig, load_config

__all__ = ["SearchResult", "search"]


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What a sweep hands over: the leaderboard, the best trial, the ensemble and where the files are."""

    run_dir: Path
    leaderboard: list[dict[str, Any]]
    best: dict[str, Any]
    ensemble: dict[str, Any]
    artifact: Path
    report: Path | None
    wall_s: float


def search(
    data: str,
    out: str | os.PathLike[str],
    *,
    test: str | None = None,
    config: ExperimentConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    time_budget_s: float | None = None,
    trials: int | None = None,
    seed: int | None = None,
    report: bool = True,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Search for the best transfer of a pretrained backbone to ``data`` and write everything to ``out``.

    ``config`` is an :class:`ExperimentConfig`, a mapping or a YAML path; the keyword arguments override it.
    Joins the Ray cluster in ``RAY_ADDRESS`` or starts an embedded one for the duration of the call.

    >>> result = search("my_images/", "runs/first", time_budget_s=300)  # doctest: +SKIP
    >>> print(result.best["backbone"], result.ensemble["test"]["accuracy"])  # doctest: +SKIP
    """
    from automl_tl.evaluate.results import build_results
    from automl_tl.sweep.driver import run_search

    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    cfg = cfg.replace("data", source=data)
    overrides = {k: v for k, v in (("time_budget_s", time_budget_s), ("num_samples", trials), ("seed", seed)) if v is not None}
    if overrides:
        cfg = cfg.replace("search", **overrides)
    out = Path(out)
    outcome = run_search(cfg, out, test_source=test, log=log, progress=False)
    results = build_results(out, log=log)
    report_path = None
    if report:
        from automl_tl.report import write_report

        report_path = write_report(out)
    return SearchResult(
        run_dir=out,
        leaderboard=outcome.rows,
        best=results["best"],
        ensemble=results["ensemble"],
        artifact=Path(results["artifact"]),
        report=report_path,
        wall_s=outcome.wall_s,
    )
