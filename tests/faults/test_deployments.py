"""Deployments that share one Redis, and workers that share one host: nobody takes, drops or lists
another's jobs or workers, and every worker's name is its own.

The deployments here set no GENCLI_NAMESPACE: each one's namespace is its store's deployment id,
as for users. Real redis-server, real `gencli worker` processes, SQLite stores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from services import RedisServer, child_env
from tailing import wait_for

from gencli.cli.main import main
from gencli.model.checkpoint import create_model
from gencli.storage.db import JobStatus
from gencli.storage.settings import get_settings
from gencli.storage.store import open_store
from gencli.worker.client import Client, keys_for

pytestmark = pytest.mark.slow


class Deployment:
    """One user's gencli: a GENCLI_HOME and SQLite store of its own, on the shared Redis."""

    def __init__(self, tmp, name: str, redis_url: str):
        self.vars = {"GENCLI_HOME": str(tmp / name), "GENCLI_REDIS_URL": redis_url,
                     "GENCLI_DB_URL": f"sqlite:///{tmp / name / 'store.db'}", "GENCLI_LEASE_SECONDS": "3"}
        self.tmp = tmp
        (tmp / name).mkdir()
        self.procs: list[subprocess.Popen] = []

    def use(self, monkeypatch) -> Client:
        for k, v in self.vars.items():
            monkeypatch.setenv(k, v)
        return Client(get_settings())

    @property
    def keys(self):
        return keys_for(get_settings(), open_store(self.vars["GENCLI_DB_URL"]))

    def worker(self, model: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"worker-{uuid.uuid4().hex[:6]}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "gencli.cli", "worker", "--model", model, "--device", "cpu",
                              "--model-name", "tiny", *args], env=child_env(self.vars), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        p.log_path = log.name
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def shared(tmp_path, monkeypatch):
    server = RedisServer(tmp_path)
    model = str(create_model(tmp_path / "tiny", preset="tiny", tokenizer="cl100k_base", chat_format="chatml", seed=3))
    a, b = Deployment(tmp_path, "alice", server.url), Deployment(tmp_path, "bob", server.url)
    for k in ("GENCLI_NAMESPACE", "GENCLI_REDIS_URL", "GENCLI_DB_URL"):
        monkeypatch.delenv(k, raising=False)
    yield {"server": server, "model": model, "a": a, "b": b}
    a.stop()
    b.stop()
    server.stop()


def _workers(r, keys) -> list[dict]:
    return [json.loads(r.get(k)) for k in r.scan_iter(keys.worker("*"))]


def test_two_deployments_on_one_redis_neither_takes_drops_nor_lists_the_others(shared, monkeypatch):
    a, b, r = shared["a"], shared["b"], shared["server"].client()
    alice = a.use(monkeypatch)
    a_keys = alice.keys
    a.worker(shared["model"])
    wait_for(lambda: len(_workers(r, a_keys)) == 1, 60, "alice's worker")
    bob = b.use(monkeypatch)
    assert bob.keys.namespace != a_keys.namespace  # two stores, two namespaces, no setting needed
    waiting = bob.submit(["bob's prompt"], model="tiny", max_tokens=5, temperature=0)
    # alice's worker serves a queue named like bob's: it must not see his job. A job of alice's
    # submitted after his runs, so her worker has taken from its queue since his job was queued.
    alice = a.use(monkeypatch)
    later = alice.submit(["alice's first prompt"], model="tiny", max_tokens=5, temperature=0)
    assert later.wait(60) is JobStatus.SUCCEEDED
    bob = b.use(monkeypatch)
    assert waiting.status is JobStatus.QUEUED
    out = CliRunner().invoke(main, ["status"])
    assert "workers (0)" in out.output and "1 queued job(s)" in out.output, out.output
    b.worker(shared["model"])
    assert waiting.wait(60) is JobStatus.SUCCEEDED
    assert waiting.record().worker in {w["name"] for w in _workers(r, bob.keys)}
    alice = a.use(monkeypatch)
    mine = alice.submit(["alice's prompt"], model="tiny", max_tokens=5, temperature=0)
    assert mine.wait(60) is JobStatus.SUCCEEDED
    assert mine.record().worker in {w["name"] for w in _workers(r, a_keys)}
    assert bob.store.get_job(mine.id) is None and alice.store.get_job(waiting.id) is None
    out = CliRunner().invoke(main, ["status"])
    assert "workers (1)" in out.output
    for p in a.procs + b.procs:
        assert "not run: missing" not in Path(p.log_path).read_text()


def test_a_message_for_a_job_the_store_does_not_know_is_kept_not_dropped(shared, monkeypatch):
    a, r = shared["a"], shared["server"].client()
    client = a.use(monkeypatch)
    a.worker(shared["model"])
    wait_for(lambda: _workers(r, client.keys), 60, "the worker")
    stranger = uuid.uuid4().hex
    client._enqueue(stranger, "tiny", 0)  # a message whose job this store never recorded
    kept = wait_for(lambda: r.lrange(client.keys.unknown_jobs, 0, -1), 30, "the unknown job to be kept")
    assert json.loads(kept[0])["job"] == stranger
    job = client.submit(["after it"], model="tiny", max_tokens=3)
    assert job.wait(60) is JobStatus.SUCCEEDED  # and the worker goes on


def test_workers_with_default_names_on_one_host_each_get_their_own(shared, monkeypatch):
    a, r = shared["a"], shared["server"].client()
    client = a.use(monkeypatch)
    a.worker(shared["model"])
    a.worker(shared["model"])
    wait_for(lambda: len(_workers(r, client.keys)) == 2, 60, "two heartbeats")
    workers = _workers(r, client.keys)
    assert len({w["name"] for w in workers}) == 2 and len({w["pid"] for w in workers}) == 2
    out = CliRunner().invoke(main, ["status"])
    assert "workers (2)" in out.output
    taken = workers[0]["name"]
    dup = a.worker(shared["model"], "--name", taken)
    assert dup.wait(60) == 1
    assert f"a live worker is already named {taken}" in Path(dup.log_path).read_text()
    assert len(_workers(r, client.keys)) == 2


def test_a_jsonl_line_whose_parameter_only_looks_right_is_refused_at_submit(shared, monkeypatch, tmp_path):
    client = shared["a"].use(monkeypatch)
    f = tmp_path / "lines.jsonl"
    for bad, what in [('"top_k": 200.0', "top_k"), ('"max_tokens": true', "max_tokens"), ('"seed": 1.5', "seed")]:
        f.write_text('{"prompt": "fine"}\n{"prompt": "not fine", ' + bad + "}\n")
        r = CliRunner().invoke(main, ["submit", "--model", "tiny", "--prompt_file", str(f)])
        assert r.exit_code == 1 and "line 2" in r.output and what in r.output and "Traceback" not in r.output
    assert client.store.list_jobs() == []
    assert not any(client.redis.llen(q) for q in client.keys.queue_lists("gen.tiny"))
