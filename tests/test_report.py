"""The run report: a real sweep on hymenoptera at 64 px, its report.html checked as text and in Chromium.

    .venv/bin/python -m pytest -q tests/test_report.py
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from automl_tl.errors import SearchError
from automl_tl.report import REPORT_NAME, SECTIONS, write_report
from automl_tl.report._analysis import ParamSpec, divergences, param_importances
from automl_tl.report._inputs import Curve, Epoch


# --- fast checks, no sweep ------------------------------------------------------------------------------


def _curve(tid: str, **series: list[float]) -> Curve:
    n = len(next(iter(series.values())))
    return Curve(tid, tuple(Epoch(e + 1, {k: v[e] for k, v in series.items()}) for e in range(n)))


def test_divergence_flags_train_pulling_away_and_rising_val_loss() -> None:
    curves = {
        "apart": _curve("apart", train_accuracy=[0.6, 0.8, 0.95], val_accuracy=[0.62, 0.7, 0.72]),
        "together": _curve("together", train_accuracy=[0.6, 0.7, 0.8], val_accuracy=[0.62, 0.72, 0.79]),
        "loss": _curve("loss", train_loss=[0.9, 0.5, 0.2], val_log_loss=[0.8, 0.5, 0.7]),
        "short": _curve("short", train_accuracy=[0.99], val_accuracy=[0.5]),
    }
    flagged = divergences(curves)
    assert set(flagged) == {"apart", "loss"}
    assert "95.0%" in flagged["apart"].message and "rose from 0.500" in flagged["loss"].message


def test_importances_find_the_parameter_that_matters_and_explain_when_they_cannot() -> None:
    specs = [ParamSpec("learning_rate", None, 1e-4, 1e-1, log=True), ParamSpec("augmentation", ("none", "light"))]
    trials: list[dict[str, Any]] = [
        {"trial_id": f"t{i}", "learning_rate": 10 ** (-4 + 3 * i / 11), "augmentation": ("none", "light")[i % 2],
         "best_val_accuracy": 0.5 + 0.04 * i}
        for i in range(12)
    ]  # fmt: skip
    result = param_importances(trials, specs)
    assert list(result.values)[0] == "learning_rate"
    assert sum(result.values.values()) == pytest.approx(1.0)
    assert param_importances(trials[:2], specs).values == {}
    assert "at least 3" in param_importances(trials[:2], specs).note
    same = [{**t, "best_val_accuracy": 0.7} for t in trials]
    assert "same validation accuracy" in param_importances(same, specs).note


def test_a_folder_without_a_finished_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from automl_tl.cli import EXIT_USER_ERROR, main

    with pytest.raises(SearchError, match="no summary.json"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == EXIT_USER_ERROR
    assert "automl-tl: error:" in capsys.readouterr().err
    (tmp_path / "summary.json").write_text(json.dumps({"trials": []}), encoding="utf-8")
    with pytest.raises(SearchError, match="no ensemble results"):
        write_report(tmp_path)


# --- one real sweep for the rest --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(
    tmp_path_factory: pytest.TempPathFactory, ray_session: object, hymenoptera_dir: Path, data_cache_dir: Path
) -> Path:
    from automl_tl.config import load_config
    from automl_tl.evaluate.results import build_results
    from automl_tl.sweep.driver import run_search

    config = load_config({
        "data": {"source": str(hymenoptera_dir / "train"), "cache_dir": str(data_cache_dir)},
        "space": {"backbones": ["mobilenetv2_100"], "image_sizes": [64], "max_epochs": 3, "batch_sizes": [32],
                  "freeze_depths": [6, 8], "augmentations": ["none", "light"]},
        "search": {"num_samples": 4, "time_budget_s": 300},
    })  # fmt: skip
    out = tmp_path_factory.mktemp("report") / "run"
    run_search(config, out, test_source=str(hymenoptera_dir / "val"), progress=False)
    build_results(out)
    return out


@pytest.fixture(scope="module")
def report(run_dir: Path) -> tuple[Path, str, dict[str, Any]]:
    """The report as ``automl-tl report RUN_DIR`` writes it (write_report behind the CLI)."""
    from automl_tl.cli import main

    assert main(["report", str(run_dir)]) == 0
    path = run_dir / REPORT_NAME
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return path, path.read_text(encoding="utf-8"), summary



@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_report_is_one_self_contained_file(run_dir: Path, report: tuple[Path, str, dict[str, Any]]) -> None:
    path, html, _ = report
    assert path == run_dir / REPORT_NAME and path.stat().st_size > 10_000
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""\ssrc=["'](?!data:)""", html), "every src must be a data URI"
    assert not re.search(r"""\shref=["'](?!#)""", html), "links may only point inside the page"
    assert "<script" not in html and "url(" not in html and "@import" not in html


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_every_section_is_there(report: tuple[Path, str, dict[str, Any]]) -> None:
    _, html, _ = report
    for key, title in SECTIONS:
        assert f'<section id="{key}"><h2>{escape(title)}</h2>' in html


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_leaderboard_has_one_row_per_trial(run_dir: Path, report: tuple[Path, str, dict[str, Any]]) -> None:
    _, html, summary = report
    with open(run_dir / "leaderboard.csv", newline="", encoding="utf-8") as fh:
        ids = [row["trial_id"] for row in csv.DictReader(fh)]
    table = html.split('<table class="leaderboard">', 1)[1].split("</table>", 1)[0]
    body = table.split("<tbody>", 1)[1]
    assert body.count("<tr>") == len(ids) == len(summary["trials"])
    rows = body.split("<tr>")[1:]
    for tid, row in zip(ids, rows):  # in rank order
        assert tid in row


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_confusion_matrices_are_summary_json_numbers(report: tuple[Path, str, dict[str, Any]]) -> None:
    _, html, summary = report
    section = html.split('<section id="confusion">', 1)[1].split("</section>", 1)[0]
    counts = [int(c) for c in re.findall(r'class="cm-count">(\d+)</text>', section)]
    ensemble = [c for row in summary["ensemble"]["test"]["confusion_matrix"] for c in row]
    best = [c for row in summary["best"]["test"]["confusion_matrix"] for c in row]
    assert counts == ensemble + best
    assert "no longer reproduce" not in html  # the artifact gave back the test predictions of summary.json
    verdict = "beat" if summary["ensemble"]["beat_best"] else "did not beat"
    assert f"trial(s) {verdict} the best single trial" in html


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_mistakes_are_embedded_thumbnails_and_early_stops_are_marked(
    report: tuple[Path, str, dict[str, Any]],
) -> None:
    from PIL import Image

    _, html, summary = report
    cm = summary["ensemble"]["test"]["confusion_matrix"]
    mistakes = sum(c for i, row in enumerate(cm) for j, c in enumerate(row) if i != j)
    section = html.split('<section id="misclassified">', 1)[1].split("</section>", 1)[0]
    thumbs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', section)
    assert len(thumbs) == min(12, mistakes)
    image = Image.open(io.BytesIO(base64.b64decode(thumbs[0])))
    assert image.format == "PNG" and max(image.size) <= 112

    max_epochs = summary["config"]["space"]["max_epochs"]
    early = [t for t in summary["trials"] if t["epochs_run"] < max_epochs and t["stop_reason"] != "max_epochs"]
    assert html.count("badge b-stop") == len(early)
    curves = html.split('<section id="curves">', 1)[1].split("</section>", 1)[0]
    assert curves.count('class="stop"') == 3 * len(early)  # overview, accuracy card, loss card


