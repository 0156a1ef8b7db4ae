"""Stream mode (``data.mode: stream``): shards of encoded images, streamed trial batches, and a sweep that ranks
its trials as the decoded cache's sweep does."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from automl_tl.config import DataConfig, load_config
from automl_tl.data._decode import decode
from automl_tl.data.shards import _Shrink, decoded_cache_bytes, encode_for_shard, resolve_mode
from automl_tl.train.trial_data import stream_batches
from tests.scenarios._common import tiny_config


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def test_auto_streams_only_above_the_threshold() -> None:
    config = DataConfig(stream_above_gb=1.0)  # 320 px side: 307,200 bytes an image at most
    assert decoded_cache_bytes(3000, config) == 3000 * 320 * 320 * 3
    assert resolve_mode(config, 3000) == "cache" and resolve_mode(config, 4000) == "stream"
    assert resolve_mode(config.model_copy(update={"mode": "stream"}), 1) == "stream"
    assert resolve_mode(config.model_copy(update={"mode": "cache"}), 10**9) == "cache"


def test_a_small_jpeg_keeps_its_bytes_and_a_large_one_is_shrunk() -> None:
    small, large = _jpeg(200, 100, 0), _jpeg(800, 400, 1)
    item = decode(small, 320, 10**8)
    assert encode_for_shard(small, item) is small  # re-decoding gives the very same pixels
    item = decode(large, 320, 10**8)
    shrunk = encode_for_shard(large, item)
    assert shrunk[:3] == b"\xff\xd8\xff" and len(shrunk) < len(large)
    again = decode(shrunk, 320, 10**8)
    assert (again.width, again.height) == (320, 160) == (item.width, item.height)


def test_streamed_batches_hold_each_requested_row_once(tmp_path: Path) -> None:
    payloads = [_jpeg(40 + i, 30, i) for i in range(10)] + [b"not an image"]
    fetches = [lambda p=p: p for p in payloads]
    labels = np.arange(len(payloads)) % 2
    table = _Shrink(fetches, labels, 32, 10**8)({"id": np.arange(len(payloads))})
    assert table.column("status").to_pylist()[-1] != "ok" and table.column("image").to_pylist()[-1] is None
    (tmp_path / "shards").mkdir()
    pq.write_table(table.slice(0, 6), tmp_path / "shards" / "a.parquet")
    pq.write_table(table.slice(6), tmp_path / "shards" / "b.parquet")
    rows = np.array([9, 1, 2, 5, 7, 8, 0])
    resize = lambda x: torch.nn.functional.interpolate(x[None].float(), size=(8, 8))[0]  # noqa: E731
    batches = list(stream_batches(str(tmp_path / "shards"), rows, labels[rows], 3, 0, resize))
    assert [len(y) for _, y in batches] == [3, 3]  # the single leftover image is dropped
    first = list(stream_batches(str(tmp_path / "shards"), rows, labels[rows], 100, 0, resize))[0]
    assert first[0].shape == (7, 3, 8, 8) and sorted(first[1].tolist()) == sorted(labels[rows].tolist())
    again = list(stream_batches(str(tmp_path / "shards"), rows, labels[rows], 100, 0, resize))[0]
    assert torch.equal(first[0], again[0])  # the same seed reads in the same order
    twice = np.array([3, 3, 4])  # a sampler drawing with replacement
    drawn = list(stream_batches(str(tmp_path / "shards"), twice, labels[twice], 100, 0, resize))[0]
    assert sorted(drawn[1].tolist()) == sorted(labels[twice].tolist()) and len(drawn[0]) == 3


def _leaderboard(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "leaderboard.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_stream_and_cache_sweeps_rank_trials_alike(
    ray_session: Any, hymenoptera_dir: Path, data_cache_dir: Path, tmp_path: Path
) -> None:
    from automl_tl.sweep.driver import run_search

    boards = {}
    for mode in ("cache", "stream"):
        raw = tiny_config(hymenoptera_dir / "train", data_cache_dir, trials=2)
        raw["data"]["mode"] = mode
        raw["search"]["max_concurrent_trials"] = 1  # the searcher sees the results in one order in both
        run_search(load_config(raw), tmp_path / f"run-{mode}", progress=False)
        boards[mode] = _leaderboard(tmp_path / f"run-{mode}")
    shards = sorted((tmp_path / "run-stream" / "data" / "shards").glob("*/*.parquet"))
    assert shards and not (tmp_path / "run-cache" / "data").exists()
    assert all(r["feature_cache"] == "hit" for r in boards["stream"])  # computed by Ray Data before the trials
    keys = ("learning_rate", "optimizer", "weight_decay")
    assert [tuple(r[k] for k in keys) for r in boards["stream"]] == [tuple(r[k] for k in keys) for r in boards["cache"]]
    for s, c in zip(boards["stream"], boards["cache"]):
        assert float(s["best_val_accuracy"]) == pytest.approx(float(c["best_val_accuracy"]), abs=0.06)


def test_the_report_names_the_mode_and_its_threshold(hymenoptera_dir: Path, data_cache_dir: Path) -> None:
    from automl_tl.data import format_report, load_dataset

    config = DataConfig(cache_dir=str(data_cache_dir), stream_above_gb=20.0)
    report = load_dataset(str(hymenoptera_dir / "val"), config, progress=False).report
    assert report.data_mode == "cache" and report.shards is None  # 153 images: far below 20 GB decoded
    assert "data mode: cache (data.mode: auto, streams above 20 GB decoded)" in format_report(report)
    assert report.to_dict()["data_mode"] == "cache"
