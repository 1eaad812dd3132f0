"""Ordered schema migrations, recorded in a `gencli_migrations` table.

Each migration is a function of a connection inside one transaction, with the DDL of its own
moment written out (never the current models), so an old store upgrades step by step.
tests/test_store.py checks that the migrated schema matches the models in db.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gencli.storage.db import WRITE_OPTION, utcnow


def _0001_jobs_and_items(conn: Connection) -> None:
    md = sa.MetaData()
    sa.Table(
        "jobs", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("idempotency_key", sa.String(200), unique=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("worker", sa.String(200)),
        sa.Column("device", sa.String(32)),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_expires", sa.DateTime),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("error_class", sa.String(200)),
        sa.Column("error_message", sa.Text),
        sa.Column("error_where", sa.Text),
        sa.Column("oom_retries", sa.Integer, nullable=False),
        sa.Column("final_batch_size", sa.Integer),
        sa.Column("final_device", sa.String(32)),
        sa.Column("n_items", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("tokens_per_s", sa.Float),
    )
    sa.Table(
        "items", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("line", sa.Integer, nullable=False),
        sa.Column("custom_id", sa.String(200)),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("params", sa.JSON),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("output", sa.Text),
        sa.Column("finish_reason", sa.String(16)),
        sa.Column("prompt_tokens", sa.Integer),
        sa.Column("completion_tokens", sa.Integer),
        sa.Column("error", sa.Text),
        sa.UniqueConstraint("job_id", "idx"),
    )
    md.create_all(conn)


def _0002_job_result(conn: Connection) -> None:
    """A job's result summary: for dataset prep, the counts of its meta.json."""
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN result JSON"))


