"""Fuzz the served API against its own OpenAPI schema with schemathesis, on 127.0.0.1, and write
``benchmarks/results/fuzz.json``: requests per operation and per body media type, status codes, responses
of 500 or above (target 0), responses not valid against the schema (target 0), and whether a real image is
answered as the Predictor answers it afterwards.

    .venv/bin/python benchmarks/bench_fuzz.py                 # up to 1,000 generated requests per operation
    .venv/bin/python benchmarks/bench_fuzz.py --cases 20      # a quick run (written to fuzz_smoke.json)

An operation without parameters or body (healthz, metadata, stats) has one request to generate; the body and
query of /v1/predict take the rest.

The server is ``start_server`` on an embedded Ray (as ``automl-tl serve`` runs it) with a bearer token, small
body and pixel limits (so generated bodies reach them), and a tiny two-class artifact whose first class is
named ``<img src=x onerror=alert(1)>``. Every request carries the token. Every default check of schemathesis
runs but "positive data acceptance": a schema cannot say "bytes that decode as an image", so random bytes
are a schema-valid body that is rightly answered 422.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKEN = "bench-fuzz-token"
CLASSES = ("<img src=x onerror=alert(1)>", "bees")


def _artifact(folder: Path) -> Path:
    from automl_tl.inference.artifact import write_artifact
    from tests.test_artifact import make_member

    write_artifact(folder, CLASSES, [make_member("a", 64)], [1.0], 1.0,
                   metrics={"best_member": "a", "val": {"accuracy": 0.9}}, method="greedy")  # fmt: skip
    return folder


def fuzz(url: str, cases_per_operation: int) -> dict[str, Any]:
    """Generate ``cases_per_operation`` requests for every operation of the live schema and check each answer."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance  # any valid body accepted: see below

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    report: dict[str, Any] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        tally: dict[str, Any] = {"requests": 0, "status": collections.Counter(), "media_types": collections.Counter(),
                                 "server_errors": [], "schema_failures": []}  # fmt: skip

        @given(case=operation.as_strategy())
        @settings(max_examples=cases_per_operation, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)  # fmt: skip
        def run(case: Any) -> None:
            response = case.call(headers=auth, timeout=60)
            tally["requests"] += 1
            tally["status"][str(response.status_code)] += 1
            tally["media_types"][str(case.media_type)] += 1
            if response.status_code >= 500:
                tally["server_errors"].append(f"{response.status_code}: {response.text[:200]}")
            try:
                case.validate_response(response, headers=auth, excluded_checks=[positive_data_acceptance])
            except Exception as exc:  # noqa: BLE001 - every kind of check failure is a finding to record
                tally["schema_failures"].append(str(exc)[:400])

        run()
        tally["status"] = dict(sorted(tally["status"].items()))
        tally["media_types"] = dict(tally["media_types"])
        report[f"{operation.method.upper()} {operation.path}"] = tally
    return report


def real_image_check(url: str, artifact: Path) -> dict[str, Any]:
    import numpy as np
    import requests

    from automl_tl.inference.predictor import Predictor

    image = sorted((REPO.parent / "shared" / "datasets" / "hymenoptera" / "val" / "bees").glob("*.jpg"))[0]
    answer = requests.post(f"{url}/v1/predict?top_k=2", data=image.read_bytes(), timeout=60,
                           headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/jpeg"})  # fmt: skip
    expected = Predictor.load(artifact).predict([image], top_k=2)[0]
    got = answer.json()["predictions"][0] if answer.status_code == 200 else {"labels": [], "probabilities": []}
    same = got["labels"] == list(expected.labels) and bool(
        np.allclose(got["probabilities"], expected.probabilities, atol=1e-5)
    )
    return {"image": image.name, "status": answer.status_code, "labels": got["labels"], "as_predictor": same}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="most generated requests per operation (default 1000)")
    args = parser.parse_args()

    from automl_tl.serve import start_server, stop_server
    from tests.scenarios._common import free_port

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_fuzz_") as tmp:
        artifact = _artifact(Path(tmp) / "artifact")
        url = start_server(artifact, mode="ensemble", port=free_port(), token=TOKEN,
                           max_body_bytes=1 << 20, max_pixels=1_000_000)  # fmt: skip
        try:
            operations = fuzz(url, args.cases)
            after = real_image_check(url, artifact)
        finally:
            stop_server()
    import schemathesis

    total = sum(op["requests"] for op in operations.values())
    out = {
        "what": "schemathesis against the live /openapi.json of automl-tl serve (embedded Ray, HAProxy ingress), "
                "bearer token on, 127.0.0.1",
        "schemathesis": schemathesis.__version__,
        "cases_per_operation": args.cases,
        "requests": total,
        "server_errors": sum(len(op["server_errors"]) for op in operations.values()),
        "schema_failures": sum(len(op["schema_failures"]) for op in operations.values()),
        "real_image_after": after,
        "operations": operations,
        "wall_s": round(time.time() - started, 1),
        "command": "python benchmarks/bench_fuzz.py" + (f" --cases {args.cases}" if args.cases != 1000 else ""),
    }  # fmt: skip
    name = "fuzz.json" if total >= 1000 else "fuzz_smoke.json"
    target = REPO / "benchmarks" / "results" / name
    target.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: out[k] for k in ("requests", "server_errors", "schema_failures", "real_image_after")}))
    print(f"written {target}")
    return 0 if out["server_errors"] == 0 and out["schema_failures"] == 0 and after["as_predictor"] else 1


if __name__ == "__main__":
    sys.exit(main())
