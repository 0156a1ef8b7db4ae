"""``automl-tl serve``: its flags, and the command that starts the server and blocks until stopped.

    automl-tl serve RUN_DIR_OR_ARTIFACT [--mode best|ensemble|cascade] [--host 127.0.0.1] [--port 8000]
                    [--replicas N] [--gpus-per-replica G] [--min-replicas A --max-replicas B] ...
    automl-tl serve RUN_DIR --emit-config serve.yaml [--config-kind serve|rayservice]
"""

from __future__ import annotations

import argparse
import signal
import time
from types import FrameType
from typing import Any

__all__ = ["add_serve_arguments", "run_serve_command"]


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", metavar="RUN_DIR_OR_ARTIFACT", help="run directory (uses its artifact/) or artifact")
    p.add_argument("--mode", choices=("best", "ensemble", "cascade"), default="ensemble",
                   help="serve the best single member, the ensemble (default), or the cascade: the cheap member, "
                        "and the ensemble only for the images it is unsure of")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (initial count when autoscaling)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, dest="gpus_per_replica")
    p.add_argument("--cpus-per-replica", type=float, dest="cpus_per_replica",
                   help="default: on an embedded Ray, the machine's CPUs shared among the replicas (CPU, fixed "
                        "replica count, single layout); else 1")  # fmt: skip
    p.add_argument("--forward-lanes", type=int, dest="forward_lanes",
                   help="batches a replica forwards side by side, one core each (default: one per CPU; 1 on a GPU)")
    p.add_argument("--min-replicas", type=int, dest="min_replicas", help="turns on autoscaling")
    p.add_argument("--max-replicas", type=int, dest="max_replicas", help="turns on autoscaling")
    p.add_argument("--target-ongoing-requests", type=float, dest="target_ongoing_requests",
                   help="autoscaling target per replica (default: the batch size per forward lane)")
    p.add_argument("--max-batch-size", type=int, dest="max_batch_size", help="dynamic batching size (default 8)")
    p.add_argument("--batch-wait-ms", type=float, dest="batch_wait_ms",
                   help="longest wait to fill a batch (default 0: a batch closes when the model is free)")  # fmt: skip
    p.add_argument("--ingress", choices=("haproxy", "proxy"), default="proxy",
                   help="how HTTP reaches the replicas: Serve's Python proxy (default) or HAProxy straight to them "
                        "(Linux, one node, a fixed replica count)")  # fmt: skip
    p.add_argument("--layout", choices=("single", "composed"),
                   help="ensemble in one deployment, or one deployment per member")
    p.add_argument("--gateway", action="store_true", default=None,
                   help="single layout: a thin ingress in front of the replicas that sends a request again to a live "
                        "replica when the one running it dies (one hop more per request)")  # fmt: skip
    p.add_argument("--access-log", action="store_true", default=None, dest="access_log",
                   help="log a line per request in each replica's Serve log (off by default: it costs throughput)")
    p.add_argument("--token-env", metavar="VAR", dest="token_env", help="require a bearer token read from $VAR")
    p.add_argument("--token-file", metavar="FILE", dest="token_file", help="require a bearer token read from FILE")
    p.add_argument("--insecure", action="store_true",
                   help="allow a --host beyond loopback without a token (anyone who reaches it may use the model)")
    p.add_argument("--max-body-mb", type=float, dest="max_body_mb", help="largest request body (default 16)")
    p.add_argument("--max-pixels", type=int, dest="max_pixels", help="largest image in pixels (default 40M)")
    p.add_argument("--emit-config", metavar="FILE", dest="emit_config",
                   help="write a Serve config (serve deploy FILE) instead of serving")
    p.add_argument("--config-kind", choices=("serve", "rayservice"), default="serve", dest="config_kind",
                   help="with --emit-config: a Serve config (default) or a KubeRay RayService manifest")  # fmt: skip


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = {
        name: getattr(args, name)
        for name in ("cpus_per_replica", "min_replicas", "max_replicas", "target_ongoing_requests", "max_batch_size",
                     "layout", "token_env", "token_file", "max_pixels", "forward_lanes", "access_log", "gateway")  # fmt: skip
        if getattr(args, name) is not None
    }
    if args.batch_wait_ms is not None:
        options["batch_wait_timeout_s"] = args.batch_wait_ms / 1000.0
    if args.max_body_mb is not None:
        options["max_body_bytes"] = int(args.max_body_mb * 1024 * 1024)
    return options


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_serve_command(args: argparse.Namespace) -> int:
    from automl_tl.serve._server import emit_config, start_server, stop_server

    common = (args.artifact, args.mode, args.host, args.port, args.replicas, args.gpus_per_replica)
    if args.emit_config:
        path = emit_config(args.emit_config, *common, kind=args.config_kind, **_options(args))
        how = "serve deploy" if args.config_kind == "serve" else "kubectl apply -f"
        print(f"{args.config_kind} config written to {path}; deploy it with: {how} {path}")
        return 0
    previous = signal.getsignal(signal.SIGTERM)
    try:
        url = start_server(*common, ingress=args.ingress, insecure=args.insecure, **_options(args))
        # After Ray started: its core worker installs its own SIGTERM handler, which would kill us uncleanly.
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        print(f"serving the {args.mode} of {args.artifact} at {url}", flush=True)
        print(f"  POST {url}/v1/predict   page {url}/   API docs {url}/docs   (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the server", flush=True)
    finally:
        stop_server()
        signal.signal(signal.SIGTERM, previous)
    return 0
