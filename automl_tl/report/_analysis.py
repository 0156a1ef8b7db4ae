"""What the report computes rather than reads: parameter importances, train/validation divergence, the
served model's predictions on the evaluation split, and its most confident mistakes as thumbnails.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from automl_tl.errors import AutoMLError
from automl_tl.evaluate.metrics import confusion_matrix
from automl_tl.train.loop import HYPERPARAMETERS
from automl_tl.report._inputs import Curve, RunInputs

__all__ = [
    "Divergence",
    "Importance",
    "Miss",
    "ParamSpec",
    "Predictions",
    "confident_misses",
    "divergences",
    "param_importances",
    "param_specs",
    "predictions",
    "thumbnail_base64",
]

MIN_TRIALS_FOR_IMPORTANCE = 3
# A trial is flagged when train accuracy ends this far above validation accuracy, having grown by at least
# GAP_GROWTH since its first epoch, or when validation log loss climbs back this much above its minimum
# while training loss keeps falling.
GAP, GAP_GROWTH, LOSS_RISE = 0.10, 0.05, 0.10


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One hyperparameter as searched: categorical choices, or a numeric range (log-scaled or not)."""

    name: str
    choices: tuple[Any, ...] | None
    low: float = 0.0
    high: float = 0.0
    log: bool = False

    @property
    def searched(self) -> bool:
        return len(self.choices) > 1 if self.choices is not None else self.high > self.low


def param_specs(space: Mapping[str, Any], trials: Sequence[Mapping[str, Any]]) -> list[ParamSpec]:
    """The search space from the run's config, widened to every value a trial really used (PBT mutates)."""
    specs = []
    for name, key in HYPERPARAMETERS.items():
        seen = [t.get(name) for t in trials if name in t]
        rng = space.get(key)
        if not isinstance(rng, Mapping):  # a list of choices; a range is {low, high, log}
            configured = list(rng or [])
            choices = tuple(configured + [v for v in dict.fromkeys(seen) if v not in configured])
            specs.append(ParamSpec(name, choices))
            continue
        numbers = [float(v) for v in seen if isinstance(v, (int, float))]
        low, high = min([float(rng["low"]), *numbers]), max([float(rng["high"]), *numbers])
        specs.append(ParamSpec(name, None, low, high, bool(rng.get("log", False)) and low > 0))
    return specs


@dataclasses.dataclass(frozen=True)
class Importance:
    values: dict[str, float]  # searched parameter -> share of importance, largest first; empty if not computed
    note: str


def param_importances(trials: Sequence[Mapping[str, Any]], specs: Sequence[ParamSpec]) -> Importance:
    """PED-ANOVA importances (Optuna's default; no scikit-learn) of each searched parameter for val accuracy.

    The finished trials become an in-memory Optuna study. The "top" group PED-ANOVA contrasts with all
    trials is the best 10%, but at least two trials so a small sweep still has a group to compare.
    """
    searched = [s for s in specs if s.searched]
    done = [t for t in trials if isinstance(t.get("best_val_accuracy"), (int, float))]
    if not searched:
        return Importance({}, "Nothing was searched: every hyperparameter had a single value.")
    if len(done) < MIN_TRIALS_FOR_IMPORTANCE:
        return Importance({}, f"Importances need at least {MIN_TRIALS_FOR_IMPORTANCE} finished trials; this run has {len(done)}.")
    if len({float(t["best_val_accuracy"]) for t in done}) == 1:
        return Importance({}, "Every finished trial reached the same validation accuracy, so no parameter stands out.")

    import optuna
    from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

    distributions: dict[str, BaseDistribution] = {
        s.name: CategoricalDistribution(s.choices) if s.choices is not None else FloatDistribution(s.low, s.high, log=s.log)
        for s in searched
    }
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small-sample and experimental-feature warnings; the note says it
            study = optuna.create_study(direction="maximize")
            for t in done:
                params = {s.name: t.get(s.name) if s.choices is not None else float(t[s.name]) for s in searched}
                study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                          value=float(t["best_val_accuracy"])))  # fmt: skip
            quantile = min(0.5, max(0.1, 2 / len(done)))
            evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
            raw = optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=False)
    finally:
        optuna.logging.set_verbosity(verbosity)
    total = sum(raw.values())
    if total <= 0:
        return Importance({}, "PED-ANOVA found no parameter that separates the best trials from the rest.")
    values = {k: v / total for k, v in sorted(raw.items(), key=lambda kv: -kv[1])}
    caution = " With fewer than 20 trials, read them as a hint, not a finding." if len(done) < 20 else ""
    note = (f"PED-ANOVA (Optuna {optuna.__version__}) over {len(done)} finished trials: how much each parameter's "
            f"distribution among the best {quantile:.0%} differs from all trials, as shares summing to 1.{caution}")  # fmt: skip
    return Importance(values, note)


@dataclasses.dataclass(frozen=True)
class Divergence:
    trial_id: str
    message: str


