"""The sweep's searcher: Optuna proposing, each effective configuration run once, and backbones ranked by
transferability before they are fine-tuned.

Two proposals that differ only in settings their kind of trial ignores (the learning rate of a probe on
cached features, the layer decay of a frozen backbone: :meth:`TrialConfig.identity`) train the same model.
A proposal whose identity a trial already has (finished or running) is not run: the searcher asks Optuna
again, for a point drawn at random (see ``_random_point``). When every distinct point of a finite space has been proposed the searcher says so and Tune ends the
sweep (``summary.json``'s ``sweep.stop_reason`` is ``space_exhausted``), instead of waiting out the budget.

Every trial that trains a head on a backbone's cached features (the frozen-first probe among them) reports
the LogME score of those features (``automl_tl.train.transferability``). Once a backbone's score trails the
best known by more than ``search.rank_margin``, a proposal that would step through its images (fine-tuning,
or a frozen extractor under augmentation) is declined before it becomes a trial; its cheap head trials on
cached features stay allowed. While a backbone's score is on the way (a trial on its cached features is
running), proposals that would step through its images wait for it, so trials running side by side do
not fine-tune a backbone that its probe is about to rank out.

A declined proposal is told to Optuna as FAILED, which its samplers leave out of their model: TPE keeps
sampling from what it learnt of trials that ran, restricted to what ranking allows (a constrained space),
and the trial cap and the budget go to trials that run. Telling it PRUNED would instead teach TPE that low
freeze depths are bad in general, since only fine-tuning proposals are ever declined; ending such a trial
inside Tune would spend a trial slot and a process start on it.

A duplicate is told FAILED too, whether the trial it repeats has finished or still runs, and for the same
reason: the model keeps one observation per point, the one the trial that ran reported. Telling it
COMPLETE with that trial's value adds a copy of the point for every repeat, and since TPE proposes again
where it has seen good values, the copies of the best point pull each categorical choice towards it until
nearly every proposal repeats it and the sweep stalls. Duplicates are counted in ``ranking.json`` (``duplicates_skipped``) and logged once per trial.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optuna.samplers import RandomSampler
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from automl_tl.config import ExperimentConfig
from automl_tl.runs.storage import write_atomic
from automl_tl.train.trial_config import TrialConfig
from automl_tl.train.transferability import backbone_scores, prune_decisions, ranking_enabled

__all__ = ["MAX_DECLINES", "RANKING_FILE", "RankedOptunaSearch", "ranked_search", "ranking_summary", "with_ranking"]

logger = logging.getLogger(__name__)
RANKING_FILE = "ranking.json"  # the searcher's record: backbones pruned (and why), proposals declined or skipped
# Proposals in a row that cannot run (declined or duplicates) before the searcher stops asking: a declined
# one is then let through, a duplicate left for Tune's next request. TPE gives every category some prior
# weight, so reaching it means the space left is all but empty.
MAX_DECLINES = 200


class RankedOptunaSearch(OptunaSearch):
    """:class:`OptunaSearch` that runs each effective configuration once and declines image-stepping proposals
    for backbones ranked out (see module)."""

    def __init__(self, constants: Mapping[str, Any], prune: bool, margin: float, record: Path,
                 points: int | None = None, seed: int | None = None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self._constants = dict(constants)  # the param space's fixed values: a proposal only holds searched ones
        self._prune, self._margin, self._record = prune, margin, str(record)
        self._points = points  # the space's distinct effective points when it is finite
        self._scores: dict[str, float] = {}
        self._pruned: dict[str, str] = {}
        self._declined: dict[str, int] = {}
        self._scoring: dict[str, str] = {}  # trial id -> the unscored backbone whose features that trial trains on
        self._ran: dict[tuple[tuple[str, Any], ...], str] = {}  # identity -> the trial that runs it
        self._duplicates: dict[str, int] = {}  # trial -> proposals skipped as its duplicates
        self._explore = RandomSampler(seed=seed)  # draws what is asked after a repeat

    # Searcher.FINISHED (a str) ends the search: Ray documents it, though its annotation leaves it out.
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        if self._points is not None and len(self._ran) >= self._points:
            return self._exhausted()
        for attempt in range(MAX_DECLINES + 1):
            params = super().suggest(trial_id) or {}
            cfg = TrialConfig.from_params({**self._constants, **params})
            identity = cfg.identity()
            if identity in self._ran:
                self._skip_duplicate(trial_id, self._ran[identity])
                continue
            verdict = self._rank(trial_id, cfg)
            if verdict == "wait":
                self._withdraw(trial_id)  # its score is on the way: Tune asks again on its next step
                return None
            if verdict == "decline" and attempt < MAX_DECLINES:
                self._withdraw(trial_id)
                self._declined[cfg.backbone] = self._declined.get(cfg.backbone, 0) + 1
                self._write()
                continue
            if verdict == "decline":
                logger.warning(f"ranking declined {MAX_DECLINES} proposals in a row; letting one on {cfg.backbone} run",
                               extra={"stage": "search"})  # fmt: skip
            self._ran[identity] = trial_id
            return params
        return None  # proposals kept repeating trials: Tune asks again on its next step

    def _random_point(self) -> dict[str, Any]:
        """A point drawn at random from the searched dimensions, asked next in place of a repeat.

        A sampler that has learnt one point is best keeps proposing it (TPE sees only trials that ran, and the
        repeats it is told failed are out of its model), so asking it again after a repeat can take thousands
        of asks to leave a point that a probe made best. A random draw leaves it at once; the trial it becomes
        is a completed trial like any other, which the sampler then learns from."""
        space: Any = self._space  # flat name -> Optuna distribution, set up by OptunaSearch
        study: Any = self._ot_study
        return {name: self._explore.sample_independent(study, None, name, dist)  # type: ignore[arg-type]
                for name, dist in space.items()}  # fmt: skip

    def _rank(self, trial_id: str, cfg: TrialConfig) -> str:
        """What ranking says of a proposal: ``run``, ``wait`` (its backbone's score is on the way) or ``decline``."""
        backbone = cfg.backbone
        if cfg.frozen_features:
            if backbone not in self._scores:
                self._scoring[trial_id] = backbone  # this trial will score its backbone
            return "run"
        if not self._prune or (backbone not in self._scores and backbone not in self._scoring.values()):
            return "run"
        if backbone not in self._scores:
            return "wait"
        return "decline" if backbone in self._pruned else "run"

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._note(trial_id, result)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self._note(trial_id, result or {})
        self._scoring.pop(trial_id, None)  # scored, or it never will: nothing waits on it any more
        super().on_trial_complete(trial_id, result, error)

    def _skip_duplicate(self, trial_id: str, first: str) -> None:
        """The proposal for ``trial_id`` trains what trial ``first`` trains: withdrawn, counted, and logged the
        first time only."""
        self._withdraw(trial_id)
        study: Any = self._ot_study  # set up by OptunaSearch before the first suggestion
        study.enqueue_trial(self._random_point())  # what the next ask returns: see _random_point
        self._duplicates[first] = self._duplicates.get(first, 0) + 1
        if self._duplicates[first] == 1:
            logger.info(f"proposals that train what trial {first} trains (they differ only in settings its kind of "
                        "trial ignores) are not run again", extra={"stage": "search"})  # fmt: skip
        self._write()

    def _exhausted(self) -> str:
        logger.info(f"each of the search space's {self._points} distinct point(s) has been proposed; no more trials",
                    extra={"stage": "search"})  # fmt: skip
        return str(Searcher.FINISHED)

    def _withdraw(self, trial_id: str) -> None:
        """Tell Optuna the proposal for ``trial_id`` failed (out of its model) and forget it."""
        study: Any = self._ot_study  # set up by OptunaSearch before the first suggestion
        study.tell(self._ot_trials.pop(trial_id), state=TrialState.FAIL)

    def _note(self, trial_id: str, result: Mapping[str, Any]) -> None:
        score = result.get("transferability")
        trial = self._ot_trials.get(trial_id)
        if score is None or trial is None:
            return
        backbone = str({**self._constants, **trial.params}.get("backbone"))
        if self._scores.get(backbone, float("-inf")) >= float(score):
            return
        self._scores = backbone_scores([*self._scores.items(), (backbone, float(score))])
        self._scoring = {t: b for t, b in self._scoring.items() if b != backbone}
        if self._prune:
            for name, why in prune_decisions(self._scores, self._margin).items():
                if name not in self._pruned:
                    logger.info(f"ranking: {name} is pruned ({why}): no more fine-tuning proposed for it",
                                extra={"stage": "search"})  # fmt: skip
                    self._pruned[name] = why
        self._write()

    def _write(self) -> None:
        record = {"scores": self._scores, "pruned": self._pruned, "declined": self._declined,
                  "duplicates_skipped": sum(self._duplicates.values()), "duplicates_of": self._duplicates}  # fmt: skip
        Path(self._record).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(self._record), json.dumps(record, indent=2))


