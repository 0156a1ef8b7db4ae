"""What each model replica runs around its models, in plain asyncio and torch: one batch at a time in each
of its forward lanes (worker threads), an admission gate that makes ``@serve.batch`` form full batches
under load, and counters. The forward itself is the inference core's
(:class:`~automl_tl.inference.core.MemberRunner`), as in the Predictor.
"""

from __future__ import annotations

import asyncio
import functools
import os
import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from automl_tl.backbones._inference import ab_off
from automl_tl.errors import ConfigError
from automl_tl.inference.artifact import Artifact
from automl_tl.inference.core import BatchResult, MemberRunner, Plan
from automl_tl.inference.latency import time_forward_ms
from automl_tl.inference.transforms import Preprocessing
from automl_tl.serve._args import AppArgs
from automl_tl.train.memory import trim_heap

__all__ = [
    "Counters",
    "Forward",
    "Row",
    "configure_batching",
    "device_for",
    "memory",
    "pin_torch_threads",
    "single_threaded",
    "spread",
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
        self.escalated = 0  # images a cascade sent past its cheap member
        self.forward_ms = 0.0
        self.lanes = lanes
        self.peak_busy_lanes = 0  # the most batches that were forwarded at once
        self.lone_request: dict[str, Any] | None = None  # how lone requests run, and the times that chose it

    def add(self, batch_size: int, forward_ms: float, escalated: int = 0) -> None:
        self.batches += 1
        self.images += batch_size
        self.forward_ms += forward_ms
        self.escalated += escalated

    def to_dict(self) -> dict[str, Any]:
        mean = self.images / self.batches if self.batches else 0.0
        rate = self.escalated / self.images if self.images else 0.0
        return {"batches": self.batches, "images": self.images, "mean_batch_size": mean,
                "escalated": self.escalated, "escalation_rate": round(rate, 4),
                "forward_ms": round(self.forward_ms, 3), "lanes": self.lanes,
                "peak_busy_lanes": self.peak_busy_lanes, "lone_request": self.lone_request, **memory()}  # fmt: skip


# libgomp (torch's OpenMP) lets a team's idle threads spin between parallel regions only while it manages no
# more threads than there are cores; past that they sleep and wake on every region. A second thread that runs
# multi-threaded torch ops (the replica's constructor, a decode thread) tips it over and slows every forward
# (figures in benchmarks/results/serve.json). So a replica's models
# are built, warmed up and run multi-threaded only in its first forward lane, and every other thread (decode
# threads, other lanes) runs torch single-threaded.


# torch sets a thread's OpenMP thread count lazily, at its first parallel op, to the count the process last set
# from any thread (ATen's ``lazy_init_num_threads``), and that overrides an earlier ``set_num_threads`` of the
# thread's own. A decode thread that set 1 but ran its first resize just after lane 0 set 2 for a lone request
# thus ran on 2 threads and started a second OpenMP team: libgomp then manages more threads than cores and
# stops spinning, and lane 0's forward took about twice as long for the rest of the replica's life (a test
# reproduces the race). Reading the count first runs that lazy step,
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
# Lone forwards timed each way when a replica chooses how to run its members (about 0.5 s for an ensemble of
# two small members on 2 cores).
CHOICE_ROUNDS = 7

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
    nothing else is admitted; or, for several members, with the members spread over the lanes on one thread
    each, where the replica measured that faster when it started (:attr:`member_lanes`). A batch-1 forward
    is faster on all threads, while under load two one-thread batches side by side served more than one two-thread batch at a time
    (``benchmarks/bench_serve.py``). Our reading: an OpenMP team waits at every barrier for whichever of its
    threads decoding or HTTP work has preempted, while a one-thread lane only slows itself.
    """

    def __init__(
        self,
        build: Callable[[], MemberRunner],
        threads: int,
        lanes: int = 1,
        example: Callable[[], tuple[torch.Tensor, ...]] | None = None,
        batch_size: int = 1,
        plan: Plan | None = None,
    ) -> None:
        self.counters = Counters(lanes)
        self.plan = plan  # a cascade routes each batch's uncertain rows past its first member
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
        self.member_lanes: list[list[int]] | None = None  # see _choose_member_lanes
        self.lone_threads = threads  # a cascade's lone request: see _choose_lone_threads
        self.latency_ms: list[dict[str, float]] = []  # each member's forward, timed when the replica started
        if example is not None:
            # Made in lane 0 too: filling a 224 px image is a parallel op, and on the calling thread it would
            # start a second OpenMP team (a 1 x 2 replica's lone forwards then took twice as long).
            one = self._lanes[0].submit(example).result()
            batch = [one] * batch_size
            # A few batch sizes, twice each: the first forwards of a shape pay for torch's lazy set-up (its
            # kernels' scratch memory and caches), not the requests.
            for size in [n for n in sorted({1, 2, max(1, batch_size // 2), batch_size}) for _ in range(2)]:
                self._lanes[0].submit(_on_threads, threads, self.runner.run, batch[:size]).result()
            if lanes > 1:
                for lane in self._lanes:
                    lane.submit(_on_threads, self.narrow_threads, self.runner.run, batch).result()
                if len(self.runner.models) > 1 and self.runner.device.type == "cpu" and not ab_off("lone_request_timing"):
                    # A cascade's lone request runs its cheap member first, so its members never run side by
                    # side; what is left to choose is how many threads that member runs on.
                    if plan is None or plan.threshold is None:
                        self.member_lanes = self._choose_member_lanes(one)
                    else:
                        self.lone_threads = self._choose_lone_threads(one)
            self.latency_ms = self._lanes[0].submit(_on_threads, 1, self._time_members, one).result()
        self._free = list(range(lanes))
        self._wide = False  # a forward on every thread is running: nothing else may start
        self._open: asyncio.Event | None = None  # made in the replica's event loop, on first use

    @classmethod
    def serving(cls, artifact: Artifact, member_indices: Sequence[int], args: AppArgs, plan: Plan | None = None) -> Forward:
        """The forward lanes of a replica that serves these members of the artifact (the ``plan``'s, routed as
        its cascade routes them when it is one)."""
        preprocessing = [Preprocessing.from_dict(artifact.members[i].preprocessing) for i in member_indices]
        device = device_for(args)
        return cls(
            lambda: MemberRunner.build(artifact, member_indices, device),
            args.threads_per_replica(),
            args.lanes_per_replica(),
            lambda: tuple(torch.zeros(3, p.input_size, p.input_size) for p in preprocessing),
            args.max_batch_size,
            plan,
        )

    def _time_members(self, example: tuple[torch.Tensor, ...]) -> list[dict[str, float]]:
        """Each member's forward latency on this replica (called in lane 0 on one thread, as a forward lane of
        a loaded replica runs it, after the warm-up)."""
        return [time_forward_ms(functools.partial(self.runner.forward_batch, m), example[m])
                for m in range(len(self.runner.models))]  # fmt: skip

    def _choose_member_lanes(self, example: tuple[torch.Tensor, ...]) -> list[list[int]] | None:
        """Members spread over the lanes, if a lone request is answered sooner with each lane forwarding its
        members on one thread, all lanes at once, than with every member in turn on all threads; else None.

        Timed here, on the replica's own cores, since which is faster depends on the members: two members of
        similar cost gain from running side by side (mobilenetv2_100 at 160 px beside tf_efficientnet_lite0 at
        224 px), while one large member and a
        small one would wait on the large member's slower single-thread forward.
        """
        one = [example]

        def member_ms(m: int) -> float:
            return _median_ms(lambda: self._lanes[0].submit(_on_threads, 1, self.runner.forward, m, one).result())

        groups = spread([member_ms(m) for m in range(len(self.runner.models))], len(self._lanes))

        def wide() -> None:
            self._lanes[0].submit(_on_threads, self.threads, self.runner.run, one).result()

        def side_by_side() -> None:
            running = [self._lanes[i].submit(self._forward_members, group, one) for i, group in enumerate(groups)]
            for done in running:
                done.result()

        times: dict[str, list[float]] = {"wide": [], "side_by_side": []}
        for _ in range(CHOICE_ROUNDS):  # in turn, so a drift in the machine's speed meets both alike
            times["wide"].append(_elapsed_ms(wide))
            times["side_by_side"].append(_elapsed_ms(side_by_side))
        wide_ms, split_ms = (float(np.median(times[k])) for k in ("wide", "side_by_side"))
        chosen = groups if split_ms < wide_ms else None
        self.counters.lone_request = {"wide_ms": round(wide_ms, 3), "side_by_side_ms": round(split_ms, 3),
                                      "member_lanes": chosen}  # fmt: skip
        return chosen

    def _choose_lone_threads(self, example: tuple[torch.Tensor, ...]) -> int:
        """The torch threads a cascade's lone request runs on: one, if its cheap member answered a lone image
        sooner on one thread than on all of them when the replica started; else all.

        On a busy machine a team of threads waits at every barrier for whichever of them was preempted, and
        one thread can win even where all win on an idle one; the ensemble's lone request is chosen the same
        way (:meth:`_choose_member_lanes`). An escalated row's other members then run on that count too.
        """
        one = [example]

        def cheap(threads: int) -> Callable[[], object]:
            return lambda: self._lanes[0].submit(_on_threads, threads, self.runner.forward, 0, one).result()

        times: dict[str, list[float]] = {"wide": [], "one_thread": []}
        for _ in range(CHOICE_ROUNDS):  # in turn, so a drift in the machine's speed meets both alike
            times["wide"].append(_elapsed_ms(cheap(self.threads)))
            times["one_thread"].append(_elapsed_ms(cheap(1)))
        wide_ms, one_ms = (float(np.median(times[k])) for k in ("wide", "one_thread"))
        chosen = 1 if one_ms < wide_ms else self.threads
        self.counters.lone_request = {"wide_ms": round(wide_ms, 3), "one_thread_ms": round(one_ms, 3),
                                      "member_lanes": None, "cascade_threads": chosen}  # fmt: skip
        return chosen

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
        """Prepare and forward one request's images as one batch while nothing else runs: in lane 0 on every
        thread (a cascade: on :attr:`lone_threads`), or with :attr:`member_lanes`, each lane forwarding its
        members on one thread, all at once.
        A lone request skips the decode pool and the batcher (two thread hand-offs and a queue on its
        critical path). Requests arriving meanwhile wait at
        :meth:`admit` as they would for a batch. Call it only while :attr:`idle`."""
        if not self.idle:
            raise RuntimeError("Forward.solo needs an idle replica")
        self._claim(0, wide=True)
        if self.member_lanes is None:
            return await self._go(0, self.lone_threads, prepare)
        try:
            loop = asyncio.get_running_loop()
            inputs = await loop.run_in_executor(self._lanes[0], _on_threads, 1, prepare)
            start = time.perf_counter()
            parts = await asyncio.gather(*(
                loop.run_in_executor(self._lanes[i], self._forward_members, group, inputs)
                for i, group in enumerate(self.member_lanes)
            ))  # fmt: skip
            probs = dict(pair for part in parts for pair in part)
            result = BatchResult(tuple(probs[m] for m in sorted(probs)), (time.perf_counter() - start) * 1000.0)
        finally:
            self._release(0)
        self._count(len(inputs), result)
        return _rows(result, len(inputs))

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
        self._count(len(inputs), result)
        return _rows(result, len(inputs))

    def _count(self, batch_size: int, result: BatchResult) -> None:
        self.counters.add(batch_size, result.forward_ms, result.escalated)
        if self.counters.batches % TRIM_EVERY_BATCHES == 0:
            self._lanes[0].submit(trim_heap)  # off the event loop: before lane 0's next batch

    def _prepare_and_forward(
        self, threads: int, prepare: Callable[[], list[tuple[torch.Tensor, ...]]]
    ) -> tuple[list[tuple[torch.Tensor, ...]], BatchResult]:
        inputs = prepare()
        return inputs, _on_threads(threads, self.runner.run, inputs, self.plan)

    def _forward_members(
        self, members: list[int], inputs: list[tuple[torch.Tensor, ...]]
    ) -> list[tuple[int, np.ndarray]]:
        """These members' softmax for a batch, on this thread alone (a lane of a lone request's forward)."""
        return [(m, _on_threads(1, self.runner.forward, m, inputs)) for m in members]


def _on_threads(threads: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with this thread's torch ops on ``threads`` threads (torch's count is per thread)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(*args)


def spread(costs: Sequence[float], lanes: int) -> list[list[int]]:
    """Indices of ``costs`` in at most ``lanes`` groups of near-equal total cost: the costliest first, each
    to the group that is cheapest so far (longest-processing-time-first scheduling)."""
    if lanes < 1:
        raise ValueError(f"lanes must be at least 1, got {lanes}")
    groups: list[list[int]] = [[] for _ in range(min(lanes, len(costs)))]
    totals = [0.0] * len(groups)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        g = totals.index(min(totals))
        groups[g].append(i)
        totals[g] += costs[i]
    return groups


def _elapsed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def _median_ms(fn: Callable[[], object], runs: int = 5) -> float:
    return float(np.median([_elapsed_ms(fn) for _ in range(runs)]))


def _rows(result: BatchResult, size: int) -> list[Row]:
    return [(tuple(p[j] for p in result.member_probs), size, result.forward_ms) for j in range(size)]
