"""The report page: one self-contained HTML file (inline CSS, inline SVG, thumbnails as data URIs)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from automl_tl.errors import AutoMLError
from automl_tl.evaluate.metrics import lookup, reliability_bins
from automl_tl.evaluate.ranking import metric_value
from automl_tl.report import _svg as svg
from automl_tl.report._html import fmt as _fmt
from automl_tl.report._html import note as _note
from automl_tl.report._html import table as _table
from automl_tl.report._frontier import frontier_section
from automl_tl.report._selection import selection_section
from automl_tl.report._analysis import (
    Divergence,
    Importance,
    Miss,
    ParamSpec,
    Predictions,
    confident_misses,
    divergences,
    finite,
    param_importances,
    param_specs,
    predictions,
)
from automl_tl.report._explain import explanation_section
from automl_tl.report._health import data_health
from automl_tl.report._inputs import RunInputs, load_run
from automl_tl.train.loop import HYPERPARAMETERS

__all__ = ["SECTIONS", "REPORT_NAME", "render", "write_report"]

REPORT_NAME = "report.html"
# (anchor, heading) of every section, in page order.
SECTIONS = (
    ("overview", "Overview"),
    ("ensemble", "Ensemble vs best single model"),
    ("selection", "How the served model was chosen"),
    ("latency", "Accuracy against latency"),
    ("leaderboard", "Leaderboard"),
    ("transferability", "Backbones ranked before fine-tuning"),
    ("curves", "Learning curves"),
    ("overfitting", "Overfitting"),
    ("hyperparameters", "Hyperparameters and accuracy"),
    ("confusion", "Confusion matrix"),
    ("per-class", "Per-class metrics"),
    ("reliability", "Reliability diagram"),
    ("misclassified", "Most confidently misclassified images"),
    ("explanations", "Where the model looked"),
    ("data-health", "Data health"),
)

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:24px;margin:8px 0 2px}h2{font-size:19px;margin:0 0 10px;border-bottom:2px solid #4e79a7;padding-bottom:4px}
h3{font-size:14px;margin:4px 0}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:14px 18px;margin:16px 0}
nav a{margin-right:12px;color:#4e79a7;text-decoration:none}nav{font-size:13px}
table{border-collapse:collapse;font-size:12.5px}td,th{padding:3px 8px;white-space:nowrap;border-bottom:1px solid #eee;text-align:right}
th{background:#f0f2f5;position:sticky;top:0;white-space:normal}td.l,th.l{text-align:left}tbody tr:nth-child(even){background:#fafbfc}
.scroll{overflow-x:auto;max-height:640px}.muted{color:#777}.note{color:#555;font-size:13px;max-width:900px}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #e3e3e3;border-radius:5px;padding:6px 8px}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:11px;margin-left:4px;color:#fff}
.b-best{background:#f28e2b}.b-ens{background:#4e79a7}.b-stop{background:#d62728}.b-div{background:#b07aa1}
.verdict{font-size:16px;padding:8px 12px;border-radius:5px;margin-bottom:10px}
.yes{background:#e6f4ea;border-left:5px solid #59a14f}.no{background:#fdecea;border-left:5px solid #e15759}
.facts td{text-align:left}.facts td:first-child{color:#666;padding-right:18px}
figure{margin:0;width:150px;font-size:11.5px;overflow-wrap:anywhere}.thumb{height:120px;display:flex;align-items:center;justify-content:center}.thumb img{border:2px solid #e15759}
b.win{color:#2e7d32}
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` for a finished run (after build_results) and return its path.

    A run on object storage (``s3://...``) is read into its local mirror, and the page is uploaded beside it;
    the returned path is then the local copy.
    """
    from automl_tl.runs.rundir import RunDir
    from automl_tl.runs.storage import write_atomic

    where = RunDir.open(run_dir)
    where.pull("summary.json", "data.json", "tune")
    run = load_run(where.path)
    target = run.path / REPORT_NAME
    write_atomic(target, render(run))
    where.push(REPORT_NAME)
    return target


