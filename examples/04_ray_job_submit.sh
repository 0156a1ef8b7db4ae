#!/usr/bin/env bash
# A sweep, then its endpoint, each submitted to a Ray cluster with `ray job submit` (token authentication on).
#
#   bash examples/04_ray_job_submit.sh [--smoke-test] [DATA]
#
# With RAY_API_SERVER_ADDRESS set (and RAY_AUTH_TOKEN, or ~/.ray/auth_token) it submits to that cluster; the
# run directory must then be one every node reaches: set RUN_DIR=s3://bucket/prefix. Otherwise it starts a
# one-node cluster on 127.0.0.1 from this checkout's .venv (so the jobs run the venv's Python and automl-tl)
# and stops it (by its process id) on exit. --smoke-test: two tiny trials at 64 px, one epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export PATH="$ROOT/.venv/bin:$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token

SMOKE=0
if [ "${1:-}" = "--smoke-test" ]; then SMOKE=1; shift; fi
DATA="${1:-}"
if [ -z "$DATA" ]; then
  if [ -d "$ROOT/../shared/datasets/hymenoptera/train" ]; then DATA="$(cd "$ROOT/../shared/datasets/hymenoptera/train" && pwd)"
  else DATA="builtin:animal-shapes"; fi
fi
WORK="$(mktemp -d /tmp/atl-example-XXXXXX)"
RUN_DIR="${RUN_DIR:-$WORK/run}"  # a job resolves paths on the cluster: absolute, or s3://
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

HEAD_PID=""
cleanup() {
  if [ -n "${SERVE_JOB:-}" ]; then ray job stop --address "$RAY_API_SERVER_ADDRESS" "$SERVE_JOB" >/dev/null 2>&1 || true; fi
  if [ -n "$HEAD_PID" ]; then
    kill -TERM "$HEAD_PID" 2>/dev/null || true  # `ray start --block` drains and stops its own processes
    for _ in $(seq 30); do kill -0 "$HEAD_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$HEAD_PID" 2>/dev/null || true  # then whatever is left of its process group
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "${RAY_API_SERVER_ADDRESS:-}" ]; then
  export RAY_AUTH_TOKEN="${RAY_AUTH_TOKEN:-$(python -c 'import secrets; print(secrets.token_hex(32))')}"
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # keep every Ray address on 127.0.0.1
  DASH_PORT="$(free_port)"
  echo "[example] starting a local Ray head (token auth on), dashboard and Jobs API on 127.0.0.1:$DASH_PORT"
  setsid ray start --head --block --node-ip-address=127.0.0.1 --port="$(free_port)" --dashboard-host=127.0.0.1 \
    --dashboard-port="$DASH_PORT" --dashboard-agent-listen-port="$(free_port)" \
    --ray-client-server-port="$(free_port)" --temp-dir="$WORK/ray" --disable-usage-stats \
    >"$WORK/ray-start.log" 2>&1 &
  HEAD_PID=$!
  export RAY_API_SERVER_ADDRESS="http://127.0.0.1:$DASH_PORT"
  for i in $(seq 90); do  # jobs are accepted once the node's job agent has registered
    if ray job submit --no-wait --submission-id "probe-$$-$i" -- true >/dev/null 2>&1; then break; fi
    kill -0 "$HEAD_PID" 2>/dev/null || { cat "$WORK/ray-start.log"; exit 1; }
    sleep 1
  done
fi

# The code travels as the working dir; the venv (GBs) and build litter never do.
RUNTIME_ENV='{"excludes": [".venv", ".git", "runs", ".mypy_cache", ".pytest_cache", "**/__pycache__"]}'
SWEEP=(--trials 8 --time-budget-s 600)
if [ "$SMOKE" = 1 ]; then
  cat >"$WORK/smoke.yaml" <<'YAML'
space: {backbones: [mobilenetv2_100], image_sizes: [64], max_epochs: 1, batch_sizes: [32], freeze_depths: [8], augmentations: [none]}
search: {num_samples: 2, time_budget_s: 300, scheduler: none, ensemble_size: 2}
resources: {trial_engine: inline}
YAML
  SWEEP=(--config "$WORK/smoke.yaml")
fi

SWEEP_JOB="automl-tl-sweep-$$"
echo "[example] submitting the sweep as job $SWEEP_JOB (its log streams below)"
ray job submit --submission-id "$SWEEP_JOB" --working-dir . --runtime-env-json "$RUNTIME_ENV" \
  -- automl-tl search --data "$DATA" --out "$RUN_DIR" "${SWEEP[@]}"
ray job status "$SWEEP_JOB"

SERVE_PORT="${SERVE_PORT:-$(free_port)}"
SERVE_JOB="automl-tl-serve-$$"
echo "[example] submitting the endpoint as job $SERVE_JOB (it serves until the job is stopped)"
ray job submit --no-wait --submission-id "$SERVE_JOB" --working-dir . --runtime-env-json "$RUNTIME_ENV" \
  -- automl-tl serve "$RUN_DIR" --mode best --host 127.0.0.1 --port "$SERVE_PORT" >/dev/null
python - "$SERVE_PORT" "$DATA" <<'PY'
import json, pathlib, sys, time, urllib.request
port, data = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}"
deadline = time.time() + 240
while True:
    try:
        if urllib.request.urlopen(f"{url}/v1/healthz", timeout=5).status == 200:
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("the endpoint did not become ready")
    time.sleep(1)
images = sorted(p for p in pathlib.Path(data).rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
if images:
    req = urllib.request.Request(f"{url}/v1/predict?top_k=1", data=images[0].read_bytes(),
                                 headers={"content-type": "image/jpeg"})
    answer = json.load(urllib.request.urlopen(req, timeout=60))["predictions"][0]
    print(f"[example] {images[0].name}: {answer['labels'][0]} ({answer['probabilities'][0]:.3f}) from {url}/v1/predict")
else:
    print(f"[example] the endpoint answers at {url}/v1/predict")
PY
ray job logs "$SERVE_JOB" | tail -n 3
echo "[example] done: sweep $SWEEP_JOB succeeded; endpoint job $SERVE_JOB is stopped on exit"
