"""Redis is transport, the store is the record: Redis flushed, stopped or trimmed under a running
job never loses it, runs it twice, stores a wrong output, or shows a tailer a wrong text as whole.

Real `gencli worker` processes and a real redis-server of the module's own that the tests
FLUSHALL, kill and restart, on SQLite and on PostgreSQL (the `env` fixture).
"""

from __future__ import annotations

import signal
import time

import pytest
import redis
from click.testing import CliRunner
from services import start_worker
from tailing import Tailer, reference, wait_for

from gencli.cli.main import main
from gencli.storage.db import JobStatus
from gencli.worker.stream import Publisher, StreamRefused, follow, publish_many, read_log

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("queue_env")]

PROMPTS = [f"story number {n}:" for n in range(4)]


def _checkpointed(client, job_id: str) -> int:
    """Ids the store holds of the job's lines: their checkpoints, and the outputs of those ended."""
    return sum(len(it.ids or []) for it in client.store.items(job_id))


def test_redis_flushed_while_a_job_runs_then_its_worker_dies_the_next_resumes_from_the_store(env, tiny, client):
    model = f"tiny-flush-{env['id']}"
    a = start_worker(env, tiny, f"flushed-{env['id']}@test", "--model-name", model, "--batch_size", "1")
    b = None
    try:
        job = client.submit(PROMPTS, model=model, max_tokens=200, temperature=0)
        tailer = Tailer(job)
        tailer.start()
        wait_for(lambda: tailer.tokens() > 80, 60, "tokens from the first worker")
        env["redis"].client().flushall()  # the log's head, the queue, the worker's message: all gone
        wait_for(lambda: len(read_log(env["redis"].client(), env["keys"], job.id)) > 20, 30,
                 "tokens logged after the flush")
        checkpointed = _checkpointed(client, job.id)
        wait_for(lambda: _checkpointed(client, job.id) > checkpointed, 30, "a checkpoint after the flush")
        a.kill(signal.SIGKILL)
        b = start_worker(env, tiny, f"resumer-{env['id']}@test", "--model-name", model, "--batch_size", "1")
        assert job.wait(90) is JobStatus.SUCCEEDED, job.record().error_message
        tailer.join(30)
        rec = job.record()
        assert rec.attempts == 2 and rec.worker == b.name
        stored = [x["output"] for x in job.result()]
        assert stored == reference(tiny, PROMPTS, 200)  # not a text that starts mid-way
        assert len(client.store.items(job.id)) == len(PROMPTS)
        events = read_log(env["redis"].client(), env["keys"], job.id)
        assert events[0]["seq"] > 1  # the log lost its head...
        assert any(e["t"] == "resync" for e in events)  # ...so the resumer said it went by the store
        assert tailer.error is None and tailer.texts(len(PROMPTS)) == stored  # a live tailer ends right
        late = client.job(job.id)
        assert [late.texts()[i] for i in range(len(PROMPTS))] == stored  # and so does a late one
        assert any(e["t"] == "gap" for e in late.events())
    finally:
        a.stop()
        if b:
            b.stop()


def test_a_tailer_of_a_log_that_lost_its_head_says_so_and_shows_the_stored_output(env, tiny, client, worker):
    job = client.submit(PROMPTS[:2], model="tiny", max_tokens=30, temperature=0)
    assert job.wait(60) is JobStatus.SUCCEEDED
    r = env["redis"].client()
    log = env["keys"].log(job.id)
    r.xtrim(log, minid="6-0", approximate=False)  # as eviction or the log's cap would: the first five events are gone
    t = CliRunner().invoke(main, ["tail", job.id])
    assert t.exit_code == 0, t.output
    stored = [x["output"] for x in job.result()]
    assert "lost events" in t.stderr
    assert t.stdout == f"=== line 1 ===\n{stored[0]}\n=== line 2 ===\n{stored[1]}\n"  # held back, then whole
    assert job.texts() == dict(enumerate(stored))
    r.delete(log)  # the whole log gone (expired, or Redis restarted empty)
    t = CliRunner().invoke(main, ["tail", job.id])
    assert t.exit_code == 0, t.output
    assert t.stdout == f"=== line 1 ===\n{stored[0]}\n=== line 2 ===\n{stored[1]}\n"
    assert "lost events" in t.stderr


