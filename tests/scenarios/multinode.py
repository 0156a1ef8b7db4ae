"""A simulated three-node Ray cluster on this machine: node loss mid-sweep, then a replica killed under load.

    .venv/bin/python tests/scenarios/multinode.py --data DIR --cache DIR --work DIR --result result.json

Run by ``tests/test_multinode.py`` in a subprocess (one Ray per process). It starts a head and two worker
nodes with ``ray.cluster_utils.Cluster`` (one CPU each, token auth on, everything on 127.0.0.1), then:

1. asks for a sweep into a local run directory without ``shared_fs``: refused (several nodes);
2. runs a sweep with ``shared_fs=True`` (the nodes share this machine's disk) and, once a trial has finished
   and a trial on a worker node has stored a checkpoint but not finished, removes that worker node;
3. builds the artifact and serves it with 2 replicas; a client sends bounded loops of sequential requests
   while one replica's actor is killed, once racing a request in flight and once between two requests,
   and counts the failed requests of each;
4. runs a short stream-mode sweep (``data.mode: stream``) with the data set and the run directory in a moto S3
   bucket, on three live nodes, and records the shards' bytes per node's disk.

Everything measured goes to the ``--result`` JSON; the test asserts on it. The cluster is shut down in a
``finally`` whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.scenarios._common import free_port, tiny_config  # noqa: E402

MAX_EPOCHS = 4


def _trial_results(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every result line Tune has logged so far, per trial id."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in (run_dir / "tune").glob("*/result.json"):
        lines = []
        for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                continue  # a line being written right now
        if lines:
            out[str(lines[0]["trial_id"])] = lines
    return out


class NodeKiller(threading.Thread):
    """Removes a worker node once a trial has finished somewhere and a trial on that node is mid-way.

    Mid-way means it has reported an epoch and has two or more to go, so its checkpoint is in storage and its
    loss must show as a resume; a finished trial beforehand lets the test check that no completed trial is
    lost. With 5 trials on 3 one-CPU nodes, the trials that start after the first two finish include one
    on a worker node, so such a moment comes.
    """

    def __init__(self, cluster: Any, candidates: list[Any], run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.cluster, self.candidates, self.run_dir = cluster, candidates, run_dir
        self.info: dict[str, Any] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        by_id = {node.node_id: node for node in self.candidates}
        while not self.stop.is_set():
            results = _trial_results(self.run_dir)
            finished = [t for t, lines in results.items() if lines[-1].get("stop_reason")]
            # At least two epochs to go: Tune may already hold a newer result than result.json shows, and a
            # trial that is really finishing would not show the node loss.
            running = {t: lines[-1] for t, lines in results.items()
                       if lines[-1].get("node_id") in by_id and lines[-1].get("epoch", 0) <= MAX_EPOCHS - 2}  # fmt: skip
            if finished and running:
                trial, last = sorted(running.items())[0]
                victim = by_id[last["node_id"]]
                on_victim = sorted(t for t, line in running.items() if line["node_id"] == victim.node_id)
                mtimes = {t: (self.run_dir / "trials" / t / "model.safetensors").stat().st_mtime_ns for t in finished}
                started = time.time()
                self.cluster.remove_node(victim, allow_graceful=False)
                self.info = {"victim": victim.node_id, "trials_on_victim": on_victim,
                             "epoch_at_kill": {t: running[t]["epoch"] for t in on_victim},
                             "finished_before_kill": mtimes, "remove_s": round(time.time() - started, 2)}  # fmt: skip
                return
            time.sleep(0.1)


def sweep_with_node_loss(cluster: Any, workers: list[Any], args: argparse.Namespace, result: dict[str, Any]) -> Path:
    from automl_tl.config import load_config
    from automl_tl.errors import SearchError
    from automl_tl.sweep.driver import run_search

    raw = tiny_config(Path(args.data), Path(args.cache), trials=5, freeze_depths=[6], augmentations=["light"],
                      max_epochs=MAX_EPOCHS)  # fmt: skip
    raw["search"].update(max_concurrent_trials=3, seed=1)
    config = load_config(raw)
    work = Path(args.work)
    try:
        run_search(config, work / "refused", progress=False)
        result["local_path_refused"] = None
    except SearchError as exc:
        result["local_path_refused"] = str(exc)

    run_dir = work / "run"
    killer = NodeKiller(cluster, workers, run_dir)
    killer.start()
    started = time.time()
    try:
        outcome = run_search(config, run_dir, progress=False, shared_fs=True)
    finally:
        killer.stop.set()
        killer.join(timeout=60)
    result["sweep_wall_s"] = round(time.time() - started, 1)
    result["node_loss"] = killer.info
    per_trial = _trial_results(run_dir)
    result["trial_nodes"] = {t: [line.get("node_id") for line in lines] for t, lines in per_trial.items()}
    result["epoch_s"] = sorted(round(float(line.get("epoch_s", 0)), 2) for lines in per_trial.values() for line in lines)
    result["leaderboard"] = [
        {k: r.get(k) for k in ("trial_id", "stop_reason", "epochs_run", "has_model", "best_val_accuracy")}
        for r in outcome.rows
    ]
    result["model_mtimes_after"] = {
        t: (run_dir / "trials" / t / "model.safetensors").stat().st_mtime_ns
        for t in killer.info.get("finished_before_kill", {})
    }
    return run_dir


def _replicas(address: str) -> list[Any]:
    from ray.util.state import list_actors

    alive = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
    return [a for a in alive if "ServeReplica" in (a.class_name or "") and "Classifier" in (a.class_name or "")]


def _kill(actor: Any) -> None:
    import ray

    ray.kill(ray.get_actor(actor.name, namespace="serve"), no_restart=True)


def _client_loop(url: str, image: bytes, n: int, kill_at: int, kill: Any) -> dict[str, Any]:
    """``n`` sequential requests (each with a timeout); ``kill()`` runs before request ``kill_at``."""
    import requests

    statuses: list[int | str] = []
    latencies: list[float] = []
    for i in range(n):
        if i == kill_at:
            kill()
        start = time.perf_counter()
        try:
            reply = requests.post(f"{url}/v1/predict", data=image, headers={"content-type": "image/jpeg"},
                                  timeout=30)  # fmt: skip
            statuses.append(reply.status_code)
        except requests.RequestException as exc:
            statuses.append(type(exc).__name__)
        latencies.append(time.perf_counter() - start)
    return {"requests": n, "failed": sum(1 for s in statuses if s != 200),
            "statuses": {str(s): statuses.count(s) for s in set(statuses)},
            "p50_ms": round(1000 * sorted(latencies)[n // 2], 1), "max_ms": round(1000 * max(latencies), 1)}  # fmt: skip


def _wait_for_replicas(address: str, count: int, timeout_s: float = 60) -> float:
    started = time.time()
    while time.time() - started < timeout_s:
        if len(_replicas(address)) >= count:
            return round(time.time() - started, 1)
        time.sleep(0.25)
    return -1.0


def serve_with_replica_kill(run_dir: Path, address: str, args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Two replicas; one is killed twice over: racing an in-flight request, then between two requests."""
    from automl_tl.evaluate.results import build_results
    from automl_tl.serve import start_server, stop_server

    build_results(run_dir)
    url = start_server(run_dir, mode="best", host="127.0.0.1", port=free_port(), replicas=2, cpus_per_replica=0.5)
    try:
        replicas = _replicas(address)
        result["replica_nodes"] = sorted(a.node_id for a in replicas)
        image = sorted((Path(args.data).parent / "val" / "bees").glob("*.jpg"))[0].read_bytes()
        n = args.requests

        def racing_kill() -> None:  # from another thread, a few ms into the next request: like a crash
            victim = _replicas(address)[0]
            threading.Thread(target=lambda: (time.sleep(0.01), _kill(victim)), daemon=True).start()

        racing = _client_loop(url, image, n, n // 4, racing_kill)
        racing["replacement_s"] = _wait_for_replicas(address, 2)
        def kill_and_wait() -> None:  # a replica that died while idle: the next request comes after its death
            victim = _replicas(address)[0]
            _kill(victim)  # ray.kill only asks; the actor may still take a request for a few ms
            deadline = time.time() + 30
            while time.time() < deadline and any(a.actor_id == victim.actor_id for a in _replicas(address)):
                time.sleep(0.05)

        between = _client_loop(url, image, n, n // 4, kill_and_wait)
        between["replacement_s"] = _wait_for_replicas(address, 2)
        result["serve"] = {"racing_kill": racing, "kill_between_requests": between,
                           "replicas_alive_after": len(_replicas(address))}  # fmt: skip
    finally:
        stop_server()


# --- stream mode: the set in a moto S3 bucket, shards streamed by every node -------------------------------


def _parquet_bytes(folders: list[str]) -> int:
    return sum(p.stat().st_size for f in folders if Path(f).is_dir() for p in Path(f).rglob("*.parquet") if p.is_file())


def stream_sweep_from_s3(cluster: Any, args: argparse.Namespace, result: dict[str, Any]) -> None:
    """A short stream-mode sweep whose data and run directory are in a moto bucket, on three live nodes; records
    the leaderboard, the shards' bytes in the bucket and the shard bytes each node's disk holds."""
    import pyarrow.fs as pafs
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from automl_tl.config import load_config
    from automl_tl.runs.storage import node_cache_dir
    from automl_tl.sweep.driver import run_search
    from tests.scenarios._common import create_bucket, moto_server

    while len([n for n in ray.nodes() if n.get("Alive")]) < 3:  # the node-loss phase removed one
        cluster.add_node(num_cpus=1, temp_dir=result["temp_dir"], object_store_memory=200 * 1024 * 1024)
        cluster.wait_for_nodes()
    with moto_server() as env:
        create_bucket(env["AWS_ENDPOINT_URL"], "stream")
        os.environ.update(env)
        s3 = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], scheme="http", region="us-east-1",
                               access_key="testing", secret_key="testing")  # fmt: skip
        pafs.copy_files(args.data, "stream/hymenoptera", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
        ray.shutdown()  # a job whose workers reach the bucket
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
        # freeze depth 6: every trial trains on images, streamed from the bucket on its own node
        raw = tiny_config(Path(args.data), Path(args.cache), trials=2, freeze_depths=[6])
        raw["data"].update(source="s3://stream/hymenoptera", mode="stream")
        raw["search"].update(max_concurrent_trials=2, seed=1)
        started = time.time()
        outcome = run_search(load_config(raw), "s3://stream/run", progress=False)
        shards = [i for i in s3.get_file_info(pafs.FileSelector("stream/run/data/shards", recursive=True))
                  if i.type == pafs.FileType.File]  # fmt: skip
        folders = [args.cache, str(node_cache_dir()), result["temp_dir"]]
        probe = ray.remote(num_cpus=0)(_parquet_bytes)
        per_node = {
            n["NodeID"]: ray.get(probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(folders))
            for n in ray.nodes() if n.get("Alive")
        }  # fmt: skip
        result["stream"] = {
            "wall_s": round(time.time() - started, 1),
            "shard_files": len(shards),
            "shard_bytes": sum(i.size for i in shards),
            "node_shard_bytes": per_node,
            "leaderboard": [{k: r.get(k) for k in ("trial_id", "stop_reason", "has_model", "best_val_accuracy",
                                                   "freeze_depth", "feature_cache")} for r in outcome.rows],  # fmt: skip
        }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="hymenoptera/train")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--requests", type=int, default=60, help="requests per kill")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="atl-mn-", dir="/tmp")  # short: Ray's socket paths must fit
    result: dict[str, Any] = {"temp_dir": temp_dir}
    node = {"num_cpus": 1, "temp_dir": temp_dir, "object_store_memory": 200 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": True,
                      "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})  # fmt: skip
    try:
        workers = [cluster.add_node(**node) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        result["nodes"] = {"head": cluster.head_node.node_id, "worker1": workers[0].node_id,
                           "worker2": workers[1].node_id}  # fmt: skip
        result["node_ips"] = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
        run_dir = sweep_with_node_loss(cluster, workers, args, result)
        serve_with_replica_kill(run_dir, cluster.address, args, result)
        try:  # its own record: a failure here fails only its own test
            stream_sweep_from_s3(cluster, args, result)
        except Exception:  # noqa: BLE001
            result["stream"] = {"error": traceback.format_exc()}
    except Exception:  # noqa: BLE001 - reported to the test through the result file
        result["error"] = traceback.format_exc()
    finally:
        Path(args.result).write_text(json.dumps(result, indent=2), encoding="utf-8")
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
