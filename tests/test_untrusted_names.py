"""Names that come from users' files are data, never markup or paths: a class named like an HTML tag is shown
as text in the report, and a manifest naming a file outside its artifact is refused before anything is read.

(The drop-an-image page, with such a class on a live server, is checked in tests/test_fuzz.py.)

    .venv/bin/python -m pytest -q tests/test_untrusted_names.py
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from automl_tl.errors import ArtifactError
from automl_tl.evaluate.metrics import classification_metrics
from automl_tl.inference.artifact import MANIFEST_NAME, load_artifact, write_artifact
from automl_tl.report import _svg as svg
from automl_tl.report._analysis import Miss, Predictions
from automl_tl.report._inputs import RunInputs
from automl_tl.report._page import _confusion, _misclassified, _overview, _per_class

from .test_artifact import make_member

EVIL = "<img src=x onerror=alert(1)>"
NAMES = (EVIL, 'bees"><script>alert(2)</script>')


def _run() -> RunInputs:
    labels = np.array([0, 1, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    m = classification_metrics(labels, probs, NAMES)
    summary = {
        "data": {"class_names": list(NAMES), "source": EVIL, "test_source": None, "n_train": 3, "n_val": 5, "n_test": 0},
        "best": {"trial_id": "t1", "val": {"accuracy": 0.6}, "val_calibrated": m},
        "ensemble": {"val": m, "test": None},
        "config": {"space": {"max_epochs": 1}},
        "metric": "val_accuracy",
        "versions": {},
    }
    return RunInputs(Path("run"), summary, [], {}, {"labels": labels.tolist()})


class _Elements(HTMLParser):
    """The elements and text an HTML fragment holds, as a browser's parser sees them."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _no_markup_from_names(html: str) -> str:
    """Assert the names made no element and no handler; return the fragment's text."""
    parsed = _Elements(html)
    assert not [t for t, _ in parsed.tags if t == "script"]
    assert not [(t, a) for t, attrs in parsed.tags for a in attrs if a.startswith("on")]
    assert all((attrs.get("src") or "").startswith("data:") for t, attrs in parsed.tags if t == "img")
    return "".join(parsed.text)


def test_class_names_are_text_in_every_report_section_that_shows_them() -> None:
    run = _run()
    preds = Predictions("validation", np.arange(5), np.array([0, 1, 0, 1, 1]),
                        np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]]), None, ())  # fmt: skip
    miss = Miss(2, EVIL, EVIL, NAMES[1], 0.7, 0.3, "AAAA")
    parts = {"per class": _per_class(run), "confusion": _confusion(run), "mistakes": _misclassified(run, preds, [miss])}
    for section, html in parts.items():
        assert EVIL[:18] in _no_markup_from_names(html), section  # shown, as text
    assert EVIL in _no_markup_from_names(parts["per class"]) and EVIL in _no_markup_from_names(parts["mistakes"])


def test_the_heatmap_escapes_labels_and_titles() -> None:
    html = svg.heatmap([[2, 1], [0, 3]], list(NAMES), EVIL)
    assert EVIL in _no_markup_from_names(html)  # the hover title holds the full name


def test_the_overview_escapes_class_names_and_the_data_source() -> None:
    assert EVIL in _no_markup_from_names(_overview(_run(), [EVIL]))


# --- manifests naming files outside the artifact --------------------------------------------------------


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    folder = tmp_path / "artifact"
    write_artifact(folder, ("ants", "bees"), [make_member("a", 64)], [1.0], 1.0, metrics={}, method="greedy")
    return folder


def _rewrite(folder: Path, weight_file: str) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["members"][0]["weight_file"] = weight_file
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["../secret.safetensors", "/etc/passwd", "sub/../../x", "..", "a\\..\\b"])
def test_a_manifest_naming_a_path_outside_is_refused(artifact: Path, name: str) -> None:
    _rewrite(artifact, name)
    with pytest.raises(ArtifactError, match=r"members\[0\]\.weight_file .* not a plain file name inside the artifact"):
        load_artifact(artifact)


def test_a_symlink_out_of_the_artifact_is_refused_before_it_is_read(artifact: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    weights = next(artifact.glob("*.safetensors"))
    outside.write_bytes(weights.read_bytes())
    link = artifact / "link.safetensors"
    link.symlink_to(outside)
    _rewrite(artifact, "link.safetensors")
    # Its bytes match the manifest's sha256: only the containment check stands between it and a load.
    with pytest.raises(ArtifactError, match=r"leads to .*outside\.safetensors, outside the artifact"):
        load_artifact(artifact)


def test_a_symlink_inside_the_artifact_is_fine(artifact: Path) -> None:
    weights = next(artifact.glob("*.safetensors"))
    (artifact / "alias.safetensors").symlink_to(weights.name)
    _rewrite(artifact, "alias.safetensors")
    assert load_artifact(artifact).members[0].weight_file == "alias.safetensors"


# --- the drop-an-image page -------------------------------------------------------------------------------


def test_the_page_writes_answers_as_text_and_runs_only_its_own_script() -> None:
    from automl_tl.serve._app import _PAGE, page_policy

    script = _PAGE.split("<script>", 1)[1].split("</script>", 1)[0]
    # Text goes in through textContent; markup setters only ever clear.
    assert "textContent = label" in script
    for setter in ("innerHTML", "outerHTML"):
        assert set(re.findall(rf"\.{setter}\s*=\s*([^;]+);", script)) <= {'""'}, setter
    assert "insertAdjacentHTML" not in script and "document.write" not in script
    policy = page_policy(_PAGE)
    assert "'unsafe-inline'" not in policy.split("script-src", 1)[1].split(";")[0]  # no inline handler runs
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in policy  # the page's own script does
