"""Soak: the ensemble served as ``automl-tl serve`` serves it, under 32 clients for 10 minutes, with a replica
killed (SIGKILL) every 2 minutes; 127.0.0.1 only. Writes ``benchmarks/results/soak.json``: requests and failed
requests per minute, p50/p99 latency per minute, the resident memory of the Serve processes per minute and
its drift from the first minute to the last, and when each replica was killed.

    .venv/bin/python benchmarks/bench_soak.py                            # 10 min, 32 clients, kill every 120 s
    .venv/bin/python benchmarks/bench_soak.py --ingress haproxy          # HAProxy instead of Serve's proxy
    .venv/bin/python benchmarks/bench_soak.py --duration-s 30 --kill-every-s 15   # a smoke run (soak_smoke.json)

Targets (issue 23): no failed request with the proxy ingress (its router retries on a live replica), at most
the requests in flight on the killed replica with HAProxy; memory drift at most 3 %. The artifact is
bench_serve's pair (mobilenetv2_100 at 160 px and tf_efficientnet_lite0 at 224 px, untrained: timing does
not depend on the weights), served as two replicas so one survives each kill; requests are hymenoptera val
JPEGs as raw ``image/jpeg`` bodies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
SERVE_PROCESSES = ("ray::ServeRepli", "ray::ServeContr", "ray::ProxyActor", "ray::HAProxyMan", "haproxy")


def _serve_processes() -> dict[int, str]:
    """This run's Serve processes, found by the mark every process of our embedded Ray carries."""
    from automl_tl._owned import OWNER_ENV, owned_by

    return {p.pid: p.name for p in owned_by(os.environ[OWNER_ENV]) if p.name.startswith(SERVE_PROCESSES)}


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _killer(stop: threading.Event, every_s: float, kills: list[dict[str, Any]], started: float) -> None:
    """SIGKILL one replica (the oldest pid) every ``every_s`` seconds; Serve starts a new one."""
    while not stop.wait(every_s):
        replicas = sorted(pid for pid, name in _serve_processes().items() if name.startswith("ray::ServeRepli"))
        if replicas:
            os.kill(replicas[0], signal.SIGKILL)
            kills.append({"t_s": round(time.monotonic() - started, 1), "pid": replicas[0]})


def _sampler(stop: threading.Event, samples: list[tuple[float, int]], started: float) -> None:
    while not stop.wait(1.0):
        samples.append((time.monotonic() - started, sum(_rss_bytes(pid) for pid in _serve_processes())))


async def _load(url: str, bodies: list[bytes], clients: int, seconds: float, started: float) -> list[tuple[float, float, str]]:
    """(finish time, latency ms, "" or what failed) for every request of ``clients`` closed-loop clients."""
    import aiohttp

    done: list[tuple[float, float, str]] = []
    deadline = started + seconds

    async def client(n: int, session: aiohttp.ClientSession) -> None:
        i = n
        while time.monotonic() < deadline:
            body = bodies[i % len(bodies)]
            i += clients
            sent = time.monotonic()
            failure = ""
            try:
                async with session.post(f"{url}/v1/predict?top_k=1", data=body,
                                        headers={"Content-Type": "image/jpeg"}) as resp:  # fmt: skip
                    await resp.read()
                    if resp.status != 200:
                        failure = f"HTTP {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failure = type(exc).__name__
            now = time.monotonic()
            done.append((now - started, (now - sent) * 1000.0, failure))

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(client(n, session) for n in range(clients)))
    return done


def _per_minute(done: list[tuple[float, float, str]], samples: list[tuple[float, int]], minute_s: float) -> list[dict[str, Any]]:
    rows = []
    for m in range(int(max((t for t, _, _ in done), default=0) // minute_s) + 1):
        lo, hi = m * minute_s, (m + 1) * minute_s
        ok = sorted(ms for t, ms, f in done if lo <= t < hi and not f)
        failed = [f for t, _, f in done if lo <= t < hi and f]
        rss = [b for t, b in samples if lo <= t < hi]
        rows.append({
            "minute": m + 1,
            "requests": len(ok) + len(failed),
            "failed": len(failed),
            "failures": sorted(set(failed)),
            "p50_ms": round(statistics.median(ok), 2) if ok else None,
            "p99_ms": round(ok[min(len(ok) - 1, int(0.99 * len(ok)))], 2) if ok else None,
            "rss_mb": round(statistics.mean(rss) / 2**20, 1) if rss else None,
        })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--kill-every-s", type=float, default=120.0)
    parser.add_argument("--ingress", choices=("proxy", "haproxy"), default="proxy")
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    minute_s = 60.0 if args.duration_s >= 120 else args.duration_s / 3  # a smoke run still shows three rows

    from bench_serve import _build_artifact  # the same pair bench_serve measures

    from automl_tl.serve import start_server, stop_server
    from tests.scenarios._common import free_port

    files = sorted((ROOT.parent / "shared" / "datasets" / "hymenoptera" / "val").glob("*/*.jpg"))
    bodies = [f.read_bytes() for f in files]
    with tempfile.TemporaryDirectory(prefix="bench_soak_") as tmp:
        artifact = _build_artifact(Path(tmp) / "artifact")
        url = start_server(artifact, mode="ensemble", port=free_port(), replicas=args.replicas,
                           cpus_per_replica=1.0, ingress=args.ingress)  # fmt: skip
        stop = threading.Event()
        kills: list[dict[str, Any]] = []
        samples: list[tuple[float, int]] = []
        started = time.monotonic()
        threads = [threading.Thread(target=_killer, args=(stop, args.kill_every_s, kills, started), daemon=True),
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
    minutes = _per_minute(done, samples, minute_s)
    first, last = minutes[0]["rss_mb"], minutes[-1]["rss_mb"]
    out = {
        "what": f"ensemble, {args.replicas} replicas, {args.ingress} ingress, {args.clients} clients, a replica "
                f"SIGKILLed every {args.kill_every_s:.0f} s, 127.0.0.1",
        "duration_s": args.duration_s,
        "row_s": minute_s,
        "requests": len(done),
        "failed": sum(1 for _, _, f in done if f),
        "kills": kills,
        "rss_drift_pct": round(100.0 * (last - first) / first, 2) if first and last else None,
        "per_minute": minutes,
        "command": "python benchmarks/bench_soak.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    target = RESULTS / ("soak.json" if args.duration_s >= 600 else "soak_smoke.json")
    target.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: out[k] for k in ("requests", "failed", "rss_drift_pct")}), f"-> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