def render(run: RunInputs) -> str:
    """The whole page as one string."""
    notes: list[str] = []
    preds = predictions(run)
    if preds is not None:
        notes.extend(preds.notes)
    misses: list[Miss] = []
    if preds is not None:
        try:
            misses = confident_misses(preds, run.class_names, run.data.get("cache_path"))
        except (AutoMLError, OSError) as exc:
            notes.append(f"Thumbnails are unavailable: the image cache cannot be read ({exc}).")
    specs = param_specs(run.summary.get("config", {}).get("space", {}), run.trials)
    flagged = divergences(run.curves)
    bodies = {
        "overview": _overview(run, notes),
        "ensemble": _ensemble(run),
        "selection": selection_section(run),
        "latency": frontier_section(run),
        "leaderboard": _leaderboard(run, flagged),
        "transferability": _transferability(run.summary.get("transferability") or {}),
        "curves": _curves(run, flagged),
        "overfitting": _overfitting(run, flagged),
        "hyperparameters": _hyperparameters(run, specs, param_importances(run.trials, specs)),
        "confusion": _confusion(run),
        "per-class": _per_class(run),
        "reliability": _reliability(run, preds),
        "misclassified": _misclassified(run, preds, misses),
        "explanations": explanation_section(run, preds),
        "data-health": data_health(run),
    }
    nav = " ".join(f'<a href="#{key}">{escape(title)}</a>' for key, title in SECTIONS)
    sections = "".join(f'<section id="{key}"><h2>{escape(title)}</h2>{bodies[key]}</section>' for key, title in SECTIONS)
    title = f"automl_tl report: {run.path.resolve().name}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><main><h1>{escape(title)}</h1>"
            f'<p class="muted">{escape(str(run.path.resolve()))} · written {time.strftime("%Y-%m-%d %H:%M")}</p>'
            f"<nav>{nav}</nav>{sections}</main></body></html>")  # fmt: skip


# --- formatting ---------------------------------------------------------------------------------------------


def _split_metrics(run: RunInputs, which: str) -> tuple[str, dict[str, Any]]:
    """The evaluation split's name and metrics of ``which`` ("best" or "ensemble"): test, else validation."""
    part = run.summary[which]
    if run.has_test and part.get("test"):
        return "test", part["test"]
    return "validation", part["val_calibrated"] if which == "best" else part["val"]


def _stopped_early(row: Mapping[str, Any], max_epochs: int) -> bool:
    reason = str(row.get("stop_reason") or "")
    return not reason.startswith("max_epochs") and int(row.get("epochs_run") or 0) < max_epochs


# --- sections -----------------------------------------------------------------------------------------------


def _overview(run: RunInputs, notes: Sequence[str]) -> str:
    s, data = run.summary, run.summary["data"]
    names = run.class_names
    done = [t for t in run.trials if finite(t.get("best_val_accuracy"))]
    split, ens = _split_metrics(run, "ensemble")
    versions = ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items())
    facts = [
        ("data", escape(str(data.get("source")))),
        ("test data", escape(str(data.get("test_source") or "split from the data"))),
        ("classes", f"{len(names)}: " + escape(", ".join(names[:30])) + (" …" if len(names) > 30 else "")),
        ("images", f"{data.get('n_train')} train / {data.get('n_val')} validation / {data.get('n_test')} test"),
        ("trials", f"{len(done)} finished of {len(run.trials)}; sweep took {float(s.get('wall_s') or 0):.0f} s"),
        ("search metric", escape(str(s.get("metric")))),
        ("best single trial", f"{escape(str(s['best']['trial_id']))} (val accuracy {_fmt(s['best']['val'].get('accuracy'))})"),
        (f"served ensemble, {split}", f"accuracy {_fmt(ens['accuracy'])}, macro F1 {_fmt(ens['f1']['macro'])}, "
                                      f"log loss {_fmt(ens['log_loss'])}"),  # fmt: skip
        ("versions", escape(versions)),
        ("run created", escape(str(s.get("created", "–")))),
    ]
    rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>' + "".join(_note(n) for n in notes)


_COMPARED = (
    ("accuracy", "accuracy", 1), ("balanced accuracy", "balanced_accuracy", 1), ("macro F1", "f1.macro", 1),
    ("weighted F1", "f1.weighted", 1), ("top-5 accuracy", "top_k_accuracy.5", 1), ("log loss", "log_loss", -1),
    ("ECE (calibration error)", "ece", -1),
)  # fmt: skip