def ranking_summary(config: ExperimentConfig, rows: list[dict[str, Any]], record_path: Path) -> dict[str, Any]:
    """``summary.json``'s ``transferability``: each backbone's score (from the trials that scored it), which
    backbones ranking pruned and why, and how many proposals it declined for each."""
    backbones = list(config.space.backbones)
    enabled = ranking_enabled(config.search.rank_backbones, len(backbones))
    scores = backbone_scores((str(r.get("backbone")), r.get("transferability")) for r in rows)
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    pruned = prune_decisions(scores, config.search.rank_margin) if enabled else {}
    return {
        "method": "logme",
        "on": "the train split's frozen features; higher is better",
        "setting": config.search.rank_backbones,
        "enabled": enabled,
        "margin": config.search.rank_margin,
        "scores": {name: scores.get(name) for name in backbones},
        "best": max(scores, key=lambda n: scores[n]) if scores else None,
        "pruned": pruned,
        "declined_proposals": {name: int(n) for name, n in dict(record.get("declined") or {}).items()},
        "duplicates_skipped": int(record.get("duplicates_skipped") or 0),
    }


def with_ranking(rows: list[dict[str, Any]], summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Leaderboard rows with their backbone's score and, for a pruned backbone, why."""
    scores, pruned = summary["scores"], summary["pruned"]
    return [{**r, "transferability": scores.get(r.get("backbone")), "pruned_by_rank": pruned.get(r.get("backbone"), "")}
            for r in rows]  # fmt: skip


def ranked_search(config: ExperimentConfig, param_space: Mapping[str, Any], record: Path, **kwargs: Any) -> RankedOptunaSearch:
    """The sweep's searcher for ``config`` (``kwargs`` go to :class:`OptunaSearch`)."""
    from ray.tune.search.sample import Domain

    from automl_tl.sweep.space import count_points

    constants = {k: v for k, v in param_space.items() if not isinstance(v, Domain)}
    prune = ranking_enabled(config.search.rank_backbones, len(config.space.backbones))
    return RankedOptunaSearch(constants, prune, config.search.rank_margin, record, count_points(dict(param_space)),
                              config.search.seed, **kwargs)  # fmt: skip
