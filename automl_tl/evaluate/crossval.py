"""Deciding on all the data: k-fold cross-validated predictions of heads on cached features.

A validation split of a few dozen images cannot tell good trials apart: several tie, and the ensemble chosen
on them can lose to its own best member. A trial that trains only a head on frozen features (the probe and
every other fully frozen, unaugmented trial) is cheap to train again, so when the validation split is small
(``search.cv_below_images``) each such trial is trained ``k`` more times, once per fold of train + val, with
its own recipe (``automl_tl.train.loop.refit_head``). Every train and validation image then has a prediction
from a head that never saw it: ranking and ensemble selection use those out-of-fold predictions, and the
artifact serves each chosen head refitted on train + val. The spread across folds says when two trials are
not really different. Plain numpy and torch, no Ray.

    .venv/bin/python -m pytest -q tests/test_crossval.py
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from automl_tl.evaluate.metrics import log_loss

__all__ = [
    "FoldScores",
    "HeadTrial",
    "choose_tta",
    "cross_validate_heads",
    "fold_accuracies",
    "head_trial",
    "out_of_fold",
    "fresh_head",
    "refit_state",
    "spread_note",
    "stratified_folds",
    "use_cross_validation",
]

FitPredict = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (rows to fit on, rows to predict) -> probabilities


def use_cross_validation(n_val: int, cv_below_images: int) -> bool:
    """Whether a validation split of ``n_val`` images is small enough to decide on folds instead."""
    return 0 < n_val < cv_below_images


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Each row's fold in ``0 .. k-1``: every class spread evenly over the folds, rows shuffled by ``seed``."""
    labels = np.asarray(labels, dtype=np.int64)
    if k < 2:
        raise ValueError(f"cross-validation needs k >= 2 folds, got {k}")
    if labels.size < k:
        raise ValueError(f"{k} folds need at least {k} rows, got {labels.size}")
    rng = np.random.default_rng(seed)
    folds = np.empty(labels.size, dtype=np.int64)
    offset = 0
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        folds[rows] = (np.arange(rows.size) + offset) % k  # the next class starts where this one left off
        offset += rows.size
    return folds


def out_of_fold(fit_predict: FitPredict, folds: np.ndarray) -> np.ndarray:
    """Every row's prediction from a model fitted on the other folds only."""
    folds = np.asarray(folds)
    out: np.ndarray | None = None
    for fold in np.unique(folds):
        test, train = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
        probs = np.asarray(fit_predict(train, test), dtype=np.float64)
        if out is None:
            out = np.zeros((folds.size, probs.shape[1]), dtype=np.float64)
        out[test] = probs
    if out is None:
        raise ValueError("out_of_fold needs at least one row")
    return out


def fold_accuracies(labels: np.ndarray, probs: np.ndarray, folds: np.ndarray) -> tuple[float, ...]:
    """Accuracy of the out-of-fold predictions within each fold."""
    hits = np.asarray(probs).argmax(axis=1) == np.asarray(labels)
    return tuple(float(hits[folds == f].mean()) for f in np.unique(folds))


@dataclasses.dataclass(frozen=True)
class FoldScores:
    """A trial's out-of-fold probabilities (train rows, then validation rows) and its accuracy per fold."""

    oof_probs: np.ndarray
    fold_accuracy: tuple[float, ...]
    log_loss: float
    tta_probs: np.ndarray | None = None  # the same heads, averaged with their answer on the mirrored images
    tta_fold_accuracy: tuple[float, ...] = ()
    tta_log_loss: float | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_accuracy))

    @property
    def std(self) -> float:
        return float(np.std(self.fold_accuracy, ddof=1)) if len(self.fold_accuracy) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        tta = {"tta_accuracy_mean": float(np.mean(self.tta_fold_accuracy)), "tta_log_loss": self.tta_log_loss,
               "tta_fold_accuracy": list(self.tta_fold_accuracy)} if self.tta_fold_accuracy else {}  # fmt: skip
        return {"accuracy_mean": self.mean, "accuracy_std": self.std, "log_loss": self.log_loss,
                "fold_accuracy": list(self.fold_accuracy), **tta}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class HeadTrial:
    """What refitting one finished head-on-features trial needs, read from its ``trial.json``."""

    trial_id: str
    params: Mapping[str, Any]  # the trial's TrialConfig fields
    best_epoch: int
    probe_l2: float | None


