"""What each model replica runs around its models, in plain asyncio and torch: one batch at a time in each
of its forward lanes (worker threads), an admission gate that makes ``@serve.batch`` form full batches
under load, and counters.
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

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
    "pin_torch_threads",
    "single_threaded",
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
    def __init__(self, lanes: int = 1) -> None:
        self.batches = 0
        self.images = 0
        self.forward_ms = 0.0
        self.lanes = lanes
        self.peak_busy_lanes = 0  # the most batches that were forwarded at once

    def add(self, batch_size: int, forward_ms: float) -> None:
        self.batches += 1
        self.images += batch_size
        self.forward_ms += forward_ms

    def to_dict(self) -> dict[str, Any]:
        mean = self.images / self.batches if self.batches else 0.0
        return {"batches": self.batches, "images": self.images, "mean_batch_size": mean,
                "forward_ms": round(self.forward_ms, 3), "lanes": self.lanes,
                "peak_busy_lanes": self.peak_busy_lanes, **memory()}  # fmt: skip


# libgomp (torch's OpenMP) lets a team's idle threads spin between parallel regions only while it manages no
# more threads than there are cores; past that they sleep and wake on every region. A second thread that runs
# multi-threaded torch ops (the replica's constructor, a decode thread) tips it over: a tf_efficientnet_lite0
# forward at batch 1 with 2 threads on 2 cores took 22-25 ms instead of 12.4-12.8 ms. So a replica's models
# are built, warmed up and run multi-threaded only in its first forward lane, and every other thread (decode
# threads, other lanes) runs torch single-threaded.


# torch sets a thread's OpenMP thread count lazily, at its first parallel op, to the count the process last set
# from any thread (ATen's ``lazy_init_num_threads``), and that overrides an earlier ``set_num_threads`` of the
# thread's own. A decode thread that set 1 but ran its first resize just after lane 0 set 2 for a lone request
# thus ran on 2 threads and started a second OpenMP team: libgomp then manages more threads than cores and
# stops spinning, and lane 0's forward took twice as long for the rest of the replica's life (lone requests to
# a 1 x 2 replica: 24.2 instead of 12.8 ms server-side for the best member, 45.4 instead of 23 for the
# ensemble; reproduced in-process, 38.4 against 14.8-19.2 ms). Reading the count first runs that lazy step,
# so the count set next stays.
def pin_torch_threads(threads: int) -> None:
    """This thread's torch ops run on ``threads`` threads, whatever other threads set later."""
    torch.get_num_threads()  # ATen's one-time, per-thread initialisation: now, not at the first op
    torch.set_num_threads(threads)


def single_threaded() -> None:
    """Thread initializer: this thread's torch ops run on it alone and never start an OpenMP team."""
    pin_torch_threads(1)


def configure_batching(batched: Any, args: AppArgs) -> None:
    """Apply the configured batch size and wait to a ``@serve.batch`` method (its decorator has defaults)."""
    batched.set_max_batch_size(args.max_batch_size)
    batched.set_batch_wait_timeout_s(args.batch_wait_timeout_s)


Row = tuple[tuple[np.ndarray, ...], int, float]  # member softmax rows, batch size, batch forward ms


# Batches of every size from 1 to max_batch_size leave the glibc heap fragmented, and a replica's resident
# size would creep up under varied load; giving free pages back every few dozen batches keeps it level.
TRIM_EVERY_BATCHES = 32

T = TypeVar("T")


