"""From a finished sweep to what a user trusts: the ensemble, calibrated test metrics and the artifact.

Everything here is chosen on validation data only (ensemble members, weights, temperatures); the test split,
which no trial and no selection ever saw, is touched once at the end to score the best single trial and the
ensemble. The artifact (``RUN_DIR/artifact/``) holds every ensemble member plus the best single trial and the
cascade's cheap member (with weight 0 when the selection left them out), so serving can offer ``--mode best``,
``--mode ensemble`` and ``--mode cascade``. Every candidate's forward latency is measured first
(:mod:`automl_tl.inference.latency`): selection keeps within ``search.latency_budget_ms``, the cascade is
chosen by expected latency, and the figures go into the manifest and the report's accuracy-latency plot.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from automl_tl.inference.artifact import member_from_trial, write_artifact
from automl_tl.config import load_config
from automl_tl.evaluate.crossval import decide_on_folds, spread_note, use_cross_validation
from automl_tl.evaluate.ensemble import CascadeChoice, EnsembleSelection, choose_cascade, no_worse_than_best, select_ensemble, within_budget
from automl_tl.inference.calibrate import apply_temperature, combine, fit_temperature
from automl_tl.inference.latency import LATENCY_KEY, trial_latency_ms, where_timed
from automl_tl.errors import SearchError
from automl_tl.evaluate.metrics import classification_metrics, format_metrics_table
from automl_tl.evaluate.ranking import beats
from automl_tl.runs.locate import ARTIFACT_DIR
from automl_tl.runs.rundir import RunDir
from automl_tl.runs.storage import local_data_cache

__all__ = ["build_results", "ARTIFACT_DIR"]

logger = logging.getLogger(__name__)
_ENSEMBLE, _EVALUATE, _RESULTS = {"stage": "ensemble"}, {"stage": "evaluate"}, {"stage": "results"}

# Ensemble selection optimises validation log loss: it rewards calibrated, complementary members, which
# accuracy (flat on small validation sets) cannot tell apart.
SELECTION_METRIC = "log_loss"


def build_results(run_dir: str | Path) -> dict[str, Any]:
    """Select the ensemble, calibrate, write the artifact, score best and ensemble on the test split."""
    run = RunDir.open(run_dir)
    run.pull("summary.json", "data.json", "config.yaml", "trials")  # a remote run: into the local mirror
    summary = run.read_json("summary.json")
    data = run.read_json("data.json")
    config = load_config(run.path / "config.yaml")
    class_names = list(data["class_names"])
    labels = np.asarray(data["labels"], dtype=np.int64)
    val_idx, test_idx = np.asarray(data["val"], dtype=np.int64), np.asarray(data["test"], dtype=np.int64)
    y_val = labels[val_idx]

    candidates = [r["trial_id"] for r in summary["trials"] if r.get("has_model")]
    if not candidates:
        raise SearchError(f"{run.path}: no trial saved a model, so there is nothing to ensemble")
    val_probs = {t: np.load(run.trial_dir(t) / "val_probs.npy") for t in candidates}
    best_id = str(summary["best"]["trial_id"])
    pool, pool_labels, folds = val_probs, y_val, None
    infos = {t: run.read_json(f"trials/{t}/trial.json") for t in candidates}
    latency = trial_latency_ms(infos)
    cost = {t: latency[t][LATENCY_KEY] for t in candidates}
    if use_cross_validation(len(val_idx), config.search.cv_below_images):
        logger.info(f"{len(val_idx)} validation images (search.cv_below_images={config.search.cv_below_images}): "
                    f"cross-validating heads on cached features, {config.search.cv_folds} folds over train + val",
                    extra=_ENSEMBLE)  # fmt: skip
        folds = decide_on_folds(data, local_data_cache(data), infos, val_probs, config.search.cv_folds, config.search.seed,
                                tta=config.search.test_time_augmentation)  # fmt: skip
        logger.info(folds.why + (f"; fold accuracy (mean +/- sd): {spread_note(folds.scores)}" if folds.scores else ""),
                    extra=_ENSEMBLE)  # fmt: skip
        if folds.used and folds.best_id is not None:
            pool, pool_labels, best_id = folds.probs, folds.labels, folds.best_id
    chosen_on = f"{'cross-validated' if pool is not val_probs else 'validation'} predictions on {pool_labels.size} images"
    logger.info(f"selecting from {len(pool)} trials ({config.search.ensemble_method}, size "
                f"{config.search.ensemble_size}) on {chosen_on}", extra=_ENSEMBLE)  # fmt: skip
    budget = config.search.latency_budget_ms
    selection = select_ensemble(pool, pool_labels, config.search.ensemble_method, config.search.ensemble_size,
                                SELECTION_METRIC, cost, budget, config.search.ensemble_init_best)  # fmt: skip
    rival = best_id if within_budget((), best_id, cost, budget) else selection.members[0]  # the best that fits
    selection, why = no_worse_than_best(selection, pool, pool_labels, rival, config.search.metric)
    if budget is not None:
        logger.info(f"latency budget {budget:g} ms: the ensemble's members take {sum(cost[t] for t in selection.members):.1f} "
                    f"ms at batch 1 ({where_timed()})", extra=_ENSEMBLE)  # fmt: skip
    served = {"mode": "best_member" if selection.members == (best_id,) else "ensemble", "why": f"{why}, on {chosen_on}"}
    logger.info(f"serves the {served['mode'].replace('_', ' ')}: {served['why']}", extra=_ENSEMBLE)
    temperatures = {t: fit_temperature(pool[t], pool_labels) for t in {*pool, best_id}}
    ens_val_raw = combine([pool[t] for t in selection.members], selection.weights)
    ens_temperature = fit_temperature(ens_val_raw, pool_labels)
    cascade = choose_cascade(pool, pool_labels, temperatures, selection, ens_temperature, cost,
                             config.search.cascade_tolerance)  # fmt: skip
    logger.info(f"cascade: {_cascade_note(cascade)}", extra=_ENSEMBLE)
    best_val = classification_metrics(pool_labels, apply_temperature(pool[best_id], temperatures[best_id]), class_names)
    ens_val = classification_metrics(pool_labels, apply_temperature(ens_val_raw, ens_temperature), class_names)

    # Served alone (weight 0 in the ensemble): the best single trial (mode best) and the cascade's cheap member.
    alone = [t for t in dict.fromkeys([best_id] + ([cascade.member] if cascade else [])) if t not in selection.members]
    member_ids = list(selection.members) + alone
    weights = list(selection.weights) + [0.0] * len(alone)
    members = []
    for t in member_ids:
        record, state = member_from_trial(run.trial_dir(t), member_id=t)
        if folds is not None and folds.used and t in folds.probs:  # chosen on folds: served refitted on train + val
            state = {**state, **folds.refit(t, len(class_names))}
            record = dataclasses.replace(record, tta=folds.tta.get(t, ()))  # as its fold predictions were
        members.append((dataclasses.replace(record, temperature=temperatures[t], latency_ms=latency[t]), state))
    artifact_dir = run.path / ARTIFACT_DIR
    max_side = config.data.cache_max_side
    rule = {"member_id": cascade.member, "threshold": cascade.threshold, "val": cascade.to_dict()} if cascade else None
    timed = {"latency_measured_on": where_timed()}
    write_artifact(artifact_dir, class_names, members, weights, ens_temperature, {"best_member": best_id, **timed},
                   method=selection.method, decode_max_side=max_side, cascade=rule)  # fmt: skip

    best_test: dict[str, Any] | None = None
    ens_test: dict[str, Any] | None = None
    cascade_test: dict[str, Any] | None = None
    if len(test_idx):
        logger.info(f"scoring on {len(test_idx)} held-out test images", extra=_EVALUATE)
        raw = _member_test_probs(artifact_dir, local_data_cache(data), test_idx)
        y_test = labels[test_idx]
        best_test = classification_metrics(y_test, apply_temperature(raw[best_id], temperatures[best_id]), class_names)
        ens_raw = combine([raw[t] for t in selection.members], selection.weights)
        ens_test = classification_metrics(y_test, apply_temperature(ens_raw, ens_temperature), class_names)
        cascade_test = _cascade_test(artifact_dir, raw, y_test, class_names) if cascade else None
    else:
        logger.info("no test split (the data gave train/val only and no --test): test metrics are skipped",
                    extra=_EVALUATE)  # fmt: skip

    ens_beats = beats(ens_test or ens_val, best_test or best_val, config.search.metric)
    results: dict[str, Any] = {
        "metric": config.search.metric,
        "best": {**_best_entry(summary, best_id), "temperature": temperatures[best_id], "val_calibrated": best_val,
                 "test": best_test},  # fmt: skip
        "selection": {"on": chosen_on, "served": served["mode"], "why": served["why"],
                      "cross_validation": folds.to_dict() if folds is not None else None},  # fmt: skip
        "ensemble": {
            "method": selection.method,
            "selection_metric": SELECTION_METRIC,
            "members": list(selection.members),
            "weights": list(selection.weights),
            "temperature": ens_temperature,
            "member_temperatures": {t: temperatures[t] for t in selection.members},
            "val": ens_val,
            "test": ens_test,
            "beat_best": ens_beats,
        },
        "cascade": {**cascade.to_dict(), "test": cascade_test} if cascade else None,
        "latency": _frontier(pool, pool_labels, latency, selection, ens_val, cascade, budget),
        "artifact": f"{run.remote}/{ARTIFACT_DIR}" if run.remote else str(artifact_dir),
    }
    summary.update(results)
    run.write_json("summary.json", summary)
    metrics = {"best_member": best_id, "best": {"val": best_val, "test": best_test}, "ensemble": {"val": ens_val, "test": ens_test},
               **timed, **({"cascade": results["cascade"]} if cascade else {})}  # fmt: skip
    write_artifact(artifact_dir, class_names, members, weights, ens_temperature, metrics,
                   method=selection.method, decode_max_side=max_side, cascade=rule)  # fmt: skip
    run.push(ARTIFACT_DIR, "summary.json")
    split = "test" if best_test is not None else "validation (no test split)"
    table = {"best": best_test or best_val, "ensemble": ens_test or ens_val}
    scalars = {name: {k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "log_loss", "ece")}
               for name, m in table.items()}  # fmt: skip
    logger.info(f"{split} metrics:\n{format_metrics_table(table)}", extra={**_RESULTS, "metrics": scalars})
    verdict = "beat" if ens_beats else "did not beat"
    logger.info(f"the ensemble of {len(selection.members)} trial(s) {verdict} the best single trial; artifact: "
                f"{results['artifact']}",
                extra={**_RESULTS, "artifact": results["artifact"], "beat_best": ens_beats})  # fmt: skip
    return results


def _best_entry(summary: dict[str, Any], best_id: str) -> dict[str, Any]:
    """The summary's ``best`` entry for ``best_id``: the sweep's own best, or the best on folds."""
    if str(summary["best"]["trial_id"]) == best_id:
        return dict(summary["best"])
    row = next(r for r in summary["trials"] if str(r["trial_id"]) == best_id)
    return {"trial_id": best_id, "config": {k: row.get(k) for k in summary["best"].get("config", {})},
            "val": {k: row.get(f"best_val_{k}") for k in ("accuracy", "macro_f1", "log_loss")}}  # fmt: skip



def _cascade_note(cascade: CascadeChoice | None) -> str:
    if cascade is None:
        return "no member cheaper than the ensemble keeps its accuracy within the tolerance; mode cascade is off"
    return (f"{cascade.member} answers alone at calibrated confidence >= {cascade.threshold:.4f}; on validation "
            f"{cascade.escalation_rate:.1%} of images go on to the ensemble, accuracy {cascade.accuracy:.4f} vs the "
            f"ensemble's {cascade.ensemble_accuracy:.4f}, {cascade.expected_latency_ms:.1f} ms per image on average")


def _cascade_test(artifact_dir: Path, raw: dict[str, np.ndarray], labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """The cascade's test metrics and escalation rate, routed by the inference core's own rule."""
    from automl_tl.inference.artifact import load_artifact
    from automl_tl.inference.core import plan_for

    plan = plan_for(load_artifact(artifact_dir), "cascade")
    probs = [raw[m] for m in plan.member_ids]
    metrics = classification_metrics(labels, plan.calibrate(probs), class_names)
    return {**metrics, "escalation_rate": float(np.mean(~plan.confident(probs[0])))}


def _frontier(pool: dict[str, np.ndarray], labels: np.ndarray, latency: dict[str, dict[str, float]],
              selection: EnsembleSelection, ens_val: dict[str, Any], cascade: CascadeChoice | None,
              budget: float | None) -> dict[str, Any]:  # fmt: skip
    """Accuracy against batch-1 latency for every trial, the ensemble and the cascade (the report's frontier)."""
    trials = {t: {"latency_ms": latency[t], "accuracy": float(np.mean(pool[t].argmax(axis=1) == labels))} for t in pool}
    ensemble_ms = sum(latency[t][LATENCY_KEY] for t in selection.members)
    return {"measured_on": where_timed(), "budget_ms": budget, "key": LATENCY_KEY, "trials": trials,
            "ensemble": {"latency_ms": ensemble_ms, "accuracy": ens_val["accuracy"], "members": list(selection.members)},
            "cascade": {"latency_ms": cascade.expected_latency_ms, "accuracy": cascade.accuracy,
                        "member": cascade.member} if cascade else None}  # fmt: skip


def _member_test_probs(artifact_dir: Path, cache_path: str, test_idx: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Each member's uncalibrated test probabilities through the inference core: serving's own preprocessing
    and forward, each member once (the best single trial is one of them)."""
    from automl_tl.data import Dataset
    from automl_tl.inference.artifact import load_artifact
    from automl_tl.inference.core import Members

    artifact = load_artifact(artifact_dir)
    members = Members(artifact)
    every = range(len(artifact.members))
    images = Dataset.open(Path(cache_path))
    parts: list[list[np.ndarray]] = [[] for _ in every]
    for start in range(0, len(test_idx), batch_size):
        arrays = [images.image(int(i)) for i in test_idx[start : start + batch_size]]
        for i, probs in enumerate(members.probabilities(arrays, every)):
            parts[i].append(probs)
    return {m.member_id: np.concatenate(parts[i]) for i, m in enumerate(artifact.members)}
