"""Workers that stall past their lease, cancels and retries whose Redis half is lost: the job
still ends once, with the store's outputs, and what a tailer shows ends equal to them.

Real `gencli worker` processes (SIGSTOP/SIGCONT), a real redis-server of the module's own, on
SQLite and on PostgreSQL (the `env` fixture).
"""

from __future__ import annotations

import signal
import time

import pytest
from services import start_worker, stop_between_writes
from tailing import Tailer, reference, wait_for

from gencli.storage.db import JobStatus
from gencli.worker.stream import read_log

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("queue_env")]

PROMPTS = [f"story number {n}:" for n in range(4)]


def test_a_worker_stopped_past_its_lease_and_woken_after_a_takeover_writes_nothing_more(env, tiny, client):
    model = f"tiny-stop-{env['id']}"
    a = start_worker(env, tiny, f"stalled-{env['id']}@test", "--model-name", model, "--batch_size", "1")
    b = None
    try:
        job = client.submit(PROMPTS, model=model, max_tokens=200, temperature=0)
        tailer = Tailer(job)
        tailer.start()
        wait_for(lambda: tailer.tokens() > 60, 60, "tokens from the first worker")
        stop_between_writes(a, client.store, job.id)
        b = start_worker(env, tiny, f"taker-{env['id']}@test", "--model-name", model, "--batch_size", "1")
        wait_for(lambda: job.record().worker == b.name, 60, "the takeover")
        seen = tailer.tokens()
        wait_for(lambda: tailer.tokens() > seen + 20, 60, "tokens from the new owner")
        a.kill(signal.SIGCONT)  # it wakes mid-step, with tokens to publish and items to save
        assert job.wait(90) is JobStatus.SUCCEEDED
        tailer.join(30)
        rec = job.record()
        assert rec.attempts == 2 and rec.worker == b.name
        stored = [x["output"] for x in job.result()]
        assert stored == reference(tiny, PROMPTS, 200)
        assert len(client.store.items(job.id)) == len(PROMPTS)
        events = read_log(env["redis"].client(), env["keys"], job.id)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # no seq twice, none skipped
        assert [e["worker"] for e in events if e["t"] == "start"] == [a.name, b.name]
        assert [e["status"] for e in events if e["t"] == "end"] == ["succeeded"]
        seqs = [d.seq for d in tailer.deltas]
        assert seqs == sorted(set(seqs)) and tailer.error is None
        assert tailer.texts(len(PROMPTS)) == stored
        wait_for(lambda: "lease lost" in a.log.read_text(), 30, "the woken worker to stop the job")
        assert a.alive()  # it stopped that job, not itself, and serves the next
    finally:
        a.kill(signal.SIGCONT)
        a.stop()
        if b:
            b.stop()


def test_a_job_cancelled_while_its_worker_is_stopped_keeps_what_readers_saw(env, tiny, client):
    """The cancel reaches neither the stopped worker nor, before the takeover, any other: the heir
    claims the job only to end it, each line with the tokens the log holds, which readers saw."""
    model = f"tiny-stopcancel-{env['id']}"
    a = start_worker(env, tiny, f"frozen-{env['id']}@test", "--model-name", model, "--batch_size", "2")
    b = None
    try:
        job = client.submit(PROMPTS[:2], model=model, max_tokens=240, temperature=0)
        tailer = Tailer(job)
        tailer.start()
        wait_for(lambda: tailer.tokens() > 40, 60, "tokens from the first worker")
        stop_between_writes(a, client.store, job.id)
        job.cancel()
        b = start_worker(env, tiny, f"heir-{env['id']}@test", "--model-name", model, "--batch_size", "2")
        assert job.wait(60) is JobStatus.CANCELLED
        tailer.join(30)
        stored = [x["output"] for x in job.result()]
        full = reference(tiny, PROMPTS[:2], 240)
        assert all(stored) and all(f.startswith(s) for s, f in zip(stored, full, strict=True)), stored
        assert [x["finish_reason"] for x in job.result()] == ["cancelled", "cancelled"]
        assert tailer.texts(2) == stored and tailer.error is None
        assert job.record().worker == b.name
    finally:
        a.kill(signal.SIGCONT)
        a.stop()
        if b:
            b.stop()


