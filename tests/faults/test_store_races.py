"""State changes raced by real processes on one store (SQLite and PostgreSQL): every change is one
atomic statement, so exactly one of the racers wins and no count loses an update.

Each racer is a separate process with its own connection pool; they start together on a barrier.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest

from gencli.storage.db import ItemStatus, JobStatus
from gencli.storage.store import Store, StoreError

pytestmark = pytest.mark.slow

N_RACERS, N_JOBS = 4, 60


def _new_jobs(store: Store, n: int, items: int = 1) -> list[str]:
    return [store.create_job(model="tiny", params={}, items=[{"prompt": f"p{i}"} for i in range(items)])[0].id
            for _ in range(n)]


def _race_claims(url: str, job_ids: list[str], who: int, barrier, out) -> None:
    store = Store(url)
    won = []
    for j in job_ids:  # every racer claims the same job at the same moment (the old read-then-write
        barrier.wait(30)  # claim let two or more win 179 of 200 jobs this way on PostgreSQL)
        if store.claim(j, owner=f"o{who}", worker=f"w{who}", device="cpu", lease_seconds=60, max_deliveries=100).ok:
            won.append(j)
    out.put((who, won))


def _race(target, url: str, *args) -> dict[int, list]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(N_RACERS), ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, *args, who, barrier, out)) for who in range(N_RACERS)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return results


def test_racing_claims_on_every_job_one_winner_each_and_attempts_count_every_claim(store_url):
    store = Store(store_url)
    jobs = _new_jobs(store, N_JOBS)
    won = _race(_race_claims, store_url, jobs)
    winners = [j for w in won.values() for j in w]
    assert sorted(winners) == sorted(jobs)  # each job claimed exactly once
    for who, mine in won.items():
        for j in mine:
            rec = store.get_job(j)
            assert (rec.status, rec.lease_owner, rec.worker, rec.attempts) == ("running", f"o{who}", f"w{who}", 1)


def _race_retry(url: str, job_id: str, who: int, barrier, out) -> None:
    store = Store(url)
    barrier.wait(30)
    try:
        out.put((who, store.reset_for_retry(job_id)))
    except StoreError as e:
        out.put((who, str(e)))


def test_racing_retries_of_one_job_put_its_items_back_once(store_url):
    store = Store(store_url)
    (job,) = _new_jobs(store, 1, items=3)
    assert store.claim(job, owner="o", worker="w", device="cpu", lease_seconds=60, max_deliveries=3).ok
    assert store.finish(job, "o", JobStatus.CANCELLED)
    got = _race(_race_retry, store_url, job)
    counts = [v for v in got.values() if isinstance(v, int)]
    assert max(counts) == 3 and counts.count(3) == 1  # one racer reset the 3 items
    assert all(v == 0 or "is queued" in str(v) for v in got.values() if v != 3)
    assert [it.epoch for it in store.items(job)] == [1, 1, 1]  # one new epoch, not one per racer


def _race_cancel_or_claim(url: str, job_id: str, who: int, barrier, out) -> None:
    store = Store(url)
    barrier.wait(30)
    if who % 2:
        out.put((who, store.request_cancel(job_id)))
    else:
        c = store.claim(job_id, owner=f"o{who}", worker="w", device="cpu", lease_seconds=60, max_deliveries=9)
        out.put((who, "claimed" if c.ok else c.reason))


@pytest.mark.parametrize("round_", range(3))
def test_a_cancel_racing_a_claim_ends_consistent(store_url, round_):
    store = Store(store_url)
    (job,) = _new_jobs(store, 1, items=2)
    got = _race(_race_cancel_or_claim, store_url, job)
    rec = store.get_job(job)
    assert rec.cancel_requested
    claimed = [w for w, v in got.items() if v == "claimed"]
    assert len(claimed) <= 1
    if claimed:  # the claim came first: the job runs, and its worker is asked to stop
        assert rec.status == "running" and rec.attempts == 1
        assert store.renew_many([(job, f"o{claimed[0]}")], 30) == {job: True}
    else:  # the cancel came first: cancelled for good, its items too, never started
        assert rec.status == "cancelled" and rec.attempts == 0 and rec.started_at is None
        assert {it.status for it in store.items(job)} == {"cancelled"}


def test_jobs_ended_inside_claim_end_their_items_so_retry_runs_them(store_url):
    store = Store(store_url)
    cancelled, crashing = _new_jobs(store, 2, items=2)
    # cancelled while running: its message comes back after the worker died
    assert store.claim(cancelled, owner="a", worker="w", device="cpu", lease_seconds=0.2, max_deliveries=3).ok
    store.request_cancel(cancelled)
    for owner in ("b", "c"):  # a job that crashes its worker: claimed, never finished
        assert store.claim(crashing, owner=owner, worker="w", device="cpu", lease_seconds=0.2, max_deliveries=2).ok
        _sleep_past(store, 0.3)
    _sleep_past(store, 0.3)
    # a generation job cancelled after it started is claimed only to be ended, each item with what
    # the replay log shows (worker/runner.py); its worker ends it so
    c = store.claim(cancelled, owner="d", worker="w", device="cpu", lease_seconds=30, max_deliveries=3)
    assert c.ok and c.cancelled
    assert store.finish(cancelled, "d", JobStatus.CANCELLED)
    assert store.claim(crashing, owner="e", worker="w", device="cpu", lease_seconds=30, max_deliveries=2).reason == \
        "too many deliveries"
    assert {it.status for it in store.items(cancelled)} == {ItemStatus.CANCELLED.value}
    assert {(it.status, it.error) for it in store.items(crashing)} == {
        ("failed", "the job was delivered 2 times and never finished: it may crash its worker")}
    assert store.reset_for_retry(cancelled) == 2 and store.reset_for_retry(crashing) == 2
    assert store.claim(crashing, owner="f", worker="w", device="cpu", lease_seconds=30, max_deliveries=2).ok


def _sleep_past(store: Store, seconds: float) -> None:
    """Wait until the database's clock has moved on by seconds."""
    import time

    start = store.db_time()
    while store.db_time() - start < timedelta(seconds=seconds):
        time.sleep(0.02)