def _ensemble(run: RunInputs) -> str:
    best, ens = run.summary["best"], run.summary["ensemble"]
    split, ens_m = _split_metrics(run, "ensemble")
    _, best_m = _split_metrics(run, "best")
    won = bool(ens.get("beat_best"))
    metric = str(run.summary.get("metric", "val_accuracy"))
    name = metric.removeprefix("val_").replace("_", " ")
    ens_v, best_v = metric_value(ens_m, metric), metric_value(best_m, metric)
    if ens_v != best_v:
        why = f"{'higher' if ens_v > best_v else 'lower'} {split} {name}"
    else:
        why = f"equal {split} {name}, {'lower' if ens_m['log_loss'] < best_m['log_loss'] else 'higher'} log loss"
    verdict = (f"The ensemble of {len(ens['members'])} trial(s) {'beat' if won else 'did not beat'} the best single "
               f"trial ({escape(str(best['trial_id']))}): {why}.")  # fmt: skip
    columns = [(f"best single trial, {split}", best_m), (f"ensemble, {split}", ens_m)]
    if split == "test":
        columns += [("best single, validation", best["val_calibrated"]), ("ensemble, validation", ens["val"])]
    rows = []
    for title, key, sign in _COMPARED:
        values = [lookup(m, key) for _, m in columns]
        if values[0] is None:
            continue
        cells = [_fmt(v) for v in values]
        if values[0] != values[1] and finite(values[0]) and finite(values[1]):
            win = 1 if sign * (values[1] - values[0]) > 0 else 0
            cells[win] = f'<b class="win">{cells[win]}</b>'
        rows.append([escape(title), *cells])
    members = [[escape(str(t)), f"{w:.3f}", _fmt(ens.get("member_temperatures", {}).get(t), 3)]
               for t, w in zip(ens["members"], ens["weights"])]  # fmt: skip
    return (f'<div class="verdict {"yes" if won else "no"}">{verdict}</div>'
            + _table(["metric", *(c for c, _ in columns)], rows)
            + _note(f"Members chosen by {ens.get('method')} selection on validation {ens.get('selection_metric', 'log loss')}; "
                    f"ensemble temperature {float(ens['temperature']):.3f}, best trial's {float(best['temperature']):.3f}. "
                    f"Beating means ranking above on the search's metric ({name}), or equal on it and lower log loss.")
            + "<h3>Ensemble members</h3>" + _table(["trial", "weight", "temperature"], members))  # fmt: skip


# Column headings of the hyperparameters (:data:`HYPERPARAMETERS`) where the name is too long for a table.
_SHORT = {"freeze_depth": "freeze", "learning_rate": "lr", "backbone_lr_ratio": "backbone lr ×",
          "augmentation": "augment", "weight_decay": "weight decay", "label_smoothing": "label smooth",
          "batch_size": "batch", "image_size": "size", "head_dropout": "dropout"}  # fmt: skip
_LEADERBOARD = (
    ("rank", "rank"), ("trial", "trial_id"), *((_SHORT.get(name, name), name) for name in HYPERPARAMETERS),
    ("val acc", "best_val_accuracy"), ("val macro F1", "best_val_macro_f1"), ("val log loss", "best_val_log_loss"),
    ("best epoch", "best_epoch"), ("epochs", "epochs_run"), ("stop reason", "stop_reason"), ("wall s", "wall_s"),
    ("LogME", "transferability"),
)  # fmt: skip


def _badges(run: RunInputs, tid: str, flagged: Mapping[str, Divergence]) -> str:
    ens = run.summary["ensemble"]
    out = '<span class="badge b-best">best</span>' if tid == str(run.summary["best"]["trial_id"]) else ""
    if tid in ens["members"]:
        out += f'<span class="badge b-ens">ensemble {ens["weights"][ens["members"].index(tid)]:.2f}</span>'
    if tid in flagged:
        out += '<span class="badge b-div">diverging</span>'
    return out


