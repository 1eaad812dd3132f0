"""One worker, many jobs in one batch: each job makes what it makes alone, and every guarantee of
the queue holds per job: cancel, SIGKILL and takeover, out of memory, a lost lease.

Real `gencli worker` processes decoding several jobs' sequences together (continuous batching,
worker/batcher.py), a real redis-server of the module's own, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import signal
import time

import pytest
from services import start_worker
from sqlalchemy import update
from tailing import Tailer, reference, wait_for

from gencli.storage.db import JobRow, JobStatus, db_now
from gencli.worker.stream import read_log

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("queue_env")]


def _spec(n: int) -> dict:
    """JobRow n of a mixed set: 1 to 3 lines, its own budget, greedy or seeded sampling with its own
    temperature and top_k."""
    sampled = n % 2 == 1
    return {"prompts": [f"job {n} line {k}:" for k in range(1 + n % 3)], "max_tokens": 12 + 9 * n,
            "temperature": 0.7 + 0.2 * n if sampled else 0.0, "top_k": 40 + 10 * n if sampled else 200,
            "seed": 100 + n if sampled else None}


def _submit(client, model: str, spec: dict):
    return client.submit(spec["prompts"], model=model, max_tokens=spec["max_tokens"],
                         temperature=spec["temperature"], top_k=spec["top_k"], seed=spec["seed"])


def _alone(tiny, spec: dict) -> list[str]:
    return reference(tiny, spec["prompts"], spec["max_tokens"], temperature=spec["temperature"],
                     top_k=spec["top_k"], seed=spec["seed"])


def _overlapping(records) -> int:
    """How many pairs of jobs were running at the same time (by the store's clock)."""
    return sum(1 for i, a in enumerate(records) for b in records[i + 1:]
               if a.started_at < b.finished_at and b.started_at < a.finished_at)


def test_many_concurrent_jobs_of_mixed_lengths_and_parameters_each_equal_the_job_alone(env, tiny, client):
    model = f"tiny-mix-{env['id']}"
    w = start_worker(env, tiny, f"mixer-{env['id']}@test", "--model-name", model, "--batch_size", "8",
                     "--max-jobs", "8")
    try:
        specs = [_spec(n) for n in range(10)]
        jobs = [_submit(client, model, s) for s in specs]
        for j in jobs:
            assert j.wait(120) is JobStatus.SUCCEEDED
        for j, s in zip(jobs, specs):
            assert [x["output"] for x in j.result()] == _alone(tiny, s), j.id
        records = [j.record() for j in jobs]
        assert {r.attempts for r in records} == {1}
        assert _overlapping(records) >= 5  # they really ran side by side, not one after another
    finally:
        w.stop()


def test_cancelling_one_job_mid_batch_stops_its_rows_and_leaves_the_others_unchanged(env, tiny, client):
    model = f"tiny-cancel-{env['id']}"
    w = start_worker(env, tiny, f"canceller-{env['id']}@test", "--model-name", model, "--batch_size", "8")
    try:
        keep_prompts = ["kept one:", "kept two:"]
        doomed = client.submit(["doomed one:", "doomed two:", "doomed three:"], model=model, max_tokens=240,
                               temperature=0)
        kept = client.submit(keep_prompts, model=model, max_tokens=240, temperature=0)
        r = env["redis"].client()
        wait_for(lambda: len(read_log(r, env["keys"], kept.id)) > 20 and len(read_log(r, env["keys"], doomed.id)) > 20,
                 60, "both jobs decoding")
        t0 = time.monotonic()
        doomed.cancel()
        assert doomed.wait(10) is JobStatus.CANCELLED
        stopped_in = time.monotonic() - t0
        ended = len(read_log(r, env["keys"], doomed.id))
        assert kept.status is JobStatus.RUNNING  # the other job was still decoding when this one ended
        assert kept.wait(120) is JobStatus.SUCCEEDED
        assert len(read_log(r, env["keys"], doomed.id)) == ended  # not one token after its end
        results = doomed.result()
        assert {x["status"] for x in results} == {"cancelled"} and all(x["output"] for x in results)
        assert all(x["finish_reason"] == "cancelled" for x in results)
        assert [x["output"] for x in kept.result()] == reference(tiny, keep_prompts, 240)
        assert stopped_in < 5, stopped_in
    finally:
        w.stop()


def test_sigkill_of_a_worker_holding_several_jobs_finishes_each_once_elsewhere(env, tiny, client):
    model = f"tiny-several-{env['id']}"
    a = start_worker(env, tiny, f"holder-{env['id']}@test", "--model-name", model, "--batch_size", "8")
    b = None
    try:
        specs = [_spec(n) for n in (4, 5, 7)]
        for s in specs:
            s["max_tokens"] = 200
        jobs = [_submit(client, model, s) for s in specs]
        tailers = [Tailer(j) for j in jobs]
        for t in tailers:
            t.start()
        wait_for(lambda: all(t.tokens() > 10 for t in tailers), 60, "every job streaming")
        assert len({j.record().worker for j in jobs}) == 1  # one worker holds them all
        a.kill(signal.SIGKILL)
        b = start_worker(env, tiny, f"heir-{env['id']}@test", "--model-name", model, "--batch_size", "8")
        for j in jobs:
            assert j.wait(120) is JobStatus.SUCCEEDED
        r = env["redis"].client()
        for j, s, t in zip(jobs, specs, tailers):
            t.join(30)
            assert t.error is None
            rec = j.record()
            assert rec.attempts == 2 and rec.worker == b.name
            stored = [x["output"] for x in j.result()]
            assert stored == _alone(tiny, s)  # resumed where it was: what one run makes
            assert t.texts(len(s["prompts"])) == stored  # a tailer saw each token once
            seqs = [e["seq"] for e in read_log(r, env["keys"], j.id)]
            assert seqs == list(range(1, len(seqs) + 1))
            assert [e["t"] for e in read_log(r, env["keys"], j.id)].count("end") == 1
    finally:
        a.stop()
        if b:
            b.stop()


def test_out_of_memory_with_several_jobs_preempts_sequences_and_changes_no_output(env, tiny, client):
    """Injected at 3 rows: the engine halves its rows, preempting the newest sequences, which are
    fed again later from their ids so far; every job's output is what it makes alone."""
    model = f"tiny-oomx-{env['id']}"
    w = start_worker(env, tiny, f"squeezed-{env['id']}@test", "--model-name", model, "--batch_size", "6",
                     "--max-slots-per-job", "3", extra_env={"GENCLI_INJECT_OOM": "3"})
    try:
        specs = [_spec(n) for n in (2, 5, 8)]  # 3 lines each
        jobs = [_submit(client, model, s) for s in specs]
        for j in jobs:
            assert j.wait(120) is JobStatus.SUCCEEDED
        for j, s in zip(jobs, specs):
            assert [x["output"] for x in j.result()] == _alone(tiny, s)
        records = [j.record() for j in jobs]
        assert sum(r.oom_retries for r in records) >= 1
        assert all(r.final_batch_size is not None and r.final_batch_size <= 6 for r in records)
        rungs = [line for line in w.log.read_text().splitlines() if "out of memory on cpu at" in line]
        assert rungs and all("preempted" in line for line in rungs)
    finally:
        w.stop()


def test_a_lease_lost_for_one_of_several_jobs_stops_only_that_job_which_is_then_resumed(env, tiny, client):
    model = f"tiny-lost-{env['id']}"
    w = start_worker(env, tiny, f"loser-{env['id']}@test", "--model-name", model, "--batch_size", "8")
    try:
        specs = [_spec(n) for n in (3, 4, 6)]
        for s in specs:
            s["max_tokens"] = 220
        jobs = [_submit(client, model, s) for s in specs]
        r = env["redis"].client()
        wait_for(lambda: all(len(read_log(r, env["keys"], j.id)) > 15 for j in jobs), 60, "every job decoding")
        victim = jobs[0]
        with client.store.Write.begin() as s:  # another owner takes the lease, and lets it run out
            s.execute(update(JobRow).where(JobRow.id == victim.id).values(lease_owner="thief", lease_expires=db_now(-60)))
        for j in jobs:
            assert j.wait(120) is JobStatus.SUCCEEDED
        log = w.log.read_text()
        assert f"job {victim.id}: lease lost" in log
        assert all(f"job {j.id}: lease lost" not in log for j in jobs[1:])
        assert [j.record().attempts for j in jobs] == [2, 1, 1]  # taken back and resumed; the others untouched
        for j, s in zip(jobs, specs):
            assert [x["output"] for x in j.result()] == _alone(tiny, s)
        assert [e["t"] for e in read_log(r, env["keys"], victim.id)].count("end") == 1
    finally:
        w.stop()
