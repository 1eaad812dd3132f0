"""The store's operations on jobs and items: the record of everything gencli does.

Redis carries messages and tokens; this is where a job's state lives. Writes by a worker are
guarded by its lease (`lease_owner`): a worker that lost its job to another (it stalled, the
job was taken over) can no longer write results, so a job gets one set of outputs.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import and_, bindparam, case, column, func, insert, literal, null, or_, select, table, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import load_only

from gencli.model.errors import GencliError
from gencli.storage.db import (
    BACKENDS,
    BUSY_SECONDS,
    Deployment,
    File,
    Item,
    ItemStatus,
    JobAttempt,
    JobRow,
    JobStatus,
    db_now,
    make_engine,
    make_sessionmaker,
    sqlite_path,
)
from gencli.storage.migrations import PG_SEARCH_VECTOR, migrate, prompt_text

_stores: dict[str, Store] = {}


def open_store(url: str, *, make_dir: bool = False) -> Store:
    """The store at url, migrated, shared within this process. A SQLite file may be made in a
    directory that exists; make_dir also makes its directory (the default store, in GENCLI_HOME)."""
    if url not in _stores:
        path = _sqlite_file(url)
        if path is not None and make_dir:
            path.parent.mkdir(parents=True, exist_ok=True)
        _stores[url] = Store(url)
    return _stores[url]


def _sqlite_file(url: str):
    try:
        return sqlite_path(url)
    except ArgumentError:  # not a URL at all: Store says so
        return None


class StoreError(Exception):
    pass


@dataclass
class Claim:
    ok: bool
    reason: str = ""  # why not: "done", "leased", "cancelled", "too many deliveries", "missing"
    attempt: int = 0
    run_seconds: float = 0.0  # the job's running time over its earlier attempts
    cancelled: bool = False  # claimed only to be ended: a cancel came after it started


def _total(run_seconds: float | None) -> dict:
    """The running-time column's new value: the worker's total over all attempts (a total, so a
    write that was lost costs no time), or unchanged."""
    return {} if run_seconds is None else {"run_seconds": float(run_seconds)}


def _totals(run_seconds: dict[str, float]) -> dict:
    """_total for several jobs in one UPDATE, by job id."""
    if not run_seconds:
        return {"lease_owner": JobRow.lease_owner}  # a write that changes nothing, to lock the rows
    return {"run_seconds": case({j: float(r) for j, r in run_seconds.items()}, value=JobRow.id,
                                else_=JobRow.run_seconds)}


class StoreOpenError(GencliError):
    """The store's URL cannot be opened (garbage, a missing database, a directory that does not exist)."""


class StoreBusy(StoreOpenError):
    """The store is there but another process holds its write lock (SQLite's "database is locked")."""


class SearchError(GencliError):
    """A search query that cannot be searched (it has no words)."""


