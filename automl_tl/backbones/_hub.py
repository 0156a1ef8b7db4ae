"""Where the pretrained weights of a ``timm:`` backbone are, and whether they can be had at all.

They are looked for in this order: a file in timm's key layout under ``$AUTOML_TL_WEIGHTS_DIR`` (what an
air-gapped cluster uses, and what the tests write from a random init), the local Hugging Face cache, then
the hub itself. Building a network never asks the hub about a file the cache already holds, and only the
pre-flight check (:func:`check_weights`) asks whether the hub answers, with a deadline: without
``HF_HUB_OFFLINE`` a machine with no network can leave one hub request waiting for minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from automl_tl.backbones._reach import HUB_TIMEOUT_S, answers_within, unreachable, weights_dir
from automl_tl.backbones._registry import BackboneSpec, TimmHub, WeightSource
from automl_tl.backbones._weights import source_status
from automl_tl.errors import BackboneError

__all__ = [
    "HUB_TIMEOUT_S", "check_weights", "hub_reasons", "hub_source", "hub_weights_file", "local_weights_file",
    "weights_status",
]

def local_weights_file(names: Sequence[str]) -> Path | None:
    """The first ``<name>.safetensors`` of ``names`` present in the weights folder."""
    for name in dict.fromkeys(names):
        path = weights_dir() / f"{name}.safetensors"
        if path.is_file():
            return path
    return None


def hub_source(pretrained_cfg: dict[str, Any]) -> TimmHub:
    """Where timm itself would fetch the weights of ``pretrained_cfg`` from: a hub repository, else a URL."""
    repo_id = str(pretrained_cfg.get("hf_hub_id") or "")
    filenames: tuple[str, ...] = ()
    if repo_id:
        from timm.models._hub import _get_safe_alternatives

        wanted = str(pretrained_cfg.get("hf_hub_filename") or "pytorch_model.bin")
        filenames = (*_get_safe_alternatives(wanted), wanted)  # timm reads a safetensors twin first
    return TimmHub(
        repo_id=repo_id,
        filenames=filenames,
        url="" if repo_id else str(pretrained_cfg.get("url") or ""),
        license=pretrained_cfg.get("license"),
    )


def _url_cache_file(url: str) -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def hub_weights_file(source: TimmHub) -> Path | None:
    """The weight file of ``source`` already in the local Hugging Face (or torch hub) cache, if any."""
    if source.url:
        cached = _url_cache_file(source.url)
        return cached if cached.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    for filename in source.filenames:
        found = try_to_load_from_cache(source.repo_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def download_hub_file(source: TimmHub) -> Path:
    """Fetch the weight file of ``source`` into the cache (where the pre-flight check found the hub)."""
    if source.url:
        from timm.models._hub import download_cached_file

        return Path(download_cached_file(source.url))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for filename in source.filenames:
        try:
            return Path(hf_hub_download(source.repo_id, filename))
        except EntryNotFoundError:
            continue
    raise BackboneError(f"hub repository {source.repo_id} has none of {', '.join(source.filenames)}")


def _hub_answers(source: TimmHub, timeout_s: float) -> str | None:
    """None when the hub holds the weights of ``source``, else why not (one short request, bounded)."""
    try:
        if source.url:
            import urllib.request

            request = urllib.request.Request(source.url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout_s):  # noqa: S310 - timm's own https URL
                return None
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import EntryNotFoundError

        for filename in source.filenames:
            try:
                get_hf_file_metadata(hf_hub_url(source.repo_id, filename), timeout=timeout_s)
                return None
            except EntryNotFoundError:
                continue
        return f"the repository has none of {', '.join(source.filenames)}"
    except Exception as exc:  # noqa: BLE001 - connection, DNS, HTTP and timeout errors come in many types
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {first[:160]}"


def _unreachable(spec: BackboneSpec, source: TimmHub, reason: str) -> str:
    from huggingface_hub import constants

    where = f"{constants.ENDPOINT}/{source.repo_id}" if source.repo_id else source.url
    cached = f"{constants.HF_HUB_CACHE}" if source.repo_id else str(_url_cache_file(source.url).parent)
    return unreachable(spec.name, weights_dir() / f"{spec.architecture}.safetensors",
                       f"{cached} (no {source.repo_id or source.url})", f"{where} ({reason})", source.repo_id)


def hub_reasons(sources: Mapping[str, TimmHub], timeout_s: float = HUB_TIMEOUT_S) -> dict[str, str | None]:
    """For each source: None when its weights can be had (the local cache holds them, or the hub answers for
    them), else why not. Hub requests run at once, each bounded by ``timeout_s``."""
    from huggingface_hub import constants

    reasons: dict[str, str | None] = {}
    asks: dict[str, Callable[[], str | None]] = {}
    for key, source in sources.items():
        if hub_weights_file(source) is not None:
            reasons[key] = None
        elif constants.HF_HUB_OFFLINE:
            reasons[key] = "HF_HUB_OFFLINE is set"
        elif not source.repo_id and not source.url:
            reasons[key] = "timm has no pretrained weights for it"
        else:
            asks[key] = lambda source=source: _hub_answers(source, timeout_s)  # type: ignore[misc]
    reasons.update(answers_within(asks, timeout_s + 0.5))
    return reasons


def check_weights(specs: Sequence[BackboneSpec], timeout_s: float = HUB_TIMEOUT_S) -> None:
    """Every backbone of ``specs`` can get its pretrained weights, or one :class:`BackboneError` names each
    one that cannot, where it looked and how to supply the file. Hub lookups run at once, each bounded."""
    problems: dict[str, str] = {}
    hubs: dict[str, tuple[BackboneSpec, TimmHub]] = {}
    for spec in specs:
        source = spec.weights
        if isinstance(source, TimmHub):
            hubs[spec.name] = (spec, source)
        elif (status := source_status(source)) != "ready":
            problems[spec.name] = f"backbone '{spec.name}': {source.describe()}: {status}"
    for name, reason in hub_reasons({name: source for name, (_, source) in hubs.items()}, timeout_s).items():
        spec, source = hubs[name]
        if reason is None:
            continue
        if not source.repo_id and not source.url:
            problems[name] = f"backbone '{name}': timm has no pretrained weights for {spec.architecture}"
        else:
            problems[name] = _unreachable(spec, source, reason)
    if problems:
        raise BackboneError("; ".join(problems[s.name] for s in specs if s.name in problems))


def weights_status(source: WeightSource) -> str:
    """'ready', or a short sentence saying what is missing and how to get it; a hub source is ready when the
    local cache holds its file (the hub itself is only asked by :func:`check_weights`)."""
    if not isinstance(source, TimmHub):
        return source_status(source)
    if hub_weights_file(source) is not None:
        return "ready"
    return "hub (needs network, or the file in $AUTOML_TL_WEIGHTS_DIR)"
