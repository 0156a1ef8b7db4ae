"""`automl-tl serve` and `demo` stopped by SIGINT, SIGTERM or SIGKILL leave nothing behind; what they start
listens on loopback only; an earlier crash's leftovers are named before anything starts.

Every process a driver starts carries its mark (``AUTOML_TL_OWNER=<driver pid>....``); the tests find them by
that mark and by the driver's process tree, read the kernel's socket tables, and stop only what they started,
by pid.

    .venv/bin/python -m pytest -q tests/test_serve_lifecycle.py
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from automl_tl._owned import OWNER_ENV, Owned, find_leftovers, is_loopback, listening, owned_by
from automl_tl.errors import ConfigError
from automl_tl.inference.artifact import write_artifact
from automl_tl.serve import check_port
from automl_tl.serve._loopback import local_haproxy_config
from automl_tl.data._cache import CACHE_ENV
from tests.scenarios._common import free_port

from .test_artifact import CLASSES, make_member

EXE = str(Path(sys.executable).parent / "automl-tl")
START_TIMEOUT_S = 300.0
GONE_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    write_artifact(root / "artifact", CLASSES, [make_member("a", 64)], [1.0], 1.0,
                   metrics={"best_member": "a", "val": {"accuracy": 0.9}}, method="greedy")  # fmt: skip
    return root


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", OWNER_ENV))}
    env.update(RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _start_time(pid: int) -> str | None:
    """The start time of a live process (None once it ended: a zombie holds no memory and no socket)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _descendants(root: int) -> set[int]:
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def _ours(driver: int) -> dict[int, tuple[str | None, list[str]]]:
    """Every process of the driver's tree or carrying its mark: pid -> (start time, addresses it listens on)."""
    pids = _descendants(driver) | {p.pid for p in owned_by(f"{driver}.")}
    return {pid: (_start_time(pid), listening(pid)) for pid in pids}


def _alive(snapshot: dict[int, tuple[str | None, list[str]]]) -> list[int]:
    return [pid for pid, (started, _) in snapshot.items() if started is not None and _start_time(pid) == started]


class Server:
    """An `automl-tl serve` (or demo) subprocess, stopped by its pid only."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []

    def wait_for(self, text: str, timeout_s: float = START_TIMEOUT_S) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        os.set_blocking(self.proc.stdout.fileno(), False)
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line:
                self.lines.append(line)
                if text in line:
                    return
                continue
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} in the output:\n{''.join(self.lines)[-4000:]}")

    def stop(self, signum: int = signal.SIGINT, timeout_s: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def serving(run_dir: Path, port: int) -> Iterator[Server]:
    server = Server([EXE, "serve", str(run_dir), "--mode", "best", "--port", str(port)], _env())
    try:
        server.wait_for("serving the best of")
        yield server
    finally:
        server.stop(signal.SIGINT)


def _wait_gone(snapshot: dict[int, tuple[str | None, list[str]]], driver: int) -> None:
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while (_alive(snapshot) or owned_by(f"{driver}.")) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [(pid, _describe(pid)) for pid in _alive(snapshot) if Path(f"/proc/{pid}").exists()]
    assert not left, f"still running after the driver stopped: {left}"
    assert not owned_by(f"{driver}.")


def _describe(pid: int) -> str:
    """Name, state, parent and mark of a process, for a failure message."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError as exc:
        return f"gone ({exc.strerror})"
    mark = next((e.decode(errors="replace") for e in environ.split(b"\0") if e.startswith(OWNER_ENV.encode())), "unmarked")
    return f"{status['Name'].strip()} {status['State'].strip()} ppid {status['PPid'].strip()} {mark}"


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _no_listener_left(snapshot: dict[int, tuple[str | None, list[str]]], driver: int) -> None:
    opened = {address for _, addresses in snapshot.values() for address in addresses}
    assert opened, "the server listened nowhere?"
    still = [p for p in owned_by("") if set(p.listens) & opened]
    assert not still, f"ports the stopped server opened are held by: {still}"


# --- clean stops -----------------------------------------------------------------------------------------