def head_trial(trial_id: str, info: Mapping[str, Any]) -> HeadTrial | None:
    """The trial as a refittable head, or None when it trained more than a head on cached features."""
    from automl_tl.train.loop import TrialConfig

    cfg = TrialConfig.from_params(info)
    if not (cfg.frozen_features and cfg.pretrained) or not info.get("best_epoch"):
        return None
    l2 = info.get("probe_l2")
    return HeadTrial(trial_id, cfg.to_dict(), int(info["best_epoch"]), float(l2) if l2 is not None else None)


def _fit_head(trial: HeadTrial, template: torch.nn.Module, x: torch.Tensor, labels: np.ndarray, num_classes: int) -> torch.nn.Module:
    from automl_tl.train.loop import TrialConfig, refit_head

    cfg = TrialConfig.from_params(trial.params)
    head = copy.deepcopy(template)  # the same fresh initialisation in every fold
    refit_head(cfg, head, x, labels, trial.best_epoch, num_classes, trial.probe_l2)
    return head


def fresh_head(trial: HeadTrial, num_classes: int) -> tuple[torch.nn.Module, str]:
    """A freshly initialised head of the trial's kind and the name of its module in the trial's network."""
    from automl_tl.backbones import create_backbone
    from automl_tl.train.loop import TrialConfig, seed_everything

    cfg = TrialConfig.from_params(trial.params)
    seed_everything(cfg.seed)
    model = create_backbone(cfg.backbone, num_classes=num_classes, pretrained=False, head=cfg.head,
                            head_dropout=cfg.head_dropout)  # fmt: skip
    head = model.head
    name = next(n for n, m in model.named_modules() if m is head)
    return copy.deepcopy(head), name


def cross_validate_heads(
    trials: Sequence[HeadTrial],
    features: Callable[[HeadTrial], torch.Tensor],
    labels: np.ndarray,
    folds: np.ndarray,
    num_classes: int,
    flipped: Callable[[HeadTrial], torch.Tensor] | None = None,
) -> dict[str, FoldScores]:
    """Out-of-fold predictions of every trial over the rows of ``features`` (one head per fold and trial);
    with ``flipped`` (the same rows' features of the mirrored images), also each head's test-time-augmented
    answer: its softmax averaged over both."""
    from automl_tl.train.probe import head_probs, one_thread

    labels = np.asarray(labels, dtype=np.int64)
    scores = {}
    for trial in trials:
        x = features(trial)
        x_flip = flipped(trial) if flipped is not None else x
        template, _ = fresh_head(trial, num_classes)

        def fit_predict(train: np.ndarray, test: np.ndarray, trial: HeadTrial = trial, x: torch.Tensor = x,
                        x_flip: torch.Tensor = x_flip, template: torch.nn.Module = template) -> np.ndarray:  # fmt: skip
            head = _fit_head(trial, template, x[torch.from_numpy(train)], labels[train], num_classes)
            rows = torch.from_numpy(test)
            return np.concatenate([head_probs(head, x[rows]), head_probs(head, x_flip[rows])], axis=1)

        with one_thread():
            both = out_of_fold(fit_predict, folds)
        oof, tta = both[:, :num_classes], (both[:, :num_classes] + both[:, num_classes:]) / 2
        score = FoldScores(oof, fold_accuracies(labels, oof, folds), log_loss(labels, oof))
        if flipped is not None:
            score = dataclasses.replace(score, tta_probs=tta, tta_fold_accuracy=fold_accuracies(labels, tta, folds),
                                        tta_log_loss=log_loss(labels, tta))  # fmt: skip
        scores[trial.trial_id] = score
    return scores


