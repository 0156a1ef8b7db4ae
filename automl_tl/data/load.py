"""``load_dataset``: resolve a source, validate it (or find its cache), split it, return a Dataset.

    from automl_tl.data import load_dataset, format_report
    ds = load_dataset("/data/flowers")          # first run decodes every image once, later runs reuse it
    print(format_report(ds.report))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from automl_tl.config import DataConfig
from automl_tl.data._cache import CacheFile, cache_dir, fingerprint, lookup, open_cache, remember
from automl_tl.data._ingest import ingest
from automl_tl.data._split import check_classes, draw_splits, refuse
from automl_tl.data.dataset import Dataset, ListingInfo
from automl_tl.data.shards import resolve_mode, write_shards
from automl_tl.data.sources import DataSource, resolve_source
from automl_tl.errors import DatasetError

__all__ = ["load_dataset"]

_LAYOUT_HINT = {
    "class-folders": "expected DIR/<class>/<image files> or DIR/{train,val,test}/<class>/<image files>",
    "split-folders": "expected DIR/{train,val,test}/<class>/<image files>",
}


def load_dataset(
    source: str,
    config: DataConfig | None = None,
    progress: bool = True,
    *,
    test_source: str | None = None,
    strict: bool = True,
    shard_root: str | None = None,
) -> Dataset:
    """Load ``source`` (see :mod:`automl_tl.data.sources` for the forms it takes) as a split Dataset.

    ``test_source`` (default: ``config.test_source``) is a second source used entirely as the test split,
    only for the final evaluation; its classes must be those of ``source``. Validation is logged (stage
    ``data``); ``progress`` adds a bar on a terminal. ``strict=False`` (what ``inspect`` uses) lists an empty
    class, a single class or a class too small for the splits in ``report.problems`` instead of raising.

    In stream mode (``data.mode``, see :func:`automl_tl.data.shards.resolve_mode`) the images go into Parquet
    shards under ``shard_root`` (a URI every node reaches; default ``<cache dir>/shards``) through Ray Data,
    and the returned Dataset reads them from there.
    """
    config = config if config is not None else DataConfig()
    test_text = test_source if test_source is not None else config.test_source
    main = resolve_source(source)
    sources = [main]
    if test_text:
        test = resolve_source(test_text)
        if "test" in main.given_splits:
            raise DatasetError(
                f"{main.text} has its own test split and a separate test set {test.text} was given; "
                "use one of them"
            )
        _check_same_classes(main, test)
        sources.append(test.as_split("test"))
    folder = cache_dir(config)
    identities = [s.identity for s in sources]
    stream = resolve_mode(config, sum(len(s.records) for s in sources)) == "stream"
    fp = fingerprint(identities, config)
    if stream:  # one set of shards per listing and place
        root = (shard_root or str(folder / "shards")).rstrip("/") + "/" + fp[:24]
        fp = fingerprint([*identities, f"shards={root}"], config)
    cache = _open_previous(folder, fp)
    if cache is None:
        _check_listing(sources, config, strict)  # fail before decoding anything when the layout cannot work
        if stream:
            path = write_shards(sources, main.classes, root, folder, config)
        else:
            path = ingest(sources, main.classes, folder, config, progress)
        remember(folder, fp, path)
    listing = ListingInfo(
        main.text, main.kind, sources[1].text if len(sources) > 1 else None,
        tuple(s for src in sources for s in src.skipped), sum(src.ignored for src in sources),
    )
    return Dataset(cache or open_cache(path), config, listing, cache is not None, strict)


def _open_previous(folder: Path, fp: str) -> CacheFile | None:
    """The cache file an identical listing produced before; a damaged one is rebuilt, not fatal."""
    path = lookup(folder, fp)
    if path is None:
        return None
    try:
        return open_cache(path)
    except DatasetError:
        return None


def _check_same_classes(main: DataSource, test: DataSource) -> None:
    extra = sorted(set(test.classes) - set(main.classes))
    missing = sorted(set(main.classes) - set(test.classes))
    problems = []
    if extra:
        problems.append(f"it has class(es) the training data lacks: {', '.join(map(repr, extra))}")
    if missing:
        problems.append(f"it lacks class(es) of the training data: {', '.join(map(repr, missing))}")
    if problems:
        raise DatasetError(f"the test set {test.text} does not match the classes of {main.text}: {'; '.join(problems)}")


def _check_listing(sources: list[DataSource], config: DataConfig, strict: bool) -> None:
    main = sources[0]
    records = [r for s in sources for r in s.records]
    if not records:
        hint = _LAYOUT_HINT.get(main.kind)
        raise DatasetError(f"no images found in {main.text}" + (f"; {hint}" if hint else ""))
    if not strict:
        return
    index = {name: i for i, name in enumerate(main.classes)}
    labels = np.array([index[r.label] for r in records], dtype=np.int64)
    check_classes(labels, main.classes, main.text)
    given = np.array([r.split for r in records], dtype="<U5")
    # Only the counts matter here, so any draw order does.
    keys = np.arange(len(records), dtype=np.uint64)
    refuse(draw_splits(keys, labels, given, main.classes, val_fraction=config.val_fraction,
                       test_fraction=config.test_fraction)[1])