class Forward:
    """A replica's models behind ``@serve.batch``, run in ``lanes`` worker threads, one batch per lane.

    ``@serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first request, whether or not the
    model is free, so under load it would queue many small batches behind the running ones. ``admit`` holds
    requests back while every lane is busy; when one ends they all reach the batcher in the same loop turn and
    form one batch of up to ``max_batch_size``. An idle replica admits at once, so a lone request does not
    wait.

    With one lane (the default on a GPU, and on a one-core replica) every forward runs on ``threads`` torch
    threads. With several (a CPU replica of several cores), batches run side by side on one torch thread
    each, and a request that finds the replica idle (:meth:`solo`) runs on all ``threads`` in lane 0 while
    nothing else is admitted. On 2 cores a batch-1 forward took 13.5 ms on 2 threads against 18.7 ms on 1,
    while under load two one-thread batches side by side served more than one two-thread batch at a time
    (``benchmarks/bench_serve.py``). Our reading: an OpenMP team waits at every barrier for whichever of its
    threads decoding or HTTP work has preempted, while a one-thread lane only slows itself.
    """

    def __init__(
        self,
        build: Callable[[], MemberRunner],
        threads: int,
        lanes: int = 1,
        warm_up: Callable[[MemberRunner], object] | None = None,
    ) -> None:
        self.counters = Counters(lanes)
        self.threads = threads
        self.narrow_threads = threads if lanes == 1 else 1
        self._lanes = [
            ThreadPoolExecutor(1, thread_name_prefix=f"forward{i}", initializer=pin_torch_threads,
                               initargs=(threads if i == 0 else self.narrow_threads,))  # fmt: skip
            for i in range(lanes)
        ]
        # Built and warmed up in lane 0: its OpenMP team is the process's only one (the other lanes never
        # start one), and the first request of either width does not pay for lazy initialisation.
        self.runner = self._lanes[0].submit(build).result()
        if warm_up is not None:
            self._lanes[0].submit(_on_threads, threads, warm_up, self.runner).result()
            if lanes > 1:
                for lane in self._lanes:
                    lane.submit(_on_threads, self.narrow_threads, warm_up, self.runner).result()
        self._free = list(range(lanes))
        self._wide = False  # a forward on every thread is running: nothing else may start
        self._open: asyncio.Event | None = None  # made in the replica's event loop, on first use

    @classmethod
    def serving(cls, artifact: Artifact, member_indices: Sequence[int], args: AppArgs) -> Forward:
        """The forward lanes of a replica that serves these members of the artifact."""
        preprocessing = [Preprocessing.from_dict(artifact.members[i].preprocessing) for i in member_indices]
        device = device_for(args)
        return cls(
            lambda: MemberRunner.build(artifact, member_indices, device),
            args.threads_per_replica(),
            args.lanes_per_replica(),
            lambda runner: runner.warm_up(preprocessing, args.max_batch_size),
        )

    def _gate(self) -> asyncio.Event:
        if self._open is None:
            self._open = asyncio.Event()
            self._update()
        return self._open

    def _update(self) -> None:
        gate = self._gate()
        if self._free and not self._wide:
            gate.set()
        else:
            gate.clear()

    async def admit(self) -> None:
        await self._gate().wait()

    @property
    def idle(self) -> bool:
        return len(self._free) == len(self._lanes)

    async def solo(self, prepare: Callable[[], list[tuple[torch.Tensor, ...]]]) -> list[Row]:
        """Prepare and forward one request's images as one batch on every thread, while nothing else runs:
        a lone request skips the decode pool and the batcher (two thread hand-offs and a queue: a lone
        request's p50 fell from 34.8 to 32.1 ms on 2 cores). Requests arriving meanwhile wait at
        :meth:`admit` as they would for a batch. Call it only while :attr:`idle`."""
        if not self.idle:
            raise RuntimeError("Forward.solo needs an idle replica")
        self._claim(0, wide=True)
        return await self._go(0, self.threads, prepare)

    async def start(self, inputs: list[tuple[torch.Tensor, ...]]) -> list[asyncio.Future[Row]]:
        """Forward a batch the batcher formed (already prepared) on the next free lane; returns once it has
        started, with one future per image, so the batcher can form the next batch for another lane."""
        gate = self._gate()
        while not gate.is_set():  # set exactly while a lane is free and no wide forward runs
            await gate.wait()
        lane = self._free[-1]
        self._claim(lane, wide=False)
        task = asyncio.ensure_future(self._go(lane, self.narrow_threads, lambda: inputs))
        futures: list[asyncio.Future[Row]] = [asyncio.get_running_loop().create_future() for _ in inputs]

        def settle(done: asyncio.Future[list[Row]]) -> None:
            for j, future in enumerate(futures):
                if future.done():
                    continue
                if done.cancelled():
                    future.cancel()
                elif (error := done.exception()) is not None:
                    future.set_exception(error)
                else:
                    future.set_result(done.result()[j])

        task.add_done_callback(settle)
        return futures

    def _claim(self, lane: int, wide: bool) -> None:
        self._free.remove(lane)
        self._wide = wide
        self._update()
        busy = len(self._lanes) - len(self._free)
        self.counters.peak_busy_lanes = max(self.counters.peak_busy_lanes, busy)

    def _release(self, lane: int) -> None:
        self._free.append(lane)
        self._wide = False  # only a solo forward is wide, and nothing runs beside it
        self._update()

    async def _go(self, lane: int, threads: int, prepare: Callable[[], list[tuple[torch.Tensor, ...]]]) -> list[Row]:
        """Run ``prepare`` and the forward in a lane that :meth:`_claim` took, then give the lane back."""
        try:
            inputs, result = await asyncio.get_running_loop().run_in_executor(
                self._lanes[lane], self._prepare_and_forward, threads, prepare
            )
        finally:
            self._release(lane)
        self.counters.add(len(inputs), result.forward_ms)
        return _rows(result, len(inputs))

    def _prepare_and_forward(
        self, threads: int, prepare: Callable[[], list[tuple[torch.Tensor, ...]]]
    ) -> tuple[list[tuple[torch.Tensor, ...]], BatchResult]:
        inputs = prepare()
        return inputs, _on_threads(threads, self._forward, inputs)

    def _forward(self, inputs: list[tuple[torch.Tensor, ...]]) -> BatchResult:
        result = self.runner.run(inputs)
        if self.counters.batches % TRIM_EVERY_BATCHES == TRIM_EVERY_BATCHES - 1:
            trim_heap()
        return result


def _on_threads(threads: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with this thread's torch ops on ``threads`` threads (torch's count is per thread)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(*args)


def _rows(result: BatchResult, size: int) -> list[Row]:
    return [(tuple(p[j] for p in result.member_probs), size, result.forward_ms) for j in range(size)]
