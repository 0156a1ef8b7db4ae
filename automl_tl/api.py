"""The Python API: one call runs the sweep, the ensemble, the evaluation and the report.

>>> import automl_tl
>>> result = automl_tl.search("../shared/datasets/hymenoptera/train", "runs/ants",
...                           test="../shared/datasets/hymenoptera/val", time_budget_s=120)  # doctest: +SKIP
>>> result.best.params["backbone"], result.ensemble.test.accuracy  # doctest: +SKIP
>>> result.predictor().predict(["photo.jpg"], top_k=1)[0].label  # doctest: +SKIP

``out`` may be object storage (``s3://bucket/prefix``), as for ``automl-tl search --out``. Everything a
search returns is read from the run directory, and :func:`resume` continues a search whose driver stopped.
:func:`run_pipeline` is the one sequence (sweep or resume, then results, then report) that this API, the
``automl-tl search`` and ``resume`` commands and the demo all run.

Progress goes to the ``automl_tl`` loggers, each record with its ``stage`` (search, ensemble, evaluate,
results, report) and, for trial events, the trial's figures as fields; the library adds no handler, so the
caller decides what shows (``logging.basicConfig(level=logging.INFO)`` shows it all).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from automl_tl.config import ExperimentConfig, load_config
from automl_tl.errors import AutoMLError

if TYPE_CHECKING:
    from automl_tl.evaluate.outcome import BestTrial, EnsembleResult, LeaderboardRow
    from automl_tl.inference.predictor import Predictor

__all__ = ["SearchResult", "run_pipeline", "resume", "search"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What a search hands over, typed: the leaderboard (best first), the best trial, the ensemble and where
    the files are. Locations are local paths or URIs, as the run directory is."""

    run_dir: str
    metric: str  # the search's metric, on which trials and the ensemble rank
    leaderboard: tuple[LeaderboardRow, ...]
    best: BestTrial
    ensemble: EnsembleResult
    artifact: str
    report: str | None  # None when the report was not asked for or could not be written
    wall_s: float  # the sweep's wall-clock time

    def predictor(self) -> Predictor:
        """The artifact loaded for prediction: the ensemble and the best member."""
        from automl_tl.inference.predictor import Predictor

        return Predictor.load(self.artifact)


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
    shared_fs: bool = False,
) -> SearchResult:
    """Search for the best transfer of a pretrained backbone to ``data`` and write everything to ``out``.

    ``config`` is an :class:`ExperimentConfig`, a mapping or a YAML path; the keyword arguments override it.
    ``out`` is a local folder or a URI (``s3://bucket/prefix``). Joins the Ray cluster in ``RAY_ADDRESS`` or
    starts an embedded one for the duration of the call; ``shared_fs`` says a local ``out`` is mounted on
    every node of a multi-node cluster.

    >>> result = search("my_images/", "runs/first", time_budget_s=300)  # doctest: +SKIP
    >>> print(result.best.params["backbone"], result.ensemble.test.accuracy)  # doctest: +SKIP
    """
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    cfg = cfg.replace("data", source=data)
    overrides = {k: v for k, v in (("time_budget_s", time_budget_s), ("num_samples", trials), ("seed", seed)) if v is not None}
    if overrides:
        cfg = cfg.replace("search", **overrides)
    return run_pipeline(out, cfg, test=test, report=report, shared_fs=shared_fs)


def resume(run_dir: str | os.PathLike[str], *, report: bool = True, shared_fs: bool = False) -> SearchResult:
    """Continue the search in ``run_dir`` whose driver stopped (finished trials are kept), then finish it."""
    return run_pipeline(run_dir, None, report=report, shared_fs=shared_fs)


def run_pipeline(
    out: str | os.PathLike[str],
    config: ExperimentConfig | None,
    *,
    test: str | None = None,
    report: bool = True,
    shared_fs: bool = False,
    progress: bool = False,
) -> SearchResult:
    """The whole job into the run directory ``out``: the sweep (``config``; None resumes the one in ``out``),
    then the data diagnostics, the ensemble, calibration, test scores and artifact, then the report.

    A sweep or results step that fails raises; a report that fails is logged and the results stand.
    ``progress`` draws bars on a terminal (data validation, the sweep's trials).
    """
    from automl_tl.train.memory import scoped_env

    location = os.fspath(out)
    with scoped_env():  # the caller's environment as it was, whatever Ray and torch set while they ran
        from automl_tl.data.deep import write_run_diagnostics
        from automl_tl.evaluate.results import build_results
        from automl_tl.sweep.driver import resume_search, run_search

        if config is None:
            outcome = resume_search(location, progress=progress, shared_fs=shared_fs)
        else:
            outcome = run_search(config, location, test_source=test, progress=progress, shared_fs=shared_fs)
        write_run_diagnostics(location)  # diagnostics.json, from the features the sweep cached
        results = build_results(location)
        report_location = _write_report(location) if report else None
    return _result(location, outcome.rows, results, report_location, outcome.wall_s)


def _write_report(location: str) -> str | None:
    """The report closes every finished search; a failure there is said, and the results stand."""
    from automl_tl.report import REPORT_NAME, write_report
    from automl_tl.runs.storage import is_uri, join

    try:
        written = write_report(location)
    except (AutoMLError, OSError) as exc:
        logger.warning(f"not written ({exc}); the run's results are complete: retry with `automl-tl report {location}`",
                       extra={"stage": "report"})  # fmt: skip
        return None
    where = join(location, REPORT_NAME) if is_uri(location) else str(written)
    logger.info(where, extra={"stage": "report", "report": where})
    return where


def _result(
    location: str, rows: list[dict[str, Any]], results: Mapping[str, Any], report: str | None, wall_s: float
) -> SearchResult:
    from automl_tl.evaluate.outcome import BestTrial, EnsembleResult, LeaderboardRow
    from automl_tl.runs.storage import is_uri

    return SearchResult(
        run_dir=location.rstrip("/") if is_uri(location) else str(os.path.abspath(location)),
        metric=str(results["metric"]),
        leaderboard=tuple(LeaderboardRow.from_dict(row) for row in rows),
        best=BestTrial.from_dict(results["best"]),
        ensemble=EnsembleResult.from_dict(results["ensemble"]),
        artifact=str(results["artifact"]),
        report=report,
        wall_s=wall_s,
    )
