"""The Python-proxy ingress (``ingress="proxy"``, the default) serves.

Its own module: the ingress is chosen when Serve starts, and ``tests/test_serve.py`` keeps one Serve with
HAProxy running for all of its tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from pydantic import ValidationError
from ray.exceptions import ActorDiedError

from automl_tl.errors import ConfigError
from automl_tl.inference.predictor import Predictor
from automl_tl.serve import AppArgs, start_server, stop_server
from automl_tl.serve._gateway import ATTEMPTS, retry_on_replica_death
from automl_tl.serve._inputs import RequestError
from automl_tl.serve._server import resolve_ingress

from .test_serve import CLASSES, _free_port, _post, _probs, predictor, process_names, run_dir  # noqa: F401 (fixtures)


def test_the_ingress_is_the_python_proxy_or_haproxy() -> None:
    with pytest.raises(ConfigError, match="ingress must be 'haproxy' or 'proxy', got 'nginx'"):
        resolve_ingress("nginx")
    with pytest.raises(ConfigError, match="ingress must be 'haproxy' or 'proxy', got 'auto'"):
        resolve_ingress("auto")
    assert resolve_ingress("proxy") == "proxy" and resolve_ingress("haproxy") == "haproxy"


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_the_python_proxy_ingress_answers_like_the_predictor(
    ray_session: Any, run_dir: Path, predictor: Predictor, hymenoptera_dir: Path
) -> None:
    images = [sorted((hymenoptera_dir / "val" / name).glob("*.jpg"))[0] for name in CLASSES]
    url = start_server(run_dir, mode="ensemble", port=_free_port(), cpus_per_replica=0.5)  # the default ingress
    try:
        meta = requests.get(f"{url}/v1/metadata", timeout=10).json()
        assert meta["ingress"] == "proxy" and "haproxy" not in process_names()
        answers = [_post(url, data=p.read_bytes(), headers={"Content-Type": "image/jpeg"}) for p in images]
        assert all(a.status_code == 200 for a in answers)
        got = [_probs(a.json()["predictions"][0]) for a in answers]
        np.testing.assert_allclose(got, predictor.predict_proba(images), atol=1e-5)
        bad = _post(url, data=b"not an image", headers={"Content-Type": "image/jpeg"})
        assert bad.status_code == 422 and "image" in bad.json()["detail"]
    finally:
        stop_server()


def _replica_pids(deployment: str) -> list[int]:
    """The pids of the live replicas of one deployment of the app, among this test process's descendants
    (the Ray it started): other Ray instances may run on the machine."""
    parent, title = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            title[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode()
    ours, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - ours
        ours |= frontier
    return sorted(pid for pid in ours if title.get(pid, "").startswith(f"ray::ServeReplica:automl_tl:{deployment}"))


# layout -> (its options, the deployment whose replica is killed, the one holding the HTTP requests); the
# composed layout serves the best member alone, so that only four replicas start.
KILLED = {
    "single": ({"mode": "ensemble", "gateway": True}, "Classifier", "Gateway"),
    "composed": ({"mode": "best", "layout": "composed"}, "Member0-b", "Classifier"),
}


@pytest.mark.slow
@pytest.mark.needs_shared_data
@pytest.mark.parametrize("layout", list(KILLED))
def test_a_replica_killed_with_requests_in_flight_fails_none_of_them(
    ray_session: Any, run_dir: Path, hymenoptera_dir: Path, layout: str
) -> None:
    options, killed, holder = KILLED[layout]
    jpeg = sorted((hymenoptera_dir / "val" / CLASSES[0]).glob("*.jpg"))[0].read_bytes()
    url = start_server(run_dir, port=_free_port(), replicas=2, cpus_per_replica=0.5, ingress="proxy", **options)
    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:  # closed loop: a request in flight on each replica whenever the kill comes
        with requests.Session() as session:
            while not stop.is_set():
                answer = session.post(f"{url}/v1/predict", data=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60)
                statuses.append(answer.status_code)

    clients = [threading.Thread(target=client) for _ in range(8)]
    try:
        victims = _replica_pids(killed)
        assert len(victims) == 2 and len(_replica_pids(holder)) == 2
        for t in clients:
            t.start()
        while len(statuses) < 40:
            time.sleep(0.05)
        os.kill(victims[0], signal.SIGKILL)
        killed_at = len(statuses)
        time.sleep(3.0)  # requests keep coming while Serve notices the death and restarts the replica
        stop.set()
        for t in clients:
            t.join(timeout=60)
        assert len(statuses) > killed_at + 20, "too few requests after the kill to judge"
        assert statuses.count(200) == len(statuses), f"failed: {sorted(set(statuses) - {200})}"
        # Through the gateway a user error is still the replica's own 4xx.
        bad = _post(url, data=b"not an image", headers={"Content-Type": "image/jpeg"})
        assert bad.status_code == 422 and "image" in bad.json()["detail"]
        assert requests.get(f"{url}/v1/metadata", timeout=10).json()["layout"] == layout
    finally:
        stop.set()
        stop_server()


def test_a_call_is_retried_only_while_its_replica_dies() -> None:
    calls: list[str] = []

    async def dies_then(answer: str, deaths: int) -> str:
        calls.append(answer)
        if len(calls) <= deaths:
            raise ActorDiedError()
        return answer

    assert asyncio.run(retry_on_replica_death(lambda: dies_then("ok", ATTEMPTS - 1))) == "ok"
    assert len(calls) == ATTEMPTS
    calls.clear()
    with pytest.raises(ActorDiedError):  # every attempt died: the caller's 5xx
        asyncio.run(retry_on_replica_death(lambda: dies_then("never", ATTEMPTS)))
    assert len(calls) == ATTEMPTS

    async def user_error() -> str:
        calls.append("bad")
        raise RequestError(422, "not an image")

    calls.clear()
    with pytest.raises(RequestError):  # not a death: no retry
        asyncio.run(retry_on_replica_death(user_error))
    assert calls == ["bad"]


def test_the_gateway_goes_only_in_front_of_the_single_layout(run_dir: Path) -> None:
    with pytest.raises(ValidationError, match="gateway=True needs layout='single'.*got layout='composed'"):
        AppArgs(artifact=str(run_dir), layout="composed", gateway=True)
    assert AppArgs(artifact=str(run_dir), gateway=True).gateway