def test_redis_down_longer_than_the_lease_costs_a_live_worker_nothing(env, tiny, client):
    model = f"tiny-down-{env['id']}"
    a = start_worker(env, tiny, f"patient-{env['id']}@test", "--model-name", model, "--batch_size", "1")
    b = start_worker(env, tiny, f"bystander-{env['id']}@test", "--model-name", model, "--batch_size", "1")
    server = env["redis"]
    try:
        job = client.submit(PROMPTS, model=model, max_tokens=240, temperature=0)
        wait_for(lambda: job.status is JobStatus.RUNNING, 30, "the job to start")
        owner = job.record().worker
        wait_for(lambda: _checkpointed(client, job.id) > 0, 30, "the job's first checkpoint")
        server.proc.kill()
        server.proc.wait(10)
        lease = float(env["vars"]["GENCLI_LEASE_SECONDS"])
        seen = []
        deadline = time.time() + 3 * lease
        while time.time() < deadline:  # the store is up: the lease keeps being renewed
            rec = job.record()
            assert rec.status == "running" and rec.worker == owner and rec.attempts == 1
            seen.append(rec.lease_expires)
            time.sleep(0.5)
        assert seen[-1] > seen[0] + __import__("datetime").timedelta(seconds=lease)
        server.start()
        assert job.wait(120) is JobStatus.SUCCEEDED, job.record().error_message
        rec = job.record()
        assert rec.attempts == 1 and rec.worker == owner
        assert [x["output"] for x in job.result()] == reference(tiny, PROMPTS, 240)
    finally:
        if server.proc.poll() is not None:
            server.start()
        a.stop()
        b.stop()


def test_a_worker_whose_redis_is_gone_stops_within_seconds_on_sigterm(env, tiny):
    w = start_worker(env, tiny, f"leaving-{env['id']}@test", "--model-name", f"tiny-leaving-{env['id']}")
    server = env["redis"]
    try:
        logged = len(w.log.read_text())
        server.proc.kill()
        server.proc.wait(10)
        wait_for(lambda: "Cannot connect to" in w.log.read_text()[logged:], 30, "its consumer to be reconnecting")
        t0 = time.monotonic()
        w.kill(signal.SIGTERM)
        w.proc.wait(30)
        assert time.monotonic() - t0 < 10, "a worker without Redis must not wait out its reconnect loop"
    finally:
        server.start()
        w.stop()


def test_reads_work_with_redis_down(env, tiny, client, worker):
    job = client.submit(["read me"], model="tiny", max_tokens=5, temperature=0)
    assert job.wait(60) is JobStatus.SUCCEEDED
    server = env["redis"]
    server.proc.kill()
    server.proc.wait(10)
    try:
        for args in (["list"], ["show", job.id], ["results", job.id]):
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 0, r.output
            assert job.id in r.output or "read me" in r.output
        before = len(client.store.list_jobs(limit=1000))
        r = CliRunner().invoke(main, ["submit", "--model", "tiny", "--prompt", "x"])
        assert r.exit_code == 1 and "does not answer" in r.output and "Traceback" not in r.output
        assert len(client.store.list_jobs(limit=1000)) == before  # nothing half-recorded
    finally:
        server.start()
        worker.wait_ready(server.client(), timeout=60)


def test_a_log_over_its_cap_is_trimmed_and_readers_fall_back_to_the_store(env, tiny, client):
    model = f"tiny-cap-{env['id']}"
    w = start_worker(env, tiny, f"capped-{env['id']}@test", "--model-name", model, "--batch_size", "1",
                     extra_env={"GENCLI_STREAM_MAX_EVENTS": "10"})
    try:
        job = client.submit(PROMPTS, model=model, max_tokens=120, temperature=0)
        assert job.wait(60) is JobStatus.SUCCEEDED
        events = read_log(env["redis"].client(), env["keys"], job.id)
        made = sum(x["usage"]["completion_tokens"] for x in job.result())
        assert len(events) < made and events[0]["seq"] > 1  # the cap trimmed the head (in whole nodes)
        assert [job.texts()[i] for i in range(len(PROMPTS))] == [x["output"] for x in job.result()]
    finally:
        w.stop()


