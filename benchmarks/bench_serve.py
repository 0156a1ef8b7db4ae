"""Serving benchmark: Serve against the same models in-process, best against ensemble, and the two ensemble
layouts, on 127.0.0.1 only. Writes ``benchmarks/results/serve.json``; about 7-8 minutes on 2 cores.

    .venv/bin/python benchmarks/bench_serve.py              # the full run (60 s load test)
    .venv/bin/python benchmarks/bench_serve.py --smoke-test # a few seconds per stage, for CI
    .venv/bin/python benchmarks/bench_serve.py --explain    # lone /v1/explain vs /v1/predict (serve_explain.json)
    .venv/bin/python benchmarks/bench_serve.py cascade [--demo-run RUN --hymenoptera-run RUN]  # serve_cascade.json

The artifact is the default search space's pair, built without training (timing does not depend on the
weights): mobilenetv2_100 at 160 px and tf_efficientnet_lite0 at 224 px, the latter named best member.
Requests are real hymenoptera val JPEGs sent as raw ``image/jpeg`` bodies by 32 concurrent aiohttp
clients in this process. The in-process baseline is the Predictor on the same files at the same batch size
with the same two cores (decode, preprocess and forward, as the server does), plus forward-only figures
(on one thread, on two, and for the ensemble its two members side by side on one thread each, as a replica
of two lanes may answer a lone request), measured before and after the Serve runs; the fastest, figure by
figure, is the reference.
The single layout runs as two replicas of one core and one torch thread, and (runs named ``*_1x2``) as one
replica of two cores, which forwards two batches side by side on one thread each and a lone request on
both threads; ``best_1x2_one_lane`` is that replica forwarding one batch at a time on both threads (what
it did before it had lanes). The 60 s load test (``MAIN``) runs against the ensemble as ``automl-tl serve`` deploys
it here, one replica of both cores; the others load for 15 s. Each deployment is judged on throughput and
lone-request latency together. Lone requests
are sent one at a time after the warm-up load, to a warmed-up replica, over http.client (a thin client), then
again with LONE_PAUSE_S before each, as the in-process ``*_spaced`` figures are timed.
Memory is the resident set of every Serve process this run started (HAProxy, proxy, controller, replicas), sampled
each second, and their summed high-water marks (VmHWM) in each sixth of the measured run (reset between
sixths, so no short peak escapes), which is what "flat" is judged on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from automl_tl.train.memory import MALLOC_ENV, reset_peak_rss, tune_malloc  # noqa: E402
from automl_tl.inference.artifact import MemberRecord, write_artifact  # noqa: E402
from automl_tl.backbones import create_backbone  # noqa: E402
from automl_tl.inference.predictor import Predictor  # noqa: E402
from automl_tl.serve import DEFAULT_LAYOUT, AppArgs, start_server, stop_server  # noqa: E402
from automl_tl.serve._app import replica_env  # noqa: E402
from automl_tl.serve._model import MemberRunner, plan_for  # noqa: E402
from automl_tl.serve._replica import pin_torch_threads, spread  # noqa: E402
from automl_tl.serve._server import Ingress, resolve_ingress  # noqa: E402
from automl_tl.backbones._inference import AB_OFF_ENV  # noqa: E402

CLIENTS = 32
BATCH = 8
CPUS = 2
TWO_THREADS = "_1x2"  # runs with one replica of CPUS torch threads instead of CPUS replicas of one
# The 60 s load test: the ensemble as `automl-tl serve` deploys it on this machine, one replica of all its CPUs.
MAIN = f"ensemble_single{TWO_THREADS}"
ONE_LANE = "_one_lane"  # a replica of several threads that forwards one batch at a time
WINDOWS = 6  # the load run's memory is judged by its peak in each sixth
# Lone requests are also timed with this pause before each, in-process and through Serve alike: this machine
# runs slower after idling (a 30 ms pause made one in-process decode + forward 6-8.5 ms slower, and numpy
# after it too), so a lone request that finds the server idle pays that whether or not Serve is in the way.
LONE_PAUSE_S = 0.05


def _build_artifact(out: Path) -> Path:
    members = []
    for member_id, backbone, size in (("mnv2", "mobilenetv2_100", 160), ("lite0", "tf_efficientnet_lite0", 224)):
        torch.manual_seed(0)
        net = create_backbone(backbone, num_classes=2, pretrained=False)
        record = MemberRecord.create(member_id, backbone, 2, image_size=size, temperature=1.1)
        members.append((record, net.state_dict()))
    write_artifact(out, ("ants", "bees"), members, [1.0, 1.0], 1.2, metrics={"best_member": "lite0"})
    return out


def _percentiles(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    arr = np.asarray(values_ms)
    return {"p50_ms": round(float(np.percentile(arr, 50)), 2), "p99_ms": round(float(np.percentile(arr, 99)), 2)}


# --- in-process ------------------------------------------------------------------------------------------


def in_process(artifact: Path, files: list[Path], mode: str, seconds: float) -> dict[str, Any]:
    """The Predictor on files at batch size BATCH (decode + preprocess + forward), and forward-only times, with
    one torch thread and with one per core; the better of the two is the reference."""
    predictor = Predictor.load(artifact)
    member = plan_for(predictor.artifact, "best").member_ids[0] if mode == "best" else None
    plan = plan_for(predictor.artifact, mode)
    runner = MemberRunner.build(predictor.artifact, plan.member_indices)
    item = tuple(torch.randn(3, p.input_size, p.input_size) for p in plan.preprocessing)
    out: dict[str, Any] = {}
    for threads in sorted({1, CPUS}):
        torch.set_num_threads(threads)
        predictor.predict_proba(files[:BATCH], batch_size=BATCH, member=member)  # warm up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            chunk = [files[(done + i) % len(files)] for i in range(BATCH * 2)]
            predictor.predict_proba(chunk, batch_size=BATCH, member=member)
            done += len(chunk)
        figures: dict[str, float] = {"throughput_img_s": round(done / (time.perf_counter() - start), 2)}
        for size in (1, BATCH):
            runner.run([item] * size)
            times = [runner.run([item] * size).forward_ms for _ in range(30 if size == 1 else 6)]
            figures[f"forward_ms_batch{size}"] = round(statistics.median(times), 2)
        figures["forward_only_throughput_img_s"] = round(BATCH * 1000.0 / figures[f"forward_ms_batch{BATCH}"], 2)

        def predict_one(i: int) -> float:  # one file, decoded and predicted alone: what a lone request asks
            sent = time.perf_counter()
            predictor.predict_proba([files[i]], batch_size=1, member=member)
            return (time.perf_counter() - sent) * 1000.0

        figures["predict_one_file_ms"] = _lone_median(predict_one, 0.0)
        figures["predict_one_file_spaced_ms"] = _lone_median(predict_one, LONE_PAUSE_S)
        figures["forward_ms_batch1_spaced"] = _lone_median(lambda _: runner.run([item]).forward_ms, LONE_PAUSE_S)
        out[f"threads_{threads}"] = figures
    torch.set_num_threads(CPUS)
    runs = list(out.values())
    if len(plan.member_indices) > 1 and CPUS > 1:
        out["members_side_by_side"] = _side_by_side(runner, item)
    forwards = list(out.values())
    out["best"] = {
        "throughput_img_s": max(r["throughput_img_s"] for r in runs),
        "forward_ms_batch1": min(r["forward_ms_batch1"] for r in forwards),
        "predict_one_file_ms": min(r["predict_one_file_ms"] for r in runs),
        "forward_ms_batch1_spaced": min(r["forward_ms_batch1_spaced"] for r in forwards),
        "predict_one_file_spaced_ms": min(r["predict_one_file_spaced_ms"] for r in runs),
    }
    return out


def _side_by_side(runner: MemberRunner, item: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Batch-1 forward times with the members spread over one-thread lanes running at once: what a Serve
    replica of several lanes does with a lone request when that is faster (``Forward._choose_member_lanes``),
    so the in-process reference gets it too."""
    lanes = [ThreadPoolExecutor(1, initializer=pin_torch_threads, initargs=(1,)) for _ in range(CPUS)]
    try:

        def member_ms(m: int) -> float:
            def timed() -> float:
                start = time.perf_counter()
                runner.forward(m, [item])
                return (time.perf_counter() - start) * 1000.0

            return statistics.median(lanes[0].submit(timed).result() for _ in range(10))

        groups = spread([member_ms(m) for m in range(len(runner.models))], CPUS)

        def forward_group(group: list[int]) -> None:
            for m in group:
                runner.forward(m, [item])

        def once(_: int = 0) -> float:
            start = time.perf_counter()
            running = [lanes[i].submit(forward_group, group) for i, group in enumerate(groups)]
            for done in running:
                done.result()
            return (time.perf_counter() - start) * 1000.0

        once()
        return {
            "member_lanes": groups,
            "forward_ms_batch1": round(statistics.median(once() for _ in range(30)), 2),
            "forward_ms_batch1_spaced": _lone_median(once, LONE_PAUSE_S),
        }
    finally:
        for lane in lanes:
            lane.shutdown()


