"""Run directories on shared storage (automl_tl.runs.storage): a real sweep into S3 on a local moto server.

The S3 server is moto, started on 127.0.0.1 by the fixture and stopped by its pid; pyarrow reaches it
through ``AWS_ENDPOINT_URL``. The sweep runs as ``automl-tl search --out s3://...`` in a subprocess so its
embedded Ray (and every trial) sees the same environment a cluster node would.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from automl_tl.errors import ArtifactError, SearchError
from automl_tl.runs.rundir import RunDir
from automl_tl.runs.storage import (
    atomic_path,
    discard_staging,
    download,
    fetch_once,
    is_uri,
    join,
    local_mirror,
    share_file,
    trial_output,
    upload,
    write_atomic,
    write_atomic_fs,
)
from tests.scenarios._common import (
    VENV_BIN,
    create_bucket,
    free_port,
    moto_server,
    ray_env,
    stop_process_group,
    tiny_config,
    write_config,
)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[dict[str, str]]:
    with moto_server() as env:
        yield env


@pytest.fixture()
def bucket(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; this process's pyarrow reaches the server through the AWS_* variables."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    name = f"automl-tl-{uuid.uuid4().hex[:10]}"
    create_bucket(s3_server["AWS_ENDPOINT_URL"], name)
    return f"s3://{name}"


def _s3_files(uri: str) -> dict[str, int]:
    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {i.path[len(root) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}


def test_uris_and_local_paths() -> None:
    assert is_uri("s3://bucket/run") and is_uri("gs://b/x")
    assert not is_uri("/tmp/run") and not is_uri("runs/x") and not is_uri("file:///tmp/run")
    assert join("s3://b/run/", "trials", "t1/") == "s3://b/run/trials/t1"
    assert local_mirror("s3://b/run") == local_mirror("s3://b/run/") != local_mirror("s3://b/other/run")


def test_atomic_writes_leave_the_old_file_or_the_new_one(bucket: str, tmp_path: Path) -> None:
    target = tmp_path / "deep" / "summary.json"
    write_atomic(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'
    with pytest.raises(RuntimeError), atomic_path(target) as partial:
        partial.write_text('{"a": 2, "half')
        raise RuntimeError("killed midway")
    assert target.read_text() == '{"a": 1}' and sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]
    with atomic_path(tmp_path / "features.npz") as partial:
        assert partial.suffix == ".npz" and partial.parent == tmp_path  # np.savez keeps the name as given
        partial.write_bytes(b"x")
    assert (tmp_path / "features.npz").read_bytes() == b"x"
    write_atomic(join(bucket, "run", "summary.json"), b"{}")
    write_atomic(join(bucket, "run", "summary.json"), b'{"b": 2}')
    assert _s3_files(bucket) == {"run/summary.json": 8}
    fs, path = pafs.FileSystem.from_uri(str(tmp_path / "state.json"))
    write_atomic_fs(fs, path, b"[]")  # a filesystem without whole-object writes: a partial file, then a move
    assert (tmp_path / "state.json").read_bytes() == b"[]" and not list(tmp_path.glob("*.partial"))


def test_upload_download_and_fetch_once(bucket: str, tmp_path: Path) -> None:
    folder = tmp_path / "src"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.bin").write_bytes(b"\0" * 1000)
    upload(folder, join(bucket, "tree"))
    assert _s3_files(bucket) == {"tree/a.txt": 1, "tree/sub/b.bin": 1000}
    assert download(join(bucket, "tree"), tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "b.bin").read_bytes() == b"\0" * 1000
    assert not download(join(bucket, "nothing"), tmp_path / "none")
    # A second download of the folder fetches only what is missing, resized or older than the remote copy.
    copy = tmp_path / "copy"
    (copy / "sub" / "b.bin").write_bytes(b"\1" * 1000)  # same size, newer: taken as current, so left alone
    (copy / "a.txt").write_text("b")
    os.utime(copy / "a.txt", (0, 0))  # same size, older than the remote copy
    assert download(join(bucket, "tree"), copy)
    assert (copy / "sub" / "b.bin").read_bytes() == b"\1" * 1000 and (copy / "a.txt").read_text() == "a"
    (copy / "sub" / "b.bin").write_bytes(b"\1" * 10)  # another size
    assert download(join(bucket, "tree"), copy)
    assert (copy / "sub" / "b.bin").read_bytes() == b"\0" * 1000

    blob = tmp_path / "key123.arrow"
    blob.write_bytes(b"x" * 5000)
    share_file(blob, join(bucket, "data", blob.name))
    share_file(blob, join(bucket, "data", blob.name))  # same size already there: no second upload
    node = tmp_path / "node_cache" / blob.name
    assert fetch_once(join(bucket, "data", blob.name), node).read_bytes() == blob.read_bytes()
    with pytest.raises(SearchError, match="was not uploaded"):
        fetch_once(join(bucket, "data", "missing.arrow"), tmp_path / "node_cache" / "missing.arrow")


def test_trial_output_stages_and_publishes(bucket: str, tmp_path: Path) -> None:
    local, publish = trial_output(str(tmp_path / "run"), "t1")
    assert local == tmp_path / "run" / "trials" / "t1"
    publish()  # a local run directory is written in place: nothing to do
    run = f"{bucket}/run-2"
    staging, publish = trial_output(run, "t1")
    assert staging.is_dir() and not str(staging).startswith(str(tmp_path))  # node-local, not the run directory
    (staging / "trial.json").write_text("{}")
    publish()
    assert _s3_files(run) == {"trials/t1/trial.json": 2}
    discard_staging(run, staging)
    assert not staging.exists()
    discard_staging(str(tmp_path / "run"), tmp_path)  # never removes anything of a local run directory
    assert tmp_path.is_dir()


def test_remote_run_dir_mirrors_and_pushes(bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOML_TL_RUNS_DIR", str(tmp_path / "mirrors"))
    run = RunDir.open(f"{bucket}/run-1")
    assert run.remote == f"{bucket}/run-1" and run.location == run.remote
    assert run.path.parent == tmp_path / "mirrors"
    run.prepare()
    run.write_json("data.json", {"x": 1})
    run.push("data.json", "not-there.json")
    assert run.remote_exists("data.json") and not run.remote_exists("tune")
    other = RunDir(tmp_path / "elsewhere", remote=f"{bucket}/run-1")
    other.pull("data.json")
    assert other.read_json("data.json") == {"x": 1}
    local = RunDir.open(tmp_path / "local-run")
    assert local.remote is None and local.location == str((tmp_path / "local-run").resolve())


def test_local_run_dir_on_a_multi_node_cluster_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from automl_tl.sweep.driver import check_storage

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    with pytest.raises(SearchError, match=r"local path, but the Ray cluster has 2 nodes.*s3://.*--shared-fs"):
        check_storage(RunDir(tmp_path), shared_fs=False)
    check_storage(RunDir(tmp_path), shared_fs=True)  # the user says every node mounts it
    check_storage(RunDir(tmp_path, remote="s3://b/run"), shared_fs=False)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    check_storage(RunDir(tmp_path), shared_fs=False)  # one node: a local path is fine


# A caller of the Python API: a search into S3, then what it left behind in this process and in the bucket.
_API_SEARCH = r"""
import json, os, sys
before = dict(os.environ)  # before anything of automl_tl, Ray or torch is loaded
import automl_tl

