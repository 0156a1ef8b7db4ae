"""The sweep's searcher: Optuna proposing, with backbones ranked by transferability before they are fine-tuned.

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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from automl_tl.config import ExperimentConfig
from automl_tl.runs.storage import write_atomic
from automl_tl.train.trial_config import TrialConfig
from automl_tl.train.transferability import backbone_scores, prune_decisions, ranking_enabled

__all__ = ["MAX_DECLINES", "RANKING_FILE", "RankedOptunaSearch", "ranked_search", "ranking_summary", "with_ranking"]

logger = logging.getLogger(__name__)
RANKING_FILE = "ranking.json"  # the searcher's record: backbones pruned (and why), proposals declined
# Declined proposals in a row before one is let through anyway: TPE gives every category some prior weight,
# so reaching it means the space left by ranking is all but empty.
MAX_DECLINES = 200


class RankedOptunaSearch(OptunaSearch):
    """:class:`OptunaSearch` that declines image-stepping proposals for backbones ranked out (see module)."""

    def __init__(self, constants: Mapping[str, Any], prune: bool, margin: float, record: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._constants = dict(constants)  # the param space's fixed values: a proposal only holds searched ones
        self._prune, self._margin, self._record = prune, margin, str(record)
        self._scores: dict[str, float] = {}
        self._pruned: dict[str, str] = {}
        self._declined: dict[str, int] = {}
        self._scoring: dict[str, str] = {}  # trial id -> the unscored backbone whose features that trial trains on

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        params: dict[str, Any] | None = None
        for attempt in range(MAX_DECLINES + 1):
            params = super().suggest(trial_id) or {}
            full = {**self._constants, **params}
            backbone = str(full.get("backbone"))
            if TrialConfig.from_params(full).frozen_features:
                if backbone not in self._scores:
                    self._scoring[trial_id] = backbone  # this trial will score its backbone
                return params
            if not self._prune:
                return params
            if backbone not in self._scores and backbone in self._scoring.values():
                self._withdraw(trial_id)  # its score is on the way: Tune asks again on its next step
                return None
            if backbone not in self._pruned:
                return params
            if attempt == MAX_DECLINES:
                logger.warning(f"ranking declined {MAX_DECLINES} proposals in a row; letting one on {backbone} run",
                               extra={"stage": "search"})  # fmt: skip
                return params
            self._withdraw(trial_id)
            self._declined[backbone] = self._declined.get(backbone, 0) + 1
            self._write()
        return params

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._note(trial_id, result)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self._note(trial_id, result or {})
        self._scoring.pop(trial_id, None)  # scored, or it never will: nothing waits on it any more
        super().on_trial_complete(trial_id, result, error)

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
        record = {"scores": self._scores, "pruned": self._pruned, "declined": self._declined}
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
    }


def with_ranking(rows: list[dict[str, Any]], summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Leaderboard rows with their backbone's score and, for a pruned backbone, why."""
    scores, pruned = summary["scores"], summary["pruned"]
    return [{**r, "transferability": scores.get(r.get("backbone")), "pruned_by_rank": pruned.get(r.get("backbone"), "")}
            for r in rows]  # fmt: skip


def ranked_search(config: ExperimentConfig, param_space: Mapping[str, Any], record: Path, **kwargs: Any) -> RankedOptunaSearch:
    """The sweep's searcher for ``config`` (``kwargs`` go to :class:`OptunaSearch`)."""
    from ray.tune.search.sample import Domain

    constants = {k: v for k, v in param_space.items() if not isinstance(v, Domain)}
    prune = ranking_enabled(config.search.rank_backbones, len(config.space.backbones))
    return RankedOptunaSearch(constants, prune, config.search.rank_margin, record, **kwargs)
