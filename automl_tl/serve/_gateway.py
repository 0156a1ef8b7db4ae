"""The HTTP edge of a request: its bearer token and bounded body, and how it survives the death of the replica
running it.

Serve's proxy (and HAProxy) hand a request to one replica; once that replica has accepted it, Serve's router
retries nothing: if the replica dies mid-request (killed, out of memory, a crash in native code) the
client gets a 500. Inference is idempotent, so wherever our code calls a replica through a handle it sends
the request again to a live replica (:func:`retry_on_replica_death`): the composed layout's ingress for
its member calls, and the :class:`Gateway`, a thin ingress that the single layout can put in front of its
model replicas (``AppArgs.gateway``) so that the process holding the HTTP connection is never the one
running the model. A user error is the replica's own 4xx answer and passes through untouched; a replica
dying on every attempt is still a 5xx.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from automl_tl.serve._args import AppArgs, Secret, read_token
from automl_tl.serve._inputs import RequestError
from automl_tl.serve._loopback import bind_loopback

__all__ = ["ATTEMPTS", "Gateway", "answer_in_process", "authorize", "read_body", "retry_on_replica_death"]

T = TypeVar("T")

# Tries of one call in all. More than two, so that a retry landing on a second dying replica (or one Serve
# has not yet dropped) still has a live one to go to; few, so that a request that itself kills replicas
# (a poison input) takes down at most this many before its 5xx.
ATTEMPTS = 3
# Pause before a retry: the router learns of the dead replica from the failed call, the controller a moment
# later; a short wait keeps the retry from racing back to it.
RETRY_PAUSE_S = 0.05

# What the ASGI scope of a forwarded request keeps: all an app reads from it, and picklable.
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path",
               "query_string", "headers", "server", "client")  # fmt: skip


async def retry_on_replica_death(call: Callable[[], Awaitable[T]], attempts: int = ATTEMPTS) -> T:
    """``call()``'s result, calling again (a new handle call, routed to a live replica) while the replica
    that ran it died (a :class:`~ray.exceptions.RayActorError`: ``ActorDiedError``, ``ActorUnavailableError``);
    any other error, and the last death, propagate."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except RayActorError:
            if attempt == attempts:
                raise
            await asyncio.sleep(RETRY_PAUSE_S * attempt)
    raise AssertionError("unreachable: the loop returns or raises")


def authorize(request: Request, token: Secret | None) -> None:
    """Raise a 401 :class:`RequestError` unless the request carries ``token`` (no check when it is None)."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise RequestError(401, "missing bearer token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode("utf-8"), token.get_secret_value().encode("utf-8")):
        raise RequestError(401, "invalid bearer token")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with a 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, f"Content-Length must be a number of bytes, got {declared!r:.40}")
        if int(declared) > limit:
            raise RequestError(413, f"request body is {int(declared):,} bytes, over the limit of {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def error_response(exc: RequestError) -> JSONResponse:
    """A :class:`RequestError` as the API answers it: ``{"detail": ...}`` with its 4xx status."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)


Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


async def answer_in_process(app: Callable[..., Awaitable[None]], scope: dict[str, Any], body: bytes) -> Answer:
    """(status, headers, body) of ASGI ``app`` for one HTTP request whose whole body is ``body``."""
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects: the gateway holds the connection
        raise AssertionError("unreachable")

    status, headers, chunks = 500, [], []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = int(message["status"]), [tuple(h) for h in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))

    await app(scope, receive, send)
    return status, headers, b"".join(chunks)


@serve.deployment(name="Gateway", max_constructor_retry_count=3)
class Gateway:
    """The HTTP ingress in front of the single layout's model replicas: checks the token, reads the bounded
    body, and forwards the request whole to a model replica (``Classifier.answer_http``), again to a live one
    when that replica dies. It runs no model, so a replica's death never takes a client's connection."""

    def __init__(self, args: AppArgs, model: DeploymentHandle, token: Secret | None = None) -> None:
        bind_loopback()  # before Serve starts this replica's gRPC server
        self._model = model
        self._limit = args.max_body_bytes
        self._token = token if token is not None else read_token(args)

    async def __call__(self, request: Request) -> Response:
        try:
            if request.method == "POST":  # the token guards the body; other routes check it in the replica
                authorize(request, self._token)
            body = await read_body(request, self._limit)
        except RequestError as exc:
            return error_response(exc)
        scope = {k: request.scope[k] for k in _SCOPE_KEYS if k in request.scope}
        status, headers, content = await retry_on_replica_death(lambda: self._model.answer_http.remote(scope, body))
        response = Response(content, status_code=status)
        response.raw_headers = headers
        return response
