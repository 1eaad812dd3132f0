"""The store's operations on jobs and items: the record of everything gencli does.

Redis carries messages and tokens; this is where a job's state lives. Writes by a worker are
guarded by its lease (`lease_owner`): a worker that lost its job to another (it stalled, the
job was taken over) can no longer write results, so a job gets one set of outputs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import load_only

from gencli.storage.db import (
    Item,
    ItemStatus,
    Job,
    JobStatus,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from gencli.storage.migrations import migrate

_stores: dict[str, Store] = {}


def open_store(url: str) -> Store:
    """The store at url, migrated, shared within this process."""
    if url not in _stores:
        _stores[url] = Store(url)
    return _stores[url]


class StoreError(Exception):
    pass


@dataclass
class Claim:
    ok: bool
    reason: str = ""  # why not: "done", "leased", "cancelled", "too many deliveries", "missing"
    attempt: int = 0


class Store:
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        migrate(self.engine)
        self.Session = make_sessionmaker(self.engine)  # reads
        self.Write = make_sessionmaker(self.engine, write=True)

    # --- submit side -------------------------------------------------------------------
    def create_job(
        self,
        *,
        model: str,
        params: dict,
        items: list[dict],
        kind: str = "generate",
        priority: int = 0,
        idempotency_key: str | None = None,
    ) -> tuple[Job, bool]:
        """Record a job and its items in one transaction; (job, created).

        With an idempotency key that is already recorded, the existing job comes back.
        """
        if idempotency_key:
            existing = self.job_by_key(idempotency_key)
            if existing:
                return existing, False
        job = Job(
            id=uuid.uuid4().hex,
            kind=kind,
            model=model,
            status=JobStatus.QUEUED.value,
            params=params,
            priority=priority,
            idempotency_key=idempotency_key,
            created_at=utcnow(),
            attempts=0,
            cancel_requested=False,
            oom_retries=0,
            n_items=len(items),
            completion_tokens=0,
        )
        try:
            with self.Write.begin() as s:
                s.add(job)
                s.flush()
                if items:  # a prep job has none
                    rows = [
                        dict(job_id=job.id, idx=i, line=it.get("line", i + 1), custom_id=it.get("custom_id"),
                             prompt=it["prompt"], params=it.get("params"), status=ItemStatus.PENDING.value)
                        for i, it in enumerate(items)
                    ]
                    s.execute(Item.__table__.insert(), rows)
        except IntegrityError:
            if idempotency_key:  # a concurrent submit with the same key won
                existing = self.job_by_key(idempotency_key)
                if existing:
                    return existing, False
            raise
        return job, True

    def delete_job(self, job_id: str) -> None:
        """Remove a job that could not be enqueued (nothing half-recorded)."""
        with self.Write.begin() as s:
            s.execute(Item.__table__.delete().where(Item.job_id == job_id))
            s.execute(Job.__table__.delete().where(Job.id == job_id))

    def job_by_key(self, key: str) -> Job | None:
        with self.Session() as s:
            return s.scalars(select(Job).where(Job.idempotency_key == key)).first()

    def get_job(self, job_id: str) -> Job | None:
        """A job by id, or by a unique prefix of at least 6 characters."""
        with self.Session() as s:
            job = s.get(Job, job_id)
            if job or len(job_id) < 6:
                return job
            found = s.scalars(select(Job).where(Job.id.startswith(job_id)).limit(2)).all()
            return found[0] if len(found) == 1 else None

    def items(self, job_id: str) -> list[Item]:
        with self.Session() as s:
            return list(s.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.idx)))

    def list_jobs(self, *, status: str | None = None, model: str | None = None, kind: str | None = None,
                  limit: int = 50) -> list[Job]:
        q = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if status:
            q = q.where(Job.status == status)
        if model:
            q = q.where(Job.model == model)
        if kind:
            q = q.where(Job.kind == kind)
        with self.Session() as s:
            return list(s.scalars(q))

    def queued_before(self, cutoff) -> list[Job]:
        """Jobs queued since before cutoff (a naive UTC datetime), oldest first; id, kind, model
        and priority loaded."""
        with self.Session() as s:
            return list(s.scalars(
                select(Job).where(Job.status == JobStatus.QUEUED.value, Job.created_at < cutoff)
                .order_by(Job.created_at).options(load_only(Job.id, Job.kind, Job.model, Job.priority))
            ))

    def queued_counts(self) -> dict[tuple[str, str], int]:
        """How many jobs wait, by (kind, model)."""
        with self.Session() as s:
            rows = s.execute(
                select(Job.kind, Job.model, func.count())
                .where(Job.status == JobStatus.QUEUED.value)
                .group_by(Job.kind, Job.model)
            )
            return {(kind, model): n for kind, model, n in rows}

    def request_cancel(self, job_id: str) -> str:
        """Cancel: a queued job is cancelled at once; a running one is asked to stop. New status."""
        with self.Write.begin() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise StoreError(f"no job {job_id}")
            if JobStatus(job.status).done:
                return job.status
            job.cancel_requested = True
            if job.status == JobStatus.QUEUED.value:
                job.status = JobStatus.CANCELLED.value
                job.finished_at = utcnow()
                s.execute(
                    update(Item)
                    .where(Item.job_id == job_id, Item.status == ItemStatus.PENDING.value)
                    .values(status=ItemStatus.CANCELLED.value)
                )
            return job.status

    def reset_for_retry(self, job_id: str) -> int:
        """Put a finished job's failed and cancelled items back (a failed prep job whole); how many."""
        with self.Write.begin() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise StoreError(f"no job {job_id}")
            if not JobStatus(job.status).done:
                raise StoreError(f"job {job_id} is {job.status}: only a finished job can be retried")
            if job.kind == "prep":  # no items: the whole job runs again
                n = int(job.status != JobStatus.SUCCEEDED.value)
            else:
                n = s.execute(
                    update(Item)
                    .where(Item.job_id == job_id,
                           Item.status.in_([ItemStatus.FAILED.value, ItemStatus.CANCELLED.value]))
                    .values(status=ItemStatus.PENDING.value, output=None, finish_reason=None, error=None,
                            completion_tokens=None)
                ).rowcount
            if n:
                job.status = JobStatus.QUEUED.value
                job.cancel_requested = False
                job.attempts = 0
                job.finished_at = None
                job.error_class = job.error_message = job.error_where = None
            return n

    # --- worker side -------------------------------------------------------------------
    def claim(self, job_id: str, *, owner: str, worker: str, device: str, lease_seconds: float,
              max_deliveries: int) -> Claim:
        """Take the job for this delivery, or say why not (a redelivered copy, a live lease)."""
        now = utcnow()
        with self.Write.begin() as s:
            job = s.get(Job, job_id)
            if job is None:
                return Claim(False, "missing")
            if JobStatus(job.status).done:
                return Claim(False, "done")
            if job.cancel_requested:
                self._finish(s, job, JobStatus.CANCELLED)
                return Claim(False, "cancelled")
            if job.status == JobStatus.RUNNING.value and job.lease_expires and job.lease_expires > now:
                return Claim(False, "leased")
            job.attempts += 1
            if job.attempts > max_deliveries:
                job.error_class = "DeliveryLimit"
                job.error_message = (f"the job was delivered {job.attempts - 1} times and never finished: "
                                     "it may crash its worker")
                self._finish(s, job, JobStatus.FAILED)
                return Claim(False, "too many deliveries")
            job.status = JobStatus.RUNNING.value
            job.lease_owner = owner
            job.lease_expires = now + timedelta(seconds=lease_seconds)
            job.worker = worker
            job.device = device
            job.started_at = job.started_at or now
            return Claim(True, attempt=job.attempts)

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> tuple[bool, bool]:
        """Extend the lease; (still ours, cancel requested)."""
        with self.Write.begin() as s:
            n = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING.value)
                .values(lease_expires=utcnow() + timedelta(seconds=lease_seconds))
            ).rowcount
            cancel = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
        return n == 1, bool(cancel)

    def save_item(self, job_id: str, owner: str, idx: int, *, status: ItemStatus, output: str | None,
                  finish_reason: str | None, prompt_tokens: int | None, completion_tokens: int | None,
                  error: str | None = None) -> bool:
        """Record one item's result, only while the lease is ours."""
        with self.Write.begin() as s:
            if not self._holds(s, job_id, owner):
                return False
            s.execute(
                update(Item)
                .where(Item.job_id == job_id, Item.idx == idx)
                .values(status=status.value, output=output, finish_reason=finish_reason,
                        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, error=error)
            )
            return True

    def finish(self, job_id: str, owner: str, status: JobStatus, **fields) -> bool:
        """End the job (stats and error fields as keywords), only while the lease is ours.

        Items a cancelled or failed job never reached become cancelled or failed with it, so
        `gencli retry` runs them."""
        with self.Write.begin() as s:
            if not self._holds(s, job_id, owner):
                return False
            job = s.get(Job, job_id)
            for k, v in fields.items():
                setattr(job, k, v)
            left = {JobStatus.CANCELLED: ItemStatus.CANCELLED, JobStatus.FAILED: ItemStatus.FAILED}.get(status)
            if left is not None:
                s.execute(
                    update(Item)
                    .where(Item.job_id == job_id, Item.status == ItemStatus.PENDING.value)
                    .values(status=left.value, error=job.error_message if left is ItemStatus.FAILED else None)
                )
            self._finish(s, job, status)
            return True

    def release(self, job_id: str, owner: str) -> bool:
        """Give a running job back to the queue (worker shutting down)."""
        with self.Write.begin() as s:
            return s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING.value)
                .values(status=JobStatus.QUEUED.value, lease_owner=None, lease_expires=None,
                        attempts=Job.attempts - 1)
            ).rowcount == 1

    def take_expired(self) -> list[Job]:
        """Running jobs whose lease ran out (their worker died): put back to queued, returned."""
        now = utcnow()
        with self.Write.begin() as s:
            jobs = list(s.scalars(
                select(Job).where(Job.status == JobStatus.RUNNING.value, Job.lease_expires < now)
            ))
            taken = []
            for job in jobs:
                n = s.execute(
                    update(Job)
                    .where(Job.id == job.id, Job.status == JobStatus.RUNNING.value, Job.lease_expires < now)
                    .values(status=JobStatus.QUEUED.value, lease_owner=None, lease_expires=None)
                ).rowcount
                if n:
                    taken.append(job)
            return taken

    @staticmethod
    def _holds(s, job_id: str, owner: str) -> bool:
        return s.scalar(select(Job.lease_owner).where(Job.id == job_id)) == owner

    @staticmethod
    def _finish(s, job: Job, status: JobStatus) -> None:
        job.status = status.value
        job.finished_at = utcnow()
        job.lease_owner = None
        job.lease_expires = None