def test_a_cancel_recorded_in_the_store_alone_stops_the_job(env, tiny, client, worker):
    """As when Redis lost the cancel flag: the worker reads the store's flag at its lease renewal."""
    # 32 lines on the worker's 8 slots: four waves of 240 tokens, several lease renewals long even
    # where one line alone would finish within one renewal (about a second)
    prompts = [f"a long story, part {n}" for n in range(32)]
    job = client.submit(prompts, model="tiny", max_tokens=240, temperature=1.0, top_k=1000, seed=1)
    tailer = Tailer(job)
    tailer.start()
    wait_for(lambda: tailer.tokens() > 10, 60, "tokens")
    assert client.store.request_cancel(job.id) == "running"  # no Redis flag is set
    assert not env["redis"].client().exists(env["keys"].cancel(job.id))
    assert job.wait(30) is JobStatus.CANCELLED
    tailer.join(30)
    res = job.result()
    cut = [r for r in res if r["finish_reason"] == "cancelled"]
    assert cut and all(r["usage"]["completion_tokens"] < 240 for r in cut)
    assert any(0 < r["usage"]["completion_tokens"] for r in cut)  # stopped mid-line, not only before its start
    assert tailer.texts(len(prompts)) == [r["output"] or "" for r in res]


def test_a_retry_whose_reset_publish_was_lost_never_reuses_the_cancelled_attempts_tokens(env, tiny, client, worker):
    job = client.submit(["one", "two", "three"], model="tiny", max_tokens=240, temperature=1.0, top_k=1000)
    tailer = Tailer(job)
    tailer.start()
    wait_for(lambda: tailer.tokens() > 30, 60, "tokens")
    job.cancel()
    assert job.wait(30) is JobStatus.CANCELLED
    partial = {r["line"]: r["output"] for r in job.result() if r["status"] == "cancelled"}
    assert partial and all(partial.values())
    # `gencli retry` with its "reset" event lost: the log still holds the cancelled attempt's tokens
    tailer.join(30)  # a tailer of the cancelled job ends with it, showing what the store kept
    assert tailer.texts(3) == [r["output"] for r in job.result()]
    assert client.store.reset_for_retry(job.id) == len(partial)
    client._enqueue(job.id, "tiny", 0)
    tailer = Tailer(client.job(job.id))  # one that attaches to the retry reads the old attempt first
    tailer.start()
    assert job.wait(60) is JobStatus.SUCCEEDED
    tailer.join(30)
    after = {r["line"]: r for r in job.result()}
    for line, old in partial.items():
        new = after[line]
        # a whole new run: to its budget, or (unseeded sampling may draw an end token) to a stop
        whole = new["usage"]["completion_tokens"] == 240 or new["finish_reason"] == "stop"
        assert new["status"] == "succeeded" and whole, (new, old[:80])
        assert not new["output"].startswith(old)  # unseeded: a rerun from scratch, not old text continued
    assert tailer.texts(3) == [after[n]["output"] for n in (1, 2, 3)]
    restarts = [d for d in tailer.deltas if d.restart]
    assert {d.item for d in restarts} >= {line - 1 for line in partial}


