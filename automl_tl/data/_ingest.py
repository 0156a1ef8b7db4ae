"""The first pass over a source: read, hash and decode every record once, in parallel, into the cache.

Decoding runs on a thread pool sized to the CPUs (Pillow and hashlib release the GIL while they work); the
results are written in record order, so the cache file is the same whatever the thread timing.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from automl_tl.config import DataConfig
from automl_tl.data._cache import CacheWriter
from automl_tl.data._decode import Decoded, decode
from automl_tl.data.report import REASON_UNREADABLE
from automl_tl.data.sources import DataSource, Fetch
from automl_tl.errors import DatasetError

_WINDOW_PER_WORKER = 16  # records in flight per thread: enough to hide storage latency, bounded memory
_REMOTE_MIN_WORKERS = 16

logger = logging.getLogger(__name__)


def decode_workers(config: DataConfig, remote: bool = False) -> int:
    """``data.decode_workers``, else one thread per CPU; object storage gets more (they mostly wait)."""
    if config.decode_workers is not None:
        return config.decode_workers
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        cpus = max(1, os.cpu_count() or 1)
    return max(_REMOTE_MIN_WORKERS, 4 * cpus) if remote else cpus


def ingest(
    sources: Sequence[DataSource],
    class_names: Sequence[str],
    folder: Path,
    config: DataConfig,
    progress: bool,
) -> Path:
    """Validate every record of ``sources`` into a new cache file in ``folder`` and return its path.

    The start and the end are logged (stage ``data``); ``progress`` draws a bar in between, on a terminal only.
    """
    from tqdm import tqdm

    total = sum(len(s.records) for s in sources)
    workers = decode_workers(config, remote=any(s.remote for s in sources))
    label = f"validating images ({workers} threads)"
    logger.info(f"{label}: {total} files", extra={"stage": "data", "files": total, "workers": workers})
    started = time.monotonic()
    # disable=None: drawn only when stderr is a terminal; leave=False: the closing record replaces it
    bar = tqdm(total=total, desc=label, unit="img", disable=None if progress else True, leave=False)
    described = {
        "source": sources[0].text,
        "kind": sources[0].kind,
        "test_source": sources[1].text if len(sources) > 1 else None,
    }
    writer = CacheWriter(folder, class_names, config, described)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="automl-tl-decode") as pool:
            for source in sources:
                results = _decode_in_order(pool, source.fetchers(), config, workers * _WINDOW_PER_WORKER)
                for record, item in zip(source.records, results, strict=True):
                    writer.add(record.path, record.label, record.split, item)
                    bar.update()
        bar.close()  # before the closing record, which takes the bar's line
        path = writer.finish()
        elapsed = time.monotonic() - started
        logger.info(f"{label}: {total}/{total} done in {elapsed:.1f}s ({total / max(elapsed, 1e-9):.0f}/s)",
                    extra={"stage": "data", "files": total, "elapsed_s": round(elapsed, 2)})  # fmt: skip
        return path
    except (OSError, pa.ArrowException) as exc:
        writer.abort()
        raise DatasetError(f"cannot read or cache the data: {exc}") from None
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


def _decode_in_order(
    pool: ThreadPoolExecutor, fetchers: Iterator[Fetch], config: DataConfig, window: int
) -> Iterator[Decoded]:
    pending: collections.deque[Future[Decoded]] = collections.deque()
    for fetch in fetchers:
        pending.append(pool.submit(_work, fetch, config.cache_max_side, config.max_image_pixels))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _work(fetch: Fetch, max_side: int, max_pixels: int) -> Decoded:
    try:
        payload = fetch()
    except (OSError, pa.ArrowException) as exc:
        return Decoded("", REASON_UNREADABLE, f"{type(exc).__name__}: {exc}")
    return decode(payload, max_side, max_pixels)
