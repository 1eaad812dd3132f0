"""One claimed job as the threads of a worker share it, and the ways a job is stopped.

`RunningJob` is one claim: its lease owner, its guarded stream publisher, its running time over
all attempts, and what the lease thread (serve._keep_lease) learnt about it since (the lease was
lost, a cancel was recorded in the store, the hard time limit passed); the job runners ask it
`check()` while the job runs. `ItemRun` is one of a generation job's items while it decodes, and
`Decoding` what the batcher needs of the job that holds it. A module of its own, below the
context, the batcher and the runners, so that none of them imports another to name these.
"""

from __future__ import annotations

import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import redis

from gencli.worker.keys import Keys
from gencli.worker.stream import Publisher, StreamRefused

if TYPE_CHECKING:
    from gencli.model.engine import Engine, Sequence
    from gencli.model.params import SamplingParams
    from gencli.model.textstream import TextStream


class JobCancelled(Exception):
    pass


class LeaseLost(Exception):
    pass


class TimeLimitExceeded(Exception):
    pass


class HardTimeLimitExceeded(Exception):
    pass


@dataclass
class RunningJob:
    job_id: str
    owner: str  # this delivery's lease owner: fresh for every claim
    attempt: int
    pub: Publisher
    redis: redis.Redis
    keys: Keys
    run_seconds_before: float = 0.0  # running time of the job's earlier attempts
    started: float = field(default_factory=time.monotonic)
    lease_lost: bool = False  # set by the lease thread: another worker may own the job now
    cancel_seen: bool = False  # set by the lease thread (the store records a cancel) or the outbox (Redis does)
    hard_limited: bool = False  # set by the lease thread: past GENCLI_HARD_TIME_LIMIT
    stoppable: bool = False  # its runner stops it at a hard time limit (else the process is ended)
    inbox: queue.SimpleQueue | None = None  # the job thread's, where it waits (runner.GenerationJob)
    progress: Callable[[], list[tuple[int, int, list[int]]]] | None = None  # for the lease thread's checkpoints
    _last_check: float = 0.0

    def elapsed(self) -> float:
        """The job's running time over all its attempts, this one included: what every store write
        of it records (a total, so a checkpoint lost to a race with the job's end loses no time)."""
        return self.run_seconds_before + time.monotonic() - self.started

    def wake(self) -> None:
        """Another thread changed a flag: the job's own thread looks at once (if it waits on an inbox)."""
        if self.inbox is not None:
            self.inbox.put(("check",))

    def publish(self, events: list[dict]) -> None:
        try:
            self.pub.publish(events)
        except StreamRefused as e:
            self.lease_lost = True
            raise LeaseLost(str(e)) from None

    def check(self, every: float = 0.05, *, poll_redis: bool = True) -> None:
        """Raise LeaseLost, HardTimeLimitExceeded or JobCancelled when the job must stop; with
        poll_redis, at most one Redis read of its cancel key per `every` (a generation job's cancel
        key is read by the outbox instead, in its publishing round trips)."""
        if self.lease_lost:
            raise LeaseLost(f"job {self.job_id}: lease lost")
        if self.hard_limited:
            raise HardTimeLimitExceeded()
        if self.cancel_seen:
            raise JobCancelled()
        now = time.monotonic()
        if not poll_redis or now - self._last_check < every:
            return
        self._last_check = now
        try:
            if self.redis.exists(self.keys.cancel(self.job_id)):
                raise JobCancelled()
        except redis.RedisError:
            pass  # the store's flag reaches us through the lease thread




def error_fields(e: BaseException, stats: dict | None = None) -> dict:
    """How a failure is stored: class, message, and where (file:line, device, batch size)."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{tb[-1].filename}:{tb[-1].lineno} in {tb[-1].name}" if tb else ""
    if stats:
        where += f"; device {stats.get('final_device')}, batch size {stats.get('final_batch_size')}"
    return {"error_class": type(e).__name__, "error_message": str(e)[:2000], "error_where": where}


@dataclass(eq=False)
class ItemRun:
    idx: int
    epoch: int
    prompt_ids: list[int]
    stream: TextStream
    seed: int | None
    params: SamplingParams
    seq: Sequence | None = None  # the batcher's, once it took the item
    engine: Engine | None = None  # which engine holds seq
    published: int = 0  # tok events with an id of the item in the log (counted by the outbox)


class Decoding(Protocol):
    """A job whose items the batcher decodes (runner.GenerationJob)."""

    run: RunningJob
    runs: dict[int, ItemRun]  # by item index
    inbox: queue.SimpleQueue  # where the batcher and the outbox tell the job's thread what happened
    stats: dict  # out-of-memory rungs that hit it: oom_retries, final_batch_size, final_device
    priority: int
