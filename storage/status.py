"""The states of a job and of its items: plain enums, importable without SQLAlchemy (the CLI's
option choices need them before any store is opened)."""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class ItemStatus(str, enum.Enum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


def iso(t) -> str | None:
    """A store time (naive UTC) as ISO 8601 with milliseconds and a Z, as the CLI and the API print it."""
    return None if t is None else t.isoformat(timespec="milliseconds") + "Z"