SKEWED = textwrap.dedent("""
    import sys, datetime
    from gencli.storage.store import Store
    store = Store(sys.argv[1])
    print(datetime.datetime.utcnow().isoformat())
    print(store.claim(sys.argv[2], owner="skewed", worker="w", device="cpu", lease_seconds=30,
                      max_deliveries=3).ok)
    print([j.id for j in store.take_expired()])
""")


def test_a_worker_whose_clock_is_hours_off_neither_steals_nor_loses_leases(store_url):
    """faketime shifts the process's clock (libfaketime, as a badly set machine clock would):
    leases it writes and checks are in the database's time all the same."""
    if store_url.startswith("sqlite"):
        pytest.skip("SQLite runs in each worker's process, on one machine: its clock is that machine's, "
                    "so workers on one SQLite file cannot disagree on the time")
    if not _has_faketime():
        pytest.fail("the clock-skew test needs faketime (apt-get install faketime; .ci/run installs it)")
    store = Store(store_url)
    live, mine = _new_jobs(store, 2)
    assert store.claim(live, owner="honest", worker="w", device="cpu", lease_seconds=30, max_deliveries=3).ok
    for shift in ("+2h", "-2h"):
        env = dict(os.environ, FAKETIME=shift, FAKETIME_DONT_FAKE_MONOTONIC="1",
                   LD_PRELOAD=_has_faketime())
        out = subprocess.run([sys.executable, "-c", SKEWED, store_url, mine], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout.splitlines()
        from datetime import datetime

        skew = datetime.fromisoformat(out[0]) - store.db_time()
        assert abs(abs(skew.total_seconds()) - 7200) < 60, out  # the process's clock really is off
        assert out[2] == "[]"  # the live lease was not taken, whatever the clock says
        assert store.get_job(live).lease_owner == "honest"
        if shift == "+2h":
            assert out[1] == "True"
    rec = store.get_job(mine)
    lease_left = (rec.lease_expires - store.db_time()).total_seconds()
    assert 25 < lease_left <= 30  # 30 s from the database's now, not two hours off


def _has_faketime() -> str:
    for path in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1"):
        if os.path.exists(path):
            return path
    return ""
