"""The Ray Serve application: a FastAPI ingress, dynamic batching, and one or more model deployments.

Two layouts of the same HTTP API (``AppArgs.layout``):

* ``single``: one deployment, :class:`Classifier`, holds every planned member; images from concurrent
  requests are gathered by ``@serve.batch`` and each batch runs through all members in one call;
* ``composed``: :class:`Classifier` only decodes and preprocesses; one :class:`MemberModel` deployment
  per member batches and runs its own forward; the ingress fans out, then averages and calibrates.

Either way the request path is: read the body (bounded), parse and decode it in a worker thread (never on
the event loop), queue each image into the batcher, answer with the top-k labels. In the single layout a
request that finds the replica idle skips the decode pool and the batcher: it is decoded and forwarded as
one batch in the forward thread, two thread hand-offs and a queue fewer on its critical path (an
ensemble's members may run side by side in the lanes instead, where the replica measured that faster). A CPU
replica of several cores forwards batches in several lanes at once (:class:`~automl_tl.serve._replica.Forward`). Every
user error is a :class:`~automl_tl.serve._inputs.RequestError` and becomes a 4xx JSON ``{"detail": "..."}``.
"""

# No ``from __future__ import annotations`` here, on purpose: ``serve.ingress`` pickles the FastAPI app by
# value when the class is decorated, and a route's string annotations ("Request") cannot be resolved in the
# replica from the few globals that pickling keeps. Real annotation objects travel with the functions.
import asyncio
import base64
import functools
import hashlib
import importlib.resources
import os
import re
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from ray.serve import Application, Deployment
from ray.serve.handle import DeploymentHandle

import automl_tl
from automl_tl.train.memory import MALLOC_ENV
from automl_tl.inference.artifact import Artifact, load_artifact
from automl_tl.errors import AutoMLError
from automl_tl.inference.predictor import top_predictions
from automl_tl.runs.locate import resolve_artifact
from automl_tl.serve._args import HAPROXY_FLAG, AppArgs, Secret, read_token
from automl_tl.serve._gateway import (Gateway, Answer, answer_in_process, authorize, error_response, read_body,
                                      retry_on_replica_death)  # fmt: skip
from automl_tl.serve._loopback import bind_loopback
from automl_tl.serve._inputs import BodyLimits, RequestError, decode_image, split_body
from automl_tl.serve._model import Preprocessor, ServingPlan, plan_for
from automl_tl.serve._replica import Counters, Forward, Row, configure_batching, single_threaded
from automl_tl.serve._explain import ExplainAnswers
from automl_tl.serve._schemas import (ErrorResponse, ExplainResponse, HealthResponse, MetadataResponse, PredictResponse,
                                      StatsResponse)  # fmt: skip

__all__ = ["Classifier", "MemberModel", "build_app"]

API_PREFIX = "/v1"
# No mmap per batch and no trimming (see automl_tl.train.memory.MALLOC_ENV): a replica's resident size levels off
# after warm-up instead of creeping up (benchmarks/bench_serve.py samples it), and a forward does not fault
# its activations in page by page. MALLOC_ENV's single arena is widened for a replica: see replica_env.
REPLICA_ENV = dict(MALLOC_ENV)
# Our request handlers run on Serve's own event loop in the replica, not on a second loop in a thread of their
# own (Serve's default): a request then crosses no thread boundary between Serve's HTTP handling and ours.
# They never block that loop: decoding and forwards run in worker threads. Together with Serve's access log
# off (AppArgs.access_log) this lowers the event loops' CPU per request (benchmarks/bench_serve.py).
REPLICA_ENV["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "0"
DECODE_THREADS = 2


def replica_env(args: AppArgs) -> dict[str, str]:
    """:data:`REPLICA_ENV`, with one malloc arena for each thread that allocates tensors (the forward lanes and
    the decode threads) instead of one for the whole replica. In one shared arena, the members of a lone
    request forwarded side by side after a spell of load waited on each other's allocations.
    """
    return {**REPLICA_ENV, "MALLOC_ARENA_MAX": str(args.lanes_per_replica() + DECODE_THREADS)}


def _json(answer: BaseModel, status_code: int = 200) -> Response:
    """A declared response model as JSON: validated when it was built, serialized once by pydantic (FastAPI
    would validate it again), so what is answered is what /openapi.json declares."""
    return Response(answer.model_dump_json(), status_code=status_code, media_type="application/json")


_TOP_K = Query(5, ge=1, le=10_000, description="labels per image")  # of /v1/predict and /v1/explain
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422)}
_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorResponse}}


_PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A raw image, a multipart upload of one or more files, or JSON with base64 images.",
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"}}},
                }
            },
        },
    }
}

api = FastAPI(
    title="automl_tl image classifier",
    version=automl_tl.__version__,
    description="Classify images with a saved automl_tl artifact (its best member or its ensemble).",
)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(exc)


@api.exception_handler(AutoMLError)
async def _automl_error(request: Request, exc: AutoMLError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        where = " ".join(str(p) for p in err.get("loc", ()))
        got = f" (got {err['input']!r:.40})" if "input" in err and err["input"] is not None else ""
        parts.append(f"{where}: {err.get('msg', 'invalid')}{got}")
    return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)


# The drop-an-image page; read now, since the ingress class (and what it references) is pickled when decorated.
_PAGE = importlib.resources.files("automl_tl").joinpath("static/index.html").read_text(encoding="utf-8")


def page_policy(page: str) -> str:
    """The page's Content-Security-Policy: only its own inline script runs (named by its sha256), so no inline
    handler (``onerror=...``) would run even if markup from a class name got into the page."""
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    digests = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    return (f"default-src 'self'; script-src {digests}; style-src 'unsafe-inline'; img-src 'self' blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip


_PAGE_HEADERS = {"Content-Security-Policy": page_policy(_PAGE), "X-Content-Type-Options": "nosniff"}


# --- deployments -----------------------------------------------------------------------------------------


@serve.deployment(name="MemberModel", max_constructor_retry_count=3)
class MemberModel:
    """One ensemble member: batches its preprocessed inputs and returns its (uncalibrated) softmax rows."""

    def __init__(self, args: AppArgs, member_index: int) -> None:
        bind_loopback()  # before Serve starts this replica's gRPC server
        artifact = load_artifact(args.artifact)  # build_app resolved it: an absolute folder or a URI
        self._forward = Forward.serving(artifact, [member_index], args)
        configure_batching(self._batched, args)

    async def infer(self, pixels: np.ndarray) -> Row:
        """This member's softmax row for one preprocessed CHW input."""
        await self._forward.admit()
        return await (await self._batched((torch.from_numpy(pixels),)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _batched(self, inputs: list[tuple[torch.Tensor, ...]]) -> list[asyncio.Future[Row]]:
        # Returns once the batch has a lane, so the batcher forms the next one for another lane meanwhile.
        return await self._forward.start(inputs)

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict[str, Any]:
        return self._forward.counters.to_dict()


@serve.deployment(name="Classifier", max_constructor_retry_count=3)
@serve.ingress(api)
class Classifier:
    """The HTTP ingress. Holds the members itself (``members`` None) or fans out to member deployments."""

    def __init__(
        self, args: AppArgs, token: Secret | None = None, members: list[DeploymentHandle] | None = None
    ) -> None:
        bind_loopback()  # before Serve starts this replica's gRPC server
        self._args = args
        self._token = token if token is not None else read_token(args)
        artifact = load_artifact(args.artifact)  # build_app resolved it: an absolute folder or a URI
        self._plan: ServingPlan = plan_for(artifact, args.mode)
        self._class_names = artifact.class_names
        self._max_side = artifact.decode_max_side
        self._limits = BodyLimits(args.max_body_bytes, args.max_images_per_request)
        self._preprocess = Preprocessor(self._plan.preprocessing)
        self._decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode", initializer=single_threaded)
        self._members = members
        self._forward: Forward | None = None
        self._in_flight = 0  # requests past reading their body: a lone one takes the direct path
        if members is None:
            self._forward = Forward.serving(artifact, self._plan.member_indices, args, self._plan)
            configure_batching(self._batched, args)
        else:
            single_threaded()  # the ingress only preprocesses; the member replicas own the cores
        self._metadata = MetadataResponse.model_validate(self._describe(artifact))
        self._explain = ExplainAnswers(artifact, self._plan)  # its members are built on the first /v1/explain

    def _describe(self, artifact: Artifact) -> dict[str, Any]:
        planned = set(self._plan.member_indices)
        timed = dict(zip(self._plan.member_indices, self._forward.latency_ms if self._forward else []))
        return {
            "model_id": self._plan.model_id,
            "mode": self._plan.mode,
            "layout": "single" if self._members is None else "composed",
            # How requests reach this replica: HAProxy straight to its own HTTP server, or Serve's proxy actor.
            "ingress": "haproxy" if os.environ.get(HAPROXY_FLAG) == "1" else "proxy",
            "class_names": list(artifact.class_names),
            "members": [
                {
                    "member_id": m.member_id,
                    "backbone": m.backbone,
                    "image_size": m.image_size,
                    "preprocessing": dict(m.preprocessing),
                    "temperature": m.temperature,
                    "weight": artifact.weights[i],
                    "val_metrics": dict(m.val_metrics),
                    "serving": i in planned,
                    "latency_ms": dict(m.latency_ms),  # measured where the artifact was built
                    "replica_latency_ms": timed.get(i),  # measured by this replica when it started
                }
                for i, m in enumerate(artifact.members)
            ],
            "ensemble": {"method": artifact.method, "weights": list(artifact.weights),
                         "temperature": artifact.temperature},  # fmt: skip
            "calibration_temperature": self._plan.temperature,
            "cascade": {"member_id": self._plan.member_ids[0], "threshold": self._plan.threshold}
            if self._plan.threshold is not None else None,  # fmt: skip
            "metrics": dict(artifact.metrics),
            "versions": dict(artifact.versions),
            "limits": {"max_body_bytes": self._args.max_body_bytes, "max_pixels": self._args.max_pixels,
                       "max_images_per_request": self._args.max_images_per_request},  # fmt: skip
            "batching": {"max_batch_size": self._args.max_batch_size,
                         "batch_wait_timeout_s": self._args.batch_wait_timeout_s},  # fmt: skip
        }

    def _authorize(self, request: Request) -> None:
        authorize(request, self._token)

    async def _read_body(self, request: Request) -> bytes:
        return await read_body(request, self._args.max_body_bytes)

    async def answer_http(self, scope: dict[str, Any], body: bytes) -> Answer:
        """A request the :class:`~automl_tl.serve._gateway.Gateway` forwarded, answered by this replica's own app."""
        return await answer_in_process(cast(Any, self).app, scope, body)  # the app serve.ingress wraps

    def _decoded(self, content_type: str | None, body: bytes) -> list[tuple[str, np.ndarray, float]]:
        """Parse and decode every image of a body, checked against the limits (runs in a worker thread)."""
        out = []
        for image in split_body(content_type, body, self._limits):
            start = time.perf_counter()
            pixels = decode_image(image, self._max_side, self._args.max_pixels)
            resized = self._preprocess.resized_pixels(*pixels.shape[:2])
            if resized > self._args.max_pixels:
                raise RequestError(
                    422, f"{image.name}: a {pixels.shape[1]}x{pixels.shape[0]} image is too elongated: resized for the "
                    f"model it would hold {resized:,} pixels, over max_pixels={self._args.max_pixels:,}",
                )  # fmt: skip
            out.append((image.name, pixels, start))
        return out

    def _prepare(self, content_type: str | None, body: bytes) -> list[tuple[str, tuple[torch.Tensor, ...], float]]:
        """Parse, decode and preprocess every image of a body (runs in a worker thread)."""
        return [(name, self._preprocess(pixels), (time.perf_counter() - start) * 1000.0)
                for name, pixels, start in self._decoded(content_type, body)]  # fmt: skip

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _batched(self, inputs: list[tuple[torch.Tensor, ...]]) -> list[asyncio.Future[Row]]:
        assert self._forward is not None  # the single layout
        return await self._forward.start(inputs)  # as MemberModel._batched

    async def _infer(self, inputs: tuple[torch.Tensor, ...]) -> Row:
        if self._forward is not None:
            await self._forward.admit()
            return await (await self._batched(inputs))
        assert self._members is not None
        # Each member call again on a live replica if its replica dies running it.
        rows = await asyncio.gather(*(retry_on_replica_death(functools.partial(h.infer.remote, x.numpy()))
                                      for h, x in zip(self._members, inputs)))  # fmt: skip
        return tuple(r[0][0] for r in rows), max(r[1] for r in rows), max(r[2] for r in rows)

    async def _answer(self, name: str, inputs: tuple[torch.Tensor, ...], decode_ms: float, k: int) -> dict[str, Any]:
        start = time.perf_counter()
        row = await self._infer(inputs)
        return self._format(name, row, decode_ms, (time.perf_counter() - start) * 1000.0, k)

    def _format(self, name: str, row: Row, decode_ms: float, waited_ms: float, k: int) -> dict[str, Any]:
        member_rows, batch_size, forward_ms = row
        probs = self._plan.calibrate([r[None, :] for r in member_rows])
        answer = top_predictions(probs, self._class_names, k)[0].to_dict()
        timing = {"decode_ms": round(decode_ms, 3), "queue_ms": round(max(waited_ms - forward_ms, 0.0), 3),
                  "forward_ms": round(forward_ms, 3), "batch_size": batch_size}  # fmt: skip
        return {"name": name, **answer, "timing": timing}

    async def _answer_alone(self, content_type: str | None, body: bytes, k: int) -> list[dict[str, Any]]:
        """The whole request in the forward thread as one batch: the path of a request that finds the replica idle."""
        assert self._forward is not None  # the single layout
        prepared: list[tuple[str, tuple[torch.Tensor, ...], float]] = []

        def prepare() -> list[tuple[torch.Tensor, ...]]:
            prepared.extend(self._prepare(content_type, body))
            return [inputs for _, inputs, _ in prepared]

        rows = await self._forward.solo(prepare)
        return [self._format(name, row, ms, row[2], k) for (name, _, ms), row in zip(prepared, rows)]

    @api.post(f"{API_PREFIX}/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_PREDICT_BODY)
    async def predict(self, request: Request, top_k: int = _TOP_K) -> Response:
        """Classify the images of the body; per image: the top-k labels with calibrated probabilities."""
        start = time.perf_counter()
        self._authorize(request)
        body = await self._read_body(request)
        content_type = request.headers.get("content-type")
        self._in_flight += 1
        try:
            if self._forward is not None and self._forward.idle and self._in_flight == 1:
                answers = await self._answer_alone(content_type, body, top_k)
            else:
                prepared = await asyncio.get_running_loop().run_in_executor(self._decoder, self._prepare, content_type, body)
                answers = await asyncio.gather(*(self._answer(name, x, ms, top_k) for name, x, ms in prepared))
        finally:
            self._in_flight -= 1
        return _json(PredictResponse.model_validate({
            "model_id": self._plan.model_id,
            "mode": self._plan.mode,
            "members": list(self._plan.member_ids),
            "predictions": answers,
            "total_ms": round((time.perf_counter() - start) * 1000.0, 3),
        }))  # fmt: skip

    @api.post(f"{API_PREFIX}/explain", response_model=ExplainResponse, responses=_ERRORS, openapi_extra=_PREDICT_BODY)
    async def explain(self, request: Request, top_k: int = _TOP_K) -> Response:
        """As /v1/predict, and per image a PNG (base64) of where the model looked for its top class (Grad-CAM)."""
        start = time.perf_counter()
        self._authorize(request)
        decode = functools.partial(self._decoded, request.headers.get("content-type"), await self._read_body(request))
        work = functools.partial(self._explain.respond, decode, top_k, start)
        return _json(await asyncio.get_running_loop().run_in_executor(self._decoder, work))

    @api.get(f"{API_PREFIX}/healthz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def healthz(self) -> Response:
        """200 once every model is loaded and answering; 503 otherwise."""
        ready = True
        if self._members is not None:
            try:
                await asyncio.wait_for(asyncio.gather(*(h.ready.remote() for h in self._members)), timeout=5.0)
            except Exception:  # noqa: BLE001 - any failure to answer means not ready
                ready = False
        body = HealthResponse(status="ready" if ready else "loading", model_id=self._plan.model_id,
                              auth=self._token is not None)  # fmt: skip
        return _json(body, status_code=200 if ready else 503)

    @api.get(f"{API_PREFIX}/metadata", response_model=MetadataResponse, responses=_AUTH_ERRORS)
    async def metadata(self, request: Request) -> Response:
        """Classes, members (and which of them serve), metrics, versions and limits of the artifact."""
        self._authorize(request)
        return _json(self._metadata)

    @api.get(f"{API_PREFIX}/stats", response_model=StatsResponse, responses=_AUTH_ERRORS)
    async def stats(self, request: Request) -> Response:
        """This replica's batching counters and memory (and those of the member replicas it reached)."""
        self._authorize(request)
        out: dict[str, Any] = {"ingress": (self._forward.counters if self._forward else Counters()).to_dict()}
        if self._members is not None:
            found = await asyncio.gather(*(h.stats.remote() for h in self._members))
            out["members"] = dict(zip(self._plan.member_ids, found))
        return _json(StatsResponse.model_validate(out))

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(_PAGE, headers=_PAGE_HEADERS)


# --- the application builder -----------------------------------------------------------------------------


def build_app(args: AppArgs, token: Secret | None = None, extra_env: Mapping[str, str] | None = None) -> Application:
    """The bound application for ``args``; ``token`` overrides ``token_env``/``token_file`` when given, and
    ``extra_env`` adds to the replicas' environment (the ingress settings of a Serve started here)."""
    folder = resolve_artifact(args.artifact)  # absolute: replicas do not share the caller's working directory
    args = args.model_copy(update={"artifact": str(folder)})
    artifact = load_artifact(folder)  # fail here, not in a crash-looping replica
    plan = plan_for(artifact, args.mode)
    actor: dict[str, Any] = {"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica,
                             "runtime_env": {"env_vars": {**replica_env(args), **(extra_env or {})}}}  # fmt: skip
    logs = {"enable_access_log": args.access_log}
    scale: dict[str, Any] = (
        {"autoscaling_config": args.autoscaling_config()} if args.autoscaling else {"num_replicas": args.replicas}
    )
    limit = args.ongoing_requests_limit()
    classifier, member_model = cast(Deployment, Classifier), cast(Deployment, MemberModel)
    if args.layout == "single":
        model = classifier.options(ray_actor_options=actor, max_ongoing_requests=limit, logging_config=logs,
                                   **scale).bind(args, token)  # fmt: skip
        if not args.gateway:
            return model
        gateway = cast(Deployment, Gateway).options(
            ray_actor_options={"num_cpus": 0, "runtime_env": actor["runtime_env"]},
            max_ongoing_requests=limit * 4, logging_config=logs, **scale)  # fmt: skip
        return gateway.bind(args, model, token)
    members = [
        member_model.options(
            name=f"Member{n}-{_safe(artifact.members[i].member_id)}",
            ray_actor_options=actor,
            max_ongoing_requests=limit,
            logging_config=logs,
            **scale,
        ).bind(args, i)
        for n, i in enumerate(plan.member_indices)
    ]
    ingress = classifier.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=limit * 4,
                                 logging_config=logs, **scale)  # fmt: skip
    return ingress.bind(args, token, members)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40]