def divergences(curves: Mapping[str, Curve]) -> dict[str, Divergence]:
    """Trials whose train and validation curves drift apart (see GAP, GAP_GROWTH, LOSS_RISE)."""
    flagged = {}
    for tid, curve in curves.items():
        reasons = []
        train, val = dict(curve.points("train_accuracy")), dict(curve.points("val_accuracy"))
        both = sorted(set(train) & set(val))
        if len(both) >= 2:
            first, last = both[0], both[-1]
            gap, start_gap = train[last] - val[last], train[first] - val[first]
            if gap >= GAP and gap - start_gap >= GAP_GROWTH:
                reasons.append(f"by epoch {last} train accuracy is {train[last]:.1%} against {val[last]:.1%} on "
                               f"validation (a gap of {gap * 100:.0f} points, {start_gap * 100:+.0f} at epoch {first})")  # fmt: skip
        val_loss, train_loss = dict(curve.points("val_log_loss")), dict(curve.points("train_loss"))
        if len(val_loss) >= 2:
            low_epoch = min(val_loss, key=lambda e: val_loss[e])
            last = max(val_loss)
            rise = val_loss[last] - val_loss[low_epoch]
            train_fell = low_epoch in train_loss and last in train_loss and train_loss[last] < train_loss[low_epoch]
            if last != low_epoch and rise >= LOSS_RISE * max(val_loss[low_epoch], 0.1) and train_fell:
                reasons.append(f"validation log loss rose from {val_loss[low_epoch]:.3f} (epoch {low_epoch}) to "
                               f"{val_loss[last]:.3f} (epoch {last}) while training loss kept falling")  # fmt: skip
        if reasons:
            flagged[tid] = Divergence(tid, "; ".join(reasons))
    return flagged


@dataclasses.dataclass(frozen=True)
class Predictions:
    """The served model (calibrated ensemble) and the best single trial on the evaluation split."""

    split: str  # "test" or "validation"
    rows: np.ndarray  # indices into data.json's labels and the image cache
    labels: np.ndarray
    ensemble: np.ndarray
    best: np.ndarray | None
    notes: tuple[str, ...]


def predictions(run: RunInputs) -> Predictions | None:
    """Test predictions through the saved artifact when the run has a test split, else validation ones
    rebuilt from each trial's saved ``val_probs.npy`` exactly as build_results combined them."""
    data = run.data
    if not data.get("labels"):
        return None
    labels = np.asarray(data["labels"], dtype=np.int64)
    notes: list[str] = []
    if run.has_test and data.get("test"):
        try:
            return _test_predictions(run, labels)
        except (AutoMLError, OSError, ValueError, KeyError) as exc:
            notes.append(f"Test predictions could not be recomputed from the artifact ({exc}); showing validation instead.")
    from automl_tl.inference.calibrate import apply_temperature, combine

    ens, best = run.summary["ensemble"], run.summary["best"]
    try:
        probs = {t: np.load(run.path / "trials" / t / "val_probs.npy") for t in {*ens["members"], best["trial_id"]}}
    except OSError as exc:
        notes.append(f"Validation probabilities are missing ({exc}).")
        return None
    rows = np.asarray(data["val"], dtype=np.int64)
    ensemble = apply_temperature(combine([probs[t] for t in ens["members"]], ens["weights"]), float(ens["temperature"]))
    single = apply_temperature(probs[best["trial_id"]], float(best["temperature"]))
    return Predictions("validation", rows, labels[rows], ensemble, single, tuple(notes))


def _test_predictions(run: RunInputs, labels: np.ndarray) -> Predictions:
    from automl_tl.data import Dataset
    from automl_tl.inference.calibrate import apply_temperature, combine
    from automl_tl.inference.predictor import Predictor

    predictor = Predictor.load(run.path)  # the run directory's artifact
    art = predictor.artifact
    images = Dataset.open(Path(run.data["cache_path"]))
    rows = np.asarray(run.data["test"], dtype=np.int64)
    best_id = str(run.summary["best"]["trial_id"])
    best_index = art.member_index(best_id)
    ensemble, single = [], []
    for start in range(0, len(rows), 32):
        batches = predictor.preprocess([images.image(int(i)) for i in rows[start : start + 32]])
        probs = predictor.member_probabilities(batches)  # each member once; the best is one of them
        ensemble.append(apply_temperature(combine(probs, art.weights), art.temperature))
        single.append(apply_temperature(probs[best_index], art.members[best_index].temperature))
    ens_probs, best_probs = np.concatenate(ensemble), np.concatenate(single)
    notes = []
    expected = run.summary["ensemble"]["test"]["confusion_matrix"]
    got = confusion_matrix(labels[rows], ens_probs.argmax(axis=1), len(run.class_names)).tolist()
    if got != expected:
        notes.append("The artifact's test predictions no longer reproduce summary.json's confusion matrix: "
                     "the artifact or the image cache changed after the run.")  # fmt: skip
    return Predictions("test", rows, labels[rows], ens_probs, best_probs, tuple(notes))


@dataclasses.dataclass(frozen=True)
class Miss:
    row: int
    name: str
    true_class: str
    predicted: str
    confidence: float
    true_probability: float
    png_base64: str


def confident_misses(
    preds: Predictions, class_names: Sequence[str], cache_path: str | None, limit: int = 12, side: int = 112
) -> list[Miss]:
    """The served model's ``limit`` most confident wrong answers, as PNG thumbnails at most ``side`` px."""
    from automl_tl.data import Dataset

    predicted = preds.ensemble.argmax(axis=1)
    wrong = np.flatnonzero(predicted != preds.labels)
    if not len(wrong) or not cache_path:
        return []
    order = wrong[np.argsort(-preds.ensemble[wrong, predicted[wrong]], kind="stable")][:limit]
    images = Dataset.open(Path(cache_path))
    misses = []
    for k in order:
        row = int(preds.rows[k])
        name = Path(str(images.paths[row])).name if len(images.paths) > row else f"image {row}"
        misses.append(Miss(
            row, name, class_names[int(preds.labels[k])], class_names[int(predicted[k])],
            float(preds.ensemble[k, predicted[k]]), float(preds.ensemble[k, preds.labels[k]]),
            thumbnail_base64(images.image(row), side),
        ))  # fmt: skip
    return misses


def thumbnail_base64(image: np.ndarray, side: int = 112) -> str:
    """An HWC uint8 image as a base64 PNG at most ``side`` px on its longer side, for a data URI."""
    from PIL import Image

    thumb = Image.fromarray(np.ascontiguousarray(image))
    thumb.thumbnail((side, side))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
