"""Serving an artifact over HTTP with Ray Serve: FastAPI ingress, dynamic batching, best member or ensemble.

    automl-tl serve RUN_DIR [--mode best|ensemble|cascade] [--port 8000] [--replicas N]  # blocks; prints the URL
    serve run automl_tl.serve:app artifact=RUN_DIR/artifact mode=ensemble           # the same app, Serve's CLI
    automl-tl serve RUN_DIR --emit-config serve.yaml && serve deploy serve.yaml      # or a KubeRay RayService

    from automl_tl.serve import start_server, stop_server
    url = start_server("runs/my_run", mode="best", port=8000)   # returns once /v1/healthz answers 200
    stop_server()

API: ``POST /v1/predict`` (raw ``image/*`` body, multipart files, or JSON ``{"images": [base64, ...]}``;
query ``top_k``), ``GET /v1/healthz``, ``GET /v1/metadata``, ``GET /v1/stats``, ``GET /`` (a drop-an-image
page) and the OpenAPI schema at ``/docs``. Tests and figures:

    .venv/bin/python -m pytest -q tests/test_serve.py
    .venv/bin/python benchmarks/bench_serve.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from automl_tl.runs.locate import resolve_artifact
from automl_tl.serve._args import DEFAULT_LAYOUT, AppArgs
from automl_tl.serve._server import APP_NAME, check_port, emit_config, make_args, start_server, stop_server

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = [
    "APP_NAME",
    "DEFAULT_LAYOUT",
    "AppArgs",
    "app",
    "check_port",
    "emit_config",
    "make_args",
    "resolve_artifact",
    "start_server",
    "stop_server",
]


def app(args: AppArgs) -> Application:
    """The Serve application builder: ``serve run automl_tl.serve:app artifact=PATH mode=ensemble``."""
    from automl_tl.serve._app import build_app

    if not isinstance(args, AppArgs):  # a plain dict from a caller that bypassed Serve's validation
        args = AppArgs.model_validate(args)
    return build_app(args)


# Serve validates ``key=value`` arguments into the builder's annotated pydantic model; with postponed
# annotations it would see the string "AppArgs", so hand it the class.
app.__annotations__["args"] = AppArgs
