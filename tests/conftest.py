"""Shared fixtures: the real data sets beside the checkout, and one Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"
DATA_DIR = Path(__file__).resolve().parent / "data"


def _shared(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(
            f"{path} is absent: the shared datasets ship beside the checkout in CI, not in a user's clone"
        )
    return path


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"{SHARED_DATASETS} is absent: the shared datasets ship beside the checkout in CI only")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def hymenoptera_dir() -> Path:
    return _shared("hymenoptera")


@pytest.fixture(scope="session")
def flowers5_dir() -> Path:
    return _shared("flowers5")


@pytest.fixture(scope="session")
def ray_session() -> object:
    """One local Ray instance for every test of the session that needs one; stopped at the end."""
    import ray

    from automl_tl.sweep.driver import RAY_ENV
    from automl_tl.train.memory import tune_malloc

    for name, value in RAY_ENV.items():  # what a sweep gives the processes of the Ray it starts
        os.environ.setdefault(name, value)
    started = not ray.is_initialized()
    if started:
        tune_malloc()  # as the CLI does: the workers run with the same allocator settings
        ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=None)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for the session, so each data set is decoded once across tests."""
    return tmp_path_factory.mktemp("data_cache")
