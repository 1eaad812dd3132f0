"""The SQL store: engine set-up and the tables of jobs and their items (prompts and outputs).

The store is SQLite (`sqlite:///path`) or PostgreSQL (`postgresql://...`, through psycopg 3).
SQLite runs in WAL mode with a busy timeout, and every write transaction starts with BEGIN
IMMEDIATE, so several worker processes can write to one file without "database is locked";
reads never wait for writers.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.sql.expression import FunctionElement, literal

from gencli.storage.status import ItemStatus, JobStatus

__all__ = ["Base", "Deployment", "File", "Item", "ItemStatus", "JobRow", "JobAttempt", "JobStatus", "db_now",
           "make_engine", "make_sessionmaker", "normalize_url", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class db_now(FunctionElement):
    """The database's clock, as a naive UTC timestamp, `seconds` from now: every lease and
    timestamp the store writes comes from here, so workers whose clocks disagree agree on it."""

    type = DateTime()
    inherit_cache = True

    def __init__(self, seconds: float = 0.0):
        super().__init__(literal(float(seconds)))


@compiles(db_now, "sqlite")
def _db_now_sqlite(element, compiler, **kw):
    # SQLAlchemy's SQLite DateTime text, microseconds included, so stored times compare as text
    (seconds,) = element.clauses
    return ("(strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.3f seconds', "
            f"{compiler.process(seconds, **kw)})) || '000')")


@compiles(db_now, "postgresql")
def _db_now_pg(element, compiler, **kw):
    (seconds,) = element.clauses
    return f"(timezone('utc', clock_timestamp()) + {compiler.process(seconds, **kw)} * interval '1 second')"


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="generate")
    model: Mapped[str] = mapped_column(String(200), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.QUEUED.value)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires: Mapped[datetime | None] = mapped_column(DateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error_class: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_where: Mapped[str | None] = mapped_column(Text)
    oom_retries: Mapped[int] = mapped_column(Integer, default=0)
    final_batch_size: Mapped[int | None] = mapped_column(Integer)
    final_device: Mapped[str | None] = mapped_column(String(32))
    n_items: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    result: Mapped[dict | None] = mapped_column(JSON)  # prep: the dataset's counts
    queued_at: Mapped[datetime | None] = mapped_column(DateTime)  # last put on the queue (submit, retry, takeover)
    run_seconds: Mapped[float] = mapped_column(Float, default=0.0)  # time spent running, over all attempts

    items: Mapped[list[Item]] = relationship(back_populates="job", order_by="Item.idx")


class Item(Base):
    """One prompt of a job, and its output once made."""

    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("job_id", "idx"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    idx: Mapped[int] = mapped_column(Integer)  # 0-based position in the job
    line: Mapped[int] = mapped_column(Integer)  # line in the prompt file (1 for --prompt)
    custom_id: Mapped[str | None] = mapped_column(String(200))
    prompt: Mapped[object] = mapped_column(JSON)  # text, or a list of chat messages
    params: Mapped[dict | None] = mapped_column(JSON)  # per-line overrides of the job's params
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.PENDING.value)
    output: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    epoch: Mapped[int] = mapped_column(Integer, default=0)  # +1 at each retry: the attempt its tokens belong to
    ids: Mapped[list | None] = mapped_column(JSON)  # checkpoint: the ids generated so far in this epoch
    # Provenance (see model/provenance.py): the resolved sampling it runs with, its seed included
    # (drawn and recorded before its first token when none was given), recorded when an attempt
    # starts it; and the attempt, device and dtype that made its output, recorded with the output.
    sampling: Mapped[dict | None] = mapped_column(JSON)
    attempt: Mapped[int | None] = mapped_column(Integer)
    device: Mapped[str | None] = mapped_column(String(32))
    dtype: Mapped[str | None] = mapped_column(String(16))
    prompt_text: Mapped[str | None] = mapped_column(Text)  # the prompt as the search index reads it
    # What the item's sampling asked to be scored (worker/logprobs.py): {"prompt": [...], "tokens": [...]}
    logprobs: Mapped[dict | None] = mapped_column(JSON)

    job: Mapped[JobRow] = relationship(back_populates="items")


class JobAttempt(Base):
    """One attempt (claim) of a job: what ran it (model hash, tokenizer, dtype, device, software)."""

    __tablename__ = "job_attempts"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    provenance: Mapped[dict] = mapped_column(JSON)


class File(Base):
    """An uploaded file (a Batch API input file), bytes and all."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)


class Deployment(Base):
    """One row: this store's deployment id, made with the store (see worker/keys.py)."""

    __tablename__ = "gencli_deployment"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)


WRITE_OPTION = "gencli_write"
BACKENDS = ("sqlite", "postgresql")  # the databases the store's SQL is written for
BUSY_SECONDS = 30  # how long a SQLite write waits for another process's write lock


def normalize_url(url: str) -> str:
    """postgresql:// means psycopg 3 here (SQLAlchemy's default driver is psycopg2)."""
    u = make_url(url)
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None: not SQLite, or in memory)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database).expanduser()


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_SECONDS})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below be the only one
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={BUSY_SECONDS * 1000}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # Writers take the write lock up front (no deadlock upgrading a read lock); readers don't
        # wait for writers at all (WAL).
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")

    return engine


def make_sessionmaker(engine: Engine, *, write: bool = False) -> sessionmaker:
    """Sessions for reads, or (write) for transactions that write: BEGIN IMMEDIATE on SQLite."""
    return sessionmaker(engine.execution_options(**{WRITE_OPTION: True}) if write else engine,
                        expire_on_commit=False)
