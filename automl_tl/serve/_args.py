"""The typed arguments of the serving application, and where its artifact and bearer token come from.

No Ray here: :class:`AppArgs` is what ``serve run automl_tl.serve:app artifact=PATH mode=ensemble`` and a
Serve config file's ``args:`` are validated into, and what :func:`~automl_tl.serve.start_server` builds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from automl_tl.config import config_error
from automl_tl.errors import ConfigError

__all__ = ["AppArgs", "DEFAULT_LAYOUT", "Secret", "config_error", "read_token"]

ServeMode = Literal["best", "ensemble", "cascade"]
Layout = Literal["single", "composed"]

# One deployment holding every member batches each image once through all of them, with no fan-out hop
# between deployments: faster here than one deployment per member (figures: benchmarks/results/serve.json).
DEFAULT_LAYOUT: Layout = "single"

# The environment flag that makes Ray Serve put HAProxy in front of its proxies.
HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"


# The bearer token: pydantic's SecretStr never shows its value in a repr, a log line or a traceback;
# ``get_secret_value()`` is the one way to read it.
Secret = SecretStr


class AppArgs(BaseModel):
    """Everything the serving application needs; every field can be given as ``key=value`` to ``serve run``.

    ``replicas`` is the fixed replica count; setting ``min_replicas`` or ``max_replicas`` turns on
    autoscaling between them (starting at ``replicas``), aiming at ``target_ongoing_requests`` per replica
    (default: one full batch per forward lane). The bearer token is read inside each replica from the
    environment variable ``token_env`` or the file ``token_file``; it is never part of the arguments.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    artifact: str = Field(description="artifact folder, its manifest.json, or a run directory holding artifact/")
    mode: ServeMode = "ensemble"
    layout: Layout = DEFAULT_LAYOUT
    # The single layout behind a thin ingress (serve._gateway.Gateway) that sends a request again to a live
    # replica when the one running it dies, at the cost of one hop more per request.
    gateway: bool = False
    replicas: int = Field(1, ge=1, le=1024)
    min_replicas: int | None = Field(None, ge=0, le=1024)
    max_replicas: int | None = Field(None, ge=1, le=1024)
    target_ongoing_requests: float | None = Field(None, gt=0)
    cpus_per_replica: float = Field(1.0, ge=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, ge=1, le=256)
    # Batches a replica forwards side by side, each on one torch thread (see serve._replica.Forward).
    forward_lanes: int | None = Field(None, ge=1, le=256)
    max_batch_size: int = Field(8, ge=1, le=1024)
    # No wait by default: batches fill from the requests that queue while the previous batch runs (one
    # batch at a time), so a lone request is not held back; a positive wait fills batches at light load.
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=10)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1)
    max_images_per_request: int = Field(64, ge=1)
    # Serve's access log, a line per request in each replica's log file: off unless asked for, a saving per
    # request (see REPLICA_ENV in serve._app for what it and the handlers' event loop gained together).
    # Errors and warnings are logged either way.
    access_log: bool = False
    token_env: str | None = Field(None, min_length=1)
    token_file: str | None = Field(None, min_length=1)

    @field_validator("artifact")
    @classmethod
    def _artifact_is_a_path(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("artifact must be a path, got an empty string")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AppArgs:
        if self.gateway and self.layout != "single":
            raise ValueError(f"gateway=True needs layout='single' (the composed layout's ingress retries its member "
                             f"calls itself), got layout={self.layout!r}")  # fmt: skip
        if self.mode == "cascade" and self.layout != "single":
            raise ValueError(f"mode='cascade' needs layout='single' (one replica routes each batch's uncertain rows "
                             f"to the ensemble), got layout={self.layout!r}")  # fmt: skip
        if self.token_env and self.token_file:
            raise ValueError("give token_env or token_file, not both")
        lo, hi = self.min_replicas, self.max_replicas
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_replicas <= max_replicas must hold, but got {lo} > {hi}")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def autoscaling_config(self) -> dict[str, Any]:
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        return {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": min(max(self.replicas, low), high),
            "target_ongoing_requests": self.target_ongoing_requests
            or float(self.lanes_per_replica() * self.max_batch_size),
        }

    def threads_per_replica(self) -> int:
        """Torch threads a replica uses: ``torch_threads``, else one per reserved CPU."""
        return self.torch_threads or max(1, round(self.cpus_per_replica))

    def lanes_per_replica(self) -> int:
        """Batches a replica forwards at once: ``forward_lanes``, else one per torch thread on a CPU replica
        and one on a GPU (its kernels queue on one device anyway)."""
        if self.forward_lanes is not None:
            return self.forward_lanes
        return 1 if self.gpus_per_replica > 0 else self.threads_per_replica()

    def ongoing_requests_limit(self) -> int:
        """A batch running in each lane and one filling: enough to keep batches full without hoarding work."""
        return self.max_ongoing_requests or max((self.lanes_per_replica() + 1) * self.max_batch_size, 4)




def read_token(args: AppArgs) -> Secret | None:
    """The bearer token named by ``token_env`` / ``token_file`` (None when auth is off); empty is an error."""
    if args.token_env:
        value = os.environ.get(args.token_env, "")
        where = f"environment variable {args.token_env}"
    elif args.token_file:
        try:
            value = Path(args.token_file).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"token_file {args.token_file}: cannot read it: {exc.strerror or exc}") from None
        where = f"token_file {args.token_file}"
    else:
        return None
    value = value.strip()
    if not value:
        raise ConfigError(f"{where} is empty or unset: the bearer token cannot be empty")
    return Secret(value)
