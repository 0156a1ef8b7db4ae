"""What each model replica runs around its models, in plain asyncio and torch: one batch at a time in a
worker thread, an admission gate that makes ``@serve.batch`` form full batches under load, and counters.
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from automl_tl._memory import trim_heap
from automl_tl.artifact import Artifact
from automl_tl.errors import ConfigError
from automl_tl.serve._args import AppArgs
from automl_tl.serve._model import BatchResult, MemberRunner
from automl_tl.transforms import Preprocessing

__all__ = [
    "Counters",
    "Forward",
    "Row",
    "configure_batching",
    "device_for",
    "memory",
    "single_threaded",
    "torch_threads",
]


def memory() -> dict[str, int]:
    """This process's resident memory now and at its peak, in bytes (Linux /proc and getrusage)."""
    rss = 0
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"pid": os.getpid(), "rss_bytes": rss, "peak_rss_bytes": peak}


def device_for(args: AppArgs) -> str:
    if args.gpus_per_replica > 0:
        if not torch.cuda.is_available():
            raise ConfigError(
                f"gpus_per_replica={args.gpus_per_replica}, but torch sees no CUDA device in this replica"
            )
        return "cuda"
    return "cpu"


class Counters:
    def __init__(self) -> None:
        self.batches = 0
        self.images = 0
        self.forward_ms = 0.0

    def add(self, batch_size: int, forward_ms: float) -> None:
        self.batches += 1
        self.images += batch_size
        self.forward_ms += forward_ms

    def to_dict(self) -> dict[str, Any]:
        mean = self.images / self.batches if self.batches else 0.0
        return {"batches": self.batches, "images": self.images, "mean_batch_size": mean,
                "forward_ms": round(self.forward_ms, 3), **memory()}  # fmt: skip


def torch_threads(args: AppArgs) -> int:
    return args.torch_threads or max(1, round(args.cpus_per_replica))


# libgomp (torch's OpenMP) lets a team's idle threads spin between parallel regions only while it manages no
# more threads than there are cores; past that they sleep and wake on every region. A second thread that runs
# multi-threaded torch ops (the replica's constructor, a decode thread) tips it over: a tf_efficientnet_lite0
# forward at batch 1 with 2 threads on 2 cores took 22-25 ms instead of 12.4-12.8 ms. So a replica's models
# are built, warmed up and run in its one forward thread, and every other thread runs torch single-threaded.


def single_threaded() -> None:
    """Thread initializer: this thread's torch ops run on it alone and never start an OpenMP team."""
    torch.set_num_threads(1)


def configure_batching(batched: Any, args: AppArgs) -> None:
    """Apply the configured batch size and wait to a ``@serve.batch`` method (its decorator has defaults)."""
    batched.set_max_batch_size(args.max_batch_size)
    batched.set_batch_wait_timeout_s(args.batch_wait_timeout_s)


Row = tuple[tuple[np.ndarray, ...], int, float]  # member softmax rows, batch size, batch forward ms


# Batches of every size from 1 to max_batch_size leave the glibc heap fragmented, and a replica's resident
# size would creep up under varied load; giving free pages back every few dozen batches keeps it level.
TRIM_EVERY_BATCHES = 32


class Forward:
    """A replica's models behind ``@serve.batch``: one batch at a time, in a worker thread.

    ``@serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first request, whether or not the
    model is free, so under load it would queue many small batches behind the running one. ``admit`` holds
    requests back while a batch runs; when it ends they all reach the batcher in the same loop turn and
    form one batch of up to ``max_batch_size``. An idle replica admits at once, so a lone request does not
    wait.
    """

    def __init__(self, build: Callable[[], MemberRunner], threads: int) -> None:
        self.counters = Counters()
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="forward", initializer=torch.set_num_threads, initargs=(threads,)
        )
        # Built and warmed up in the thread that will run it: its OpenMP team is the process's only one.
        self.runner = self._executor.submit(build).result()
        self._running = 0
        self._idle: asyncio.Event | None = None  # made in the replica's event loop, on first use

    @classmethod
    def serving(cls, artifact: Artifact, member_indices: Sequence[int], args: AppArgs) -> Forward:
        """The forward thread of a replica that serves these members of the artifact."""
        preprocessing = [Preprocessing.from_dict(artifact.members[i].preprocessing) for i in member_indices]

        def build() -> MemberRunner:
            runner = MemberRunner.build(artifact, member_indices, device_for(args))
            runner.warm_up(preprocessing, args.max_batch_size)
            return runner

        return cls(build, torch_threads(args))

    def _event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            self._idle.set()
        return self._idle

    async def admit(self) -> None:
        await self._event().wait()

    @property
    def idle(self) -> bool:
        return self._running == 0

    async def solo(self, prepare: Callable[[], list[tuple[torch.Tensor, ...]]]) -> list[Row]:
        """Prepare and forward one request's images as one batch, in the forward thread, while nothing else
        runs: a lone request skips the decode pool and the batcher (two thread hand-offs and a queue: a lone
        request's p50 fell from 34.8 to 32.1 ms on 2 cores). Requests arriving meanwhile wait at
        :meth:`admit` as they would for a batch."""
        idle = self._event()
        self._running += 1
        idle.clear()
        try:
            inputs, result = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._prepare_and_forward, prepare
            )
        finally:
            self._running -= 1
            if self._running == 0:
                idle.set()
        self.counters.add(len(inputs), result.forward_ms)
        return _rows(result, len(inputs))

    def _prepare_and_forward(
        self, prepare: Callable[[], list[tuple[torch.Tensor, ...]]]
    ) -> tuple[list[tuple[torch.Tensor, ...]], BatchResult]:
        inputs = prepare()
        return inputs, self._forward(inputs)

    def _forward(self, inputs: list[tuple[torch.Tensor, ...]]) -> BatchResult:
        result = self.runner.run(inputs)
        if self.counters.batches % TRIM_EVERY_BATCHES == TRIM_EVERY_BATCHES - 1:
            trim_heap()
        return result

    async def run(self, inputs: list[tuple[torch.Tensor, ...]]) -> list[Row]:
        """Forward a batch the batcher formed (already prepared)."""
        return await self.solo(lambda: inputs)


def _rows(result: BatchResult, size: int) -> list[Row]:
    return [(tuple(p[j] for p in result.member_probs), size, result.forward_ms) for j in range(size)]