def _0003_leases_checkpoints_deployment(conn: Connection) -> None:
    """The durable queue: when a job was last queued and how long it has run (over all attempts),
    each item's epoch (bumped at retry) and generated-ids checkpoint, and the deployment id that
    namespaces this store's keys in a shared Redis."""
    for ddl in (
        "ALTER TABLE jobs ADD COLUMN queued_at TIMESTAMP",
        "ALTER TABLE jobs ADD COLUMN run_seconds FLOAT NOT NULL DEFAULT 0",
        "ALTER TABLE items ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE items ADD COLUMN ids JSON",
    ):
        conn.execute(sa.text(ddl))
    conn.execute(sa.text("UPDATE jobs SET queued_at = created_at"))
    md = sa.MetaData()
    deployment = sa.Table(
        "gencli_deployment", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    md.create_all(conn)
    conn.execute(deployment.insert().values(id=uuid.uuid4().hex, created_at=utcnow()))


def _0004_files(conn: Connection) -> None:
    """Uploaded files (the Batch API's input files): their bytes are in the store, the record."""
    md = sa.MetaData()
    sa.Table(
        "files", md,
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("content", sa.LargeBinary, nullable=False),
    )
    md.create_all(conn)


def _0005_provenance_and_search(conn: Connection) -> None:
    """Provenance and history search: each attempt's record (model hash, tokenizer, dtype,
    device, software) in `job_attempts`; per item the sampling it ran with (seed included, a drawn
    one too), the attempt, device and dtype that produced its output, and its prompt as plain text
    for the full-text index over prompts and outputs (SQLite FTS5 kept by triggers, or a
    PostgreSQL GIN index over the same text)."""
    for ddl in (
        "ALTER TABLE items ADD COLUMN sampling JSON",
        "ALTER TABLE items ADD COLUMN attempt INTEGER",
        "ALTER TABLE items ADD COLUMN device VARCHAR(32)",
        "ALTER TABLE items ADD COLUMN dtype VARCHAR(16)",
        "ALTER TABLE items ADD COLUMN prompt_text TEXT",
    ):
        conn.execute(sa.text(ddl))
    md = sa.MetaData()
    sa.Table("jobs", md, sa.Column("id", sa.String(32), primary_key=True))  # exists: named for the key
    attempts = sa.Table(
        "job_attempts", md,
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("worker", sa.String(200)),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("provenance", sa.JSON, nullable=False),
    )
    attempts.create(conn)
    # the rows of an older store: their prompts as text, once (read as JSON, so each database's
    # driver decodes it alike: psycopg hands back a JSON string prompt already decoded)
    items = sa.table("items", sa.column("id"), sa.column("prompt", sa.JSON))
    for row in conn.execute(sa.select(items.c.id, items.c.prompt)).all():
        conn.execute(sa.text("UPDATE items SET prompt_text = :t WHERE id = :i"),
                     {"t": prompt_text(row.prompt), "i": row.id})
    if conn.dialect.name == "sqlite":
        for ddl in SQLITE_SEARCH_DDL:
            conn.execute(sa.text(ddl))
        conn.execute(sa.text("INSERT INTO items_fts(items_fts) VALUES ('rebuild')"))
    elif conn.dialect.name == "postgresql":
        conn.execute(sa.text(f"CREATE INDEX ix_items_search ON items USING GIN ({PG_SEARCH_VECTOR})"))


# The search index: prompt text and output, words folded to lower case, no stemming (so a word
# is found as typed, in any language), on both databases.
SQLITE_SEARCH_DDL = (
    "CREATE VIRTUAL TABLE items_fts USING fts5(prompt_text, output, content='items', content_rowid='id')",
    "CREATE TRIGGER items_fts_insert AFTER INSERT ON items BEGIN "
    "INSERT INTO items_fts(rowid, prompt_text, output) VALUES (new.id, new.prompt_text, new.output); END",
    "CREATE TRIGGER items_fts_delete AFTER DELETE ON items BEGIN "
    "INSERT INTO items_fts(items_fts, rowid, prompt_text, output) VALUES ('delete', old.id, old.prompt_text, "
    "old.output); END",
    "CREATE TRIGGER items_fts_update AFTER UPDATE OF prompt_text, output ON items BEGIN "
    "INSERT INTO items_fts(items_fts, rowid, prompt_text, output) VALUES ('delete', old.id, old.prompt_text, "
    "old.output); "
    "INSERT INTO items_fts(rowid, prompt_text, output) VALUES (new.id, new.prompt_text, new.output); END",
)
# PostgreSQL indexes the first SEARCH_CHARS characters of each prompt and output: a tsvector holds
# at most 1 MB, and a longer text (a huge prompt given with --truncate) must not fail its write.
SEARCH_CHARS = 100_000
PG_SEARCH_VECTOR = (f"to_tsvector('simple', left(coalesce(prompt_text, ''), {SEARCH_CHARS}) || ' ' || "
                    f"left(coalesce(output, ''), {SEARCH_CHARS}))")
SEARCH_TABLES = {"items_fts", "items_fts_data", "items_fts_idx", "items_fts_docsize", "items_fts_config"}


def prompt_text(prompt) -> str:
    """A prompt as the search index reads it: its text, or its messages' contents one per line."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        parts = []
        for m in prompt:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):  # content parts: their text
                parts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n".join(parts)
    return ""


def _0006_logprobs(conn: Connection) -> None:
    """Per item, the log-probabilities its sampling asked for (logprobs, prompt_logprobs)."""
    conn.execute(sa.text("ALTER TABLE items ADD COLUMN logprobs JSON"))


MIGRATIONS: list[tuple[str, Callable[[Connection], None]]] = [
    ("0001_jobs_and_items", _0001_jobs_and_items),
    ("0002_job_result", _0002_job_result),
    ("0003_leases_checkpoints_deployment", _0003_leases_checkpoints_deployment),
    ("0004_files", _0004_files),
    ("0005_provenance_and_search", _0005_provenance_and_search),
    ("0006_logprobs", _0006_logprobs),
]

_log = sa.Table(
    "gencli_migrations", sa.MetaData(),
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)


def migrate(engine: Engine) -> list[str]:
    """Apply the migrations this store lacks, in order; return their names."""
    applied_now = []
    with engine.execution_options(**{WRITE_OPTION: True}).begin() as conn:  # one migrator at a time
        if conn.dialect.name == "postgresql":  # one migrator at a time across machines
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7471)"))
        _log.create(conn, checkfirst=True)
        done = set(conn.execute(sa.select(_log.c.name)).scalars())
        for name, step in MIGRATIONS:
            if name not in done:
                step(conn)
                conn.execute(_log.insert().values(name=name, applied_at=utcnow()))
                applied_now.append(name)
    return applied_now
