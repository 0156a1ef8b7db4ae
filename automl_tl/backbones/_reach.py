"""Whether weights can be had at all, answered before torch and timm are imported.

Importing torch and timm takes seconds, longer on a busy machine, so a sweep naming a hub backbone on a
machine with no network would spend them only to learn that nothing answers. :func:`refuse_unreachable_early`
decides from the weights folder, the local caches and one bounded request per weight host, and raises only
when the outcome is certain whatever timm's pretrained config says: no local file could hold the weights and
no host timm fetches from answers. Any doubt defers to the full check, which reads timm's config.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from automl_tl.errors import BackboneError

__all__ = ["HUB_TIMEOUT_S", "answers_within", "refuse_unreachable_early", "unreachable", "weights_dir"]

HUB_TIMEOUT_S = 2.0  # how long the pre-flight check waits for a weight host to answer
HUB_PREFIX = "timm:"
# Where timm's pretrained weights that are not on the Hugging Face hub are downloaded from.
TIMM_URL_HOSTS = ("https://github.com", "https://dl.fbaipublicfiles.com")


def weights_dir() -> Path:
    """Where fetched weight files live: ``$AUTOML_TL_WEIGHTS_DIR`` or ``~/.cache/automl_tl/weights``."""
    env = os.environ.get("AUTOML_TL_WEIGHTS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "automl_tl" / "weights"


def answers_within(checks: dict[str, Callable[[], str | None]], deadline_s: float) -> dict[str, str | None]:
    """Run every check at once on daemon threads; one still waiting at the deadline counts as no answer.

    A daemon thread, not an executor: a request stuck in name resolution cannot be cancelled, and must not
    keep the process from exiting either."""
    answers: dict[str, str | None] = {}
    threads = []
    for key, check in checks.items():

        def run(key: str = key, check: Callable[[], str | None] = check) -> None:
            answers[key] = check()

        thread = threading.Thread(target=run, name=f"automl_tl-hub-{key}", daemon=True)
        thread.start()
        threads.append(thread)
    end = time.monotonic() + deadline_s
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    return {key: answers.get(key, f"no answer within {deadline_s:g} s") for key in checks}


def unreachable(name: str, weights_file: Path, cache: str, where: str, repo_id: str = "") -> str:
    """Why backbone ``name`` has no weights and how to supply them: the one wording of both checks."""
    return (
        f"backbone '{name}': no pretrained weights reachable. Looked for {weights_file} (absent), in the local "
        f"cache {cache} and at {where}. Put the weights, in timm's key layout, at that .safetensors path "
        f"($AUTOML_TL_WEIGHTS_DIR sets the folder), or fill the cache on a machine that reaches the hub"
        + (f" (`hf download {repo_id}`)" if repo_id else "")
    )


def _host_answers(url: str, timeout_s: float) -> str | None:
    """None when ``url``'s server answers at all (any HTTP status), else why not."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(url, timeout=timeout_s)
        return None
    except Exception as exc:  # noqa: BLE001 - connection, DNS, proxy and timeout errors come in many types
        if "timeout" in type(exc).__name__.lower():  # the HTTP client's own (requests or httpx)
            return f"no answer within {timeout_s:g} s"
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {first[:160]}"


def _torch_hub_checkpoints() -> Path:
    """torch.hub's download folder, as ``torch.hub.get_dir`` finds it, without importing torch."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


def _may_be_local(arch: str) -> bool:
    """Whether a local file could hold the weights of timm's ``arch``: a file of its architecture in the
    weights folder, or any model at all in the Hugging Face or torch hub cache (its repository and file
    names are timm's to say)."""
    from huggingface_hub import constants

    base = arch.split(".")[0]
    folder = weights_dir()
    if (folder / f"{base}.safetensors").is_file() or any(folder.glob(f"{base}.*.safetensors")):
        return True
    hf_cache, checkpoints = Path(constants.HF_HUB_CACHE), _torch_hub_checkpoints()
    return any(hf_cache.glob("models--*")) or (checkpoints.is_dir() and any(checkpoints.iterdir()))


def _hosts_silent(timeout_s: float) -> str | None:
    """Why none of the hosts timm fetches weights from can be asked (None when one answers)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return f"{constants.ENDPOINT} (HF_HUB_OFFLINE is set)"
    hosts = (constants.ENDPOINT, *TIMM_URL_HOSTS)
    asks: dict[str, Callable[[], str | None]] = {}
    for host in hosts:
        asks[host] = lambda host=host: _host_answers(host, timeout_s)  # type: ignore[misc]
    reasons = answers_within(asks, timeout_s + 0.5)
    if any(reason is None for reason in reasons.values()):
        return None
    others = ", ".join(TIMM_URL_HOSTS)
    return f"{constants.ENDPOINT} ({reasons[constants.ENDPOINT]}) and timm's other hosts {others} (no answer either)"


def refuse_unreachable_early(names: Sequence[str], timeout_s: float = HUB_TIMEOUT_S) -> None:
    """Raise one :class:`BackboneError` naming each ``timm:`` backbone of ``names`` whose weights surely
    cannot be had: no local file could hold them and no weight host answers. Otherwise return, and the
    full pre-flight check decides."""
    hub = [name for name in dict.fromkeys(names) if name.startswith(HUB_PREFIX)]
    if not hub or any(_may_be_local(name.removeprefix(HUB_PREFIX)) for name in hub):
        return
    silent = _hosts_silent(timeout_s)
    if silent is None:
        return
    from huggingface_hub import constants

    raise BackboneError("; ".join(
        unreachable(name, weights_dir() / f"{name.removeprefix(HUB_PREFIX)}.safetensors",
                    f"{constants.HF_HUB_CACHE} (empty)", silent)
        for name in hub
    ))  # fmt: skip