config, data, uri, image, test = sys.argv[1:6]
result = automl_tl.search(data, uri, config=config, test=test)
changed = sorted(k for k in before.keys() | os.environ.keys() if before.get(k) != os.environ.get(k))
prediction = result.predictor().predict([image], top_k=1)[0]

from automl_tl.sweep.driver import ray_for_search
from automl_tl.train.memory import MALLOC_ENV

with ray_for_search():  # the processes Ray starts get the settings this process does not
    import ray
    workers = ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in MALLOC_ENV}).remote())
    assert not any(k in os.environ for k in MALLOC_ENV)
print(json.dumps({
    "changed": changed, "workers": workers, "run_dir": result.run_dir, "artifact": result.artifact,
    "report": result.report, "ranks": [row.rank for row in result.leaderboard], "best": result.best.trial_id,
    "label": prediction.label,
}))
"""


@pytest.fixture(scope="module")
def s3_run(s3_server: dict[str, str], hymenoptera_dir: Path, data_cache_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real sweep into a fresh bucket, by a caller of the Python API in a process of its own: the tests
    below check what it left in the bucket, in the caller's process and on a "node"'s cache, and serve it."""
    tmp_path = tmp_path_factory.mktemp("s3run")
    name = f"automl-tl-{uuid.uuid4().hex[:10]}"
    create_bucket(s3_server["AWS_ENDPOINT_URL"], name)
    uri = f"s3://{name}/runs/ants-bees"
    node_cache = tmp_path / "node_cache"  # what a worker node's $AUTOML_TL_CACHE_DIR would be
    config = write_config(tmp_path / "config.yaml", tiny_config(hymenoptera_dir / "train", data_cache_dir))
    env = ray_env(**s3_server, AUTOML_TL_CACHE_DIR=str(node_cache), AUTOML_TL_RUNS_DIR=str(tmp_path / "mirrors"))
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    cwd = tmp_path / "caller"
    cwd.mkdir()
    image = sorted((hymenoptera_dir / "val" / "bees").glob("*.jpg"))[0]
    proc = subprocess.Popen([str(VENV_BIN / "python"), "-c", _API_SEARCH, str(config), str(hymenoptera_dir / "train"),
                             uri, str(image), str(hymenoptera_dir / "val")], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=420)
    finally:
        stop_process_group(proc, grace_s=5)  # the caller and the embedded Ray it started, whatever happened
    assert proc.returncode == 0, output[-4000:]
    answer = json.loads(output.strip().splitlines()[-1])
    return {"uri": uri, "answer": answer, "env": env, "cwd": cwd, "node_cache": node_cache, "tmp": tmp_path}


