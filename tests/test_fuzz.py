"""The served API keeps the promise of its own schema: schemathesis generates requests for every operation of
the live app's /openapi.json (raw image, multipart and JSON bodies, a bearer token on), and every answer is
below 500 and valid against the schema; a real image is then answered as the Predictor answers it. The model
has a class named like an HTML tag, and the drop-an-image page shows it as text.

    .venv/bin/python -m pytest -q tests/test_fuzz.py
    .venv/bin/python benchmarks/bench_fuzz.py          # the 1,000-case run -> benchmarks/results/fuzz.json
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from automl_tl.inference.artifact import write_artifact
from automl_tl.inference.predictor import Predictor
from automl_tl.serve import start_server, stop_server
from tests.scenarios._common import free_port
from tests.scenarios.browser import drop_image

from .test_artifact import make_member

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (schemathesis brings hypothesis)
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "fuzz-token-3b9e"
EVIL = "<img src=x onerror=alert(1)>"
CLASSES = (EVIL, "bees")
CASES_PER_OPERATION = 25
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Every default check of schemathesis but one: that any schema-valid body is accepted. A schema cannot say
# "bytes that decode as an image", so random bytes are a schema-valid body that is rightly answered 422.
UNSAYABLE = [positive_data_acceptance]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "artifact"
    write_artifact(folder, CLASSES, [make_member("a", 64)], [1.0], 1.0,
                   metrics={"best_member": "a", "val": {"accuracy": 0.9}}, method="greedy")  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def url(ray_session: Any, artifact: Path) -> Iterator[str]:
    port = free_port()
    try:
        # Small limits, so generated bodies also reach the size checks.
        yield start_server(artifact, mode="ensemble", port=port, token=TOKEN, cpus_per_replica=0.5,
                           max_body_bytes=1 << 20, max_pixels=1_000_000)  # fmt: skip
    finally:
        stop_server()


def test_every_operation_answers_below_500_and_as_its_schema_says(url: str) -> None:
    # Hypothesis drives schemathesis's strategies directly: its pytest plugin does not run under pytest 9.
    from hypothesis import given

    api_schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    seen: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        name = f"{operation.method.upper()} {operation.path}"
        counts = seen.setdefault(name, {})

        @given(case=operation.as_strategy())
        @settings(max_examples=CASES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)  # fmt: skip
        def check(case: Any) -> None:
            response = case.call(headers=AUTH, timeout=60)
            key = f"{case.media_type or '-'} {response.status_code}"
            counts[key] = counts.get(key, 0) + 1
            if response.status_code >= 500:
                failures.append(f"{name}: {response.status_code} {response.text[:300]}")
            try:
                case.validate_response(response, headers=AUTH, excluded_checks=UNSAYABLE)
            except Exception as exc:  # noqa: BLE001 - every failed check is a finding
                failures.append(f"{name}: {str(exc)[:500]}")

        check()
    assert set(seen) == {"POST /v1/predict", "POST /v1/explain", "GET /v1/healthz", "GET /v1/metadata", "GET /v1/stats"}
    assert not failures, "\n".join(failures[:10])
    bodies = {key.split()[0].split("/")[0] if key.startswith("image/") else key.split()[0] for key in seen["POST /v1/predict"]}
    assert {"image", "multipart/form-data", "application/json"} <= bodies, seen  # every body form was sent


def test_every_operation_is_in_the_schema_with_its_answers(url: str) -> None:
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    operations = {(m.upper(), p) for p, methods in spec["paths"].items() for m in methods}
    assert operations == {("POST", "/v1/predict"), ("POST", "/v1/explain"), ("GET", "/v1/healthz"), ("GET", "/v1/metadata"),
                          ("GET", "/v1/stats")}  # fmt: skip
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            assert "200" in op["responses"] and op["responses"]["200"]["content"]["application/json"]["schema"], (method, path)
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"image/*", "multipart/form-data", "application/json"}
    assert spec["paths"]["/v1/predict"]["post"]["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    page = requests.get(f"{url}/", timeout=10)
    assert page.status_code == 200 and "script-src 'sha256-" in page.headers["Content-Security-Policy"]


def test_after_the_fuzz_a_real_image_is_answered_as_the_predictor_answers(
    url: str, artifact: Path, hymenoptera_dir: Path
) -> None:
    image = sorted((hymenoptera_dir / "val" / "bees").glob("*.jpg"))[0]
    answer = requests.post(f"{url}/v1/predict?top_k=2", data=image.read_bytes(), timeout=60,
                           headers={**AUTH, "Content-Type": "image/jpeg"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    got = answer.json()["predictions"][0]
    expected = Predictor.load(artifact).predict([image], top_k=2)[0]
    assert got["labels"] == list(expected.labels)
    np.testing.assert_allclose(got["probabilities"], expected.probabilities, atol=1e-5)
    assert requests.get(f"{url}/v1/metadata", headers=AUTH, timeout=10).json()["class_names"] == list(CLASSES)


def test_the_page_shows_a_class_named_like_markup_as_text(url: str, hymenoptera_dir: Path, tmp_path: Path) -> None:
    image = sorted((hymenoptera_dir / "val" / "bees").glob("*.jpg"))[0]
    setup = f"window.alert = () => {{ window.alerted = true; }}; document.querySelector('#token').value = '{TOKEN}'; true"
    with drop_image(url, image, tmp_path / "profile", setup_js=setup) as (state, page):
        assert state == "done", page.evaluate("document.querySelector('#status').textContent")
        labels = page.evaluate("[...document.querySelectorAll('#result tr.answer td:first-child')]"
                               ".map(td => td.textContent)")  # fmt: skip
        injected = page.evaluate("document.querySelectorAll('#result img, #status img').length")
        alerted = page.evaluate("window.alerted === true")
    assert EVIL in labels  # shown as its own text
    assert injected == 0 and not alerted