def _leaderboard(run: RunInputs, flagged: Mapping[str, Divergence]) -> str:
    rows = []
    for t in run.trials:
        cells = [_fmt(t.get(key), 2 if key == "wall_s" else 4) for _, key in _LEADERBOARD]
        cells[1] = f"{cells[1]}{_badges(run, str(t['trial_id']), flagged)}"
        rows.append(cells)
    return (_table([h for h, _ in _LEADERBOARD], rows, left=3, css="leaderboard")
            + _note("One row per trial, best first by the search metric; the same rows are in leaderboard.csv. "
                    "Validation scores are each trial's best epoch, before calibration."))  # fmt: skip


def _transferability(ranking: Mapping[str, Any]) -> str:
    if not ranking:
        return _note("No transferability scores: this run was made before sweeps recorded them.")
    scores, pruned, declined = ranking.get("scores") or {}, ranking.get("pruned") or {}, ranking.get("declined_proposals") or {}
    rows = [[escape(str(name)), _fmt(score, 3), escape(str(pruned.get(name) or "no")), str(declined.get(name, 0))]
            for name, score in sorted(scores.items(), key=lambda kv: -kv[1] if finite(kv[1]) else math.inf)]  # fmt: skip
    state = f"on, margin {ranking.get('margin')}" if ranking.get("enabled") else f"off (search.rank_backbones: {ranking.get('setting')})"
    return (_table(["backbone", "LogME", "pruned", "proposals declined"], rows)
            + _note(f"Each backbone's LogME score on its frozen features of the train split (higher transfers better; "
                    f"– where no trial trained a head on its cached features). Ranking {state}: a pruned backbone "
                    "got no more trials that step through images; its declined proposals never ran."))  # fmt: skip


def _curves(run: RunInputs, flagged: Mapping[str, Divergence]) -> str:
    max_epochs = int(run.summary.get("config", {}).get("space", {}).get("max_epochs") or run.max_epochs)
    x_max = max(run.max_epochs, 2)
    best_id = str(run.summary["best"]["trial_id"])
    overview, cards = [], []
    for i, t in enumerate(run.trials):
        tid = str(t["trial_id"])
        curve = run.curves.get(tid)
        if curve is None or not curve.epochs:
            cards.append(f'<div class="card"><h3>#{t.get("rank")} {escape(tid)}</h3>{_note("no epochs recorded")}</div>')
            continue
        early = _stopped_early(t, max_epochs)
        best_epoch = int(t["best_epoch"]) if finite(t.get("best_epoch")) else None
        color = svg.PALETTE[i % len(svg.PALETTE)]
        val = tuple(svg.Point(e, v, f"{tid} epoch {e}: val accuracy {v:.4f}") for e, v in curve.points("val_accuracy"))
        overview.append(svg.Series(tid, val, color, width=3.2 if tid == best_id else 1.6,
                                   end="stop" if early else "done", highlight=best_epoch))  # fmt: skip
        acc = [svg.Series("train acc", _pts(curve.points("train_accuracy")), svg.PALETTE[0], dashed=True),
               svg.Series("val acc", _pts(curve.points("val_accuracy")), svg.PALETTE[1],
                          end="stop" if early else "", highlight=best_epoch)]  # fmt: skip
        loss = [svg.Series("train loss", _pts(curve.points("train_loss")), svg.PALETTE[0], dashed=True),
                svg.Series("val log loss", _pts(curve.points("val_log_loss")), svg.PALETTE[1], end="stop" if early else "")]
        stop = f'<span class="badge b-stop">stopped early</span>' if early else ""
        cards.append(
            f'<div class="card"><h3>#{t.get("rank")} {escape(tid)}{_badges(run, tid, flagged)}{stop}</h3>'
            f'<div class="muted">{escape(str(t.get("stop_reason") or "–"))} · {len(curve.epochs)} epoch(s), best {best_epoch}</div>'
            + svg.line_chart(acc, x_max, "epoch", "accuracy", 265, 200, (0.0, 1.0))
            + svg.line_chart(loss, x_max, "epoch", "loss", 265, 200, (0.0, math.inf)) + "</div>"
        )  # fmt: skip
    return (svg.line_chart(overview, x_max, "epoch", "validation accuracy", 900, 340, (0.0, 1.0), legend=len(overview) <= 10)
            + _note(f"Every trial's validation accuracy per epoch (thick line: best trial). A red × ends a trial that "
                    f"stopped before its {max_epochs} epochs (scheduler, plateau, time budget or error); a dot ends one "
                    "that ran them all; a ring marks the epoch whose weights were kept. Below, one card per trial: "
                    "train (dashed) against validation (solid); train metrics are averaged over the epoch's "
                    "augmented batches.")
            + f'<div class="grid">{"".join(cards)}</div>')  # fmt: skip