@pytest.mark.slow
def test_sweep_into_s3_and_load_the_artifact_back(
    s3_run: dict[str, Any], s3_server: dict[str, str], hymenoptera_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    uri, env, node_cache, tmp_path = s3_run["uri"], s3_run["env"], s3_run["node_cache"], s3_run["tmp"]
    files = _s3_files(uri)
    for name in ("config.yaml", "data.json", "leaderboard.csv", "summary.json", "artifact/manifest.json"):
        assert name in files, f"{name} missing from {uri}: {sorted(files)}"
    assert any(n.startswith("tune/experiment_state") for n in files)  # Tune wrote its experiment to S3 itself
    assert any(n.startswith("tune/") and "/checkpoint_" in n for n in files)

    # The data went to the run's shared storage once and each "node" fetched it by its content key.
    data_info = json.loads(_read(uri, "data.json"))
    shared = f"data/{data_info['data_id']}.arrow"
    assert data_info["shared_cache"] == f"{uri}/{shared}"
    assert files[shared] == Path(data_info["cache_path"]).stat().st_size
    node_copy = node_cache / f"{data_info['data_id']}.arrow"
    assert node_copy.is_file() and node_copy.stat().st_size == files[shared]
    assert node_copy.resolve() != Path(data_info["cache_path"]).resolve()

    rows = list(csv.DictReader(io.StringIO(_read(uri, "leaderboard.csv"))))
    assert len(rows) == 2 and all(r["has_model"] == "True" for r in rows)
    for row in rows:  # every trial uploaded its best epoch from its node's staging folder
        assert {"model.safetensors", "val_probs.npy", "trial.json"} <= {
            n.rsplit("/", 1)[-1] for n in files if n.startswith(f"trials/{row['trial_id']}/")
        }

    from automl_tl.inference.artifact import load_artifact
    from automl_tl.inference.predictor import Predictor

    predictor = Predictor.load(f"{uri}/artifact")
    assert predictor.class_names == ("ants", "bees")
    images = sorted((hymenoptera_dir / "val" / "ants").glob("*.jpg"))[:6] + sorted(
        (hymenoptera_dir / "val" / "bees").glob("*.jpg")
    )[:6]
    predicted = [p.label for p in predictor.predict(images, top_k=1)]
    truth = ["ants"] * 6 + ["bees"] * 6
    assert sum(p == t for p, t in zip(predicted, truth)) >= 8
    summary = json.loads(_read(uri, "summary.json"))
    assert summary["artifact"] == f"{uri}/artifact" and summary["ensemble"]["test"]["n"] == 153
    assert load_artifact(uri).members  # the run directory's URI finds artifact/ too
    from automl_tl.cli import main as cli
    from automl_tl.runs.storage import main as storage_cli

    assert cli(["predict", f"{uri}/artifact", str(images[0]), "--top-k", "1"]) == 0
    assert storage_cli(["fetch", f"{uri}/artifact", str(tmp_path / "fetched")]) == 0  # what an init container runs

    # `automl-tl serve s3://...`: every replica reads the artifact from the bucket.
    port, log = free_port(), tmp_path / "serve.log"
    with log.open("w") as sink:
        server = subprocess.Popen([str(VENV_BIN / "automl-tl"), "serve", uri, "--mode", "best", "--port", str(port)],
                                  env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            answer = _predict_when_ready(f"http://127.0.0.1:{port}", images[0], server, log, deadline_s=180)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/stats", timeout=30) as reply:
                lanes = json.loads(reply.read())["ingress"]["lanes"]
        finally:
            stop_process_group(server, grace_s=10)
    assert answer["mode"] == "best" and answer["predictions"][0]["labels"][0] == predicted[0]
    # The embedded Ray's one replica took every CPU Ray counts here: one forward lane per core.
    from ray._private.utils import get_num_cpus

    assert lanes == get_num_cpus()
    assert load_artifact(tmp_path / "fetched").members[0].sha256 == predictor.artifact.members[0].sha256
    assert storage_cli(["fetch", f"{uri}/no-such-artifact", str(tmp_path / "none")]) == 2

    member = load_artifact(f"{uri}/artifact").members[0]
    fs, root = pafs.FileSystem.from_uri(f"{uri}/artifact/{member.weight_file}")
    with fs.open_output_stream(root) as fh:
        fh.write(b"tampered")
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_artifact(f"{uri}/artifact")


@pytest.mark.slow
def test_api_search_into_s3_writes_the_bucket_and_leaves_the_process_as_it_was(
    s3_run: dict[str, Any], s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from automl_tl.train.memory import MALLOC_ENV

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    uri, answer = s3_run["uri"], s3_run["answer"]
    assert answer["changed"] == []  # no variable set, changed or left behind in the caller's environment
    assert answer["workers"] == MALLOC_ENV  # while Ray's workers started with the allocator settings
    assert list(s3_run["cwd"].iterdir()) == []  # no local "s3:" folder
    assert answer["run_dir"] == uri and answer["artifact"] == f"{uri}/artifact"
    assert answer["report"] == f"{uri}/report.html" and answer["ranks"] == [1, 2]
    files = _s3_files(uri)
    for name in ("config.yaml", "data.json", "leaderboard.csv", "summary.json", "artifact/manifest.json", "report.html"):
        assert name in files, f"{name} missing from {uri}: {sorted(files)}"
    summary = json.loads(_read(uri, "summary.json"))
    assert summary["artifact"] == f"{uri}/artifact" and summary["best"]["trial_id"] == answer["best"]
    assert answer["label"] in {"ants", "bees"}


def _read(uri: str, name: str) -> Any:
    fs, path = pafs.FileSystem.from_uri(join(uri, name))
    with fs.open_input_stream(path) as fh:
        return fh.read().decode("utf-8")


def _predict_when_ready(url: str, image: Path, server: subprocess.Popen[bytes], log: Path, deadline_s: float) -> Any:
    """POST one raw image once /v1/healthz answers 200; fail with the server's output if it never does."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/v1/healthz", timeout=5) as reply:
                if reply.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1.0)
    else:
        raise AssertionError(f"the server did not become ready: {log.read_text(errors='replace')[-3000:]}")
    request = urllib.request.Request(f"{url}/v1/predict?top_k=1", data=image.read_bytes(),
                                     headers={"Content-Type": "image/jpeg"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())