def choose_tta(labels: np.ndarray, scores: FoldScores) -> tuple[str, ...]:
    """The test-time views a trial is served with: the mirrored image when averaging with it loses no
    accuracy and lowers log loss on the out-of-fold predictions, else none."""
    if scores.tta_probs is None:
        return ()
    plain, tta = _key(labels, scores.oof_probs), _key(labels, scores.tta_probs)
    return ("hflip",) if tta[0] >= plain[0] and tta[1] > plain[1] else ()


def refit_state(trial: HeadTrial, x: torch.Tensor, labels: np.ndarray, num_classes: int) -> dict[str, torch.Tensor]:
    """The trial's head trained on every row of ``x`` (train + val), keyed as in the trial's saved network."""
    template, name = fresh_head(trial, num_classes)
    head = _fit_head(trial, template, x, np.asarray(labels, dtype=np.int64), num_classes)
    return {f"{name}.{k}": v.detach().clone() for k, v in head.state_dict().items()}


def spread_note(scores: Mapping[str, FoldScores], top: int = 5) -> str:
    """The leading trials with mean and spread of fold accuracy, so near-ties are visible."""
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1].mean, kv[1].log_loss))[:top]
    return "; ".join(f"{t} {s.mean:.3f} +/- {s.std:.3f}" for t, s in ranked)


# --- the decision a sweep's results take on folds -----------------------------------------------------------

CV_POOL = 40  # head trials cross-validated at most: the best of them by validation log loss


@dataclasses.dataclass(frozen=True)
class FoldDecision:
    """Whether ranking and ensemble selection use out-of-fold predictions, why, and what they are.

    ``probs`` hold each cross-validated trial's out-of-fold probabilities over ``labels`` (the train rows,
    then the validation rows); ``best_id`` is the best of them (accuracy, then log loss).
    """

    used: bool
    why: str
    folds: int
    probs: dict[str, np.ndarray]
    labels: np.ndarray
    best_id: str | None
    scores: dict[str, FoldScores]
    heads: dict[str, HeadTrial]
    features: Callable[[HeadTrial], torch.Tensor]
    tta: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # views each trial is served with

    def refit(self, trial_id: str, num_classes: int) -> dict[str, torch.Tensor]:
        """The head of ``trial_id`` trained on train + val, keyed as in its network's state dict."""
        trial = self.heads[trial_id]
        return refit_state(trial, self.features(trial), self.labels, num_classes)

    def to_dict(self) -> dict[str, Any]:
        ranked = sorted(self.scores.items(), key=lambda kv: (-kv[1].mean, kv[1].log_loss))
        return {"used": self.used, "why": self.why, "folds": self.folds, "rows": int(self.labels.size),
                "best": self.best_id, "tta": {t: list(v) for t, v in self.tta.items() if v},
                "trials": {t: s.to_dict() for t, s in ranked}}  # fmt: skip


