"""Soak: the ensemble served as ``automl-tl serve`` serves it, under 32 clients for 10 minutes, with a model
replica killed (SIGKILL) every 2 minutes; 127.0.0.1 only. Writes the run into ``benchmarks/results/soak.json``
under its ingress (``runs.proxy``, ``runs.haproxy``; a run of the other ingress is kept): requests and
failed requests per minute and after each kill, p50/p99 latency per minute, the resident memory of the Serve
processes per minute and its drift from the first whole minute to the last.

    .venv/bin/python benchmarks/bench_soak.py                            # 10 min, 32 clients, kill every 120 s
    .venv/bin/python benchmarks/bench_soak.py --ingress haproxy          # HAProxy instead of Serve's proxy
    .venv/bin/python benchmarks/bench_soak.py --duration-s 30 --kill-every-s 15   # a smoke run (under 120 s:
                                                                                  # soak_smoke.json)

Targets (issue 23): no failed request with the proxy ingress, at most the requests in flight on the killed
replica with HAProxy; memory drift at most 3 %. With the proxy the app runs behind its gateway
(``AppArgs.gateway``, serve._gateway), which sends a request again to a live replica when the one running
it dies; HAProxy forwards straight to the model replicas, and the config automl_tl hands it
(serve._loopback.retrying_haproxy_config) makes HAProxy send a request that a dead replica left unanswered
to another replica from its buffer (bodies up to 4 MiB). Each kill records the requests in flight at it, and
splits the failures that follow into those in flight at the kill and those sent after it. The killer picks the oldest model replica
(``Classifier``), never the gateway: the gateway runs no model, and a process holding client connections
loses them when it dies whatever the design. The artifact is bench_serve's pair (mobilenetv2_100 at 160 px
and tf_efficientnet_lite0 at 224 px, untrained: timing does not depend on the weights), served as two
replicas so one survives each kill; requests are hymenoptera val JPEGs as raw ``image/jpeg`` bodies, sent by
bench_serve's closed-loop clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results"
MODEL_REPLICA = "ray::ServeReplica:automl_tl:Classifier"
# (sent at s, finished at s, latency ms, "" or what failed) per request; (at s, all bytes, model replicas' bytes,
# the machine's 1-minute load average) per memory sample.
Done = list[tuple[float, float, float, str]]
Samples = list[tuple[float, int, int, float]]


def _serve_processes() -> dict[int, str]:
    """This run's Serve processes (title -> pid), found by the mark every process of our embedded Ray carries."""
    from automl_tl._owned import OWNER_ENV, owned_by

    found = {}
    for p in owned_by(os.environ[OWNER_ENV]):
        try:
            title = Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue  # ended meanwhile
        if title.startswith(("ray::ServeReplica", "ray::ServeController", "ray::ProxyActor", "ray::HAProxy")) \
                or title.endswith("haproxy"):  # fmt: skip
            found[p.pid] = title
    return found


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _killer(stop: threading.Event, every_s: float, until_s: float, kills: list[dict[str, Any]], started: float) -> None:
    """SIGKILL the oldest model replica at every multiple of ``every_s`` before ``until_s``; Serve starts a new one."""
    at = every_s
    while at < until_s and not stop.wait(max(0.0, started + at - time.monotonic())):
        replicas = sorted(pid for pid, title in _serve_processes().items() if title.startswith(MODEL_REPLICA))
        if replicas:
            os.kill(replicas[0], signal.SIGKILL)
            kills.append({"t_s": round(time.monotonic() - started, 1), "pid": replicas[0]})
        at += every_s


def _sampler(stop: threading.Event, samples: Samples, started: float) -> None:
    while not stop.wait(1.0):
        rss = {pid: (_rss_bytes(pid), title) for pid, title in _serve_processes().items()}
        samples.append((time.monotonic() - started, sum(b for b, _ in rss.values()),
                        sum(b for b, t in rss.values() if t.startswith(MODEL_REPLICA)), os.getloadavg()[0]))  # fmt: skip


async def _load(url: str, bodies: list[bytes], clients: int, seconds: float, started: float) -> Done:
    """Every request of bench_serve's closed-loop clients, timed from ``started``."""
    import aiohttp
    from bench_serve import closed_loop

    done: Done = []

    def record(finished_at: float, latency_ms: float, failure: str) -> None:
        what = failure.split(":")[0]  # the status or the error's type
        finished = finished_at - started
        done.append((finished - latency_ms / 1000.0, finished, latency_ms, f"HTTP {what}" if what.isdigit() else what))

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
        await closed_loop(session, url, bodies, clients, started + seconds, record)
    return done


