"""Helpers shared by the cluster tests and their scenario scripts: ports, processes, tiny configs, moto.

Everything listens on 127.0.0.1 and is stopped by its own handle (a pid or a process group), never by name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


# A port from bind(("127.0.0.1", 0)) comes from the kernel's ephemeral range, the one every outgoing socket
# draws from too: one picked for a server that starts a minute later can be taken meanwhile. CI lost a demo
# run that way (2026-11-30: "port 44601 on 127.0.0.1 is already in use" after its 45 s sweep, whose Ray
# processes open sockets all the time). So servers in tests get a port below that range, and above Ray's
# own: its workers bind 10002-19999 (`ray start` refuses a head port there) and Serve's replicas, behind
# HAProxy, 30000-31000.
_LOWEST_PORT, _HIGHEST_PORT = 20_000, 29_999


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port() -> int:
    """A port free on 127.0.0.1 now, outside the ephemeral range (so no outgoing socket takes it later) and
    the ranges Ray and Serve bind."""
    top = max(min(_ephemeral_start(), _HIGHEST_PORT + 1), _LOWEST_PORT + 1)
    span = top - _LOWEST_PORT
    start = secrets.randbelow(span)  # two tests picking at once rarely start at the same place
    for step in range(span):
        port = _LOWEST_PORT + (start + step) % span
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port on 127.0.0.1 between {_LOWEST_PORT} and {top}")


def tiny_config(data: Path, cache: Path, trials: int = 2, **space: Any) -> dict[str, Any]:
    """The smallest real sweep: mobilenetv2_100 at 64 px, frozen features, one epoch."""
    base: dict[str, Any] = {"backbones": ["mobilenetv2_100"], "image_sizes": [64], "max_epochs": 1,
                            "batch_sizes": [32], "freeze_depths": [8], "augmentations": ["none"]}  # fmt: skip
    base.update(space)
    return {
        # keep: the smallest sweep skips the near-duplicate check, whose feature pass would serve its frozen
        # trials and change the splits the tests count (tests/test_diagnostics.py covers that check).
        "data": {"source": str(data), "cache_dir": str(cache), "near_duplicates": "keep"},
        "space": base,
        "search": {"num_samples": trials, "time_budget_s": 300, "scheduler": "none", "ensemble_size": 2},
        "resources": {"trial_engine": "inline", "max_failures": 2},
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def ray_env(token: str | None = None, **extra: str) -> dict[str, str]:
    """Environment of a process that starts or joins one of our test clusters: token auth on, loopback only.

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray keep every address on 127.0.0.1 instead of the
    machine's outward address; the token travels in ``RAY_AUTH_TOKEN`` so nothing is written to ~/.ray.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token or secrets.token_hex(24),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=str(REPO_ROOT),
    )
    env.update(extra)
    return env


def stop_process_group(proc: subprocess.Popen[Any], grace_s: float = 20.0) -> None:
    """SIGTERM the leader of a process group we started (``start_new_session``), then SIGKILL the group.

    The leader alone gets SIGTERM first: ``ray start --block`` then drains and stops its own processes in a
    few seconds, where a SIGTERM to the whole group makes it wait out its 30 s drain.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def processes_mentioning(marker: str) -> list[int]:
    """Pids (not ours) whose command line contains ``marker``: a cluster's unique temp dir finds its stragglers."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


def kill_stragglers(marker: str, wait_s: float = 10.0) -> list[int]:
    """SIGKILL the processes of one test cluster left after its stop (by pid; returns them)."""
    deadline = time.time() + wait_s
    left = processes_mentioning(marker)
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = processes_mentioning(marker)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


@contextlib.contextmanager
def moto_server() -> Iterator[dict[str, str]]:
    """A local S3-compatible server (moto) on 127.0.0.1; yields the AWS_* environment that reaches it."""
    import requests

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                requests.get(f"{endpoint}/moto-api/", timeout=2)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.2)
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    finally:
        stop_process_group(proc, grace_s=5)


def create_bucket(endpoint: str, bucket: str) -> None:
    import requests

    requests.put(f"{endpoint}/{bucket}", timeout=10).raise_for_status()
