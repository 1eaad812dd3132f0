"""The SQL store against a real SQLite file and a real PostgreSQL: migrations, the job and item
operations, leases, several writer processes at once, and a writer killed in the middle of a write.

PostgreSQL is the server of GENCLI_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432/test): the
run gets a fresh database there and each test a schema of its own in it, dropped afterwards. Without
a server that answers, those cases skip, saying why; under CI (CI=true) they fail instead.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from services import pg_schema

from gencli.storage.db import Base, Item, ItemStatus, JobRow, JobStatus, utcnow
from gencli.storage.migrations import MIGRATIONS, SEARCH_TABLES, migrate
from gencli.storage.store import Store, StoreError


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A URL to an empty store: a SQLite file in tmp_path, or a fresh schema in the run's PostgreSQL
    database (conftest's pg_database: skipped, or failed under CI, when no PostgreSQL answers)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    with pg_schema(request.getfixturevalue("pg_database")) as url:
        yield url


@pytest.fixture
def open_stores():
    """Store(url) that is disposed of after the test (each holds a connection pool)."""
    made: list[Store] = []

    def open_(url: str) -> Store:
        made.append(Store(url))
        return made[-1]

    yield open_
    for s in made:
        s.engine.dispose()


@pytest.fixture
def store(store_url, open_stores) -> Store:
    return open_stores(store_url)


def new_job(store: Store, n: int = 2, **kw):
    items = [{"prompt": f"prompt {i}", "line": i + 1} for i in range(n)]
    job, created = store.create_job(model="tiny", params={"max_tokens": 5}, items=items, **kw)
    assert created
    return job


def claim(store: Store, job_id: str, owner: str, *, lease: float = 30.0, max_deliveries: int = 3):
    return store.claim(job_id, owner=owner, worker=f"w-{owner}", device="cpu", lease_seconds=lease,
                       max_deliveries=max_deliveries)


def save(store: Store, job_id: str, owner: str, idx: int, text: str, status=ItemStatus.SUCCEEDED, epoch=0) -> bool:
    return store.save_item(job_id, owner, idx, epoch=epoch, status=status, output=text, finish_reason="length",
                           prompt_tokens=2, completion_tokens=3)


def count(store: Store, table) -> int:
    with store.engine.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


# --- migrations -----------------------------------------------------------------------------------


def drop_every_table(engine) -> None:
    """Start again from nothing (Store() migrates on open): every table the migrations make."""
    with engine.begin() as c:
        for t in ("items_fts", "job_attempts", "items", "jobs", "gencli_migrations", "gencli_deployment", "files"):
            c.execute(sa.text(f"DROP TABLE IF EXISTS {t}"))  # items_fts: SQLite's search index


def test_an_old_store_upgrades_in_order_and_keeps_its_rows(store_url, open_stores):
    engine = open_stores(store_url).engine
    drop_every_table(engine)
    first_name, first = MIGRATIONS[0]
    with engine.begin() as c:  # a store made by the first release
        first(c)
        c.execute(sa.text("CREATE TABLE gencli_migrations (name VARCHAR(100) PRIMARY KEY, applied_at TIMESTAMP NOT NULL)"))
        c.execute(sa.text("INSERT INTO gencli_migrations VALUES (:n, CURRENT_TIMESTAMP)"), {"n": first_name})
        c.execute(sa.text(
            "INSERT INTO jobs (id, kind, model, status, params, priority, created_at, attempts, cancel_requested, "
            "oom_retries, n_items, completion_tokens) VALUES ('old', 'generate', 'm', 'succeeded', '{}', 0, "
            "CURRENT_TIMESTAMP, 1, false, 0, 0, 0)"))
    assert migrate(engine) == [name for name, _ in MIGRATIONS[1:]]
    store = Store(store_url)
    job = store.get_job("old")
    assert job.status == "succeeded" and job.result is None
    assert job.queued_at == job.created_at and job.run_seconds == 0
    assert len(store.deployment_id()) == 32


def test_migrate_applies_once_and_the_schema_matches_the_models(store_url, open_stores):
    engine = open_stores(store_url).engine  # Store() migrates on open: start again from nothing
    drop_every_table(engine)
    assert sa.inspect(engine).get_table_names() == []

    names = ["0001_jobs_and_items", "0002_job_result", "0003_leases_checkpoints_deployment", "0004_files",
             "0005_provenance_and_search", "0006_logprobs"]
    assert migrate(engine) == names == [name for name, _ in MIGRATIONS]
    with engine.connect() as c:
        assert sorted(c.execute(sa.text("SELECT name FROM gencli_migrations")).scalars()) == names
    assert migrate(engine) == []

    insp = sa.inspect(engine)
    search = SEARCH_TABLES if engine.dialect.name == "sqlite" else set()  # FTS5's table and its shadows
    assert set(insp.get_table_names()) == set(Base.metadata.tables) | {"gencli_migrations"} | search
    for name, table in Base.metadata.tables.items():
        got = {c["name"]: c for c in insp.get_columns(name)}
        assert set(got) == {c.name for c in table.columns}, name
        for col in table.columns:
            assert got[col.name]["nullable"] == col.nullable, f"{name}.{col.name} nullable"
            assert got[col.name]["type"]._type_affinity is col.type._type_affinity, f"{name}.{col.name} type"
            length = getattr(col.type, "length", None)
            if length:
                assert got[col.name]["type"].length == length, f"{name}.{col.name} length"
        assert insp.get_pk_constraint(name)["constrained_columns"] == [c.name for c in table.primary_key]
        indexed = {tuple(ix["column_names"]) for ix in insp.get_indexes(name)}
        assert {tuple(c.name for c in ix.columns) for ix in table.indexes} <= indexed, name

    uniques = {t: {tuple(u["column_names"]) for u in insp.get_unique_constraints(t)} for t in ("jobs", "items")}
    assert uniques == {"jobs": {("idempotency_key",)}, "items": {("job_id", "idx")}}
    (fk,) = insp.get_foreign_keys("items")
    assert (fk["constrained_columns"], fk["referred_table"], fk["referred_columns"]) == (["job_id"], "jobs", ["id"])
    assert fk["options"].get("ondelete", "").upper() == "CASCADE"
    for key in ("id", "model", "status", "params", "created_at", "attempts", "cancel_requested", "n_items"):
        assert not JobRow.__table__.c[key].nullable
    for key in ("job_id", "idx", "line", "prompt", "status"):
        assert not Item.__table__.c[key].nullable


def test_a_second_store_on_a_migrated_database_applies_nothing(store_url, open_stores):
    first = open_stores(store_url)
    job = new_job(first)
    second = open_stores(store_url)
    assert migrate(second.engine) == []
    assert second.get_job(job.id).id == job.id


# --- submit side ----------------------------------------------------------------------------------


def test_create_job_records_the_job_and_its_items_in_order(store):
    chat = [{"role": "user", "content": "hi <|im_end|> there"}]
    job, created = store.create_job(
        model="tiny", params={"max_tokens": 5, "temperature": 0.0}, priority=3,
        items=[
            {"prompt": "first", "line": 2, "custom_id": "a", "params": {"max_tokens": 9}},
            {"prompt": chat, "line": 5},
            {"prompt": "日本語 🌍", "line": 7, "custom_id": "c"},
        ],
    )
    assert created and len(job.id) == 32
    rec = store.get_job(job.id)
    assert (rec.status, rec.model, rec.kind, rec.priority, rec.n_items, rec.attempts) == (
        "queued", "tiny", "generate", 3, 3, 0)
    assert rec.params == {"max_tokens": 5, "temperature": 0.0} and rec.cancel_requested is False
    assert store.get_job(job.id[:8]).id == job.id  # a unique prefix finds it
    items = store.items(job.id)
    assert [(it.idx, it.line, it.custom_id) for it in items] == [(0, 2, "a"), (1, 5, None), (2, 7, "c")]
    assert [it.prompt for it in items] == ["first", chat, "日本語 🌍"]
    assert [it.params for it in items] == [{"max_tokens": 9}, None, None]
    assert {it.status for it in items} == {"pending"} and {it.output for it in items} == {None}


def test_idempotency_key_returns_the_same_job(store):
    a = new_job(store, idempotency_key="key-1")
    b, created = store.create_job(model="tiny", params={}, items=[{"prompt": "other"}], idempotency_key="key-1")
    assert not created and b.id == a.id
    assert [j.id for j in store.list_jobs()] == [a.id]
    assert count(store, Item.__table__) == 2


def test_delete_job_removes_the_job_and_its_items(store):
    keep, gone = new_job(store), new_job(store, n=3)
    store.delete_job(gone.id)
    assert store.get_job(gone.id) is None and store.items(gone.id) == []
    assert [j.id for j in store.list_jobs()] == [keep.id]
    assert count(store, Item.__table__) == 2


# --- leases ---------------------------------------------------------------------------------------


def test_claim_lease_save_and_finish(store):
    job = new_job(store)
    c = claim(store, job.id, "o1")
    assert c.ok and c.attempt == 1
    rec = store.get_job(job.id)
    assert (rec.status, rec.lease_owner, rec.worker, rec.device) == ("running", "o1", "w-o1", "cpu")
    assert rec.started_at is not None and rec.lease_expires > rec.started_at

    other = claim(store, job.id, "o2")  # a redelivered copy while the lease is live
    assert not other.ok and other.reason == "leased"
    assert store.renew_many([(job.id, "o2")], 30) == {}
    assert store.renew_many([(job.id, "o1")], 30) == {job.id: False}

    assert not save(store, job.id, "o2", 0, "intruder")
    assert not store.finish(job.id, "o2", JobStatus.SUCCEEDED, completion_tokens=99)
    rec = store.get_job(job.id)
    assert rec.status == "running" and rec.completion_tokens == 0
    assert [it.output for it in store.items(job.id)] == [None, None]

    assert save(store, job.id, "o1", 0, "zero") and save(store, job.id, "o1", 1, "one")
    assert store.finish(job.id, "o1", JobStatus.SUCCEEDED, completion_tokens=6, tokens_per_s=12.5)
    rec = store.get_job(job.id)
    assert (rec.status, rec.completion_tokens, rec.tokens_per_s) == ("succeeded", 6, 12.5)
    assert rec.lease_owner is None and rec.lease_expires is None and rec.finished_at is not None
    items = store.items(job.id)
    assert [(it.status, it.output, it.completion_tokens) for it in items] == [
        ("succeeded", "zero", 3), ("succeeded", "one", 3)]

    after = claim(store, job.id, "o3")
    assert not after.ok and after.reason == "done"
    assert not save(store, job.id, "o1", 0, "late")  # the lease ended with the job
    assert store.items(job.id)[0].output == "zero"
    assert claim(store, "0" * 32, "o1").reason == "missing"


def test_checkpoints_and_renewals_of_several_jobs_in_one_write_touch_only_leases_still_held(store):
    """What a worker holding many jobs does every few hundred milliseconds: one transaction for
    all of them, and a job whose lease another owner holds gets nothing written."""
    a, b, c = new_job(store), new_job(store), new_job(store)
    for job, owner in ((a, "oa"), (b, "ob"), (c, "oc")):
        assert claim(store, job.id, owner).ok
    progress = [(0, 0, [5, 6]), (1, 0, [7])]
    assert store.checkpoint_many([(a.id, "oa", progress, 1.5), (b.id, "thief", progress, 2.0),
                                  (c.id, "oc", [], 0.25)]) == [True, False, True]
    assert [it.ids for it in store.items(a.id)] == [[5, 6], [7]]
    assert [it.ids for it in store.items(b.id)] == [None, None]
    assert [store.get_job(j.id).run_seconds for j in (a, b, c)] == [1.5, 0.0, 0.25]
    store.request_cancel(c.id)
    assert store.renew_many([(a.id, "oa"), (b.id, "thief"), (c.id, "oc")], 30) == {a.id: False, c.id: True}
    assert store.checkpoint_many([]) == [] and store.renew_many([], 30) == {}


def test_too_many_deliveries_fail_the_job(store):
    job = new_job(store)
    for n in (1, 2):  # each worker dies holding the job: the lease runs out
        c = claim(store, job.id, f"o{n}", lease=0.01, max_deliveries=2)
        assert c.ok and c.attempt == n
        time.sleep(0.05)
    c = claim(store, job.id, "o3", max_deliveries=2)
    assert not c.ok and c.reason == "too many deliveries"
    rec = store.get_job(job.id)
    assert rec.status == "failed" and rec.error_class == "DeliveryLimit"
    assert "delivered 2 times" in rec.error_message
    assert rec.lease_owner is None and rec.finished_at is not None
    assert claim(store, job.id, "o4").reason == "done"


def test_take_expired_puts_a_dead_workers_job_back(store):
    dead, alive = new_job(store), new_job(store)
    assert claim(store, dead.id, "o1", lease=0.01).ok
    assert claim(store, alive.id, "o2", lease=30).ok
    time.sleep(0.05)
    taken = store.take_expired()
    assert [j.id for j in taken] == [dead.id]
    rec = store.get_job(dead.id)
    assert (rec.status, rec.lease_owner, rec.lease_expires) == ("queued", None, None)
    assert store.get_job(alive.id).status == "running"
    assert store.take_expired() == []
    assert not save(store, dead.id, "o1", 0, "stale")  # the stalled worker lost its right to write
    assert store.renew_many([(dead.id, "o1")], 30) == {}
    again = claim(store, dead.id, "o3")
    assert again.ok and again.attempt == 2


def test_queued_for_lists_jobs_waiting_that_long_oldest_first_by_queued_at(store):
    first, running, second = new_job(store), new_job(store), new_job(store)
    assert claim(store, running.id, "o1").ok
    time.sleep(0.6)
    later = new_job(store)
    assert [j.id for j in store.queued_for(0.4)] == [first.id, second.id]
    assert [j.id for j in store.queued_for(-1)] == [first.id, second.id, later.id]
    store.request_cancel(first.id)
    assert [j.id for j in store.queued_for(0.4)] == [second.id]
    # a job put back on the queue (retry, takeover, release) waits from then, not from its submit
    assert store.release(running.id, "o1")
    assert running.id not in [j.id for j in store.queued_for(0.4)]
    assert running.id in [j.id for j in store.queued_for(-1)]


def test_release_gives_the_job_back(store):
    job = new_job(store)
    assert claim(store, job.id, "o1").ok
    assert not store.release(job.id, "o2")
    assert store.release(job.id, "o1")
    rec = store.get_job(job.id)
    assert (rec.status, rec.lease_owner, rec.attempts) == ("queued", None, 0)
    assert not store.release(job.id, "o1")
    c = claim(store, job.id, "o2")
    assert c.ok and c.attempt == 1


# --- cancel and retry -----------------------------------------------------------------------------


def test_cancel_a_queued_job_at_once(store):
    job = new_job(store, n=3)
    assert store.request_cancel(job.id) == "cancelled"
    rec = store.get_job(job.id)
    assert rec.status == "cancelled" and rec.cancel_requested and rec.finished_at is not None
    assert {it.status for it in store.items(job.id)} == {"cancelled"}
    assert claim(store, job.id, "o1").reason == "done"  # it never runs
    assert store.request_cancel(job.id) == "cancelled"
    with pytest.raises(StoreError):
        store.request_cancel("f" * 32)


def test_cancel_a_running_job_asks_its_worker(store):
    job = new_job(store, n=3)
    assert claim(store, job.id, "o1").ok
    assert save(store, job.id, "o1", 0, "done before the cancel")
    assert store.request_cancel(job.id) == "running"
    rec = store.get_job(job.id)
    assert rec.status == "running" and rec.cancel_requested
    assert store.renew_many([(job.id, "o1")], 30) == {job.id: True}
    assert save(store, job.id, "o1", 1, "partial", status=ItemStatus.CANCELLED)
    assert store.finish(job.id, "o1", JobStatus.CANCELLED)
    assert [(it.status, it.output) for it in store.items(job.id)] == [
        ("succeeded", "done before the cancel"), ("cancelled", "partial"), ("cancelled", None)]


def test_a_generation_job_cancelled_after_it_started_is_claimed_only_to_be_ended(store):
    """Its worker died before it saw the cancel: the next claim is ok but says `cancelled`, so that
    a worker ends each item with what the replay log holds (the store alone has not got it)."""
    job = new_job(store)
    assert claim(store, job.id, "o1", lease=0.01).ok
    store.request_cancel(job.id)
    time.sleep(0.05)  # its worker died before it saw the cancel
    c = claim(store, job.id, "o2")
    assert c.ok and c.cancelled and c.attempt == 2
    rec = store.get_job(job.id)
    assert (rec.status, rec.lease_owner) == ("running", "o2")
    assert not claim(store, job.id, "o3").ok  # the lease is o2's now
    assert save(store, job.id, "o2", 0, "what readers saw", status=ItemStatus.CANCELLED)
    assert store.finish(job.id, "o2", JobStatus.CANCELLED)
    assert [(it.status, it.output) for it in store.items(job.id)] == [("cancelled", "what readers saw"),
                                                                       ("cancelled", None)]


def test_a_cancelled_job_at_its_delivery_limit_is_ended_by_its_claim_without_a_worker(store):
    """The claim that would end it with its log's tokens is bounded like any other: a job that kept
    killing the workers that claimed it is not handed out again to be ended."""
    job = new_job(store)
    assert claim(store, job.id, "o1", lease=0.01, max_deliveries=1).ok
    store.request_cancel(job.id)
    time.sleep(0.05)
    c = claim(store, job.id, "o2", max_deliveries=1)
    assert not c.ok and c.reason == "cancelled"
    assert store.get_job(job.id).status == "cancelled"


def test_a_cancel_requested_dataset_job_is_ended_by_its_claim(store):
    """A dataset job keeps no partial output: the claim that finds it cancelled ends it in the store."""
    job = new_job(store, kind="prep")
    assert claim(store, job.id, "o1", lease=0.01).ok
    store.request_cancel(job.id)
    time.sleep(0.05)
    c = claim(store, job.id, "o2")
    assert not c.ok and c.reason == "cancelled" and not c.cancelled
    assert store.get_job(job.id).status == "cancelled"


def test_reset_for_retry_puts_back_only_failed_and_cancelled_items(store):
    job = new_job(store, n=4)
    assert claim(store, job.id, "o1").ok
    with pytest.raises(StoreError, match="only a finished job can be retried"):
        store.reset_for_retry(job.id)
    assert save(store, job.id, "o1", 0, "kept")
    assert store.save_item(job.id, "o1", 1, epoch=0, status=ItemStatus.FAILED, output=None, finish_reason=None,
                           prompt_tokens=2, completion_tokens=None, error="boom")
    assert save(store, job.id, "o1", 2, "cut short", status=ItemStatus.CANCELLED)
    assert store.finish(job.id, "o1", JobStatus.CANCELLED, error_class="X", error_message="stopped")

    assert store.reset_for_retry(job.id) == 3
    items = store.items(job.id)
    assert [(it.status, it.output, it.error, it.epoch) for it in items] == [
        ("succeeded", "kept", None, 0), ("pending", None, None, 1), ("pending", None, None, 1),
        ("pending", None, None, 1)]
    with pytest.raises(StoreError, match="is queued"):  # a second retry of the same job finds it queued
        store.reset_for_retry(job.id)
    rec = store.get_job(job.id)
    assert (rec.status, rec.attempts, rec.cancel_requested, rec.finished_at, rec.error_class) == (
        "queued", 0, False, None, None)
    assert claim(store, job.id, "o2").ok

    with pytest.raises(StoreError):
        store.reset_for_retry("e" * 32)


def test_reset_for_retry_of_a_fully_succeeded_job_changes_nothing(store):
    job = new_job(store, n=1)
    assert claim(store, job.id, "o1").ok and save(store, job.id, "o1", 0, "fine")
    assert store.finish(job.id, "o1", JobStatus.SUCCEEDED)
    assert store.reset_for_retry(job.id) == 0
    assert store.get_job(job.id).status == "succeeded"


# --- several writer processes at once (FAULTS.md: Store) ------------------------------------------

N_PROCS, N_JOBS, N_ITEMS = 4, 30, 5


def _writer(url: str, n: int, barrier, err_dir: str) -> None:
    """One worker process: open the store, then create, claim, fill and finish its jobs."""
    try:
        barrier.wait(60)  # every process opens (and migrates) the store at the same moment
        store = Store(url)
        ids = []
        for j in range(N_JOBS):
            job, _ = store.create_job(model=f"m{n}", params={"n": n},
                                      items=[{"prompt": f"p{n}.{j}.{i}"} for i in range(N_ITEMS)])
            ids.append(job.id)
        owner = f"proc{n}"
        for job_id in ids:
            c = store.claim(job_id, owner=owner, worker=owner, device="cpu", lease_seconds=60, max_deliveries=3)
            assert c.ok, c
            for i in range(N_ITEMS):
                assert store.save_item(job_id, owner, i, epoch=0, status=ItemStatus.SUCCEEDED, output=f"out {job_id} {i}",
                                       finish_reason="length", prompt_tokens=1, completion_tokens=2)
            assert store.finish(job_id, owner, JobStatus.SUCCEEDED, completion_tokens=2 * N_ITEMS)
        store.engine.dispose()
    except BaseException:
        Path(err_dir, f"proc{n}.err").write_text(traceback.format_exc())
        raise


@pytest.mark.slow
def test_several_writer_processes_lose_nothing(store_url, open_stores, tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(N_PROCS)
    err_dir = tmp_path / "errors"
    err_dir.mkdir()
    procs = [ctx.Process(target=_writer, args=(store_url, n, barrier, str(err_dir))) for n in range(N_PROCS)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(180)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    errors = {f.name: f.read_text() for f in sorted(err_dir.iterdir())}
    assert not errors, "\n".join(f"--- {k}\n{v}" for k, v in errors.items())  # "database is locked" lands here
    assert [p.exitcode for p in procs] == [0] * N_PROCS

    store = open_stores(store_url)
    jobs = store.list_jobs(limit=10_000)
    assert len(jobs) == N_PROCS * N_JOBS
    assert {j.status for j in jobs} == {"succeeded"}
    assert {(j.model, j.attempts, j.completion_tokens) for j in jobs} == {
        (f"m{n}", 1, 2 * N_ITEMS) for n in range(N_PROCS)}
    with store.Session() as s:
        items = s.execute(sa.select(Item.job_id, Item.idx, Item.status, Item.output)).all()
    assert len(items) == N_PROCS * N_JOBS * N_ITEMS
    assert {it.status for it in items} == {"succeeded"}
    assert all(it.output == f"out {it.job_id} {it.idx}" for it in items)
    if store_url.startswith("sqlite"):
        with store.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


# --- a writer killed in the middle of a write (FAULTS.md: Store) ----------------------------------


def _killed_writer(url: str, job_id: str, stray_id: str) -> None:
    """Claim the job, commit item 0, then die with item 1 and a new job written but not committed."""
    store = Store(url)
    c = store.claim(job_id, owner="doomed", worker="doomed", device="cpu", lease_seconds=0.01, max_deliveries=3)
    assert c.ok
    assert store.save_item(job_id, "doomed", 0, epoch=0, status=ItemStatus.SUCCEEDED, output="committed",
                           finish_reason="length", prompt_tokens=1, completion_tokens=1)
    with store.Session.begin() as s:
        s.execute(sa.update(Item).where(Item.job_id == job_id, Item.idx == 1)
                  .values(status=ItemStatus.SUCCEEDED.value, output="never committed"))
        s.add(JobRow(id=stray_id, kind="generate", model="stray", status="queued", params={}, priority=0,
                  created_at=utcnow(), attempts=0, cancel_requested=False,
                  oom_retries=0, n_items=0, completion_tokens=0))
        s.flush()  # both statements are on the database, inside the open transaction
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_a_writer_killed_mid_transaction_leaves_committed_rows_only(store_url, open_stores):
    store = open_stores(store_url)
    job = new_job(store, n=3)
    stray_id = uuid.uuid4().hex
    p = mp.get_context("spawn").Process(target=_killed_writer, args=(store_url, job.id, stray_id))
    p.start()
    p.join(120)
    if p.is_alive():
        p.kill()
        p.join(10)
    assert p.exitcode == -signal.SIGKILL

    deadline = time.monotonic() + 30  # PostgreSQL ends the dead client's session on its own
    while True:
        try:
            items = store.items(job.id)
            break
        except sa.exc.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert [(it.status, it.output) for it in items] == [
        ("succeeded", "committed"), ("pending", None), ("pending", None)]
    assert store.get_job(stray_id) is None
    assert count(store, JobRow.__table__) == 1

    # the job is redone: its lease runs out, it goes back to the queue, another worker finishes it
    time.sleep(0.05)
    assert [j.id for j in store.take_expired()] == [job.id]
    c = claim(store, job.id, "rescuer")
    assert c.ok and c.attempt == 2
    for i in (1, 2):
        assert save(store, job.id, "rescuer", i, f"redone {i}")
    assert store.finish(job.id, "rescuer", JobStatus.SUCCEEDED)
    assert [it.output for it in store.items(job.id)] == ["committed", "redone 1", "redone 2"]
    new_job(store)  # still writable

    fresh = open_stores(store_url)  # and a new process-like opener sees the same
    assert fresh.get_job(job.id).status == "succeeded"
    if store_url.startswith("sqlite"):
        with fresh.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


@pytest.mark.parametrize("url, reason", [
    ("garbage", "'garbage' is not a database URL"),
    ("mysql://root:secret@127.0.0.1/gencli", "the store cannot be on mysql (mysql://root:***@127.0.0.1/gencli): gencli "
                                             "keeps it in SQLite or PostgreSQL"),
    ("sqlite:////proc/no-such-dir/store.db", "is in /proc/no-such-dir, which does not exist: create that directory"),
    ("sqlite:////proc/store.db", "unable to open database file"),
    ("postgresql://postgres:secret@127.0.0.1:5432/gencli_no_such_db", "does not exist"),
])
def test_a_store_url_that_cannot_be_opened_is_one_line_naming_it(url, reason, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from gencli.cli.main import main

    if url.startswith("postgresql"):
        from services import pg_missing, pg_unavailable, pg_url

        if missing := pg_missing(pg_url()):
            pg_unavailable(missing)
    monkeypatch.setenv("GENCLI_DB_URL", url)
    for args in (["list"], ["worker", "--prep"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1, r.output
        (line,) = r.output.strip().splitlines()
        assert line.startswith("Error: ") and reason in line and "fix GENCLI_DB_URL" in line, line
        assert "secret" not in line and "Traceback" not in r.output and "MySQLdb" not in line


def test_a_sqlite_store_in_a_directory_that_does_not_exist_is_refused_and_nothing_is_made(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from gencli.cli.main import main

    monkeypatch.setenv("GENCLI_DB_URL", f"sqlite:///{tmp_path / 'typo' / 'dir' / 'x.db'}")
    r = CliRunner().invoke(main, ["list"])
    assert r.exit_code == 1 and "which does not exist: create that directory" in r.output, r.output
    assert not (tmp_path / "typo").exists()
    # in a directory that exists, a new deployment's first store is made; the default one, in a new
    # GENCLI_HOME, with its directory
    monkeypatch.setenv("GENCLI_DB_URL", f"sqlite:///{tmp_path / 'x.db'}")
    assert CliRunner().invoke(main, ["list"]).exit_code == 0 and (tmp_path / "x.db").is_file()
    monkeypatch.delenv("GENCLI_DB_URL")
    monkeypatch.setenv("GENCLI_HOME", str(tmp_path / "new" / "home"))
    assert CliRunner().invoke(main, ["list"]).exit_code == 0 and (tmp_path / "new" / "home" / "gencli.db").is_file()


def test_a_store_whose_write_lock_another_process_holds_is_busy_not_misconfigured(tmp_path, monkeypatch):
    """SQLite's "database is locked" at open (migrations take the write lock) after the busy timeout
    is said as what it is: the URL is right, the file is busy."""
    import sqlite3

    from gencli.storage import db
    from gencli.storage.store import StoreBusy

    url = f"sqlite:///{tmp_path / 'store.db'}"
    Store(url).engine.dispose()
    holder = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # as a worker stopped in the middle of a write holds it
    monkeypatch.setattr(db, "BUSY_SECONDS", 1)
    try:
        with pytest.raises(StoreBusy) as e:
            Store(url)
        msg = str(e.value)
        assert "is busy: another process has held its write lock" in msg and "GENCLI_DB_URL" not in msg
    finally:
        holder.execute("ROLLBACK")
    Store(url).engine.dispose()  # once it lets go, the store opens