def _per_minute(done: Done, samples: Samples, minute_s: float, duration_s: float) -> list[dict[str, Any]]:
    """A row per minute of the run; ``whole`` is False for a last minute cut short (requests finishing after
    the deadline), which no trend is computed over."""
    rows = []
    for m in range(int(max((t for _, t, _, _ in done), default=0) // minute_s) + 1):
        lo, hi = m * minute_s, (m + 1) * minute_s
        ok = sorted(ms for _, t, ms, f in done if lo <= t < hi and not f)
        failed = [f for _, t, _, f in done if lo <= t < hi and f]
        rss = [(b, r, load) for t, b, r, load in samples if lo <= t < hi]
        rows.append({
            "minute": m + 1,
            "whole": hi <= duration_s + 1e-6,
            "requests": len(ok) + len(failed),
            "failed": len(failed),
            "failures": sorted(set(failed)),
            "p50_ms": round(statistics.median(ok), 2) if ok else None,
            "p99_ms": round(ok[min(len(ok) - 1, int(0.99 * len(ok)))], 2) if ok else None,
            "rss_mb": round(statistics.mean(b for b, _, _ in rss) / 2**20, 1) if rss else None,
            "rss_model_replicas_mb": round(statistics.mean(r for _, r, _ in rss) / 2**20, 1) if rss else None,
            "load_avg_1min": round(statistics.mean(load for _, _, load in rss), 2) if rss else None,
        })  # fmt: skip
    return rows


def rss_drift_pct(minutes: list[dict[str, Any]]) -> float | None:
    """Resident memory of the last whole minute against the first, in percent (None under two whole minutes)."""
    whole = [m["rss_mb"] for m in minutes if m["whole"] and m["rss_mb"]]
    return round(100.0 * (whole[-1] - whole[0]) / whole[0], 2) if len(whole) >= 2 else None


def _around_kills(done: Done, kills: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kill: the requests in flight at that moment (on every replica) and, of the failed requests that
    finished before the next kill, those that were in flight at it and those sent after it."""
    edges = [k["t_s"] for k in kills] + [float("inf")]
    rows = []
    for kill, lo, hi in zip(kills, edges, edges[1:]):
        failed = [sent for sent, t, _, f in done if f and lo <= t < hi]
        rows.append({**kill, "in_flight": sum(1 for sent, t, _, _ in done if sent < lo <= t),
                     "failed_in_flight": sum(1 for sent in failed if sent < lo),
                     "failed_sent_after": sum(1 for sent in failed if sent >= lo)})  # fmt: skip
    return rows


def _span(values: list[float | None]) -> list[float] | None:
    known = [v for v in values if v is not None]
    return [min(known), max(known)] if known else None


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--kill-every-s", type=float, default=120.0)
    parser.add_argument("--ingress", choices=("proxy", "haproxy"), default="proxy")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--gateway", action=argparse.BooleanOptionalAction, default=None,
                        help="the app behind its retrying gateway (default: with the proxy ingress only)")  # fmt: skip
    args = parser.parse_args()
    gateway = args.ingress == "proxy" if args.gateway is None else args.gateway
    minute_s = 60.0 if args.duration_s >= 120 else args.duration_s / 3  # a smoke run still shows three rows

    from bench_serve import _build_artifact  # the same pair bench_serve measures

    from automl_tl.serve import start_server, stop_server
    from tests.scenarios._common import free_port

    files = sorted((ROOT.parent / "shared" / "datasets" / "hymenoptera" / "val").glob("*/*.jpg"))
    bodies = [f.read_bytes() for f in files]
    options: dict[str, Any] = {"mode": "ensemble", "replicas": args.replicas, "cpus_per_replica": 1.0, "gateway": gateway}
    with tempfile.TemporaryDirectory(prefix="bench_soak_") as tmp:
        artifact = _build_artifact(Path(tmp) / "artifact")
        url = start_server(artifact, port=free_port(), ingress=args.ingress, **options)
        stop = threading.Event()
        kills: list[dict[str, Any]] = []
        samples: Samples = []
        began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        started = time.monotonic()
        threads = [threading.Thread(target=_killer, args=(stop, args.kill_every_s, args.duration_s, kills, started),
                                    daemon=True),
                   threading.Thread(target=_sampler, args=(stop, samples, started), daemon=True)]  # fmt: skip
        for t in threads:
            t.start()
        try:
            done = asyncio.run(_load(url, bodies, args.clients, args.duration_s, started))
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=5)
            stop_server()
    minutes = _per_minute(done, samples, minute_s, args.duration_s)
    whole = [m for m in minutes if m["whole"]]
    run = {
        "what": f"ensemble, {args.replicas} model replicas{' behind the gateway' if gateway else ''}, "
                f"{args.ingress} ingress, {args.clients} clients, a model replica SIGKILLed every "
                f"{args.kill_every_s:.0f} s, 127.0.0.1",
        "date": began,
        "duration_s": args.duration_s,
        "row_s": minute_s,
        "gateway": gateway,
        "requests": len(done),
        "failed": sum(1 for _, _, _, f in done if f),
        "failures": sorted({f for _, _, _, f in done if f}),
        "p50_ms_range": _span([m["p50_ms"] for m in whole]),
        "p99_ms_range": _span([m["p99_ms"] for m in whole]),
        "rss_drift_pct": rss_drift_pct(minutes),
        "kills": _around_kills(done, kills),
        "per_minute": minutes,
        "command": "python benchmarks/bench_soak.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    target = RESULTS / ("soak.json" if args.duration_s >= 120 else "soak_smoke.json")  # a soak, or a smoke run
    out = json.loads(target.read_text(encoding="utf-8")) if target.exists() else {}
    out = {"benchmark": "soak", "date": began,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True),
                       "python": platform.python_version()},
           "runs": {**(out.get("runs") or {}), args.ingress: run}}  # fmt: skip
    target.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: run[k] for k in ("requests", "failed", "p50_ms_range", "p99_ms_range", "rss_drift_pct")}),
          json.dumps(run["kills"]), f"-> {target}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
