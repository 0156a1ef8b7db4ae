"""The processes automl_tl starts for itself, found by a mark in their environment, and their end.

An embedded Ray, the Serve actors on it and the HAProxy they spawn all inherit the environment of the driver
that started them, so ``AUTOML_TL_OWNER=<pid>.<start time>.<nonce>`` set there before ``ray.init`` marks
every one of them, whoever their parent is by then (HAProxy outlives the actor that spawned it). A guardian
process, started beside the driver, waits on a pipe only the driver holds: when the driver ends, however it
ends (SIGKILL included, which runs no handler), the pipe closes and the guardian stops every marked process
and every process of the driver's tree it last saw (a process that rewrites its title over its environment,
as Ray's agents do, loses the mark).
At start-up, marked processes whose driver is gone are an earlier crash's leftovers: they are named, with
the command that clears them, before any work starts.

    python -m automl_tl._owned FD TAG     # the guardian (started by mark_and_guard, not by hand)
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automl_tl.errors import ConfigError

__all__ = [
    "OWNER_ENV",
    "Owned",
    "check_leftovers",
    "find_leftovers",
    "listening",
    "mark_and_guard",
    "owned_by",
    "descendants",
    "start_embedded_ray",
    "stop_owned",
]

OWNER_ENV = "AUTOML_TL_OWNER"
STOP_GRACE_S = 5.0  # SIGTERM first, so Ray's processes flush their logs; then SIGKILL
_guardian: dict[str, object] = {}


@dataclass(frozen=True)
class Owned:
    """A live process and where it listens (``host:port`` strings)."""

    pid: int
    name: str
    owner: str
    listens: tuple[str, ...] = ()


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat): with the pid, a process's identity.
    None once it ended (a zombie, not yet reaped, holds no memory and no socket)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _environ_value(pid: int, name: str) -> str | None:
    try:
        pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = name.encode() + b"="
    for pair in pairs:
        if pair.startswith(prefix):
            return pair[len(prefix) :].decode(errors="replace")
    return None


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def owner_alive(tag: str) -> bool:
    """Whether the driver a mark names still runs (same pid and same start time)."""
    pid, _, rest = tag.partition(".")
    started = rest.partition(".")[0]
    return pid.isdigit() and _start_time(int(pid)) == started


def owned_by(tag_prefix: str) -> list[Owned]:
    """Every live process whose mark starts with ``tag_prefix`` ("" finds every marked process)."""
    found = []
    sockets = _listening_inodes()
    for pid in _pids():
        if pid == os.getpid():
            continue
        tag = _environ_value(pid, OWNER_ENV)
        if tag is not None and tag.startswith(tag_prefix):
            found.append(Owned(pid, _name(pid), tag, tuple(listening(pid, sockets))))
    return found


# --- listening sockets, from the kernel's tables ---------------------------------------------------------


def _listening_inodes() -> dict[str, str]:
    """Socket inode -> ``host:port`` for every TCP socket in LISTEN state (/proc/net/tcp and tcp6)."""
    found = {}
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            found[fields[9]] = f"{_host(address, width)}:{int(port, 16)}"
    return found


def _host(hex_address: str, width: int) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_address)
    # The kernel prints each 32-bit word in host (little-endian) order.
    ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(ordered) if width == 4 else ipaddress.IPv6Address(ordered)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return f"[{ip}]" if isinstance(ip, ipaddress.IPv6Address) else str(ip)


def listening(pid: int, sockets: dict[str, str] | None = None) -> list[str]:
    """The ``host:port`` addresses ``pid`` listens on."""
    sockets = _listening_inodes() if sockets is None else sockets
    found = []
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return []
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in sockets:
            found.append(sockets[target[8:-1]])
    return sorted(set(found))


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host == "::1" or host.startswith("127.")


# --- leftovers of an earlier run -------------------------------------------------------------------------


def _stray_haproxy() -> list[Owned]:
    """HAProxy processes that Ray Serve started (their config lives under haproxy-serve/) whose actor is gone:
    a Serve that stopped uncleanly, before processes carried our mark."""
    found = []
    sockets = _listening_inodes()
    for pid in _pids():
        if "haproxy" not in _name(pid):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if "haproxy-serve" in cmdline and not _name(ppid).startswith("ray::"):
            found.append(Owned(pid, _name(pid), "", tuple(listening(pid, sockets))))
    return found


def find_leftovers() -> list[Owned]:
    """Processes of ours whose driver is gone, and Serve HAProxy processes whose actor is gone."""
    marked = [p for p in owned_by("") if not owner_alive(p.owner)]
    seen = {p.pid for p in marked}
    return marked + [p for p in _stray_haproxy() if p.pid not in seen]


def check_leftovers() -> None:
    """Refuse to start while an earlier run's processes live on, naming them and how to clear them."""
    left = find_leftovers()
    if not left:
        return
    described = "; ".join(
        f"pid {p.pid} ({p.name}" + (f", listening on {', '.join(p.listens)})" if p.listens else ")") for p in left
    )
    pids = " ".join(str(p.pid) for p in left)
    raise ConfigError(
        f"{len(left)} process(es) left by an earlier automl-tl run that did not stop cleanly hold ports and "
        f"memory: {described}. Stop them with: kill {pids}   (then kill -9 {pids} if any remain)"
    )