def test_a_job_whose_redis_stays_away_is_given_back_not_failed(tmp_path, chatml_model_dir):
    """Past the client's retries (about a minute in a worker; none here) the job goes back to the
    queue with its progress in the store, instead of failing for Redis's sake."""
    import redis
    from services import free_port

    from gencli.model.checkpoint import load_model
    from gencli.storage.settings import get_settings
    from gencli.storage.store import Store
    from gencli.worker.context import WorkerContext
    from gencli.worker.keys import Keys
    from gencli.worker.runner import run_generation_job

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    job, _ = store.create_job(model="tiny", params={"max_tokens": 5, "temperature": 0}, items=[{"prompt": "hi"}])
    gone = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    ctx = WorkerContext(settings=get_settings(), store=store, redis=gone, keys=Keys("gone"), worker_name="w@test",
                        model_name="tiny", loaded=load_model(chatml_model_dir))
    assert run_generation_job(ctx, job.id) == "released"
    rec = store.get_job(job.id)
    assert (rec.status, rec.attempts, rec.lease_owner, rec.error_class) == ("queued", 0, None, None)
    assert store.items(job.id)[0].status == "pending"


def test_a_pipeline_whose_script_a_restart_emptied_is_built_again_and_publishes_once(env, monkeypatch):
    """redis-py checks a pipeline's scripts before running it, but a pipeline it retries after a
    reconnect runs unchecked: Redis restarted empty in between answers NOSCRIPT. (A worker's job
    then waited for its items forever: CI saw it stay running.) Injected here at that very point."""
    r = env["redis"].client()
    job_id = f"noscript-{env['id']}"
    pub = Publisher(r, env["keys"], job_id, owner="owner-1", ttl=60, max_events=1000)
    pub.claim({"t": "start", "worker": "w", "device": "cpu", "attempt": 1}, attempt=1)
    checked = []
    load_scripts = redis.client.Pipeline.load_scripts

    def check_then_lose_scripts(self):
        load_scripts(self)
        if not checked:
            checked.append(True)
            r.script_flush()  # as if Redis restarted empty right after the check
    monkeypatch.setattr(redis.client.Pipeline, "load_scripts", check_then_lose_scripts)
    tok = {"t": "tok", "i": 0, "e": 0, "id": 42, "text": "hi", "finish": None}
    refused, cancels = publish_many(r, [(pub, [tok])], (env["keys"].cancel(job_id),))
    assert checked and refused == [None] and cancels == [False]
    assert [(e["seq"], e["t"]) for e in read_log(r, env["keys"], job_id)] == [(1, "start"), (2, "tok")]  # once


def test_a_redis_that_refuses_writes_fails_the_running_job_instead_of_leaving_it_running(env, tiny, client):
    model = f"tiny-full-{env['id']}"
    w = start_worker(env, tiny, f"full-{env['id']}@test", "--model-name", model, "--batch_size", "1")
    r = env["redis"].client()
    try:
        job = client.submit(PROMPTS, model=model, max_tokens=240, temperature=0)
        wait_for(lambda: job.status is JobStatus.RUNNING, 30, "the job to start")
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1")  # every write is refused: "OOM command not allowed"
        try:
            assert job.wait(60) is JobStatus.FAILED  # not left running with its publishes refused
        finally:
            r.config_set("maxmemory", "0")
        rec = job.record()
        assert rec.error_message.startswith("Redis refused the job's events: ") and "maxmemory" in rec.error_message
        assert rec.error_class == "PublishRefused" and rec.attempts == 1
        # Celery's ack is refused too, which it takes as unrecoverable: the worker ends, so a
        # supervisor (gencli workers, a container's restart policy) starts it again
        assert w.proc.wait(30) != 0
        w2 = start_worker(env, tiny, f"full2-{env['id']}@test", "--model-name", model, "--batch_size", "1")
        try:
            again = client.submit(["and then"], model=model, max_tokens=5, temperature=0)
            assert again.wait(60) is JobStatus.SUCCEEDED
            assert job.record().status == "failed" and job.record().attempts == 1  # not run again
        finally:
            w2.stop()
    finally:
        r.config_set("maxmemory", "0")
        w.stop()


def test_tail_of_an_ended_job_with_redis_down_prints_it_from_the_store_with_a_note(env, tiny, client, worker):
    job = client.submit(["a line to read back", "and another"], model="tiny", max_tokens=12, temperature=0)
    assert job.wait(60) is JobStatus.SUCCEEDED
    stored = [x["output"] for x in job.result()]
    server = env["redis"]
    server.proc.kill()
    server.proc.wait(10)
    try:
        t0 = time.monotonic()
        r = CliRunner().invoke(main, ["tail", job.id])
        assert time.monotonic() - t0 < 10  # at once, not after a follower's reconnect window
        assert r.exit_code == 0, r.output
        assert "does not answer: the job's text is shown from the store" in r.stderr
        assert all(text in r.stdout for text in stored), r.stdout
        assert "Traceback" not in r.output
    finally:
        server.start()
        worker.wait_ready(server.client(), timeout=60)


