"""Redis is transport, the store is the record: a Redis that restarts empty loses no job."""

from __future__ import annotations

import time
import uuid

import pytest
from services import RedisServer, Worker, start_worker
from tailing import Tailer, wait_for

from gencli.model.checkpoint import create_model
from gencli.storage.db import JobStatus
from gencli.storage.settings import get_settings
from gencli.worker.client import Client

pytestmark = pytest.mark.slow


@pytest.fixture
def private(tmp_path, monkeypatch):
    """A redis-server of this test's own (so it can be restarted), a store, a namespace, short leases."""
    server = RedisServer(tmp_path)
    values = {
        "GENCLI_HOME": str(tmp_path / "home"),
        "GENCLI_REDIS_URL": server.url,
        "GENCLI_DB_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "GENCLI_NAMESPACE": f"t{uuid.uuid4().hex[:8]}",
        "GENCLI_LEASE_SECONDS": "3",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    yield {"vars": values, "tmp": tmp_path, "redis": server}
    server.stop()


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
        assert all(len(j.result()) == 1 for j in queued)
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
        time.sleep(3)
        assert worker.alive()  # waiting for Redis, not exited
        server.start()
        worker.wait_ready(server.client(), timeout=90)
        for job in jobs:
            assert job.wait(90) is JobStatus.SUCCEEDED, job.record().error_message
    finally:
        worker.stop()