class Relay:
    """The server that shows a port serves again after a stop, handed on as the next test's server to stop.

    Each signal test stops a running `serve` and starts a new one on the same port; the next test stops that
    one, so every check runs on a fresh start without paying for two starts per test.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.held: Server | None = None
        self.port = 0

    def _argv(self, port: int) -> list[str]:
        """HAProxy as the ingress, so a stop must take the proxy process down with the rest."""
        return [EXE, "serve", str(self.run_dir), "--mode", "best", "--port", str(port), "--ingress", "haproxy"]

    def take(self) -> tuple[Server, int]:
        """The server handed on by the previous test, or a new one on a free port."""
        if self.held is not None and self.held.proc.poll() is None:
            server, self.held = self.held, None
            return server, self.port
        server = Server(self._argv(port := free_port()), _env())
        try:
            server.wait_for("serving the best of")
        except BaseException:
            server.stop(signal.SIGKILL)
            raise
        return server, port

    def serve_again(self, port: int) -> Server:
        """A new `serve` on ``port``, ready, held for the next test."""
        server = Server(self._argv(port), _env())
        self.held, self.port = server, port
        server.wait_for("serving the best of")
        assert requests.get(f"http://127.0.0.1:{port}/v1/healthz", timeout=30).json()["status"] == "ready"
        return server

    def stop(self) -> None:
        if self.held is not None:
            snapshot, driver = _ours(self.held.proc.pid), self.held.proc.pid
            self.held.stop(signal.SIGINT)
            self.held = None
            _wait_gone(snapshot, driver)


@pytest.fixture(scope="module")
def relay(run_dir: Path) -> Iterator[Relay]:
    held = Relay(run_dir)
    try:
        yield held
    finally:
        held.stop()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_serve_stopped_by_a_signal_leaves_nothing_and_the_port_serves_again(relay: Relay, signum: int) -> None:
    server, port = relay.take()
    try:
        driver = server.proc.pid
        snapshot = _ours(driver)
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in _alive(snapshot)}
        assert {"raylet", "gcs_server"} <= names and any("haproxy" in n for n in names), names
        # While serving on 127.0.0.1, nothing of ours listens on another address.
        beyond = {pid: addresses for pid, (_, addresses) in snapshot.items() for a in addresses if not is_loopback(a)}
        assert not beyond, f"listening beyond loopback: {beyond}"
        assert requests.get(f"http://127.0.0.1:{port}/v1/healthz", timeout=30).status_code == 200
        code = server.stop(signum)
        assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 0), "".join(server.lines)[-3000:]
        _wait_gone(snapshot, driver)
        _no_listener_left(snapshot, driver)
        assert _free(port)
    finally:
        server.stop(signal.SIGKILL)
    relay.serve_again(port)  # the same port serves again at once; the next test stops this server


@pytest.mark.slow
def test_two_servers_run_side_by_side_on_different_ports(relay: Relay, run_dir: Path) -> None:
    one, first = relay.take()  # the server the signal tests handed on, or a new one
    try:
        second = free_port()
        with serving(run_dir, second) as two:
            for port in (first, second):
                assert requests.get(f"http://127.0.0.1:{port}/v1/healthz", timeout=30).json()["status"] == "ready"
            mine = [_ours(one.proc.pid), _ours(two.proc.pid)]
    finally:
        one.stop(signal.SIGKILL)
    for snapshot, server in zip(mine, (one, two)):
        _wait_gone(snapshot, server.proc.pid)


@pytest.mark.slow
def test_demo_stopped_mid_sweep_leaves_nothing(hymenoptera_dir: Path, data_cache_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    demo = Server(
        [EXE, "demo", "--data", str(hymenoptera_dir / "train"), "--out", str(tmp_path / "demo"), "--budget-s", "60",
         "--port", str(port), "--quiet"],
        _env(**{CACHE_ENV: str(data_cache_dir)}),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not any(p.name == "raylet" for p in owned_by(f"{demo.proc.pid}.")):
            assert demo.proc.poll() is None, demo.proc.stdout.read() if demo.proc.stdout else ""
            time.sleep(0.5)
        time.sleep(5)  # trials start
        snapshot = _ours(demo.proc.pid)
        beyond = {pid: addresses for pid, (_, addresses) in snapshot.items() for a in addresses if not is_loopback(a)}
        assert not beyond, f"the demo's Ray listens beyond loopback: {beyond}"
        demo.stop(signal.SIGTERM)
        _wait_gone(snapshot, demo.proc.pid)
        _no_listener_left(snapshot, demo.proc.pid)
    finally:
        demo.stop(signal.SIGKILL)
    assert _free(port)  # the port it would have served on is not held (the signal tests serve on a freed port)


# --- leftovers, exposure ---------------------------------------------------------------------------------


@pytest.fixture
def leftover() -> Iterator[subprocess.Popen[str]]:
    """A process marked by a driver that no longer exists, listening on 127.0.0.1: a crashed run's HAProxy."""
    code = "import socket, time\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(**{OWNER_ENV: "999999999.1.deadbeef"}),
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.readline()
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_crashed_runs_leftover_is_named_with_how_to_clear_it(leftover: subprocess.Popen[str], tmp_path: Path) -> None:
    found = [p for p in find_leftovers() if p.pid == leftover.pid]
    assert found and found[0].listens and is_loopback(found[0].listens[0])
    with pytest.raises(ConfigError) as info:
        check_port("127.0.0.1", free_port())
    message = str(info.value)
    assert f"pid {leftover.pid} (python" in message and found[0].listens[0] in message
    assert str(leftover.pid) in message.split("Stop them with: kill", 1)[1].split("(")[0].split()
    # The demo refuses before its sweep: nothing runs, no run directory.
    done = subprocess.run([EXE, "demo", "--out", str(tmp_path / "run"), "--port", str(free_port())], env=_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "left by an earlier automl-tl run" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def test_a_live_drivers_processes_are_not_leftovers() -> None:
    me = Owned(os.getpid(), "python", f"{os.getpid()}.{Path(f'/proc/{os.getpid()}/stat').read_text().rsplit(')', 1)[1].split()[19]}.cafe")
    from automl_tl._owned import owner_alive

    assert owner_alive(me.owner) and not owner_alive(f"{os.getpid()}.0.cafe")


def test_serving_beyond_loopback_without_a_token_is_refused(run_dir: Path) -> None:
    done = subprocess.run([EXE, "serve", str(run_dir), "--host", "0.0.0.0", "--port", str(free_port())], env=_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "no token is set" in done.stderr and "--insecure" in done.stderr
    assert "Started a local Ray" not in done.stderr  # refused before anything started


def test_haproxys_stats_and_metrics_move_to_unix_sockets() -> None:
    config = (
        "global\n    maxconn 10\nfrontend prometheus\n    bind :9101\n    mode http\n"
        "frontend http_frontend\n    bind *:8000\nlisten stats\n  bind *:8404\n  stats enable\n"
    )  # fmt: skip
    out = local_haproxy_config(config, "/run/x")
    assert "bind /run/x/metrics.sock" in out and "bind /run/x/stats.sock" in out
    assert "bind *:8000" in out  # the request frontend binds what --host says
    assert ":9101" not in out and ":8404" not in out