def _lone_median(measure: Callable[[int], float], pause_s: float, count: int = 20) -> float:
    """The median of ``measure(i)`` (ms) over ``count`` calls, each after ``pause_s`` of idling."""
    values = []
    for i in range(count):
        time.sleep(pause_s)
        values.append(measure(i))
    return round(statistics.median(values), 2)


def _faster(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """Figure by figure, the better of two in-process measurements (higher throughput, lower time)."""
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = _faster(value, last[key])
        else:
            out[key] = max(value, last[key]) if "throughput" in key else min(value, last[key])
    return out


# --- Serve -----------------------------------------------------------------------------------------------


def _serve_pids() -> dict[int, str]:
    """Serve's processes (HAProxy or the proxy actor, controller, replicas) started under this process, by pid."""
    me, found = os.getpid(), {}
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        names[int(entry.name)] = cmd
    for pid, cmd in names.items():
        if not (cmd.startswith(("ray::ServeReplica", "ray::ProxyActor", "ray::ServeController"))
                or cmd.endswith("/haproxy")):  # fmt: skip
            continue
        ancestor = parents.get(pid, 0)
        while ancestor > 1 and ancestor != me:
            ancestor = parents.get(ancestor, 0)
        if ancestor == me:
            found[pid] = cmd
    return found


def _rss_by_pid(pids: dict[int, str], field: str = "VmRSS") -> dict[int, int]:
    """Resident memory now (VmRSS) or at its peak so far (VmHWM) of each process, in bytes."""
    out = {}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    out[pid] = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass  # the process ended
    return out


def _by_process_mb(pids: dict[int, str], rss: dict[int, int]) -> dict[str, float]:
    return {f"{pids[pid].split()[0]}[{pid}]": round(value / 2**20, 1) for pid, value in sorted(rss.items())}


def _trend_mb(memory: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of resident memory over the run, times its length: the drift, free of the noise."""
    if len(memory) < 3:
        return None
    t = np.array([m[0] for m in memory])
    rss = np.array([m[1] for m in memory]) / 2**20
    slope = float(np.polyfit(t, rss, 1)[0])
    return round(slope * float(t[-1] - t[0]), 1)


async def closed_loop(session: Any, url: str, bodies: list[bytes], clients: int, stop_at: float,
                      record: Callable[[float, float, str], None]) -> None:  # fmt: skip
    """``clients`` closed-loop clients on ``session`` (an aiohttp.ClientSession), each POSTing the next of
    ``bodies`` as soon as its previous answer is in, until ``stop_at`` (monotonic clock); per request
    ``record(finished_at, latency_ms, failure)``, ``failure`` "" for a 200."""
    import aiohttp

    async def client(index: int) -> None:
        n = index
        while time.monotonic() < stop_at:
            body = bodies[n % len(bodies)]
            n += clients
            sent, failure = time.perf_counter(), ""
            try:
                async with session.post(f"{url}/v1/predict", data=body, headers={"Content-Type": "image/jpeg"}) as r:
                    payload = await r.read()
                    if r.status != 200:
                        failure = f"{r.status}: {payload[:120]!r}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failure = f"{type(exc).__name__}: {exc}"
            record(time.monotonic(), (time.perf_counter() - sent) * 1000.0, failure)

    await asyncio.gather(*(client(i) for i in range(clients)))


async def _load(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    memory: list[tuple[float, int]] = []
    snapshots: list[dict[int, int]] = []
    stop_at = time.monotonic() + seconds
    start = time.monotonic()
    pids = _serve_pids()

    def record(finished_at: float, latency_ms: float, failure: str) -> None:
        if failure:
            errors.append(failure)
        else:
            latencies.append(latency_ms)

    async def sample_memory() -> None:
        # Resident memory each second, and the exact peak of each sixth of the run: every process's VmHWM is
        # read at the end of a window and then reset (clear_refs), so no short-lived peak escapes the windows.
        window_s, next_window = seconds / WINDOWS, start + seconds / WINDOWS
        for pid in pids:
            reset_peak_rss(pid)
        while time.monotonic() < stop_at:
            snapshots.append(_rss_by_pid(pids))
            memory.append((round(time.monotonic() - start, 1), sum(snapshots[-1].values())))
            if time.monotonic() >= next_window:
                windows.append(_rss_by_pid(pids, "VmHWM"))
                for pid in pids:
                    reset_peak_rss(pid)
                next_window += window_s
            await asyncio.sleep(max(0.05, min(1.0, next_window - time.monotonic())))
        windows.append(_rss_by_pid(pids, "VmHWM"))

    windows: list[dict[int, int]] = []
    peak_before = _rss_by_pid(pids, "VmHWM")
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(sample_memory(), closed_loop(session, url, bodies, clients, stop_at, record))
    elapsed = time.monotonic() - start
    # Each process's peak over the whole run is its highest window peak.
    peak_after = {pid: max(w.get(pid, 0) for w in windows) for pid in pids} if windows else {}
    window_peaks = [round(sum(w.values()) / 2**20, 1) for w in windows]
    rss = [m for _, m in memory]
    tenth = max(1, len(rss) // 6)
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "throughput_img_s": round(len(latencies) / elapsed, 2),
        **_percentiles(latencies),
        "memory": {
            "processes": sorted(set(pids.values())),
            # The processes' summed peak (VmHWM) in each sixth of the run: flat means the last is not above the first.
            "window_peaks_mb": window_peaks,
            # Each process's high-water mark, summed: from start-up and warm-up, then over the measured run.
            "peak_before_run_mb": round(sum(peak_before.values()) / 2**20, 1),
            "peak_after_run_mb": round(sum(peak_after.values()) / 2**20, 1),
            "peak_rss_mb": round(max(rss) / 2**20, 1) if rss else None,
            "first_sixth_peak_mb": round(max(rss[:tenth]) / 2**20, 1) if rss else None,
            "last_sixth_peak_mb": round(max(rss[-tenth:]) / 2**20, 1) if rss else None,
            "growth_mb_over_run": _trend_mb(memory),
            "series_mb": [(t, round(m / 2**20, 1)) for t, m in memory[:: max(1, len(memory) // 12)]],
            "first_by_process_mb": _by_process_mb(pids, snapshots[0]) if snapshots else {},
            "last_by_process_mb": _by_process_mb(pids, snapshots[-1]) if snapshots else {},
        },
    }


def _sequential(url: str, body: bytes, count: int) -> dict[str, Any]:
    """Lone requests one after another (and again with LONE_PAUSE_S between them): client latency, where the
    server says its time went, and the HTTP round trip of a request that does no work (``/v1/healthz``).

    The client is http.client on one keep-alive connection: about as thin as curl here, so the figure is the
    server's and not a client library's (``requests`` took 0.2 ms less to 1.6 ms more per request in three
    interleaved rounds of 60 here: within this machine's noise)."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port or 80, timeout=60)

    def call(method: str, path: str, payload: bytes | None = None) -> tuple[float, bytes]:
        sent = time.perf_counter()
        conn.request(method, where.path + path, body=payload, headers={"Content-Type": "image/jpeg"} if payload else {})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:200]!r}")
        return (time.perf_counter() - sent) * 1000.0, data

    try:
        times, server, spaced = [], [], []
        for _ in range(count):
            ms, data = call("POST", "/v1/predict", body)
            times.append(ms)
            answer = json.loads(data)
            server.append((answer["total_ms"], answer["predictions"][0]["timing"]["decode_ms"],
                           answer["predictions"][0]["timing"]["forward_ms"]))  # fmt: skip
        for _ in range(count):
            time.sleep(LONE_PAUSE_S)
            spaced.append(call("POST", "/v1/predict", body)[0])
        empty = [call("GET", "/v1/healthz")[0] for _ in range(count)]
    finally:
        conn.close()
    total, decode, forward = (round(statistics.median(column[2:]), 2) for column in zip(*server))
    return {**_percentiles(times[2:]), "server_total_p50_ms": total, "server_decode_p50_ms": decode,
            "server_forward_p50_ms": forward, "spaced_p50_ms": _percentiles(spaced[2:])["p50_ms"],
            "healthz_p50_ms": round(statistics.median(empty[2:]), 2)}  # fmt: skip


def _batches(url: str) -> dict[int, tuple[int, int]]:
    """(batches, images) per model process; stats answer from one replica at a time, so ask a few times."""
    import requests

    seen: dict[int, tuple[int, int]] = {}
    for _ in range(16):
        stats = requests.get(f"{url}/v1/stats", timeout=30).json()
        for counters in [stats["ingress"], *stats.get("members", {}).values()]:
            if counters["batches"]:
                seen[counters["pid"]] = (counters["batches"], counters["images"])
    return seen


def _mean_batch(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> float:
    batches = sum(after[pid][0] - before.get(pid, (0, 0))[0] for pid in after)
    images = sum(after[pid][1] - before.get(pid, (0, 0))[1] for pid in after)
    return round(images / batches, 2) if batches else 0.0


def serve_run(artifact: Path, bodies: list[bytes], mode: str, layout: str, seconds: float, port: int,
              sequential: int, warm_up_s: float, ingress: Ingress = "proxy", threads: int = 1,
              lanes: int | None = None) -> dict[str, Any]:  # fmt: skip
    # The single layout splits the cores into replicas of ``threads`` cores and torch threads each; the
    # composed layout runs one replica per member, one core each (its ingress reserves no core).
    replicas = CPUS // threads if layout == "single" else 1
    threads = threads if layout == "single" else 1
    url = start_server(artifact, mode=mode, port=port, layout=layout, replicas=replicas, cpus_per_replica=threads,
                       torch_threads=threads, forward_lanes=lanes, max_batch_size=BATCH, ingress=ingress)  # fmt: skip
    try:
        asyncio.run(_load(url, bodies, CLIENTS, warm_up_s))  # allocator pools and decode threads settle first
        single = _sequential(url, bodies[0], sequential)  # a warmed-up replica, as a served model is
        before = _batches(url)
        load = asyncio.run(_load(url, bodies, CLIENTS, seconds))
        load["mean_batch_size"] = _mean_batch(before, _batches(url))
        import requests

        chosen = requests.get(f"{url}/v1/stats", timeout=30).json()["ingress"].get("lone_request")
        return {"lone_request": chosen,  # how the replica answering stats runs a lone request, and why
                "mode": mode, "layout": layout, "replicas": replicas, "threads_per_replica": threads,
                "forward_lanes": lanes,
                "ingress": resolve_ingress(ingress),
                "single_request": single, "load": load}  # fmt: skip
    finally:
        stop_server()


# --- A/B: each speed mechanism of the replica on and off, in the same run ---------------------------------

# What turns each mechanism off: start_server options, the private switch AB_OFF_ENV read by the serving code
# (the mechanism's name), or environment settings (Serve's own defaults).
MECHANISMS: dict[str, dict[str, Any]] = {
    "forward_lanes": {"off": "one forward lane (forward_lanes=1)", "options": {"forward_lanes": 1}},
    "lone_request_timing": {"off": "no start-up timing: a lone request always runs on every thread in lane 0",
                            "switch": True},
    "thread_arenas": {"off": "one malloc arena per replica (MALLOC_ENV) instead of one per allocating thread",
                      "switch": True},
}  # fmt: skip
KEEP_AT_LEAST_PCT = 10.0  # a mechanism stays where it gains this much on throughput or on lone-request p50
AB_ORDER = ("on", "off", "off", "on")  # balanced, so a drift in the machine's speed meets both alike


def _turned_off(names: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """start_server options and environment that run the app without the mechanisms ``names``."""
    options: dict[str, Any] = {}
    env: dict[str, str] = {}
    switched = [n for n in names if MECHANISMS[n].get("switch")]
    for name in names:
        options.update(MECHANISMS[name].get("options", {}))
        env.update(MECHANISMS[name].get("env", {}))
    if switched:
        env[AB_OFF_ENV] = ",".join(switched)
    return options, env


def ab_round(artifact: Path, bodies: list[bytes], port: int, off: list[str], seconds: float, warm_up_s: float,
             lone: int) -> dict[str, Any]:  # fmt: skip
    """One start of the main deployment (MAIN: the ensemble, one replica of every core) without the
    mechanisms ``off``: throughput under CLIENTS clients and lone-request latency."""
    options, env = _turned_off(off)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        url = start_server(artifact, mode="ensemble", port=port, replicas=1, cpus_per_replica=CPUS,
                           torch_threads=CPUS, max_batch_size=BATCH, **options)  # fmt: skip
        try:
            asyncio.run(_load(url, bodies, CLIENTS, warm_up_s))
            single = _sequential(url, bodies[0], lone)
            load = asyncio.run(_load(url, bodies, CLIENTS, seconds))
            import requests

            chosen = requests.get(f"{url}/v1/stats", timeout=30).json()["ingress"].get("lone_request")
            ingress = requests.get(f"{url}/v1/metadata", timeout=30).json()["ingress"]
            applied = _applied_env()
        finally:
            stop_server()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {"throughput_img_s": load["throughput_img_s"], "lone_p50_ms": single["p50_ms"],
            "lone_spaced_p50_ms": single["spaced_p50_ms"], "load_p50_ms": load["p50_ms"],
            "load_p99_ms": load["p99_ms"], "errors": load["errors"], "requests": load["requests"],
            "lone_request": chosen, "ingress": ingress, "env": applied}  # fmt: skip


def _applied_env() -> dict[str, dict[str, str | None]]:
    """The settings each A/B switch acts through, as the Serve controller and the replica run with them: the
    proof that a round ran with what it says."""
    names = (AB_OFF_ENV, "MALLOC_ARENA_MAX")
    out: dict[str, dict[str, str | None]] = {}
    for pid, cmd in _serve_pids().items():
        role = "replica" if cmd.startswith("ray::ServeReplica") else "controller" if "Controller" in cmd else None
        if role is None:
            continue
        try:
            pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)
        out[role] = {name: env.get(name) for name in names}
    return out


def _gains(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of the on and off rounds, each mechanism's gain over its absence (percent), and the verdict."""
    mean = {state: {key: round(statistics.mean(r[key] for r in rounds if r["state"] == state), 2)
                    for key in ("throughput_img_s", "lone_p50_ms")} for state in ("on", "off")}  # fmt: skip
    on, off = mean["on"], mean["off"]
    gain = {"throughput": round(100.0 * (on["throughput_img_s"] - off["throughput_img_s"]) / off["throughput_img_s"], 1),
            "lone_p50": round(100.0 * (off["lone_p50_ms"] - on["lone_p50_ms"]) / off["lone_p50_ms"], 1)}  # fmt: skip
    keep = max(gain.values()) >= KEEP_AT_LEAST_PCT
    return {"mean": mean, "gain_pct": gain, "verdict": "keep" if keep else "remove"}


def _targets(run: dict[str, Any], reference: dict[str, Any]) -> dict[str, bool]:
    """The serving targets for the main deployment, against the in-process reference (as in ``main``)."""
    ratio = run["throughput_img_s"] / reference["throughput_img_s"]
    gap = run["lone_p50_ms"] - reference["forward_ms_batch1"]
    return {"zero_errors": run["errors"] == 0,
            f"serve / in-process throughput >= 0.8 (got {ratio:.2f})": bool(ratio >= 0.8),
            f"lone-request p50 - fastest in-process forward <= 10 ms (got {gap:.1f} ms)": bool(gap <= 10.0)}  # fmt: skip


def ab_main(opts: argparse.Namespace) -> None:
    """Each mechanism on and off in turn (AB_ORDER), then the deployment the verdicts leave against the
    in-process reference. Results merge into ``serve_ab.json`` after each mechanism, so a cut-short run keeps
    what it measured."""
    quick = opts.smoke_test
    names = [] if opts.only == "none" else opts.only.split(",") if opts.only else list(MECHANISMS)
    unknown = sorted(set(names) - set(MECHANISMS))
    if unknown:
        sys.exit(f"--only: unknown mechanism(s) {unknown}; known: {', '.join(MECHANISMS)}")
    load_s, warm_s, lone = (3.0, 1.0, 5) if quick else (opts.load_s, 4.0, 20)
    out = RESULTS / ("serve_ab_smoke.json" if quick else "serve_ab.json")
    figures: dict[str, Any] = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    figures.update({
        "benchmark": "serve_ab", "started": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke_test": quick,
        "machine": f"{os.cpu_count()} CPUs, no GPU; 1-minute load average {os.getloadavg()[0]:.2f} at start",
        "setup": {"deployment": f"{MAIN}: the ensemble, 1 replica x {CPUS} CPUs x {CPUS} torch threads, "
                                f"max_batch_size {BATCH}, the default ingress",
                  "artifact": "mobilenetv2_100@160 + tf_efficientnet_lite0@224", "clients": CLIENTS,
                  "rounds": list(AB_ORDER[: opts.rounds]), "load_s": load_s, "warm_up_s": warm_s, "lone_requests": lone,
                  "each_round": "a fresh Serve start on one Ray; warm-up load, lone requests (http.client, one at "
                                "a time), then the load",
                  "rule": f"keep where the mean with the mechanism beats the mean without by >= {KEEP_AT_LEAST_PCT:g} % "
                          "on throughput or on lone-request p50 (gain relative to the figure without it)"},
    })  # fmt: skip
    figures.setdefault("mechanisms", {})
    files = sorted((SHARED / "hymenoptera" / "val").glob("*/*.jpg"))
    if not files:
        sys.exit(f"{SHARED / 'hymenoptera'} is absent: this benchmark needs the shared data sets")
    bodies = [p.read_bytes() for p in files]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = _build_artifact(Path(tmp) / "artifact")
        import ray

        os.environ["MALLOC_ARENA_MAX"] = MALLOC_ENV["MALLOC_ARENA_MAX"]  # Ray's own processes, as start_server runs them
        ray.init(address="local", num_cpus=CPUS, log_to_driver=False, include_dashboard=False)
        try:
            for name in names:
                rounds = []
                for state in AB_ORDER[: opts.rounds]:
                    got = ab_round(artifact, bodies, opts.port, [] if state == "on" else [name], load_s, warm_s, lone)
                    rounds.append({"state": state, **got})
                    print(name, state, json.dumps(got), flush=True)
                figures["mechanisms"][name] = {"off_means": MECHANISMS[name]["off"], "measured":
                                               time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": rounds, **_gains(rounds)}  # fmt: skip
                print(name, json.dumps(_gains(rounds)), flush=True)
                out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
            if opts.after_verdicts:
                removed = [n for n, m in figures["mechanisms"].items() if m["verdict"] == "remove"]
                before = in_process(artifact, files, "ensemble", 2.0 if quick else 6.0)
                # Those still in the code run switched off; those already removed from it are gone anyway.
                off = [n for n in removed if n in MECHANISMS]
                run = ab_round(artifact, bodies, opts.port, off, 4.0 if quick else 20.0, 2.0 if quick else 6.0, lone)
                after = in_process(artifact, files, "ensemble", 2.0 if quick else 6.0)
                reference = _faster(before, after)["best"]
                figures["after_verdicts"] = {"removed": removed, "switched_off": off, "run": run, "in_process": reference,
                                             "checks": _targets(run, reference)}  # fmt: skip
                print("after verdicts", json.dumps(figures["after_verdicts"]), flush=True)
        finally:
            ray.shutdown()
    figures["wall_s"] = round(time.monotonic() - t0, 1)
    out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out}")


def _lone_times(url: str, route: str, bodies: list[bytes], count: int, query: str = "", timeout_s: float = 120) -> list[float]:
    """Client milliseconds of ``count`` lone requests to ``/v1/{route}``, one after another over ``bodies`` in
    turn, on one connection; two more go first to warm it and are left out."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port or 80, timeout=timeout_s)
    times = []
    try:
        for i in range(count + 2):
            sent = time.perf_counter()
            conn.request("POST", f"{where.path}/v1/{route}{query}", body=bodies[i % len(bodies)],
                         headers={"Content-Type": "image/jpeg"})  # fmt: skip
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"/v1/{route}: HTTP {response.status}: {data[:200]!r}")
            times.append((time.perf_counter() - sent) * 1000.0)
    finally:
        conn.close()
    return times[2:]


def _lone_p50(url: str, route: str, body: bytes, count: int) -> float:
    """Median client latency of ``count`` lone requests to ``/v1/{route}`` (the first two are left out)."""
    return round(statistics.median(_lone_times(url, route, [body], count, "?top_k=1")), 2)


def explain_main(opts: argparse.Namespace) -> None:
    """Lone ``/v1/explain`` requests against ``/v1/predict`` ones on the same deployment (the ensemble as
    ``automl-tl serve`` deploys it, and its best member), and the in-process Explainer on the same image."""
    from automl_tl.inference.explain import Explainer
    from automl_tl.inference.images import load_image

    count = 3 if opts.smoke_test else 30
    files = sorted((SHARED / "hymenoptera" / "val").glob("*/*.jpg"))
    if not files:
        sys.exit(f"{SHARED / 'hymenoptera'} is absent: this benchmark needs the shared data sets")
    body = files[0].read_bytes()
    figures: dict[str, Any] = {
        "benchmark": "serve_explain", "started": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke_test": opts.smoke_test,
        "machine": f"{os.cpu_count()} CPUs, no GPU; 1-minute load average {os.getloadavg()[0]:.2f} at start",
        "setup": {"artifact": "mobilenetv2_100@160 + tf_efficientnet_lite0@224", "image": files[0].name,
                  "deployment": f"single layout, 1 replica x {CPUS} CPUs", "requests": f"{count} lone requests "
                  "each (http.client, one keep-alive connection, raw image/jpeg, top_k=1), after two unmeasured",
                  "explain_runs_in": "a decode thread of the ingress, torch on one thread"},
    }  # fmt: skip
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = _build_artifact(Path(tmp) / "artifact")
        pixels = load_image(files[0])
        import ray

        ray.init(address="local", num_cpus=CPUS, log_to_driver=False, include_dashboard=False)
        try:
            for mode in ("ensemble", "best"):
                explainer = Explainer.load(artifact, mode=mode)
                with torch.inference_mode(False):
                    pin_torch_threads(1)
                    local = []
                    for _ in range(count + 2):
                        start = time.perf_counter()
                        explainer.explain([pixels])
                        local.append((time.perf_counter() - start) * 1000.0)
                url = start_server(artifact, mode=mode, port=opts.port, cpus_per_replica=CPUS)
                try:
                    figures[mode] = {"explain_p50_ms": _lone_p50(url, "explain", body, count),
                                     "predict_p50_ms": _lone_p50(url, "predict", body, count),
                                     "in_process_explain_p50_ms": round(statistics.median(local[2:]), 2)}  # fmt: skip
                finally:
                    stop_server()
                print(mode, json.dumps(figures[mode]), flush=True)
        finally:
            ray.shutdown()
    figures["wall_s"] = round(time.monotonic() - t0, 1)
    out = RESULTS / ("serve_explain_smoke.json" if opts.smoke_test else "serve_explain.json")
    out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out}")


# --- the cascade: mode=cascade against the ensemble on real artifacts -----------------------------------------

# The hymenoptera artifact's sweep: three backbones of different cost, heads on frozen features (quick on CPU).
# Its greedy selection starts from the 3 best trials (from one, it stopped at two members on this data, and
# the top 3 averaged equally did not beat the best trial); the check below says whether they are of three
# different costs.
HYMENOPTERA_SWEEP: dict[str, Any] = {
    "space": {"backbones": ["tf_efficientnet_lite0", "tf_efficientnet_lite2", "mobilenetv2_100"],
              "freeze_depths": [8], "augmentations": ["none"], "learning_rate": {"low": 1e-3, "high": 3e-2, "log": True},
              "batch_sizes": [32], "max_epochs": 4, "image_sizes": [224], "heads": ["linear"]},
    "search": {"num_samples": 9, "time_budget_s": 600, "grace_period_epochs": 2, "ensemble_size": 6,
               "ensemble_init_best": 3, "seed": 0},
}  # fmt: skip
CASCADE_TOLERANCE_POINTS = 0.5
CASCADE_SPEEDUP = 1.5
CASCADE_MEMBERS = {"hymenoptera": 3}  # the served ensemble's members of different cost (backbone and size)


def _cascade_runs(opts: argparse.Namespace, tmp: Path) -> dict[str, tuple[Path, str, str]]:
    """(run directory, --data, --split) of each artifact: the given run directories, else built here by the
    demo's sweep on animal-shapes and a short hymenoptera sweep (minutes each on 2 cores)."""
    from automl_tl.api import run_pipeline
    from automl_tl.config import load_config
    from automl_tl.demo import demo_config

    hymenoptera_val = str(SHARED / "hymenoptera" / "val")
    demo, hymenoptera = opts.demo_run, opts.hymenoptera_run
    if demo is None:
        demo = tmp / "demo"
        run_pipeline(demo, demo_config(), report=False)
    if hymenoptera is None:
        hymenoptera = tmp / "hymenoptera"
        config = load_config({"data": {"source": str(SHARED / "hymenoptera" / "train")}, **HYMENOPTERA_SWEEP})
        run_pipeline(hymenoptera, config, test=hymenoptera_val, report=False)
    return {"animal-shapes": (Path(demo), "builtin:animal-shapes", "test"),
            "hymenoptera": (Path(hymenoptera), hymenoptera_val, "all")}  # fmt: skip


def _test_bodies(run_dir: Path, data: str, split: str) -> list[bytes]:
    """The test images as request bodies: the files themselves, or the cached images encoded as JPEG."""
    import io

    from PIL import Image

    from automl_tl.data import Dataset

    if split == "all":
        return [p.read_bytes() for p in sorted(Path(data).glob("*/*.jpg"))]
    info = json.loads((run_dir / "data.json").read_text(encoding="utf-8"))
    images = Dataset.open(Path(info["cache_path"]))
    bodies = []
    for i in info["test"]:
        out = io.BytesIO()
        Image.fromarray(images.image(int(i))).save(out, format="JPEG", quality=95)
        bodies.append(out.getvalue())
    return bodies


def _evaluate_cli(artifact: Path, data: str, split: str, mode: str, out: Path) -> dict[str, Any]:
    """``automl-tl evaluate ARTIFACT --mode MODE --data DATA --split SPLIT --json F``, as a user runs it."""
    import subprocess

    command = [sys.executable, "-m", "automl_tl.cli", "evaluate", str(artifact), "--mode", mode, "--data", data,
               "--split", split, "--json", str(out), "--quiet"]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    metrics = json.loads(out.read_text(encoding="utf-8"))
    return {"command": " ".join(["automl-tl", *command[3:]]), "n": metrics["n"], "accuracy": metrics["accuracy"],
            "escalation_rate": metrics.get("escalation_rate")}  # fmt: skip


def _lone_requests(url: str, bodies: list[bytes], count: int) -> dict[str, Any]:
    """Lone requests one after another over ``count`` different images (a cascade's time depends on the image)."""
    return {"requests": count, **_percentiles(_lone_times(url, "predict", bodies, count, timeout_s=60))}


def cascade_serve_run(artifact: Path, bodies: list[bytes], mode: str, seconds: float, warm_up_s: float,
                      lone: int, port: int) -> dict[str, Any]:  # fmt: skip
    """One replica of all the cores, as ``automl-tl serve`` deploys it here: lone requests, then 32 clients."""
    import requests

    url = start_server(artifact, mode=mode, port=port, replicas=1, cpus_per_replica=CPUS, torch_threads=CPUS,
                       max_batch_size=BATCH)  # fmt: skip
    try:
        asyncio.run(_load(url, bodies, CLIENTS, warm_up_s))
        single = _lone_requests(url, bodies, lone)
        before = requests.get(f"{url}/v1/stats", timeout=30).json()["ingress"]
        load = asyncio.run(_load(url, bodies, CLIENTS, seconds))
        after = requests.get(f"{url}/v1/stats", timeout=30).json()["ingress"]
        meta = requests.get(f"{url}/v1/metadata", timeout=30).json()
    finally:
        stop_server()
    images = after["images"] - before["images"]
    return {"mode": mode, "single_request": single,
            "load": {k: load[k] for k in ("clients", "seconds", "requests", "errors", "throughput_img_s", "p50_ms", "p99_ms")},
            "escalation_rate_under_load": round((after["escalated"] - before["escalated"]) / images, 4) if images else None,
            "mean_batch_size": round(images / max(1, after["batches"] - before["batches"]), 2),
            # The replica's own forward time per image under load: what the cascade saves, before decoding and HTTP.
            "forward_ms_per_image": round((after["forward_ms"] - before["forward_ms"]) / images, 2) if images else None,
            "members": {m["member_id"]: {"backbone": m["backbone"], "image_size": m["image_size"], "serving": m["serving"],
                                         "latency_ms_at_build": m["latency_ms"],
                                         "latency_ms_at_replica_start": m["replica_latency_ms"]}
                        for m in meta["members"]},
            "cascade": meta["cascade"],
            # How the replica ran a lone request, and the start-up times that chose it.
            "lone_request": after.get("lone_request")}  # fmt: skip


def cascade_main(opts: argparse.Namespace) -> None:
    quick = opts.smoke_test
    load_s, warm_s, lone = (3.0, 1.0, 5) if quick else (20.0, 5.0, 40)
    began, load_at_start, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg(), time.monotonic()
    results: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = _cascade_runs(opts, Path(tmp))
        import ray

        for name, (run_dir, data, split) in runs.items():
            artifact = run_dir / "artifact"
            bodies = _test_bodies(run_dir, data, split)
            evaluated = {mode: _evaluate_cli(artifact, data, split, mode, Path(tmp) / f"{name}-{mode}.json")
                         for mode in ("ensemble", "cascade")}  # fmt: skip
            print(name, "evaluate:", json.dumps(evaluated), flush=True)
            ray.init(address="local", num_cpus=CPUS, log_to_driver=False, include_dashboard=False)
            try:
                served = {mode: cascade_serve_run(artifact, bodies, mode, load_s, warm_s, lone, opts.port)
                          for mode in ("ensemble", "cascade")}  # fmt: skip
            finally:
                ray.shutdown()
            print(name, "serve:", json.dumps(served), flush=True)
            ens, cas = evaluated["ensemble"], evaluated["cascade"]
            gap = (ens["accuracy"] - cas["accuracy"]) * 100.0
            speedup = served["cascade"]["load"]["throughput_img_s"] / served["ensemble"]["load"]["throughput_img_s"]
            lone_ens, lone_cas = (served[m]["single_request"]["p50_ms"] for m in ("ensemble", "cascade"))
            manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
            results[name] = {"run_dir": str(run_dir), "data": data, "split": split, "test_images": len(bodies),
                             "cascade_rule": manifest.get("cascade"), "evaluate": evaluated, "serve": served,
                             "accuracy_gap_points": round(gap, 3), "throughput_ratio": round(speedup, 3),
                             "lone_p50_ms": {"ensemble": lone_ens, "cascade": lone_cas},
                             "forward_ms_per_image": {m: served[m]["forward_ms_per_image"] for m in served}}  # fmt: skip
            checks[f"{name}: cascade test accuracy within {CASCADE_TOLERANCE_POINTS} points of the ensemble's "
                   f"({cas['accuracy']:.4f} vs {ens['accuracy']:.4f}, escalation rate {cas['escalation_rate']:.3f})"] = bool(
                gap <= CASCADE_TOLERANCE_POINTS)  # fmt: skip
            checks[f"{name}: cascade throughput at {CLIENTS} clients >= {CASCADE_SPEEDUP}x the ensemble's "
                   f"(got {speedup:.2f}x)"] = bool(speedup >= CASCADE_SPEEDUP)  # fmt: skip
            checks[f"{name}: cascade lone-request p50 below the ensemble's ({lone_cas} vs {lone_ens} ms)"] = bool(
                lone_cas < lone_ens)
            kinds = {(m["backbone"], m["image_size"]) for m in served["ensemble"]["members"].values() if m["serving"]}
            results[name]["ensemble_members_of_different_cost"] = len(kinds)
            if name in CASCADE_MEMBERS:
                checks[f"{name}: at least {CASCADE_MEMBERS[name]} ensemble members of different cost (got "
                       f"{len(kinds)}: {', '.join(sorted(f'{b}@{s}' for b, s in kinds))})"] = len(kinds) >= CASCADE_MEMBERS[name]
    figures = {
        "benchmark": "serve_cascade",
        "started": began,
        "wall_s": round(time.monotonic() - t0, 1),
        "smoke_test": quick,
        "machine": f"{os.cpu_count()} CPUs, no GPU; 1-minute load average {load_at_start[0]:.2f} at start, "
                   f"{os.getloadavg()[0]:.2f} at the end (a machine shared with other work: every figure is skewed by it)",
        "conditions": {"cpus": os.cpu_count(), "gpu": False, "load_average_at_start": [round(x, 2) for x in load_at_start],
                       "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                       "note": "a machine shared with other work: every figure is skewed by it"},  # fmt: skip
        "setup": {"clients": CLIENTS, "max_batch_size": BATCH, "replicas": f"1 replica x {CPUS} CPUs x {CPUS} threads",
                  "load_s": load_s, "warm_up_s": warm_s, "lone_requests": f"{lone}, each a different test image",
                  "accuracy": "automl-tl evaluate --mode ensemble|cascade on the run's test images"},  # fmt: skip
        "artifacts": results,
        "checks": checks,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("serve_cascade_smoke.json" if quick else "serve_cascade.json")
    out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(checks, indent=2))
    print(f"written to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", nargs="?", choices=("cascade",),
                        help="cascade: mode=cascade against the ensemble on two real artifacts (serve_cascade.json)")
    parser.add_argument("--demo-run", type=Path, dest="demo_run",
                        help="with cascade: the demo's run directory (else a demo sweep runs first)")
    parser.add_argument("--hymenoptera-run", type=Path, dest="hymenoptera_run",
                        help="with cascade: a hymenoptera run directory (else a short sweep runs first)")
    parser.add_argument("--smoke-test", action="store_true", help="seconds, not minutes: checks the script runs")
    parser.add_argument("--ab", action="store_true", help="each speed mechanism on and off (serve_ab.json)")
    parser.add_argument("--only", help="with --ab: these mechanisms (comma-separated; none: only --after-verdicts) instead of all")
    parser.add_argument("--rounds", type=int, choices=(2, 4), default=4, help="with --ab: on-off, or on-off-off-on")
    parser.add_argument("--load-s", type=float, default=12.0, dest="load_s", help="with --ab: load per round")
    parser.add_argument("--after-verdicts", action="store_true", dest="after_verdicts",
                        help="with --ab: then check the serving targets without the mechanisms that did not pay")
    parser.add_argument("--explain", action="store_true", help="lone /v1/explain against /v1/predict (serve_explain.json)")
    parser.add_argument("--port", type=int, default=8765)
    opts = parser.parse_args()
    quick = opts.smoke_test
    # The in-process reference's allocator: the CLI's settings with a replica's arenas (below).
    os.environ["MALLOC_ARENA_MAX"] = replica_env(AppArgs(artifact=".", cpus_per_replica=CPUS))["MALLOC_ARENA_MAX"]
    tune_malloc()
    if opts.ab:
        ab_main(opts)
        return
    if opts.explain:
        explain_main(opts)
        return
    if opts.stage == "cascade":
        cascade_main(opts)
        return
    # Warm-up load before each measured run: the main run's is long enough for the replicas' allocator pools to
    # reach their plateau (about 10-15 s at 32 clients here), so "flat" judges the steady state.
    main_s, side_s, inproc_s, seq, warm_main_s, warm_side_s = (
        (4.0, 3.0, 2.0, 5, 1.0, 1.0) if quick else (60.0, 15.0, 6.0, 60, 15.0, 5.0)
    )
    files = sorted((SHARED / "hymenoptera" / "val").glob("*/*.jpg"))
    if not files:
        sys.exit(f"{SHARED / 'hymenoptera'} is absent: this benchmark needs the shared data sets")
    bodies = [p.read_bytes() for p in files]
    began, load_at_start = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg()[0]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = _build_artifact(Path(tmp) / "artifact")
        first = {mode: in_process(artifact, files, mode, inproc_s) for mode in ("ensemble", "best")}
        print("in-process:", json.dumps(first), flush=True)

        import ray

        os.environ["MALLOC_ARENA_MAX"] = MALLOC_ENV["MALLOC_ARENA_MAX"]  # Ray's own processes, as start_server runs them
        ray.init(address="local", num_cpus=CPUS, log_to_driver=False, include_dashboard=False)
        port = opts.port
        runs: dict[str, Any] = {}
        other = "composed" if DEFAULT_LAYOUT == "single" else "single"
        plan: tuple[tuple[str, str, str, float, float, Ingress], ...] = (
            (f"ensemble_{other}", "ensemble", other, side_s, warm_side_s, "proxy"),
            ("best_haproxy", "best", "single", side_s, warm_side_s, "haproxy"),
            ("best", "best", "single", side_s, warm_side_s, "proxy"),
            (f"best{TWO_THREADS}", "best", "single", side_s, warm_side_s, "proxy"),
            (f"best{TWO_THREADS}{ONE_LANE}", "best", "single", side_s, warm_side_s, "proxy"),
            (f"ensemble_{DEFAULT_LAYOUT}", "ensemble", DEFAULT_LAYOUT, side_s, warm_side_s, "proxy"),
            (MAIN, "ensemble", "single", main_s, warm_main_s, "proxy"),
        )
        for key, mode, layout, seconds, warm_s, ingress in plan:
            threads = CPUS if TWO_THREADS in key else 1
            lanes = 1 if key.endswith(ONE_LANE) else None
            runs[key] = serve_run(artifact, bodies, mode, layout, seconds, port, seq, warm_s, ingress, threads, lanes)
            print(key, json.dumps(runs[key]), flush=True)
        ray.shutdown()
        # Again after Serve: this machine's speed drifts by up to 1.5x between minutes, so the reference is the
        # faster of the two measurements, figure by figure (the stricter comparison for Serve).
        last = {mode: in_process(artifact, files, mode, inproc_s) for mode in ("ensemble", "best")}
        print("in-process again:", json.dumps(last), flush=True)
        baseline = _faster(first, last)

    main_run = runs[MAIN]
    layouts = {name: runs[f"ensemble_{name}"] for name in ("single", "composed")}
    faster = max(layouts, key=lambda n: layouts[n]["load"]["throughput_img_s"])
    memory = main_run["load"]["memory"]
    first_peak, last_peak = memory["window_peaks_mb"][0], memory["window_peaks_mb"][-1]
    checks = {
        "zero_errors": main_run["load"]["errors"] == 0,
        f"memory flat: the servers' summed peak RSS in the last sixth of the run is within 3% of the first "
        f"(first {first_peak} MB, last {last_peak} MB, each sixth {memory['window_peaks_mb']})": bool(
            last_peak <= 1.03 * first_peak
        ),
    }
    # Each deployment is judged on both figures at once: one that a user can run and that meets both.
    deployments = {}
    for mode, keys in (("ensemble", (MAIN, f"ensemble_{DEFAULT_LAYOUT}")),
                       ("best", ("best", f"best{TWO_THREADS}", f"best{TWO_THREADS}{ONE_LANE}"))):  # fmt: skip
        for key in keys:
            run = runs[key]
            ratio = run["load"]["throughput_img_s"] / baseline[mode]["best"]["throughput_img_s"]
            p50 = run["single_request"]["p50_ms"]
            gap = p50 - baseline[mode]["best"]["forward_ms_batch1"]
            same = p50 - baseline[mode][f"threads_{run['threads_per_replica']}"]["forward_ms_batch1"]
            whole = p50 - baseline[mode]["best"]["predict_one_file_ms"]  # decoding included on both sides
            # Both sides after the same pause: what Serve adds to a lone request that finds the machine idle.
            spaced = run["single_request"]["spaced_p50_ms"] - baseline[mode]["best"]["forward_ms_batch1_spaced"]
            spaced_whole = run["single_request"]["spaced_p50_ms"] - baseline[mode]["best"]["predict_one_file_spaced_ms"]
            lanes = run["forward_lanes"] or run["threads_per_replica"]
            deployments[key] = {"replicas": run["replicas"], "threads_per_replica": run["threads_per_replica"],
                                "forward_lanes": lanes,
                                "throughput_ratio": round(ratio, 3), "single_request_p50_ms": p50,
                                "over_fastest_forward_ms": round(gap, 2),
                                "over_same_threads_forward_ms": round(same, 2),
                                "over_in_process_decode_and_forward_ms": round(whole, 2),
                                "spaced_single_request_p50_ms": run["single_request"]["spaced_p50_ms"],
                                "spaced_over_in_process_spaced_forward_ms": round(spaced, 2),
                                "spaced_over_in_process_spaced_decode_and_forward_ms": round(spaced_whole, 2)}  # fmt: skip
            where = f"{mode}, {run['replicas']} replica(s) x {run['threads_per_replica']} thread(s) x {lanes} lane(s)"
            checks[f"{where}: serve / in-process throughput >= 0.8 (got {ratio:.2f}) and single-request p50 - "
                   f"fastest in-process forward <= 10 ms (got {gap:.1f} ms; {same:.1f} ms over the forward with "
                   f"the replica's threads, {whole:.1f} ms over in-process decode + forward of one file; after a "
                   f"{LONE_PAUSE_S * 1000:.0f} ms pause on both sides, {spaced:.1f} ms over the in-process forward)"] = bool(
                ratio >= 0.8 and gap <= 10.0
            )  # fmt: skip
    figures = {
        "benchmark": "serve",
        "started": began,
        "wall_s": round(time.monotonic() - t0, 1),
        "smoke_test": opts.smoke_test,
        "machine": f"{os.cpu_count()} CPUs, no GPU; 1-minute load average {load_at_start:.2f} at start, "
                   f"{os.getloadavg()[0]:.2f} at the end (other work on the machine skews every figure)",
        "setup": {"clients": CLIENTS, "max_batch_size": BATCH, "batch_wait_timeout_s": "AppArgs default",
                  "images": len(files), "artifact": "mobilenetv2_100@160 + tf_efficientnet_lite0@224",
                  "replicas": "single layout: 2 replicas x 1 CPU x 1 torch thread, or (runs named *_1x2) 1 replica "
                              "x 2 CPUs x 2 threads in 2 forward lanes (*_one_lane: 1 lane); composed: 1 per member",
                  "main_run": f"{MAIN}: {main_s:.0f} s of load", "warm_up_s": {"main": warm_main_s, "others": warm_side_s},
                  "allocator": "MALLOC_ENV; in this process (the in-process reference) and the replicas one arena "
                               "per allocating thread, in Ray's other processes one",
                  "requests": "raw image/jpeg bodies over keep-alive connections",
                  "lone_requests": f"http.client, one keep-alive connection; also with a {LONE_PAUSE_S} s pause "
                                   "before each, as the in-process *_spaced figures",
                  "ingress": "Serve's Python proxy (the default) unless a run says otherwise"},  # fmt: skip
        "in_process": baseline,
        "in_process_runs": {"before_serve": first, "after_serve": last},
        "serve": runs,
        "ensemble_layouts": {
            "faster": faster,
            "default": DEFAULT_LAYOUT,
            "throughput_img_s": {n: r["load"]["throughput_img_s"] for n, r in layouts.items()},
            "p50_ms_under_load": {n: r["load"]["p50_ms"] for n, r in layouts.items()},
            "single_request_p50_ms": {n: r["single_request"]["p50_ms"] for n, r in layouts.items()},
        },
        "ingress_haproxy_vs_python_proxy": {
            key: {"ingress": runs[key]["ingress"], "throughput_img_s": runs[key]["load"]["throughput_img_s"],
                  "single_request_p50_ms": runs[key]["single_request"]["p50_ms"]}
            for key in ("best_haproxy", "best")
        },  # fmt: skip
        "best_vs_ensemble": {
            key: {"throughput_img_s": runs[key]["load"]["throughput_img_s"], "p50_ms": runs[key]["load"]["p50_ms"],
                  "p99_ms": runs[key]["load"]["p99_ms"], "single_request_p50_ms": runs[key]["single_request"]["p50_ms"]}
            for key in (f"best{TWO_THREADS}", MAIN)
        },  # fmt: skip
        "deployments": deployments,
        "checks": checks,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("serve_smoke.json" if opts.smoke_test else "serve.json")
    out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(figures["checks"], indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