# --- marking and guarding what this driver starts --------------------------------------------------------


def mark_and_guard() -> str:
    """Mark this process's environment (everything it starts from now on inherits the mark) and start the
    guardian that stops the marked processes when this process ends. Idempotent; returns the mark."""
    tag = os.environ.get(OWNER_ENV, "")
    if tag and tag.startswith(f"{os.getpid()}.") and _guardian:
        return tag
    tag = f"{os.getpid()}.{_start_time(os.getpid())}.{secrets.token_hex(4)}"
    read_end, write_end = os.pipe()
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    # Its own session: a Ctrl-C in the terminal reaches the driver, which stops cleanly; the guardian then
    # finds nothing left, or finishes the job.
    proc = subprocess.Popen(
        [sys.executable, "-m", "automl_tl._owned", str(read_end), tag],
        pass_fds=(read_end,), env=env, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(read_end)
    os.set_inheritable(write_end, False)  # only this process holds it: no child keeps the guardian waiting
    _guardian.update(proc=proc, write_end=write_end)
    os.environ[OWNER_ENV] = tag
    return tag


def descendants(root: int) -> dict[int, str | None]:
    """Every live descendant of ``root``, with its start time."""
    parent: dict[int, int] = {}
    for pid in _pids():
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return {pid: _start_time(pid) for pid in found}


def stop_owned(tag: str, also: dict[int, str | None] | None = None, grace_s: float = STOP_GRACE_S) -> list[int]:
    """SIGTERM every process marked ``tag`` (and those in ``also``: pid -> start time), SIGKILL those still
    there after ``grace_s``; returns their pids.

    Scans again until none is left: a dying raylet may still start a worker. A process seen once is followed
    by its pid and start time: one that is exiting no longer shows its environment, and one that rewrote its
    title over it (Ray's agents do) never did."""
    seen: dict[int, str | None] = dict(also or {})
    seen.pop(os.getpid(), None)
    termed: set[int] = set()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline + 5 * grace_s:
        for p in owned_by(tag):
            seen.setdefault(p.pid, _start_time(p.pid))
        left = [pid for pid, started in seen.items() if started is not None and _start_time(pid) == started]
        if not left:
            break
        late = time.monotonic() > deadline
        for pid in left:
            if late or pid not in termed:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                termed.add(pid)
        time.sleep(0.2)
    return sorted(seen)


@functools.cache
def _process_token() -> str:
    """One token for every Ray this process starts: Ray's client keeps the first token it read for the life
    of the process, so a second embedded Ray (a demo's server after its sweep) must get the same one."""
    return secrets.token_hex(24)


def start_embedded_ray(**init_kwargs: Any) -> None:
    """``ray.init`` of a Ray that automl_tl starts for itself (serve, demo, search): refused while an earlier
    run's leftovers live, marked and guarded, token auth on, and every node address on loopback.

    Ray turns ``_node_ip_address="127.0.0.1"`` into the machine's outward address; only with
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` does it keep loopback (then its servers bind 127.0.0.1, where its
    version allows: docs/serving-ports.md lists what still listens beyond). The token lives only in this
    process tree's environment, never in ~/.ray.
    """
    import ray
    from ray._private import ray_constants

    check_leftovers()
    mark_and_guard()
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        # Unset, a new local Ray turns token auth on itself (and reloads its config: this process may have
        # read another value when it imported ray).
        os.environ.pop("RAY_AUTH_MODE", None)
    if not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ.setdefault("RAY_AUTH_TOKEN", _process_token())
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # and by this one, which read it at import
    ray.init(address="local", **init_kwargs)


def _guard(fd: int, tag: str) -> None:
    """Until the driver's end of the pipe closes, note the driver's process tree each second; then stop what
    it started: the marked processes and the tree last seen."""
    import select

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    driver = int(tag.split(".", 1)[0])
    tree: dict[int, str | None] = {}
    with contextlib.suppress(OSError):
        while True:
            if select.select([fd], [], [], 1.0)[0]:
                if not os.read(fd, 1):
                    break
                continue
            # Kept while alive, so one orphaned meanwhile (reparented away from the driver) is still known.
            kept: dict[int, str | None] = {pid: t for pid, t in tree.items() if t is not None and _start_time(pid) == t}
            tree = {**kept, **descendants(driver)}
    stop_owned(tag, also=tree)


if __name__ == "__main__":
    _guard(int(sys.argv[1]), sys.argv[2])
