"""``ray job submit`` against a real local cluster: token auth on, the project's venv, stopped by its handle.

The head runs as ``ray start --head --block`` in its own process group, from this venv (so its workers and
the job's entrypoint use this venv's Python), bound to 127.0.0.1 on free ports, with a unique temp dir; the
fixture stops that group and then any process whose command line names the temp dir, whatever happens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.scenarios._common import (
    REPO_ROOT,
    VENV_BIN,
    free_port,
    kill_stragglers,
    ray_env,
    stop_process_group,
)

pytestmark = pytest.mark.slow

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# The job's working dir is this checkout; the venv (GBs) and build litter never travel.
RUNTIME_ENV = {"excludes": [".venv", ".git", "runs", ".mypy_cache", ".pytest_cache", "**/__pycache__"]}


@dataclass(frozen=True)
class Head:
    address: str  # the dashboard / Jobs API address
    token: str
    env: dict[str, str]

    def client(self, token: str | None = None) -> object:
        from ray.job_submission import JobSubmissionClient

        # The token goes in the header: this test process keeps its own Ray config (RAY_AUTH_MODE) untouched.
        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {token or self.token}"})


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    temp_dir = tempfile.mkdtemp(prefix="atl-job-", dir="/tmp")  # short: Ray's socket paths must fit
    dash = free_port()
    env = ray_env()
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}", "--num-cpus=2", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--disable-usage-stats",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dash}", env["RAY_AUTH_TOKEN"], env)
    try:
        _wait_for_job_agent(head, proc)
        yield head
    finally:
        try:
            client = head.client()
            for job in client.list_jobs():  # type: ignore[attr-defined]
                if str(job.status) not in TERMINAL and job.submission_id:
                    client.stop_job(job.submission_id)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - the head may be gone already; stopping it below is what counts
            pass
        finally:
            stop_process_group(proc)
            kill_stragglers(temp_dir)  # a job driver runs in its own session: found by the temp dir, killed by pid
            log.close()
            shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_agent(head: Head, proc: subprocess.Popen[bytes], timeout_s: float = 90) -> None:
    """The head answers once the dashboard is up; jobs are accepted once its job agent has registered."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            client = head.client()
            job = client.submit_job(entrypoint="true", submission_id=f"probe-{time.time_ns()}")  # type: ignore[attr-defined]
            _wait(client, job, 60)
            return
        except Exception:  # noqa: BLE001 - not up yet ("No available agent to submit job")
            time.sleep(1)
    raise RuntimeError(f"the Ray head at {head.address} did not accept jobs within {timeout_s}s")


def _wait(client: object, job_id: str, timeout_s: float) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = str(client.get_job_status(job_id))  # type: ignore[attr-defined]
        if status in TERMINAL:
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still running after {timeout_s}s")


def _submit_cli(head: Head, job_id: str, *entrypoint: str) -> None:
    """``ray job submit`` exactly as the README documents it."""
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", head.address, "--submission-id", job_id, "--no-wait",
           "--working-dir", str(REPO_ROOT), "--runtime-env-json", json.dumps(RUNTIME_ENV), "--", *entrypoint]  # fmt: skip
    done = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def test_a_bad_config_fails_the_job_with_a_clear_message(ray_head: Head, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: {num_samples: 0}\n", encoding="utf-8")
    _submit_cli(ray_head, "bad-1", "automl-tl", "search", "--config", str(bad), "--out", str(tmp_path / "run"))
    client = ray_head.client()
    assert _wait(client, "bad-1", 120) == "FAILED"
    info = client.get_job_info("bad-1")  # type: ignore[attr-defined]
    assert info.driver_exit_code == 2
    assert f"automl-tl: error: {bad}: search.num_samples" in info.message
    assert "Traceback" not in client.get_job_logs("bad-1")  # type: ignore[attr-defined]
    assert not (tmp_path / "run").exists()


def test_the_cluster_refuses_a_wrong_token(ray_head: Head) -> None:
    from ray.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError, match="invalid or incorrect"):
        ray_head.client(token="not-the-token")


def test_sweep_and_endpoint_submitted_as_jobs(ray_head: Head, tmp_path: Path) -> None:
    """examples/04_ray_job_submit.sh against this head, as the README documents it: ``ray job submit`` of a
    tiny sweep (waits for it), then of ``automl-tl serve`` (queried, then stopped); checked here through the
    Jobs API and the run directory."""
    run_dir = tmp_path / "run"
    env = {**ray_head.env, "RAY_API_SERVER_ADDRESS": ray_head.address, "RUN_DIR": str(run_dir)}
    done = subprocess.run(["bash", str(REPO_ROOT / "examples" / "04_ray_job_submit.sh"), "--smoke-test"], env=env,
                          capture_output=True, text=True, timeout=420, start_new_session=True)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "/v1/predict" in done.stdout and "[example] done" in done.stdout

    client = ray_head.client()
    jobs = {job.entrypoint.split()[1]: job for job in client.list_jobs()  # type: ignore[attr-defined]
            if job.entrypoint.startswith("automl-tl ") and (job.submission_id or "").startswith("automl-tl-")}  # fmt: skip
    sweep, serve = jobs["search"], jobs["serve"]
    assert str(sweep.status) == "SUCCEEDED" and sweep.driver_exit_code == 0
    assert sweep.runtime_env["working_dir"].startswith("gcs://")  # the checkout travelled; the venv did not
    logs = client.get_job_logs(sweep.submission_id)  # type: ignore[attr-defined]
    assert "[search] joining the Ray cluster at 127.0.0.1:" in logs and "[search] done in" in logs
    assert "[results] the ensemble of" in logs

    assert (run_dir / "leaderboard.csv").read_text().count("\n") == 3  # header + 2 trials
    assert (run_dir / "artifact" / "manifest.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["versions"]["python"].startswith("3.11") and summary["versions"]["ray"] == "2.60.0"

    assert str(serve.status) == "STOPPED"  # the example stops its endpoint job on exit
    assert f"serving the best of {run_dir}" in client.get_job_logs(serve.submission_id)  # type: ignore[attr-defined]
