"""The Python-proxy ingress (``ingress="proxy"``, the default) serves.

Its own module: the ingress is chosen when Serve starts, and ``tests/test_serve.py`` keeps one Serve with
HAProxy running for all of its tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from automl_tl.errors import ConfigError
from automl_tl.inference.predictor import Predictor
from automl_tl.serve import start_server, stop_server
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
