"""What the worker's other threads tell a job's thread: small frozen messages, read with `match`.

A job's state (its flags, what each item has published, its out-of-memory record) has one
owner, the job's own thread (runner.GenerationJob, prep_runner). The batcher, the outbox and the
lease thread never write it: they put one of these on the job's inbox (`RunningJob.tell`), and
the job's thread applies it when it next looks. `Idle` is what a wait that timed out reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gencli.worker.rows import ItemRun


@dataclass(frozen=True)
class Published:
    """The outbox: these token ids of the job's items are in its stream now (by item index), and
    these items' last events were among them (or they ended with no event left to publish)."""

    ids: dict[int, tuple[int, ...]] = field(default_factory=dict)
    ended: tuple[ItemRun, ...] = ()


@dataclass(frozen=True)
class Stopped:
    """The batcher: the job's rows are out of the batch, and every event they made was sent."""


@dataclass(frozen=True)
class StreamTaken:
    """The outbox: the job's stream refused a publish (another worker owns the job now)."""

    reason: str


@dataclass(frozen=True)
class RedisLost:
    """The outbox: Redis did not answer a publish, after the client's retries."""

    error: BaseException


@dataclass(frozen=True)
class PublishFailed:
    """The outbox: Redis answered a publish with an error (full to its maxmemory, say)."""

    error: BaseException


@dataclass(frozen=True)
class DecodeFailed:
    """The batcher: the job's rows failed (a refused item, a broken step, memory even on the CPU)
    and are out of the batch already."""

    error: BaseException


@dataclass(frozen=True)
class MemoryRung:
    """The batcher: the job had rows in a step that ran out of memory; the engine goes on at
    batch_size rows (on device, when the job's rows moved to the CPU copy)."""

    batch_size: int
    device: str | None = None


@dataclass(frozen=True)
class LeaseGone:
    """The lease thread: the store says the job's lease is no longer this worker's."""


@dataclass(frozen=True)
class CancelRequested:
    """The lease thread (the store's flag) or the outbox (Redis's): a cancel was asked for."""


@dataclass(frozen=True)
class HardLimitPassed:
    """The lease thread: the job's running time passed GENCLI_HARD_TIME_LIMIT."""


@dataclass(frozen=True)
class Idle:
    """No message within the wait: time to look at the soft time limit."""


Message = (Published | Stopped | StreamTaken | RedisLost | PublishFailed | DecodeFailed | MemoryRung | LeaseGone
           | CancelRequested | HardLimitPassed | Idle)
