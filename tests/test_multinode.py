"""A simulated multi-node cluster (ray.cluster_utils.Cluster: a head and two workers on this machine).

The scenario needs a cluster of its own, so it runs once in a subprocess (``tests/scenarios/multinode.py``)
and writes what it measured to JSON; each test below checks one promise against that record. The
subprocess shuts its cluster down in a ``finally``; the fixture then kills by pid any process left that
names the cluster's unique temp dir, and its process group.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.scenarios._common import REPO_ROOT, kill_stragglers, ray_env, stop_process_group

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def record(hymenoptera_dir: Path, data_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("multinode")
    result = work / "result.json"
    cmd = [sys.executable, str(REPO_ROOT / "tests" / "scenarios" / "multinode.py"), "--data",
           str(hymenoptera_dir / "train"), "--cache", str(data_cache_dir), "--work", str(work), "--result", str(result)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=540)
    finally:
        stop_process_group(proc, grace_s=5)
        if result.is_file():
            kill_stragglers(json.loads(result.read_text()).get("temp_dir") or "/nonexistent-marker", wait_s=5)
    assert result.is_file(), f"the scenario wrote no result (exit {proc.returncode}):\n{(output or '')[-4000:]}"
    data: dict[str, Any] = json.loads(result.read_text())
    assert not data.get("error"), data["error"]
    print(json.dumps({k: data.get(k) for k in ("sweep_wall_s", "node_loss", "leaderboard", "serve", "stream")}, indent=1))
    return data


def test_the_cluster_stays_on_loopback(record: dict[str, Any]) -> None:
    assert record["node_ips"] == ["127.0.0.1"] and len(record["nodes"]) == 3


def test_a_local_run_dir_is_refused_on_several_nodes(record: dict[str, Any]) -> None:
    message = record["local_path_refused"]
    assert message and "is a local path, but the Ray cluster has 3 nodes" in message
    assert "s3://" in message and "--shared-fs" in message


def test_trials_are_spread_over_the_nodes(record: dict[str, Any]) -> None:
    per_node = Counter(node for nodes in record["trial_nodes"].values() for node in set(nodes))
    assert set(per_node) == set(record["nodes"].values()), per_node  # head and both workers trained


def test_losing_a_node_mid_sweep_loses_no_trial(record: dict[str, Any]) -> None:
    loss = record["node_loss"]
    assert loss and loss["trials_on_victim"], "no trial was running on a worker node when it was removed"
    rows = {r["trial_id"]: r for r in record["leaderboard"]}
    assert len(rows) == 5
    assert all(r["has_model"] and r["stop_reason"].startswith("max_epochs") for r in rows.values()), rows
    for trial, epoch in loss["epoch_at_kill"].items():
        reason = rows[trial]["stop_reason"]
        assert "resumed from epoch" in reason, reason  # retried from its checkpoint, and the leaderboard says so
        assert int(reason.rsplit("resumed from epoch ", 1)[1].split()[0]) >= epoch
        nodes = record["trial_nodes"][trial]
        assert nodes[0] == loss["victim"] and nodes[-1] != loss["victim"]
    untouched = [r for t, r in rows.items() if t not in loss["epoch_at_kill"]]
    assert all("resumed" not in r["stop_reason"] for r in untouched)
    # Trials completed before the loss keep their files: not retrained, not lost.
    assert loss["finished_before_kill"] and record["model_mtimes_after"] == loss["finished_before_kill"]


def test_serve_keeps_answering_while_a_replica_is_killed(record: dict[str, Any]) -> None:
    serve = record["serve"]
    assert len(set(record["replica_nodes"])) == 2  # the two replicas sit on different nodes
    between = serve["kill_between_requests"]
    assert between["failed"] == 0, between  # the router retries a dead replica before it accepts a request
    racing = serve["racing_kill"]
    assert racing["failed"] <= 1, racing  # at most the one request in flight on the killed replica
    assert racing["replacement_s"] >= 0 and between["replacement_s"] >= 0 and serve["replicas_alive_after"] == 2


def test_a_stream_mode_sweep_from_s3_keeps_the_set_off_every_node_disk(record: dict[str, Any]) -> None:
    stream = record["stream"]
    assert not stream.get("error"), stream["error"]
    rows = stream["leaderboard"]
    assert len(rows) == 2 and all(r["has_model"] and not r["stop_reason"].startswith("error") for r in rows), rows
    assert all(r["freeze_depth"] == 6 and r["feature_cache"] == "unused" for r in rows)  # images, streamed
    assert max(float(r["best_val_accuracy"]) for r in rows) > 0.5  # one epoch on images: better than chance
    assert stream["shard_files"] >= 1 and stream["shard_bytes"] > 0
    assert len(stream["node_shard_bytes"]) == 3
    assert all(held < stream["shard_bytes"] for held in stream["node_shard_bytes"].values()), stream
