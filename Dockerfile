# automl_tl on the official Ray GPU image of the Ray and Python that pyproject.toml pins (Ray 2.60.0, Python 3.11).
# The same image runs the head, the GPU workers, a RayJob sweep and the RayService endpoint (see cluster/).
#
#   docker build -t ghcr.io/automl-tl/automl-tl:0.1.0-ray2.60.0-py311-gpu .
#   docker run --gpus all -p 8000:8000 -v "$PWD/runs/my_run/artifact:/artifact:ro" \
#       ghcr.io/automl-tl/automl-tl:0.1.0-ray2.60.0-py311-gpu
#
# Linted in the tests (tests/test_cluster_configs.py) with hadolint and with checks of our own.
FROM rayproject/ray:2.60.0-py311-gpu

LABEL org.opencontainers.image.title="automl-tl" \
      org.opencontainers.image.description="AutoML for transfer-learning image classification on Ray" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.ref.name="ghcr.io/automl-tl/automl-tl:0.1.0-ray2.60.0-py311-gpu"

# The base image's user `ray` (uid 1000, group users = 100) owns its Python environment: nothing here needs root.
USER 1000:100
WORKDIR /home/ray/automl_tl

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    MALLOC_ARENA_MAX=1 \
    MALLOC_MMAP_THRESHOLD_=1073741824 \
    MALLOC_TRIM_THRESHOLD_=1073741824 \
    AUTOML_TL_CACHE_DIR=/home/ray/.cache/automl_tl/datasets

# Every dependency and its pin comes from pyproject.toml (ray, torch, timm, ... exactly as in the venv).
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 automl_tl ./automl_tl
RUN pip install --no-cache-dir . \
    && automl-tl fetch-weights \
    && automl-tl backbones

EXPOSE 8000 8265 6379 10001

# `automl-tl serve` answers GET /v1/healthz with 200 once every model is loaded.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v1/healthz', timeout=4).status != 200)"]

# Plain `docker run`: serve the artifact mounted at /artifact. On a Ray cluster KubeRay / `ray up` replace this
# with `ray start`, and the sweep or the endpoint is started by a RayJob / RayService / `ray job submit`.
CMD ["automl-tl", "serve", "/artifact", "--host", "0.0.0.0", "--port", "8000"]