def test_retry_reruns_only_the_cancelled_lines(env, tiny, client, tmp_path):
    """A line that finished before the cancel keeps its output and is not run again.

    On a worker of one slot, the short line runs first and alone, then the long ones one after the
    other: the cancel, sent when the short line's end is read, has 720 steps to arrive in (with the
    lines side by side on 8 slots, 240 were once too few on a busy machine: the job succeeded)."""
    model = f"tiny-retry-{env['id']}"
    w = start_worker(env, tiny, f"one-slot-{env['id']}@test", "--model-name", model, "--batch_size", "1")
    try:
        f = tmp_path / "mixed.jsonl"
        f.write_text('{"prompt": "short", "max_tokens": 3}\n{"prompt": "long one"}\n{"prompt": "long two"}\n'
                     '{"prompt": "long three"}\n')
        from gencli.worker.prompts import read_prompt_file

        job = client.submit(read_prompt_file(str(f), each_line=False), model=model, max_tokens=240, temperature=0)
        for d in job.stream():
            if d.item == 0 and d.finish_reason:
                job.cancel()
                break
        assert job.wait(30) is JobStatus.CANCELLED
        before = job.result()
        assert [r["status"] for r in before] == ["succeeded", "cancelled", "cancelled", "cancelled"]
        first_run = len(read_log(env["redis"].client(), env["keys"], job.id))
        assert job.retry() == 3
        assert job.wait(60) is JobStatus.SUCCEEDED
    finally:
        w.stop()
    after = job.result()
    assert after[0] == before[0]
    assert [r["output"] for r in after[1:]] == reference(tiny, ["long one", "long two", "long three"], 240)
    rerun = read_log(env["redis"].client(), env["keys"], job.id, after=first_run)
    assert {e["i"] for e in rerun if e["t"] == "tok"} == {1, 2, 3}  # the finished line made no token again


def test_the_soft_time_limit_counts_the_running_time_of_every_attempt(env, tiny, client):
    model = f"tiny-limit-{env['id']}"
    limit = {"GENCLI_SOFT_TIME_LIMIT": "3"}
    a = start_worker(env, tiny, f"limited-{env['id']}@test", "--model-name", model, "--batch_size", "1",
                     extra_env=limit)
    b = None
    try:
        job = client.submit(PROMPTS * 10, model=model, max_tokens=240, temperature=0)
        wait_for(lambda: job.record().run_seconds >= 2.0, 60, "two seconds of running, checkpointed")
        a.kill(signal.SIGKILL)
        b = start_worker(env, tiny, f"limited2-{env['id']}@test", "--model-name", model, "--batch_size", "1",
                         extra_env=limit)
        wait_for(lambda: job.record().attempts == 2, 60, "the second attempt's claim")
        claimed = time.monotonic()  # the worker's start-up and the takeover wait are behind us
        assert job.wait(60) is JobStatus.FAILED
        second = time.monotonic() - claimed  # the second attempt's run alone
        rec = job.record()
        assert rec.error_class == "TimeLimitExceeded" and rec.attempts == 2
        assert 3.0 <= rec.run_seconds < 4.5  # both attempts together, not 3 s each
        assert second < 2.9, second  # a fresh 3 s limit on the second attempt would need 3 s or more
    finally:
        a.stop()
        if b:
            b.stop()


def test_a_job_that_outlives_the_brokers_visibility_timeout_still_runs_once(env, tiny, client):
    """The broker hands the unacked message out again; the live lease keeps the copy from running."""
    model = f"tiny-vis-{env['id']}"
    short = {"GENCLI_VISIBILITY_TIMEOUT": "2"}
    # a's decoding waits while this file exists (its lease still renewed): the job outlives the
    # visibility timeout however fast the model decodes
    stall = env["tmp"] / f"vis-stall-{env['id']}"
    a = start_worker(env, tiny, f"slowpoke-{env['id']}@test", "--model-name", model, "--batch_size", "1",
                     extra_env={**short, "GENCLI_INJECT_STALL": str(stall)})
    b = None
    try:
        stall.touch()  # (a is warmed up already)
        job = client.submit(PROMPTS * 2, model=model, max_tokens=240, temperature=0)
        wait_for(lambda: job.status is JobStatus.RUNNING, 30, "the job to start")
        # kombu's consumer restores unacked messages older than the visibility timeout when it
        # connects (then only every 100 s): b connects after the message has grown that old
        time.sleep(float(short["GENCLI_VISIBILITY_TIMEOUT"]) + 0.5)
        b = start_worker(env, tiny, f"idler-{env['id']}@test", "--model-name", model, extra_env=short)
        wait_for(lambda: f"job {job.id} not run: leased" in b.log.read_text(), 30, "the redelivered copy")
        stall.unlink()
        assert job.wait(120) is JobStatus.SUCCEEDED
        rec = job.record()
        assert rec.attempts == 1 and rec.worker == a.name
        events = read_log(env["redis"].client(), env["keys"], job.id)
        assert [e["t"] for e in events].count("start") == 1 and [e["t"] for e in events].count("end") == 1
        assert [x["output"] for x in job.result()] == reference(tiny, PROMPTS * 2, 240)
    finally:
        stall.unlink(missing_ok=True)
        a.stop()
        if b:
            b.stop()