def test_a_log_redis_lost_is_numbered_above_what_readers_saw_when_a_new_attempt_starts_it(env):
    """Redis restarted empty while a reader had events 1..N of a job; the next attempt's claim
    starts a new log. Numbered from 1 again (as it was), the reader took the new attempt's first N
    events for ones it had and folded the rest onto its old text: a client of bench.exact saw a
    line with tokens missing from its middle. Numbered above N, the reader sees a gap, then all."""
    r = env["redis"].client()
    job_id = f"relogged-{env['id']}"

    def tok(token: int, text: str) -> dict:
        return {"t": "tok", "i": 0, "e": 0, "id": token, "text": text, "finish": None}

    first = Publisher(r, env["keys"], job_id, owner="owner-1", ttl=60)
    first.claim({"t": "start", "worker": "w1", "device": "cpu", "attempt": 1}, attempt=1)
    first.publish([tok(1, "a"), tok(2, "b"), tok(3, "c")])
    seen = first.seq  # a reader (an SSE client, a tailer) has every event so far
    r.flushall()  # as a Redis that restarted empty
    second = Publisher(r, env["keys"], job_id, owner="owner-2", ttl=60)
    start = second.claim({"t": "start", "worker": "w2", "device": "cpu", "attempt": 2}, attempt=2)
    second.publish([{"t": "resync", "items": [{"i": 0, "e": 0, "text": "a"}]}, tok(2, "b"),
                    {"t": "end", "status": "succeeded", "error": None}])
    assert start > seen
    got = list(follow(env["vars"]["GENCLI_REDIS_URL"], env["keys"], job_id, after=seen, is_done=lambda: True))
    assert [e["t"] for e in got] == ["gap", "start", "resync", "tok", "end"]


def test_a_publish_that_reaches_redis_past_its_fence_is_refused_even_with_the_owner_key_gone(env):
    """A worker stopped after its last lease check but before its call reached Redis, and woken after
    Redis restarted empty (no owner key left to refuse it), must still publish nothing: Redis compares
    the fence the call carries (until when the lease surely holds) with its own clock."""
    r = env["redis"].client()
    job_id = f"fenced-{env['id']}"
    now = time.time()
    tok = {"t": "tok", "i": 0, "e": 0, "id": 1, "text": "a", "finish": None}
    start = {"t": "start", "worker": "w1", "device": "cpu", "attempt": 1}

    stale = Publisher(r, env["keys"], job_id, owner="owner-1", ttl=60, fence=lambda: now - 0.5)
    with pytest.raises(StreamRefused, match="lease may have run out"):
        stale.claim(start, attempt=1)
    with pytest.raises(StreamRefused, match="lease may have run out"):
        stale.publish([tok])
    refusals, _ = publish_many(r, [(stale, [dict(tok)])])  # the outbox's way
    assert isinstance(refusals[0], StreamRefused)
    assert read_log(r, env["keys"], job_id) == [] and r.get(env["keys"].owner(job_id)) is None  # nothing written

    live = Publisher(r, env["keys"], job_id, owner="owner-2", ttl=60, fence=lambda: time.time() + 30)
    live.claim(start, attempt=2)
    live.publish([dict(tok)])
    submit_side = Publisher(r, env["keys"], job_id, owner=None, ttl=60, fence=lambda: now - 0.5)  # (never fenced)
    submit_side.publish([{"t": "cancel"}])
    assert [e["t"] for e in read_log(r, env["keys"], job_id)] == ["start", "tok", "cancel"]

    # A call built before a Redis outage that the client waited out reaches Redis past the fence it
    # carries; the lease was renewed meanwhile (the store was up), so it goes again, once.
    fences = iter([now - 0.5, time.time() + 30, time.time() + 30])
    held_back = Publisher(r, env["keys"], job_id, owner="owner-2", ttl=60, fence=lambda: next(fences))
    held_back.seq = read_log(r, env["keys"], job_id)[-1]["seq"]  # (the owner numbers on from its log)
    refusals, _ = publish_many(r, [(held_back, [dict(tok, id=2, text="b")])])
    assert refusals == [None]
    assert [e.get("text") for e in read_log(r, env["keys"], job_id)] == [None, "a", None, "b"]