def _pts(points: Sequence[tuple[int, float]]) -> tuple[svg.Point, ...]:
    return tuple(svg.Point(e, v, f"epoch {e}: {v:.4f}") for e, v in points)


def _overfitting(run: RunInputs, flagged: Mapping[str, Divergence]) -> str:
    if not flagged:
        return _note("No trial's train and validation curves diverge: train accuracy never pulled more than "
                     "10 points ahead of validation accuracy while growing, and validation log loss never climbed "
                     "back while training loss fell.")  # fmt: skip
    best_id = str(run.summary["best"]["trial_id"])
    members = set(run.summary["ensemble"]["members"])
    items = []
    for t in run.trials:
        d = flagged.get(str(t["trial_id"]))
        if d is None:
            continue
        role = " (best trial)" if d.trial_id == best_id else " (ensemble member)" if d.trial_id in members else ""
        items.append(f"<li><b>{escape(d.trial_id)}</b>{role}: {escape(d.message)}.</li>")
    advice = ("Training longer on these settings memorises the training images. The kept weights come from each "
              "trial's best validation epoch, so the served model is not the diverged one; more augmentation, "
              "a deeper freeze, weight decay or fewer epochs would narrow the gap.")  # fmt: skip
    return (f"<p>{len(flagged)} of {len(run.trials)} trial(s) show train and validation diverging:</p>"
            f"<ul>{''.join(items)}</ul>" + _note(advice))  # fmt: skip


def _hyperparameters(run: RunInputs, specs: Sequence[ParamSpec], importance: Importance) -> str:
    done = [t for t in run.trials if finite(t.get("best_val_accuracy"))]
    best_id = str(run.summary["best"]["trial_id"])
    parts = []
    if importance.values:
        parts.append("<h3>Parameter importance for validation accuracy</h3>"
                     + svg.bar_chart(list(importance.values), list(importance.values.values()), "importance (share)"))
    parts.append(_note(importance.note))
    fixed = [f"{s.name} = {s.choices[0] if s.choices else _fmt(s.low)}" for s in specs if not s.searched]
    if fixed:
        parts.append(_note("Not searched (one value): " + ", ".join(fixed) + "."))
    # The four the issue asks about always get a plot; other parameters only when they were searched.
    shown = [s for s in specs if s.searched or s.name in ("backbone", "freeze_depth", "learning_rate", "augmentation")]
    shown.sort(key=lambda s: -importance.values.get(s.name, -1.0))
    charts = []
    for s in shown:
        if s.choices is not None:
            labels = [str(c) for c in s.choices]
            points = [svg.Point(labels.index(str(t.get(s.name))), float(t["best_val_accuracy"]), str(t["trial_id"]))
                      for t in done if str(t.get(s.name)) in labels]  # fmt: skip
            chart = svg.scatter_chart(points, s.name, "val accuracy", categories=labels, highlight=best_id)
        else:
            points = [svg.Point(float(t[s.name]), float(t["best_val_accuracy"]), str(t["trial_id"]))
                      for t in done if finite(t.get(s.name))]  # fmt: skip
            chart = svg.scatter_chart(points, s.name, "val accuracy", log_x=s.log, highlight=best_id)
        share = f" · importance {importance.values[s.name]:.2f}" if s.name in importance.values else ""
        charts.append(f'<div class="card"><h3>{escape(s.name)}{share}</h3>{chart}</div>')
    parts.append(f'<div class="grid">{"".join(charts)}</div>')
    parts.append(_note("Each dot is a finished trial's best validation accuracy; the orange outlined dot is the best "
                       "trial. Trials stopped early by the scheduler had fewer epochs to reach their accuracy."))
    return "".join(parts)