def _screenshot(page: Path, tmp_path: Path, height: int) -> Path:
    """A headless Chromium screenshot, 1280 pixels wide, of the top ``height`` pixels of ``page``."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); the browser check needs it")
    shot = tmp_path / f"{page.stem}.png"
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", f"--window-size=1280,{height}", page.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    return shot


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_report_renders_in_headless_chromium(report: tuple[Path, str, dict[str, Any]], tmp_path: Path) -> None:
    from PIL import Image

    path, _, _ = report
    shot = _screenshot(path, tmp_path, 4000)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 4000)
    colours = image.getcolors(maxcolors=1_000_000) or []
    assert len(colours) > 200, f"the page rendered nearly blank ({len(colours)} colours)"
    # The top of the page is the title and the overview, not an error page: it holds dark text pixels.
    top = image.crop((0, 0, 1280, 400)).convert("L")
    assert top.getextrema()[0] < 80


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_explanations_show_the_surest_mistakes_and_right_answers_in_chromium(
    report: tuple[Path, str, dict[str, Any]], tmp_path: Path
) -> None:
    """The "where the model looked" section: one Grad-CAM overlay per picked image, drawn in Chromium."""
    from PIL import Image

    from automl_tl.report._explain import MISTAKES, RIGHT

    _, html, summary = report
    cm = summary["ensemble"]["test"]["confusion_matrix"]
    mistakes = sum(c for i, row in enumerate(cm) for j, c in enumerate(row) if i != j)
    right = sum(cm[i][i] for i in range(len(cm)))
    section = html.split('<section id="explanations">', 1)[1].split("</section>", 1)[0]
    assert section.count('data-right="false"') == min(MISTAKES, mistakes)
    assert section.count('data-right="true"') == min(RIGHT, right)
    overlays = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', section)
    assert len(overlays) == min(MISTAKES, mistakes) + min(RIGHT, right)
    first = Image.open(io.BytesIO(base64.b64decode(overlays[0]))).convert("RGB")
    assert max(first.size) <= 140

    # The section alone, with the report's own styles, as a page; the browser draws it.
    head = html.split("<body>", 1)[0]
    page = tmp_path / "explanations.html"
    page.write_text(f'{head}<body><main><section id="explanations">{section}</section></main></body></html>',
                    encoding="utf-8")  # fmt: skip
    shot = _screenshot(page, tmp_path, 700)
    image = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    # The heatmaps' saturated colours are on screen (the cards' red and green borders left out): the overlays
    # were decoded and drawn, not shown as broken images.
    saturated = (image.max(axis=2) - image.min(axis=2)) > 100
    borders = [np.abs(image - np.array(c)).sum(axis=2) < 60 for c in ((225, 87, 89), (89, 161, 79))]
    drawn = saturated & ~borders[0] & ~borders[1]
    assert drawn.sum() > 2000, drawn.sum()
    top = Image.open(shot).convert("L").crop((0, 0, 1280, 60))
    assert top.getextrema()[0] < 80  # the heading's dark text


def test_paired_fold_differences_decide_whether_two_trials_differ() -> None:
    from automl_tl.report._selection import indistinguishable

    leader = [0.90, 0.92, 0.88, 0.91, 0.90]
    assert indistinguishable(leader, [0.89, 0.93, 0.88, 0.90, 0.91])  # differences straddle 0
    assert not indistinguishable(leader, [a - 0.05 for a in leader])  # behind by the same margin on every fold
    assert not indistinguishable(leader, [0.80, 0.83, 0.79, 0.84, 0.80])


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_selection_section_shows_the_spread_across_folds(report: tuple[Path, str, dict[str, Any]]) -> None:
    _, html, summary = report
    section = html.split('<section id="selection">', 1)[1].split("</section>", 1)[0]
    folds = summary["selection"]["cross_validation"]
    assert folds and folds["used"], "a 48-image validation split must be decided on folds"
    first_id, first = next(iter(folds["trials"].items()))
    rows = re.findall(r"<tr><td class=l>([^<]+)</td>.*?</tr>", section)
    assert rows[0] == first_id and set(rows) <= set(folds["trials"])
    from automl_tl.report._html import fmt

    assert f"<td>{fmt(first['accuracy_mean'])}</td><td>{fmt(first['accuracy_std'])}</td>" in section
    assert "within noise of the leader" in section and f"on these {folds['folds']} folds" in section