# A consumer that takes one message of QUEUE (kombu records it as held, unacked) and dies before
# it can claim the job, as a worker SIGKILLed between the two does.
TAKE_AND_DIE = """
import os, signal, sys
from kombu import Consumer, Queue
from gencli.storage.settings import get_settings
from gencli.worker.client import Client

client = Client(get_settings(), start_redis=False)
with client.app.connection_for_read() as conn:
    def took(body, message):
        print("took", body[0][0], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    with Consumer(conn.default_channel, [Queue(sys.argv[1], routing_key=sys.argv[1])], callbacks=[took]):
        conn.drain_events(timeout=30)
"""


def test_a_job_whose_message_was_taken_by_a_consumer_that_died_is_sent_again(env, tiny, client, worker):
    """Two jobs whose messages are gone while the store has them queued and Redis kept their
    "sent" marks: one held (unacked) by a consumer that died before claiming it, which kombu would
    give back only after its visibility timeout (hours); one popped off its queue by a process
    that died before kombu recorded it as held. A worker sends both again once they have been
    queued for the grace period; each runs once. Any live worker of the deployment sends them (here
    the module's `worker`, which serves another model, or the heir)."""
    import subprocess
    import sys

    from services import child_env

    from gencli.worker import broker
    from gencli.worker.app import queue_for

    model = f"tiny-taken-{env['id']}"
    r = env["redis"].client()
    held = client.submit(PROMPTS[:2], model=model, max_tokens=20, temperature=0)
    took = subprocess.run([sys.executable, "-c", TAKE_AND_DIE, queue_for(model)], env=child_env(env["vars"]),
                          capture_output=True, text=True, timeout=60)
    assert took.returncode == -signal.SIGKILL and f"took {held.id}" in took.stdout, took.stderr[-2000:]
    assert set(broker.held_messages(r, env["keys"])) == {held.id}
    popped = client.submit(PROMPTS[2:], model=model, max_tokens=20, temperature=0)
    assert sum(r.llen(k) for k in env["keys"].queue_lists(queue_for(model))) == 1
    for key in env["keys"].queue_lists(queue_for(model)):
        r.delete(key)  # what a BRPOP of a process that died at once leaves
    assert r.exists(env["keys"].sent(held.id)) and r.exists(env["keys"].sent(popped.id))
    w = start_worker(env, tiny, f"heir-taken-{env['id']}@test", "--model-name", model)
    try:
        assert held.wait(60) is JobStatus.SUCCEEDED and popped.wait(60) is JobStatus.SUCCEEDED
        log = w.log.read_text() + worker.log.read_text()
        assert f"job {held.id}: queued in the store but a consumer took its message" in log
        assert f"job {popped.id}: queued in the store but its queue is empty and no consumer holds" in log
        for job, prompts in ((held, PROMPTS[:2]), (popped, PROMPTS[2:])):
            assert job.record().attempts == 1
            assert [x["output"] for x in job.result()] == reference(tiny, prompts, 20)
        assert held.id not in broker.held_messages(r, env["keys"])  # the dead consumer's copy is gone
    finally:
        w.stop()