def new_job_id() -> str:
    """32 hex characters that sort by time: the first 12 the Unix time in milliseconds (this
    machine's clock: it is only an id; order is by created_at), the rest random."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def search_words(query: str) -> list[str]:
    """The words of a search query: its whitespace-separated parts that hold a letter or digit."""
    words = [w for w in query.replace("\x00", " ").split() if _WORD.search(w)]
    if not words:
        raise SearchError(f"nothing to search for in {query[:40]!r}: give one or more words")
    return words


_WORD = re.compile(r"[^\W_]")


def _naive_utc(t: datetime) -> datetime:
    """A time as the store keeps them: naive UTC (a naive time is taken as UTC already). An aware
    time past either end of the calendar once in UTC becomes that end."""
    if t.tzinfo is None:
        return t
    try:
        return t.astimezone(timezone.utc).replace(tzinfo=None)
    except OverflowError:
        return datetime.min if t.year == 1 else datetime.max


def _hidden(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return repr(url)


class Store:
    def __init__(self, url: str):
        self.url = url
        shown = _hidden(url)
        fix = "fix GENCLI_DB_URL (sqlite:///PATH or postgresql://USER@HOST/DB; unset, a SQLite file in GENCLI_HOME)"
        try:
            backend = make_url(url).get_backend_name()
        except ArgumentError:
            raise StoreOpenError(f"GENCLI_DB_URL {shown} is not a database URL: {fix}") from None
        if backend not in BACKENDS:
            raise StoreOpenError(f"the store cannot be on {backend} ({shown}): gencli keeps it in SQLite or "
                                 f"PostgreSQL: {fix}")
        path = sqlite_path(url)
        if path is not None and not path.parent.is_dir():
            raise StoreOpenError(f"the SQLite store {shown} is in {path.parent}, which does not exist: create that "
                                 f"directory, or {fix}")
        try:
            self.engine = make_engine(url)
            migrate(self.engine)
        except OperationalError as e:
            reason = str(e.orig).strip().splitlines()[0]
            if "database is locked" in reason:  # not a misconfiguration: the file is fine, and busy
                raise StoreBusy(f"the store at {shown} is busy: another process has held its write lock for over "
                                f"{BUSY_SECONDS} s (a stopped or hung gencli process?): try again once it lets go") \
                    from None
            raise StoreOpenError(f"cannot open the store at {shown}: {reason}: {fix}") from None
        except (SQLAlchemyError, OSError, ImportError) as e:
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            if isinstance(e, ImportError) and backend == "postgresql":
                reason += " (for postgresql:// URLs: pip install 'gencli[postgres]')"
            raise StoreOpenError(f"cannot open the store at {shown}: {reason}: {fix}") from None
        self.Session = make_sessionmaker(self.engine)  # reads
        self.Write = make_sessionmaker(self.engine, write=True)
        self._deployment: str | None = None

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
    ) -> tuple[JobRow, bool]:
        """Record a job and its items in one transaction; (job, created).

        With an idempotency key that is already recorded, the existing job comes back.
        """
        if idempotency_key:
            existing = self.job_by_key(idempotency_key)
            if existing:
                return existing, False
        fields = dict(id=new_job_id(), kind=kind, model=model, status=JobStatus.QUEUED.value, params=params,
                      priority=priority, idempotency_key=idempotency_key, attempts=0, cancel_requested=False,
                      oom_retries=0, n_items=len(items), completion_tokens=0, run_seconds=0.0)
        try:
            with self.Write.begin() as s:
                s.execute(JobRow.__table__.insert().values(created_at=db_now(), queued_at=db_now(), **fields))
                if items:  # a prep job has none
                    rows = [
                        dict(job_id=fields["id"], idx=i, line=it.get("line", i + 1), custom_id=it.get("custom_id"),
                             prompt=it["prompt"], params=it.get("params"), status=ItemStatus.PENDING.value, epoch=0,
                             prompt_text=prompt_text(it["prompt"]))
                        for i, it in enumerate(items)
                    ]
                    s.execute(Item.__table__.insert(), rows)
        except IntegrityError:
            if idempotency_key:  # a concurrent submit with the same key won
                existing = self.job_by_key(idempotency_key)
                if existing:
                    return existing, False
            raise
        return JobRow(**fields), True

    def delete_job(self, job_id: str) -> None:
        """Remove a job that could not be enqueued (nothing half-recorded)."""
        with self.Write.begin() as s:
            s.execute(Item.__table__.delete().where(Item.job_id == job_id))
            s.execute(JobRow.__table__.delete().where(JobRow.id == job_id))

    def job_by_key(self, key: str) -> JobRow | None:
        with self.Session() as s:
            return s.scalars(select(JobRow).where(JobRow.idempotency_key == key)).first()

    def get_job(self, job_id: str) -> JobRow | None:
        """A job by id, or by a unique prefix of at least 6 characters."""
        if "\x00" in job_id:  # no id holds one, and PostgreSQL refuses text with one
            return None
        with self.Session() as s:
            job = s.get(JobRow, job_id)
            if job or len(job_id) < 6:
                return job
            found = s.scalars(select(JobRow).where(JobRow.id.startswith(job_id)).limit(2)).all()
            return found[0] if len(found) == 1 else None

    def prefix_matches(self, prefix: str) -> int:
        """How many job ids begin with prefix, counting to 2 at most (an ambiguous prefix)."""
        if "\x00" in prefix:
            return 0
        with self.Session() as s:
            return len(s.scalars(select(JobRow.id).where(JobRow.id.startswith(prefix, autoescape=True)).limit(2)).all())

    def items(self, job_id: str) -> list[Item]:
        with self.Session() as s:
            return list(s.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.idx)))

    def list_jobs(self, *, status: str | None = None, model: str | None = None, kind: str | None = None,
                  limit: int = 50, after: str | None = None, query: str | None = None,
                  since: datetime | None = None) -> list[JobRow]:
        """Newest first; `after` (a job id, the last of a page) gives the page that follows it.

        `query`: jobs with an item whose prompt or output holds every word of it (whole words, any
        case; see search_words); `since`: created at or after it (naive: UTC)."""
        if any(v and "\x00" in v for v in (status, model, kind)):
            return []  # no job holds one, and PostgreSQL refuses text with one
        q = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit)
        if query is not None:
            q = q.where(JobRow.id.in_(select(Item.job_id).where(self._matches(query))))
        if since is not None:
            q = q.where(JobRow.created_at >= _naive_utc(since))
        if after:
            mark = self.get_job(after)
            if mark is None:
                raise StoreError(f"no job {after} to page after")
            older = and_(JobRow.created_at == mark.created_at, JobRow.id < mark.id)
            q = q.where(or_(JobRow.created_at < mark.created_at, older))
        if status:
            q = q.where(JobRow.status == status)
        if model:
            q = q.where(JobRow.model == model)
        if kind:
            q = q.where(JobRow.kind == kind)
        with self.Session() as s:
            return list(s.scalars(q))

    def matching_items(self, job_ids: list[str], query: str) -> dict[str, list[Item]]:
        """The items of these jobs that match the query (as list_jobs(query=...) does), by job,
        each job's in order."""
        out: dict[str, list[Item]] = {job_id: [] for job_id in job_ids}
        if not job_ids:
            return out
        with self.Session() as s:
            for it in s.scalars(select(Item).where(Item.job_id.in_(job_ids), self._matches(query))
                                .order_by(Item.job_id, Item.idx)):
                out[it.job_id].append(it)
        return out

    def _matches(self, query: str):
        """The condition on items that their prompt text or output holds every word of query: the
        FTS5 index on SQLite (each word quoted, so nothing the user types is an FTS5 operator), the
        GIN index's expression on PostgreSQL."""
        words = search_words(query)
        if self.engine.dialect.name == "sqlite":
            phrases = " ".join('"' + w.replace('"', '""') + '"' for w in words)
            return Item.id.in_(select(column("rowid")).select_from(table("items_fts"))
                               .where(text("items_fts MATCH :search").bindparams(search=phrases)))
        if self.engine.dialect.name == "postgresql":
            return text(f"{PG_SEARCH_VECTOR} @@ plainto_tsquery('simple', :search)").bindparams(
                search=" ".join(words))
        raise SearchError(f"searching needs the store on SQLite or PostgreSQL, not {self.engine.dialect.name}")

    def queued_for(self, seconds: float) -> list[JobRow]:
        """Jobs put on the queue (submitted, retried or taken over) more than `seconds` ago by the
        database's clock, started ones first (taken over), then by priority, then oldest first; id,
        kind, model, priority and started_at loaded."""
        with self.Session() as s:
            return list(s.scalars(
                select(JobRow).where(JobRow.status == JobStatus.QUEUED.value, JobRow.queued_at < db_now(-seconds))
                .order_by(JobRow.started_at.is_(None), JobRow.priority.desc(), JobRow.queued_at)
                .options(load_only(JobRow.id, JobRow.kind, JobRow.model, JobRow.priority, JobRow.started_at))
            ))

    # --- uploaded files (the Batch API's input) -------------------------------------------
    def create_file(self, *, purpose: str, filename: str, content: bytes) -> File:
        fields = dict(id=f"file-{uuid.uuid4().hex}", purpose=purpose, filename=filename, bytes=len(content))
        with self.Write.begin() as s:
            s.execute(File.__table__.insert().values(created_at=db_now(), content=content, **fields))
        return self.get_file(fields["id"])

    def get_file(self, file_id: str) -> File | None:
        """A file's record, without its bytes."""
        with self.Session() as s:
            return s.get(File, file_id)

    def file_content(self, file_id: str) -> bytes | None:
        with self.Session() as s:
            return s.scalar(select(File.content).where(File.id == file_id))

    def list_files(self, *, purpose: str | None = None, limit: int = 100) -> list[File]:
        q = select(File).order_by(File.created_at.desc(), File.id.desc()).limit(limit)
        if purpose:
            q = q.where(File.purpose == purpose)
        with self.Session() as s:
            return list(s.scalars(q))

    def deployment_id(self) -> str:
        """This store's deployment id (made with the store): the namespace of its Redis keys."""
        if self._deployment is None:
            with self.Session() as s:
                self._deployment = s.scalar(select(Deployment.id))
        return self._deployment

    def db_time(self):
        """The database's clock now (naive UTC)."""
        with self.Session() as s:
            return s.scalar(select(db_now()))

    def queued_counts(self) -> dict[tuple[str, str], int]:
        """How many jobs wait, by (kind, model)."""
        with self.Session() as s:
            rows = s.execute(
                select(JobRow.kind, JobRow.model, func.count())
                .where(JobRow.status == JobStatus.QUEUED.value)
                .group_by(JobRow.kind, JobRow.model)
            )
            return {(kind, model): n for kind, model, n in rows}

    def live_progress(self, job_ids: list[str]) -> dict[str, tuple[int, int]]:
        """Each of these (running) jobs' progress: (tokens made so far: its ended items' counts and
        the others' checkpointed ids, items ended)."""
        if not job_ids:
            return {}
        tokens, ended = dict.fromkeys(job_ids, 0), dict.fromkeys(job_ids, 0)
        with self.Session() as s:
            rows = s.execute(select(Item.job_id, Item.status, Item.completion_tokens, Item.ids)
                             .where(Item.job_id.in_(job_ids)))
            for job_id, status, done, ids in rows:
                pending = status == ItemStatus.PENDING.value
                tokens[job_id] += len(ids or []) if pending else (done or 0)
                ended[job_id] += not pending
        return {j: (tokens[j], ended[j]) for j in job_ids}

    def status_counts(self) -> dict[str, int]:
        """How many jobs are in each status."""
        with self.Session() as s:
            return dict(s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all())

    def request_cancel(self, job_id: str) -> str:
        """Cancel: a queued job is cancelled at once; a running one is asked to stop (its worker
        sees the flag at its next lease renewal). The job's status after the request."""
        with self.Write.begin() as s:
            row = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status.in_(_LIVE))
                .values(cancel_requested=True,
                        status=case((JobRow.status == _QUEUED, JobStatus.CANCELLED.value), else_=JobRow.status),
                        finished_at=case((JobRow.status == _QUEUED, db_now()), else_=JobRow.finished_at))
                .returning(JobRow.status)
            ).first()
            if row is None:
                return self._status_of(s, job_id)
            if row.status == JobStatus.CANCELLED.value:
                self._end_items(s, job_id, JobStatus.CANCELLED)
            return row.status

    def reset_for_retry(self, job_id: str) -> int:
        """Put a finished job's failed and cancelled items back, each in a new epoch (a failed
        prep job whole); how many. Their old tokens and checkpoints are gone for good."""
        retryable = (Item.status.in_([ItemStatus.FAILED.value, ItemStatus.CANCELLED.value]))
        has_items = select(Item.id).where(Item.job_id == JobRow.id, retryable).exists()
        with self.Write.begin() as s:
            row = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status.in_([JobStatus.FAILED.value, JobStatus.CANCELLED.value]),
                       or_(JobRow.kind == "prep", has_items))
                .values(status=_QUEUED, cancel_requested=False, attempts=0, finished_at=None, queued_at=db_now(),
                        run_seconds=0.0, error_class=None, error_message=None, error_where=None)
                .returning(JobRow.kind)
            ).first()
            if row is None:
                status = self._status_of(s, job_id)
                if not JobStatus(status).done:
                    raise StoreError(f"job {job_id} is {status}: only a finished job can be retried")
                return 0
            if row.kind == "prep":  # no items: the whole job runs again
                return 1
            return s.execute(
                update(Item)
                .where(Item.job_id == job_id, retryable)
                .values(status=ItemStatus.PENDING.value, output=None, finish_reason=None, error=None,
                        completion_tokens=None, ids=None, epoch=Item.epoch + 1, sampling=null(), attempt=None,
                        device=None, dtype=None, logprobs=null())
            ).rowcount

    # --- worker side -------------------------------------------------------------------
    # Each state change is one conditional UPDATE (... RETURNING): two workers racing for one
    # job, on SQLite or PostgreSQL, cannot both win, and times come from the database's clock.
    def claim(self, job_id: str, *, owner: str, worker: str, device: str, lease_seconds: float,
              max_deliveries: int) -> Claim:
        """Take the job for this delivery, or say why not (a redelivered copy, a live lease)."""
        takeable = or_(JobRow.status == _QUEUED, and_(JobRow.status == _RUNNING, JobRow.lease_expires < db_now()))
        taken = dict(status=_RUNNING, attempts=JobRow.attempts + 1, lease_owner=owner, lease_expires=db_now(lease_seconds),
                     worker=worker, device=device)  # what either kind of claim sets
        with self.Write.begin() as s:
            row = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, takeable, JobRow.cancel_requested.is_(False), JobRow.attempts < max_deliveries)
                .values(**taken, started_at=func.coalesce(JobRow.started_at, db_now()))
                .returning(JobRow.attempts, JobRow.run_seconds)
            ).first()
            if row is not None:
                return Claim(True, attempt=row.attempts, run_seconds=row.run_seconds or 0.0)
            # A generation job cancelled after it started (its worker died or was stopped before it
            # saw the cancel): claimed all the same, so that a worker ends each item with what it
            # had made, as readers saw it (the store alone cannot: the tokens are in the log).
            row = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, takeable, JobRow.cancel_requested.is_(True), JobRow.kind == "generate",
                       JobRow.started_at.is_not(None), JobRow.attempts < max_deliveries)
                .values(**taken)
                .returning(JobRow.attempts, JobRow.run_seconds)
            ).first()
            if row is not None:
                return Claim(True, attempt=row.attempts, run_seconds=row.run_seconds or 0.0, cancelled=True)
            # Not ours: say why, ending a cancelled job or one over its delivery limit on the way.
            ended = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, takeable, JobRow.cancel_requested.is_(True))
                .values(status=JobStatus.CANCELLED.value, finished_at=db_now(), lease_owner=None,
                        lease_expires=None)
                .returning(JobRow.id)
            ).first()
            if ended:
                self._end_items(s, job_id, JobStatus.CANCELLED)
                return Claim(False, "cancelled")
            ended = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, takeable, JobRow.attempts >= max_deliveries)
                .values(status=JobStatus.FAILED.value, finished_at=db_now(), lease_owner=None, lease_expires=None,
                        error_class="DeliveryLimit",
                        error_message=(f"the job was delivered {max_deliveries} times and never finished: "
                                       "it may crash its worker"))
                .returning(JobRow.error_message)
            ).first()
            if ended:
                self._end_items(s, job_id, JobStatus.FAILED, error=ended.error_message)
                return Claim(False, "too many deliveries")
            status = s.scalar(select(JobRow.status).where(JobRow.id == job_id))
            if status is None:
                return Claim(False, "missing")
            return Claim(False, "done" if JobStatus(status).done else "leased")

    def renew_many(self, leases: list[tuple[str, str]], lease_seconds: float) -> dict[str, bool]:
        """Extend several leases, (job id, owner) each, in one statement: for each that was still
        ours, whether a cancel is requested (the others are missing)."""
        if not leases:
            return {}
        owners = dict(leases)
        with self.Write.begin() as s:
            rows = s.execute(
                update(JobRow)
                .where(JobRow.id.in_(list(owners)), JobRow.status == _RUNNING,
                       JobRow.lease_owner == case(owners, value=JobRow.id))
                .values(lease_expires=db_now(lease_seconds))
                .returning(JobRow.id, JobRow.cancel_requested)
            ).all()
        return {r.id: bool(r.cancel_requested) for r in rows}

    def checkpoint_many(self, jobs: list[tuple[str, str, list[tuple[int, int, list[int]]], float | None]]
                        ) -> list[bool]:
        """Record, for each of several jobs, (job id, owner, progress, run_seconds): each running
        item's (idx, epoch, ids generated so far), and the job's running time over all its attempts
        so far (a total, not an increment: a write that is lost or refused loses no time), only
        while the lease is ours: in one transaction of two statements (a worker holding many jobs
        writes once, not once per job). Per job, whether its lease was ours (a job whose lease was
        not gets nothing written). A resume starts from here when the replay log cannot be trusted."""
        if not jobs:
            return []
        owners = {job_id: owner for job_id, owner, _, _ in jobs}
        with self.Write.begin() as s:
            ours = set(s.scalars(
                update(JobRow)
                .where(JobRow.id.in_(list(owners)), JobRow.status == _RUNNING,
                       JobRow.lease_owner == case(owners, value=JobRow.id))
                .values(**_totals({j: r for j, _, _, r in jobs if r is not None}))
                .returning(JobRow.id)
            ).all())
            rows = [{"j": job_id, "i": i, "e": e, "v": list(ids)}
                    for job_id, _, progress, _ in jobs if job_id in ours for i, e, ids in progress]
            if rows:
                s.execute(
                    update(Item.__table__)
                    .where(Item.job_id == bindparam("j"), Item.idx == bindparam("i"), Item.epoch == bindparam("e"),
                           Item.status == ItemStatus.PENDING.value)
                    .values(ids=bindparam("v")),
                    rows,
                )
        return [job_id in ours for job_id, _, _, _ in jobs]

    def save_item(self, job_id: str, owner: str, idx: int, *, epoch: int, status: ItemStatus, output: str | None,
                  finish_reason: str | None, prompt_tokens: int | None, completion_tokens: int | None,
                  ids: list[int] | None = None, error: str | None = None, attempt: int | None = None,
                  device: str | None = None, dtype: str | None = None, logprobs: dict | None = None) -> bool:
        """Record one item's result (and the attempt, device and dtype that made it, and the
        logprobs it asked for), only while the lease is ours and the item is still in this epoch."""
        with self.Write.begin() as s:
            if not self._lock_lease(s, job_id, owner):
                return False
            return s.execute(
                update(Item)
                .where(Item.job_id == job_id, Item.idx == idx, Item.epoch == epoch)
                .values(status=status.value, output=output, finish_reason=finish_reason, ids=ids,
                        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, error=error,
                        attempt=attempt, device=device, dtype=dtype,
                        logprobs=null() if logprobs is None else logprobs)
            ).rowcount == 1

    def record_attempt(self, job_id: str, owner: str, *, worker: str, provenance: dict) -> int | None:
        """Record what runs this claim of the job (model, tokenizer, device, software), numbered
        1, 2, ... over all the job's claims (retries included); the number, or None when the lease
        is not ours. One INSERT ... SELECT: only the lease holder can add, so numbers never clash."""
        n = (select(func.count()).select_from(JobAttempt).where(JobAttempt.job_id == job_id)
             .scalar_subquery() + 1)
        ours = select(JobRow.id).where(JobRow.id == job_id, JobRow.lease_owner == owner, JobRow.status == _RUNNING)
        with self.Write.begin() as s:
            row = s.execute(
                insert(JobAttempt)
                .from_select(["job_id", "attempt", "worker", "started_at", "provenance"],
                             select(literal(job_id), n, literal(worker), db_now(),
                                    literal(provenance, JobAttempt.provenance.type))
                             .where(ours.exists()))
                .returning(JobAttempt.attempt)
            ).first()
        return row.attempt if row else None

    def attempts(self, job_id: str) -> list[JobAttempt]:
        """The job's recorded attempts, first first."""
        with self.Session() as s:
            return list(s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)
                                  .order_by(JobAttempt.attempt)))

    def start_items(self, job_id: str, owner: str, sampling: list[tuple[int, int, dict]]) -> bool:
        """Record the sampling (seed included) each of these (idx, epoch, sampling) items runs
        with, before its first token, where none is recorded for its epoch yet; only while the
        lease is ours. A takeover reads it back, so a resumed item samples what it would have."""
        if not sampling:
            return True
        with self.Write.begin() as s:
            if not self._lock_lease(s, job_id, owner):
                return False
            s.execute(
                update(Item.__table__)
                .where(Item.job_id == job_id, Item.idx == bindparam("i"), Item.epoch == bindparam("e"),
                       Item.sampling.is_(None), Item.status == ItemStatus.PENDING.value)
                .values(sampling=bindparam("v")),
                [{"i": i, "e": e, "v": v} for i, e, v in sampling],
            )
        return True

    def finish(self, job_id: str, owner: str, status: JobStatus, *, run_seconds: float | None = None,
               **fields) -> bool:
        """End the job (stats and error fields as keywords; run_seconds: its running time over all
        attempts), only while the lease is ours.

        Items a cancelled or failed job never reached become cancelled or failed with it, so
        `gencli retry` runs them."""
        with self.Write.begin() as s:
            row = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.lease_owner == owner, JobRow.status == _RUNNING)
                .values(status=status.value, finished_at=db_now(), lease_owner=None, lease_expires=None,
                        **_total(run_seconds), **fields)
                .returning(JobRow.error_message)
            ).first()
            if row is None:
                return False
            self._end_items(s, job_id, status, error=row.error_message)
            return True

    def release(self, job_id: str, owner: str, run_seconds: float | None = None) -> bool:
        """Give a running job back to the queue (worker shutting down; run_seconds as in finish)."""
        with self.Write.begin() as s:
            return s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.lease_owner == owner, JobRow.status == _RUNNING)
                .values(status=_QUEUED, lease_owner=None, lease_expires=None, attempts=JobRow.attempts - 1,
                        queued_at=db_now(), **_total(run_seconds))
            ).rowcount == 1

    def take_expired(self) -> list[JobRow]:
        """Running jobs whose lease ran out (their worker died): put back to queued, returned
        (id, kind, model, priority and the worker that lost them)."""
        with self.Write.begin() as s:
            rows = s.execute(
                update(JobRow)
                .where(JobRow.status == _RUNNING, JobRow.lease_expires < db_now())
                .values(status=_QUEUED, lease_owner=None, lease_expires=None, queued_at=db_now())
                .returning(JobRow.id, JobRow.kind, JobRow.model, JobRow.priority, JobRow.worker)
            ).all()
        return [JobRow(id=r.id, kind=r.kind, model=r.model, priority=r.priority, worker=r.worker) for r in rows]

    @staticmethod
    def _status_of(s, job_id: str) -> str:
        """The job's status, within a transaction; StoreError when there is no such job."""
        status = s.scalar(select(JobRow.status).where(JobRow.id == job_id))
        if status is None:
            raise StoreError(f"no job {job_id}")
        return status

    @staticmethod
    def _lock_lease(s, job_id: str, owner: str) -> bool:
        """Within a write: True when the job is running under owner's lease, and its row is then
        locked until the transaction ends (a takeover waits for this write, then sees it)."""
        return s.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.lease_owner == owner, JobRow.status == _RUNNING)
            .values(lease_owner=owner)
        ).rowcount == 1

    @staticmethod
    def _end_items(s, job_id: str, status: JobStatus, error: str | None = None) -> None:
        """A cancelled or failed job's items that never ran end with it (retry runs them)."""
        left = {JobStatus.CANCELLED: ItemStatus.CANCELLED, JobStatus.FAILED: ItemStatus.FAILED}.get(status)
        if left is not None:
            s.execute(
                update(Item)
                .where(Item.job_id == job_id, Item.status == ItemStatus.PENDING.value)
                .values(status=left.value, error=error if left is ItemStatus.FAILED else None)
            )


_QUEUED, _RUNNING = JobStatus.QUEUED.value, JobStatus.RUNNING.value
_LIVE = [_QUEUED, _RUNNING]
