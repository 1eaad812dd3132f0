"""One claimed job as the threads of a worker share it, and the ways a job is stopped.

`RunningJob` is one claim: its lease owner, its guarded stream publisher, its running time over
all attempts, and what the lease thread (serve._keep_lease) learnt about it since (the lease was
lost, a cancel was recorded in the store, the hard time limit passed); the job runners ask it
`check()` while the job runs. `Decoding` is what the batcher needs of a generation job. A module of its own, below the
context, the batcher and the runners, so that none of them imports another to name these.
"""

from __future__ import annotations

import queue
import time
import traceback
from dataclasses import dataclass, field
from typing import Protocol

import redis

from gencli.worker.keys import Keys
from gencli.worker.messages import CancelRequested, HardLimitPassed, Idle, LeaseGone, Message, StreamTaken
from gencli.worker.rows import ItemRun
from gencli.worker.stream import Publisher, StreamRefused


class LeaseClock:
    """Until when this worker's lease of a job surely holds, by this process's monotonic clock:
    from just before the claim, pushed on from just before each renewal that the store accepted
    (the lease thread alone writes `until`). Nothing of the job is published past it: a worker
    that was stopped (SIGSTOP, a paused VM) past its lease and wakes up must not publish, even
    where Redis restarted empty meanwhile and lost the stream's owner key that would refuse it
    (found by bench.exact: a worker woken after such a restart took a stream over from its new
    owner). The margin leaves room for the two clocks' rates and a slow publish. That check and the
    publish are two steps, and a worker stopped between them would still publish once on waking:
    so every publish also carries this moment as a fence, which Redis compares with its own clock
    (worker/stream.py; the offset between the clocks is measured at each heartbeat)."""

    MARGIN = 0.1  # of the lease

    def __init__(self, seconds: float, since: float):
        self.seconds = seconds
        self.until = since + seconds * (1 - self.MARGIN)

    def renewed(self, since: float) -> None:
        self.until = max(self.until, since + self.seconds * (1 - self.MARGIN))

    def holds(self) -> bool:
        return time.monotonic() < self.until

    def until_unix(self) -> float:
        """The same moment by the wall clock (seconds since the epoch): the publisher's fence."""
        return time.time() + (self.until - time.monotonic())


class JobCancelled(Exception):
    pass


class LeaseLost(Exception):
    pass


class TimeLimitExceeded(Exception):
    pass


class HardTimeLimitExceeded(Exception):
    @classmethod
    def after(cls, limit: float) -> HardTimeLimitExceeded:
        """The error of a job past GENCLI_HARD_TIME_LIMIT (limit seconds), its one wording."""
        return cls(f"hard time limit of {limit:g} s exceeded")


@dataclass
class RunningJob:
    """One claim of a job, owned by the job's own thread: the lease thread, the batcher and the
    outbox never set its fields; they `tell` it messages (worker/messages.py), which the job's
    thread applies as it reads them (`wait`, `check`). Other threads read only what does not
    change or is replaced whole: `elapsed()`, `stoppable` and `checkpoint`; `lease` is the lease
    thread's."""

    job_id: str
    owner: str  # this delivery's lease owner: fresh for every claim
    attempt: int
    pub: Publisher
    redis: redis.Redis
    keys: Keys
    lease: LeaseClock  # the lease thread's (RunningJob's other fields are the job thread's)
    run_seconds_before: float = 0.0  # running time of the job's earlier attempts
    stoppable: bool = False  # its runner stops it at a hard time limit (else the process is ended)
    cancel_seen: bool = False  # a cancel was asked for (given at a claim that found one: Claim.cancelled)
    started: float = field(default_factory=time.monotonic)
    lease_lost: bool = False  # another worker may own the job now
    hard_limited: bool = False  # past GENCLI_HARD_TIME_LIMIT
    inbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    # what the lease thread checkpoints: each running item's (idx, epoch, ids published so far),
    # a tuple the job's thread replaces whole; None when there is nothing to checkpoint
    checkpoint: tuple[tuple[int, int, tuple[int, ...]], ...] | None = None
    _last_check: float = 0.0

    def elapsed(self) -> float:
        """The job's running time over all its attempts, this one included: what every store write
        of it records (a total, so a checkpoint lost to a race with the job's end loses no time)."""
        return self.run_seconds_before + time.monotonic() - self.started

    def tell(self, msg: Message) -> None:
        """From any thread: the job's thread reads msg next time it looks."""
        self.inbox.put(msg)

    def wait(self, timeout: float) -> Message:
        """The job's thread: the next message (Idle after timeout seconds), applied to its flags."""
        try:
            msg = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return Idle()
        return self._apply(msg)

    def _apply(self, msg: Message) -> Message:
        match msg:
            case LeaseGone() | StreamTaken():
                self.lease_lost = True
            case CancelRequested():
                self.cancel_seen = True
            case HardLimitPassed():
                self.hard_limited = True
        return msg

    def publish(self, events: list[dict]) -> None:
        if not self.lease.holds():
            self.lease_lost = True
            raise LeaseLost(f"job {self.job_id}: its lease may have run out; nothing more is published")
        try:
            self.pub.publish(events)
        except StreamRefused as e:
            self.lease_lost = True
            raise LeaseLost(str(e)) from None

    def check(self, every: float = 0.05, *, polling: bool = True) -> None:
        """Raise LeaseLost, HardTimeLimitExceeded or JobCancelled when the job must stop. polling:
        this thread reads its inbox only here (a dataset job): apply what waits there, and read the
        job's Redis cancel key at most once per `every` (a generation job's thread reads every
        message in its own loop, and the outbox reads its cancel key in its publishing trips)."""
        if polling:
            while True:
                try:
                    self._apply(self.inbox.get_nowait())
                except queue.Empty:
                    break
            self.look_for_cancel(every)
        if self.lease_lost:
            raise LeaseLost(f"job {self.job_id}: lease lost")
        if self.hard_limited:
            raise HardTimeLimitExceeded()
        if self.cancel_seen:
            raise JobCancelled()

    def look_for_cancel(self, every: float) -> None:
        """Read the job's Redis cancel key, at most once per `every` seconds, into cancel_seen. A
        generation job's thread does this only when it has heard nothing for a while (a long step,
        a stalled device): the outbox reads the flags only when a step publishes, the lease thread
        the store's only once per lease/3."""
        now = time.monotonic()
        if self.cancel_seen or now - self._last_check < every:
            return
        self._last_check = now
        try:
            if self.redis.exists(self.keys.cancel(self.job_id)):
                self.cancel_seen = True
        except redis.RedisError:
            pass  # the store's flag reaches us through the lease thread


class PublishRefused(Exception):
    """Redis answered a publish with an error (full to its maxmemory, say): the job fails."""


def error_fields(e: BaseException, stats: dict | None = None) -> dict:
    """How a failure is stored: class, message, and where (file:line, device, batch size)."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{tb[-1].filename}:{tb[-1].lineno} in {tb[-1].name}" if tb else ""
    if stats:
        where += f"; device {stats.get('final_device')}, batch size {stats.get('final_batch_size')}"
    return {"error_class": type(e).__name__, "error_message": str(e)[:2000], "error_where": where}


class Decoding(Protocol):
    """A job whose items the batcher decodes (runner.GenerationJob)."""

    run: RunningJob  # told what happens to the job's rows (worker/messages.py)
    runs: dict[int, ItemRun]  # by item index, set before the items are handed over
    priority: int