def _confusion(run: RunInputs) -> str:
    names = run.class_names
    split, ens_m = _split_metrics(run, "ensemble")
    _, best_m = _split_metrics(run, "best")
    cards = [
        f'<div class="card"><h3>served ensemble, {split} (n = {ens_m["n"]})</h3>'
        + svg.heatmap(ens_m["confusion_matrix"], names, "ensemble confusion matrix") + "</div>",
        f'<div class="card"><h3>best single trial, {split}</h3>'
        + svg.heatmap(best_m["confusion_matrix"], names, "best trial confusion matrix") + "</div>",
    ]
    return (f'<div class="grid">{"".join(cards)}</div>'
            + _note("Rows are true classes, columns predicted ones; shading is the share of the row (recall on the "
                    "diagonal, which is outlined). Hover a cell for its count and share."))  # fmt: skip


def _per_class(run: RunInputs) -> str:
    split, m = _split_metrics(run, "ensemble")
    _, best_m = _split_metrics(run, "best")
    rows = []
    for name in run.class_names:
        f1 = float(m["f1"]["per_class"][name])
        bar = f'<svg width="80" height="10"><rect width="{80 * f1:.1f}" height="10" fill="#4e79a7"/></svg>'
        rows.append([escape(name), str(m["support"][name]), _fmt(m["precision"]["per_class"][name], 3),
                     _fmt(m["recall"]["per_class"][name], 3), _fmt(f1, 3), bar,
                     _fmt(best_m["f1"]["per_class"][name], 3)])  # fmt: skip
    for avg in ("macro", "weighted"):
        rows.append([f"<i>{avg} average</i>", str(m["n"]), _fmt(m["precision"][avg], 3), _fmt(m["recall"][avg], 3),
                     _fmt(m["f1"][avg], 3), "", _fmt(best_m["f1"][avg], 3)])  # fmt: skip
    return (_table(["class", "support", "precision", "recall", "F1", "", "F1 best single"], rows)
            + _note(f"The served ensemble on the {split} split; the last column is the best single trial's F1."))


def _reliability(run: RunInputs, preds: Predictions | None) -> str:
    if preds is None:
        return _note("No predictions are available to bin (data.json or the saved probabilities are missing).")
    curves = [("ensemble (served)", reliability_bins(preds.labels, preds.ensemble, 10), svg.PALETTE[0])]
    if preds.best is not None:
        curves.append(("best single trial", reliability_bins(preds.labels, preds.best, 10), svg.PALETTE[1]))
    key = "test" if preds.split == "test" else "val"
    ens_ece = lookup(run.summary["ensemble"], f"{key}.ece")
    best_ece = lookup(run.summary["best"], "test.ece" if key == "test" else "val_calibrated.ece")
    return (svg.reliability_chart(curves)
            + _note(f"Calibrated probabilities on the {preds.split} split ({len(preds.labels)} images) in 10 confidence "
                    f"bins. Bars under the dashed diagonal mean over-confidence. Expected calibration error (15 bins, "
                    f"as in summary.json): ensemble {_fmt(ens_ece)}, best single trial {_fmt(best_ece)}."))  # fmt: skip


def _misclassified(run: RunInputs, preds: Predictions | None, misses: Sequence[Miss]) -> str:
    if preds is None:
        return _note("No predictions are available.")
    if not misses:
        wrong = int((preds.ensemble.argmax(axis=1) != preds.labels).sum())
        return _note("The served model made no mistakes on the evaluation split." if not wrong
                     else "The image cache is unavailable, so the mistakes cannot be shown.")  # fmt: skip
    figures = "".join(
        f'<figure><div class="thumb"><img src="data:image/png;base64,{m.png_base64}" alt="{escape(m.name)}"></div>'
        f"<b>{escape(m.true_class)}</b> → {escape(m.predicted)} ({m.confidence:.0%})<br>"
        f'<span class="muted">p(true) {m.true_probability:.2f} · {escape(m.name[:40])}</span></figure>'
        for m in misses
    )
    total = int((preds.ensemble.argmax(axis=1) != preds.labels).sum())
    return (f'<div class="grid">{figures}</div>'
            + _note(f"The served ensemble's {len(misses)} most confident wrong answers of {total} mistakes on "
                    f"{len(preds.labels)} {preds.split} images: true class → predicted class (its probability)."))
