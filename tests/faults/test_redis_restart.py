"""Redis is transport, the store is the record: a Redis that restarts empty loses no job."""

from __future__ import annotations

import signal
import uuid
from contextlib import ExitStack

import pytest
from services import RedisServer, Worker, pg_schema, start_api, start_worker, stop_between_writes
from tailing import Tailer, reference, wait_for

from gencli.model.checkpoint import create_model
from gencli.storage.db import JobStatus
from gencli.storage.settings import get_settings
from gencli.worker.client import Client
from gencli.worker.keys import Keys

pytestmark = pytest.mark.slow


@pytest.fixture
def private(request, tmp_path, monkeypatch):
    """A redis-server of this test's own (so it can be restarted), a store (a SQLite file, or with
    indirect parametrization "postgresql" a schema of its own), a namespace, short leases."""
    server = RedisServer(tmp_path)
    with ExitStack() as stack:
        stack.callback(server.stop)
        if getattr(request, "param", "sqlite") == "postgresql":
            db_url = stack.enter_context(pg_schema(request.getfixturevalue("pg_database")))
        else:
            db_url = f"sqlite:///{tmp_path / 'store.db'}"
        values = {
            "GENCLI_HOME": str(tmp_path / "home"),
            "GENCLI_REDIS_URL": server.url,
            "GENCLI_DB_URL": db_url,
            "GENCLI_NAMESPACE": f"t{uuid.uuid4().hex[:8]}",
            "GENCLI_LEASE_SECONDS": "3",
        }
        for k, v in values.items():
            monkeypatch.setenv(k, v)
        yield {"vars": values, "tmp": tmp_path, "redis": server}


def test_redis_restart_with_jobs_queued_and_one_running_every_job_ends(private):
    model = str(create_model(private["tmp"] / "tiny", preset="tiny", tokenizer="cl100k_base",
                             chat_format="chatml", seed=3))
    worker = start_worker(private, model, "survivor@test", "--model-name", "tiny-restart")
    try:
        client = Client(get_settings())
        running = client.submit(["once upon a time", "the ship sailed"], model="tiny-restart", max_tokens=120,
                                temperature=0)
        queued = [client.submit([f"prompt {i}"], model="tiny-restart", max_tokens=8, temperature=0)
                  for i in range(3)]
        tailer = Tailer(running)
        tailer.start()
        wait_for(lambda: len(tailer.deltas) > 20, 60, "tokens from the running job")

        private["redis"].restart()  # the queued jobs' messages and the running one's are gone

        for job in [running, *queued]:
            assert job.wait(120) is JobStatus.SUCCEEDED, job.record().error_message
        tailer.join(30)
        assert not tailer.is_alive()  # the tailer reconnected on its own and saw the end
        seqs = [d.seq for d in tailer.deltas]
        assert seqs == sorted(set(seqs))
        assert tailer.texts(2) == [x["output"] for x in running.result()]
        assert [x["output"] for x in running.result()] == reference(model, ["once upon a time", "the ship sailed"],
                                                                    120)
        assert [j.result()[0]["output"] for j in queued] == reference(model, [f"prompt {i}" for i in range(3)], 8)
        assert worker.alive()
    finally:
        worker.stop()


def test_a_worker_started_while_redis_is_down_drains_the_queue_when_it_returns(private):
    model = str(create_model(private["tmp"] / "tiny", preset="tiny", tokenizer="cl100k_base",
                             chat_format="chatml", seed=3))
    server = private["redis"]
    client = Client(get_settings())
    jobs = [client.submit([f"prompt {i}"], model="tiny-late", max_tokens=8, temperature=0) for i in range(2)]
    server.stop()  # their messages go with it
    worker = Worker(model, private["vars"], name="early@test",
                    log=private["tmp"] / "early.log", args=("--model-name", "tiny-late"))
    try:
        wait_for(lambda: "does not answer" in worker.log.read_text(), 30, "the worker saying what it waits for")
        assert worker.alive()  # waiting for Redis, not exited
        server.start()
        worker.wait_ready(server.client(), timeout=90)
        for job in jobs:
            assert job.wait(90) is JobStatus.SUCCEEDED, job.record().error_message
        said = worker.log.read_text()
        assert said.count("does not answer") == 1, said  # said once, then a quiet wait
    finally:
        worker.stop()


