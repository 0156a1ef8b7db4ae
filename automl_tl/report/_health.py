"""The report's "Data health" section: the run's ``diagnostics.json`` (likely label errors, near-duplicates,
outliers, confusable classes; see :mod:`automl_tl.data.diagnostics`) with thumbnails from the image cache."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from html import escape
from pathlib import Path
import numpy as np

from automl_tl.report._analysis import thumbnail_base64
from automl_tl.report._inputs import RunInputs

__all__ = ["data_health"]

_SHOWN = 12  # figures per finding; diagnostics.json holds them all


def data_health(run: RunInputs) -> str:
    """The section's HTML; a note when the run has no diagnostics."""
    import json

    from automl_tl.data.deep import DIAGNOSTICS_NAME

    path = run.path / DIAGNOSTICS_NAME
    if not path.is_file():
        return _note(f"This run has no {DIAGNOSTICS_NAME} (a run from before data diagnostics, or they failed: "
                     "see the search log). `automl-tl inspect DATA --deep` computes them for any data set.")  # fmt: skip
    found = json.loads(path.read_text(encoding="utf-8"))
    thumb = _thumbnails(run.data.get("cache_path"))
    issues, dups = found.get("label_issues", []), found.get("near_duplicates", [])
    outliers, pairs = found.get("outliers", []), found.get("confusable_pairs", [])
    leaks = sum(d["kind"] == "cross-split" for d in dups)
    parts = [_note(
        f"From the frozen features of every image ({DIAGNOSTICS_NAME}): {len(issues)} likely label errors, "
        f"{len(dups)} near-duplicate pairs ({leaks} across splits), {len(outliers)} outliers, "
        f"{len(pairs)} confusable class pairs. Review them in the data; nothing here changed the training set "
        "except near-duplicates of train images in val or test, left out unless data.near_duplicates is keep."
    )]  # fmt: skip
    if issues:
        cards = [(f"<b>{escape(i['given'])}</b> → looks like {escape(i['suggested'])}<br>"
                  f'<span class="muted">quality {i["score"]:.3f} · {escape(_name(i["path"]))}</span>', [i["path"]])
                 for i in issues[:_SHOWN]]  # fmt: skip
        parts.append("<h3>Likely label errors (most suspect first)</h3>" + _grid(cards, thumb))
    if dups:
        cards = [(f"<b>{escape(d['kind'])}</b>, similarity {d['similarity']:.3f}<br>"
                  f'<span class="muted">{" ~ ".join(escape(_name(p)) for p in d["paths"])}</span>', d["paths"])
                 for d in dups[:_SHOWN]]  # fmt: skip
        parts.append("<h3>Near-duplicates</h3>" + _grid(cards, thumb))
    if outliers:
        cards = [(f'score {o["score"]:.3f}<br><span class="muted">{escape(_name(o["path"]))}</span>', [o["path"]])
                 for o in outliers[:_SHOWN]]  # fmt: skip
        parts.append("<h3>Outliers (unlike every class)</h3>" + _grid(cards, thumb))
    if pairs:
        rows = "".join(f'<tr><td class="l">{escape(p["classes"][0])} / {escape(p["classes"][1])}</td>'
                       f'<td>{p["rate"]:.1%}</td></tr>' for p in pairs[:_SHOWN])  # fmt: skip
        parts.append('<h3>Confusable class pairs</h3><table><thead><tr><th class="l">classes</th>'
                     f"<th>mistaken for each other</th></tr></thead><tbody>{rows}</tbody></table>")  # fmt: skip
    return "".join(parts)


def _thumbnails(cache_path: str | None) -> Callable[[str], str | None]:
    """Path -> base64 PNG from the run's image cache, or None when the cache or the image is gone."""
    from automl_tl.data import Dataset
    from automl_tl.errors import AutoMLError

    try:
        images = Dataset.open(Path(cache_path)) if cache_path else None
    except (AutoMLError, OSError):
        images = None
    rows: dict[str, int] = {str(p): i for i, p in enumerate(images.paths)} if images is not None else {}

    def thumb(path: str) -> str | None:
        return thumbnail_base64(np.asarray(images.image(rows[path]))) if images is not None and path in rows else None

    return thumb


def _grid(cards: Iterable[tuple[str, Sequence[str]]], thumb: Callable[[str], str | None]) -> str:
    figures = []
    for caption, paths in cards:
        imgs = "".join(f'<img src="data:image/png;base64,{t}" alt="{escape(_name(p))}">'
                       for p in paths if (t := thumb(p)) is not None)  # fmt: skip
        figures.append(f'<figure><div class="thumb">{imgs}</div>{caption}</figure>')
    return f'<div class="grid">{"".join(figures)}</div>'


def _name(path: str) -> str:
    return Path(path).name[:40]


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'