def _key(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Larger is better: accuracy, then lower log loss."""
    return float(np.mean(np.asarray(probs).argmax(axis=1) == labels)), -log_loss(labels, probs)


def _feature_loader(
    data_info: Mapping[str, Any], cache_path: str, num_classes: int, flip: bool = False
) -> Callable[[HeadTrial], torch.Tensor]:
    """Train + val features of a head trial's backbone and input size (``flip``: of the mirrored images): the
    sweep's cache, else computed once."""
    from pathlib import Path

    from automl_tl.backbones import create_backbone, resolve_spec
    from automl_tl.train.features import cached_features
    from automl_tl.train.loop import TrialConfig
    from automl_tl.train.trial_data import TrialData

    data = TrialData(
        cache_path=cache_path, data_id=str(data_info["data_id"]), class_names=tuple(data_info["class_names"]),
        train_idx=np.asarray(data_info["train"], dtype=np.int64), val_idx=np.asarray(data_info["val"], dtype=np.int64),
        labels=np.asarray(data_info["labels"], dtype=np.int64), feature_cache_dir=str(Path(cache_path).parent / "features"),
    )  # fmt: skip
    loaded: dict[tuple[str, int], torch.Tensor] = {}

    def features(trial: HeadTrial) -> torch.Tensor:
        pre = TrialConfig.from_params(trial.params).preprocessing()
        backbone, size = str(trial.params["backbone"]), pre.input_size
        if (backbone, size) not in loaded:
            spec = resolve_spec(backbone)
            model = create_backbone(backbone, num_classes=num_classes, freeze_depth=spec.max_freeze_depth)
            found = cached_features(data, backbone, pre, model, flip=flip)
            loaded[(backbone, size)] = torch.cat([found.train, found.val])
        return loaded[(backbone, size)]

    return features


def decide_on_folds(
    data_info: Mapping[str, Any],
    cache_path: str,
    infos: Mapping[str, Mapping[str, Any]],
    val_probs: Mapping[str, np.ndarray],
    k: int,
    seed: int = 0,
    tta: bool = False,
) -> FoldDecision:
    """Cross-validate the head trials among ``infos`` (trial id -> ``trial.json``) over train + val.

    ``tta``: each head trial is also scored with test-time augmentation (:func:`choose_tta`); where it helps,
    its out-of-fold predictions are the augmented ones, and so is the artifact's member.

    Trials that trained more than a head cannot be refitted cheaply; they only have validation predictions.
    The folds decide unless the best of those beats the best cross-validated head on the validation images
    in both accuracy and log loss (the heads' out-of-fold predictions there never saw those images either).
    """
    labels = np.asarray(data_info["labels"], dtype=np.int64)
    train_idx, val_idx = np.asarray(data_info["train"], dtype=np.int64), np.asarray(data_info["val"], dtype=np.int64)
    y_all, y_val = np.concatenate([labels[train_idx], labels[val_idx]]), labels[val_idx]
    num_classes = len(data_info["class_names"])
    all_heads = {t: h for t, info in infos.items() if t in val_probs and (h := head_trial(t, info)) is not None}
    by_val = sorted(all_heads, key=lambda t: log_loss(y_val, val_probs[t]))[:CV_POOL]
    heads = {t: all_heads[t] for t in by_val}
    features = _feature_loader(data_info, cache_path, num_classes)
    empty = FoldDecision(False, "", k, {}, y_all, None, {}, heads, features)
    if not heads:
        return dataclasses.replace(empty, why="no trial trained only a head on cached features")
    folds = stratified_folds(y_all, k, seed)
    flipped = _feature_loader(data_info, cache_path, num_classes, flip=True) if tta else None
    scores = cross_validate_heads(list(heads.values()), features, y_all, folds, num_classes, flipped)
    views = {t: choose_tta(y_all, s) for t, s in scores.items()}
    probs = {t: s.tta_probs if views[t] and s.tta_probs is not None else s.oof_probs for t, s in scores.items()}
    best = max(probs, key=lambda t: _key(y_all, probs[t]))
    why = f"{len(scores)} head trial(s) cross-validated over {y_all.size} images"
    if tta:
        why += f"; test-time flip helped {sum(bool(v) for v in views.values())} of them"
    decided = FoldDecision(True, why, k, probs, y_all, best, scores, heads, features, views)
    others = [t for t in val_probs if t not in all_heads]
    if not others:
        return decided
    rival = max(others, key=lambda t: _key(y_val, val_probs[t]))
    mine = _key(y_val, probs[best][train_idx.size :])
    theirs = _key(y_val, val_probs[rival])
    if theirs[0] > mine[0] and theirs[1] > mine[1]:
        why = (f"trial {rival} (not a head on cached features) beat the best cross-validated head {best} on the "
               f"{y_val.size} validation images in accuracy ({theirs[0]:.4f} vs {mine[0]:.4f}) and log loss: "
               "the validation split decides")  # fmt: skip
        return dataclasses.replace(decided, used=False, why=why)
    return decided