@pytest.mark.parametrize("private", ["sqlite", "postgresql"], indirect=True)
def test_a_worker_holding_a_job_rides_out_a_redis_outage_and_serves_the_next_job(private):
    """Redis killed while the worker decodes a long job and started again seconds later (empty):
    the job ends once with the output it has alone, and the same worker process, still up,
    serves the next job. (kombu's Redis transport used to raise AttributeError when Celery tore
    down the broken connection with the job's message unacked, and Celery ended the worker.)"""
    model = str(create_model(private["tmp"] / "tiny", preset="tiny", tokenizer="cl100k_base",
                             chat_format="chatml", seed=3))
    worker = start_worker(private, model, "outage@test", "--model-name", "tiny-outage")
    try:
        client = Client(get_settings())
        prompts = [f"line {i} of a long job" for i in range(16)]
        job = client.submit(prompts, model="tiny-outage", max_tokens=200, temperature=0)
        wait_for(lambda: job.record().status == "running", 60, "the job to start")
        private["redis"].restart(down_seconds=5)
        assert job.wait(180) is JobStatus.SUCCEEDED, job.record().error_message
        assert [x["output"] for x in job.result()] == reference(model, prompts, 200)
        wait_for(lambda: "Connected to redis" in worker.log.read_text().rsplit("Connection to broker lost", 1)[-1],
                 60, "Celery's consumer to reconnect")
        assert worker.alive(), worker.log.read_text()[-3000:]
        after = client.submit(["and then"], model="tiny-outage", max_tokens=8, temperature=0)
        assert after.wait(60) is JobStatus.SUCCEEDED
        assert after.record().worker == "outage@test" and worker.alive()
    finally:
        worker.stop()


def test_right_after_a_redis_restart_the_api_waits_for_the_workers_to_beat_again(private):
    """A Redis that restarts empty takes every worker's heartbeat with it, for up to a heartbeat;
    a request for a served model meanwhile is answered once they beat again, not refused with
    404 "not served by any live worker"."""
    import openai

    model = str(create_model(private["tmp"] / "tiny", preset="tiny", tokenizer="cl100k_base",
                             chat_format="chatml", seed=3))
    worker = start_worker(private, model, "beats@test", "--model-name", "tiny-beats")
    api = start_api(private)
    try:
        oai = openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        private["redis"].restart(down_seconds=0.2)
        assert not private["redis"].client().exists(Keys(private["vars"]["GENCLI_NAMESPACE"]).worker("beats@test"))
        done = oai.completions.create(model="tiny-beats", prompt="hello", max_tokens=4, temperature=0)
        assert done.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.NotFoundError):  # a model nobody serves is still refused
            oai.completions.create(model="tiny-nobody", prompt="hello", max_tokens=4)
    finally:
        api.stop()
        worker.stop()


@pytest.mark.parametrize("private", ["sqlite", "postgresql"], indirect=True)
def test_a_worker_woken_after_a_takeover_and_a_redis_restart_publishes_nothing(private):
    """Redis restarted empty loses the stream's owner key, which refuses a stale worker's publish:
    a worker stopped past its lease must itself know not to publish when it wakes (running.LeaseClock),
    else it takes the stream over from the job's new owner (found by bench.exact)."""
    model = str(create_model(private["tmp"] / "tiny", preset="tiny", tokenizer="cl100k_base",
                             chat_format="chatml", seed=3))
    prompts = ["the lighthouse keeper", "a letter from the north"]
    a = start_worker(private, model, "sleeper@test", "--model-name", "tiny-wake", "--batch_size", "2")
    b = None
    try:
        client = Client(get_settings())
        job = client.submit(prompts, model="tiny-wake", max_tokens=240, temperature=0)
        tailer = Tailer(job)
        tailer.start()
        wait_for(lambda: tailer.tokens() > 40, 60, "tokens from the first worker")
        stop_between_writes(a, client.store, job.id)
        b = start_worker(private, model, "heir@test", "--model-name", "tiny-wake", "--batch_size", "2")
        wait_for(lambda: job.record().worker == b.name, 60, "the takeover")
        seen = tailer.tokens()
        wait_for(lambda: tailer.tokens() > seen + 10, 60, "tokens from the new owner")
        stop_between_writes(b, client.store, job.id)  # (for a second: its lease holds)
        private["redis"].restart(down_seconds=0.2)  # empty: the stream's owner key is gone
        a.kill(signal.SIGCONT)  # the stale worker wakes first, with tokens to publish
        wait_for(lambda: "lease lost" in a.log.read_text(), 30, "the woken worker to let the job go")
        b.kill(signal.SIGCONT)
        assert job.wait(90) is JobStatus.SUCCEEDED
        tailer.join(30)
        rec = job.record()
        assert rec.attempts == 2 and rec.worker == b.name  # the heir was never refused and kept the job
        stored = [x["output"] for x in job.result()]
        assert stored == reference(model, prompts, 240)
        assert tailer.texts(len(prompts)) == stored
        assert "lease lost" not in b.log.read_text()
        assert "may have run out" in a.log.read_text()  # it held back what it had made while stopped
    finally:
        a.kill(signal.SIGCONT)
        a.stop()
        if b:
            b.kill(signal.SIGCONT)
            b.stop()
