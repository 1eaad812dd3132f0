"""Real services for tests: redis-servers and PostgreSQL databases of their own, and worker processes
started as users start them.

Imported by conftest.py, which turns these into fixtures, and by test modules that need one directly.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest
import redis
from sqlalchemy.engine import make_url

from gencli.worker.keys import Keys

# --- Redis ------------------------------------------------------------------------------------------


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server of the test's own on a free loopback port, keeping nothing on disk.

    Never a shared Redis (a developer's 127.0.0.1:6379 is left alone), so a test may restart it,
    stop it or flush it.
    """

    def __init__(self, workdir: Path):
        self.proc: subprocess.Popen | None = None
        self.workdir = workdir
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("the tests start redis-servers of their own: put redis-server on PATH "
                               "(apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = workdir / f"redis-{self.port}.log"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.log)], stdout=subprocess.DEVNULL)
        deadline = time.time() + 10
        while not _answers(self.url):
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                self.proc.wait(10)
                tail = self.log.read_text()[-1000:] if self.log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not start: {tail}")
            time.sleep(0.05)

    def restart(self, down_seconds: float = 1.0) -> None:
        """Kill our redis-server and start a new one on the same port: every key and message is gone."""
        self.proc.kill()
        self.proc.wait(10)
        time.sleep(down_seconds)
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def flush(self) -> None:
        self.client().flushall()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# --- PostgreSQL -------------------------------------------------------------------------------------

PG_URL_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


def pg_url() -> str:
    """The PostgreSQL server the tests use: GENCLI_TEST_PG_URL, else the local one."""
    return os.environ.get("GENCLI_TEST_PG_URL") or PG_URL_DEFAULT


def pg_connect(url: str, *, database: str | None = None):
    """An autocommit psycopg connection to url (or to another database on its server)."""
    import psycopg

    u = make_url(url).set(drivername="postgresql")
    if database is not None:
        u = u.set(database=database)
    return psycopg.connect(u.render_as_string(hide_password=False), connect_timeout=3, autocommit=True)


def pg_missing(url: str) -> str | None:
    """Why there is no PostgreSQL server to test against at url, or None."""
    try:
        pg_connect(url, database="postgres").close()
    except Exception as e:  # noqa: BLE001 - any failure to connect means "no PostgreSQL here"
        first_line = str(e).splitlines()[0] if str(e) else ""
        return f"no PostgreSQL answers at {url} (set GENCLI_TEST_PG_URL): {type(e).__name__}: {first_line}"
    return None


def in_ci() -> bool:
    """CI is set (CI=true, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pg_unavailable(reason: str) -> NoReturn:
    """Skip, saying why; under CI fail instead: there PostgreSQL must be tested, never skipped."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: the PostgreSQL cases must run)", pytrace=False)
    pytest.skip(reason)


@contextmanager
def fresh_pg_database(url: str) -> Iterator[str]:
    """A new database gencli_test_<hex> on url's server (made through its `postgres` database); yields
    its URL and drops it afterwards, ending any session still attached to it."""
    name = f"gencli_test_{uuid.uuid4().hex[:12]}"
    with pg_connect(url, database="postgres") as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with pg_connect(url, database="postgres") as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def pg_schema(db_url: str) -> Iterator[str]:
    """A new, empty schema in the database at db_url; yields a store URL that works inside it
    (search_path set through the connection's options) and drops the schema afterwards."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with pg_connect(db_url) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        url = make_url(db_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with pg_connect(db_url) as conn:
            conn.execute("SET lock_timeout = '20s'")
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# --- worker processes -------------------------------------------------------------------------------


def child_env(test_vars: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a process a test starts: this process's, less every GENCLI_* variable,
    then the test's own. A developer's GENCLI_DB_URL or GENCLI_REDIS_URL never reaches it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GENCLI_")}
    return {**base, **test_vars, **(extra or {})}


class ForkedProcess:
    """A child of the fork server (tests/forkserver.py), with the parts of subprocess.Popen's interface
    the tests use: pid, returncode, poll(), wait(), kill(), terminate(). Its exit status comes from
    the server, which is its parent."""

    def __init__(self, conn: socket.socket):
        self._conn = conn
        self._buf = b""
        self.pid: int = json.loads(self._line(None))["pid"]
        self.returncode: int | None = None

    def _line(self, timeout: float | None) -> bytes | None:
        """The server's next line, or None when none came within timeout (None: wait for it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                return None
            data = self._conn.recv(4096)
            if not data:
                raise RuntimeError("the tests' fork server went away before saying how its child ended")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _read(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                return None
            self.returncode = json.loads(line)["returncode"]
            self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._read(0.0)

    def wait(self, timeout: float | None = None) -> int:
        rc = self._read(timeout)
        if rc is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
        return rc

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


_fork_server: tuple[subprocess.Popen, str] | None = None


def _fork_server_path() -> str:
    """The socket of this test process's fork server, started the first time a worker is asked for."""
    global _fork_server
    if _fork_server is None or _fork_server[0].poll() is not None:
        import atexit
        import tempfile

        path = os.path.join(tempfile.mkdtemp(prefix="gencli-fork-"), "socket")
        log = path + ".log"
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forkserver.py")), path],
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        atexit.register(proc.kill)
        deadline = time.time() + 60
        while not os.path.exists(path):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the tests' fork server did not start: {Path(log).read_text()[-2000:]}")
            time.sleep(0.05)
        _fork_server = (proc, path)
    return _fork_server[1]


def start_gencli(args: list[str], env: Mapping[str, str], log: Path, *,
                 append: bool = False) -> subprocess.Popen | ForkedProcess:
    """`gencli ARGS` in a process of its own session, its output to log: forked from the fork server
    (tests/forkserver.py: the same command line, without paying for the imports again), or a fresh
    interpreter where the environment must reach the interpreter itself (LD_PRELOAD, faketime) or
    GENCLI_TEST_FORK=0 asks for that."""
    fresh = os.environ.get("GENCLI_TEST_FORK") == "0" or any(k in env for k in ("LD_PRELOAD", "FAKETIME"))
    if fresh:
        return subprocess.Popen([sys.executable, "-m", "gencli.cli", *args], env=env,
                                stdout=open(log, "a" if append else "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
    if not append:
        open(log, "w").close()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(_fork_server_path())
    request = {"args": list(args), "env": dict(env), "cwd": os.getcwd(), "log": str(log)}
    conn.sendall(json.dumps(request).encode() + b"\n")
    return ForkedProcess(conn)


class Worker:
    """`gencli worker` in a subprocess, as a user starts it.

    test_vars are the test's GENCLI_* settings (GENCLI_NAMESPACE among them: the worker's heartbeat
    is Keys(namespace).worker(name)); nothing else of GENCLI_* comes from this process.
    """

    def __init__(self, model: str | None, test_vars: Mapping[str, str], *, name: str, log: Path,
                 args: tuple[str, ...] = (), extra_env: Mapping[str, str] | None = None):
        self.name = name
        self.log = log
        self.env = child_env(test_vars, extra_env)
        namespace = self.env.get("GENCLI_NAMESPACE")
        if not namespace:
            raise ValueError(f"worker {name}: the test's vars need GENCLI_NAMESPACE, to find its heartbeat")
        self.key = Keys(namespace).worker(name)
        serve = ["--model", model] if model else []
        self.proc = start_gencli(["worker", *serve, "--device", "cpu", "--name", name, *args], self.env, log)

    def wait_ready(self, r: redis.Redis, timeout: float = 60) -> Worker:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log.read_text()[-2000:]}")
            if r.get(self.key) and "ready" in self.log.read_text():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready after {timeout} s: {self.log.read_text()[-2000:]}")

    def current_job(self, r: redis.Redis) -> str | None:
        raw = r.get(self.key)
        jobs = json.loads(raw)["jobs"] if raw else []
        return jobs[0] if jobs else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(10)


def holds_job_lock(store, job_id: str) -> bool:
    """Whether another process holds a write lock the job's takeover would wait for: SQLite's one
    write lock, or on PostgreSQL the job's row (a worker stopped inside a transaction holds it)."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from gencli.storage.db import sqlite_path

    path = sqlite_path(store.url)
    if path is not None:
        conn = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:  # database is locked
            return True
        finally:
            conn.close()
    try:
        with store.engine.begin() as c:
            c.exec_driver_sql("SELECT 1 FROM jobs WHERE id = %(id)s FOR UPDATE NOWAIT", {"id": job_id})
        return False
    except OperationalError:  # lock_not_available
        return True


def stop_between_writes(worker: Worker, store, job_id: str) -> None:
    """SIGSTOP a worker at a moment it is not inside a store write, as a worker paused past its lease
    is (stopped inside one, it would hold SQLite's write lock, or the job's row, until woken, and no
    takeover could happen meanwhile on either database)."""
    for _ in range(100):
        worker.kill(signal.SIGSTOP)
        if not holds_job_lock(store, job_id):
            return
        worker.kill(signal.SIGCONT)
        time.sleep(0.02)
    raise RuntimeError(f"worker {worker.name} was inside a store write at each of 100 stops")


def start_worker(env: dict, model: str | None, name: str, *args: str, extra_env: dict | None = None) -> Worker:
    """A worker on the test module's Redis, store and namespace (env: the conftest `env` fixture), ready."""
    w = Worker(model, env["vars"], name=name, log=env["tmp"] / f"{name}.log", args=args, extra_env=extra_env)
    try:
        return w.wait_ready(env["redis"].client())
    except BaseException:
        w.stop()  # a worker that never became ready must not outlive the test
        raise


# --- the HTTP API -----------------------------------------------------------------------------------


class APIServer:
    """`gencli serve` in a subprocess on a free loopback port, as a user starts it (a real uvicorn)."""

    def __init__(self, test_vars: Mapping[str, str], *, log: Path, args: tuple[str, ...] = (),
                 extra_env: Mapping[str, str] | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = child_env(test_vars, extra_env)
        self.proc = start_gencli(["serve", "--port", str(self.port), *args], self.env, log, append=True)

    def wait_ready(self, timeout: float = 60) -> APIServer:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gencli serve exited: {self.log.read_text()[-2000:]}")
            try:
                httpx.get(self.url + "/healthz", timeout=2)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"gencli serve not answering after {timeout} s: {self.log.read_text()[-2000:]}")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(20)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)


def start_api(env: dict, *args: str, extra_env: dict | None = None, port: int | None = None,
              name: str = "api") -> APIServer:
    """`gencli serve` on the test module's Redis, store and namespace (env: the conftest `env` fixture), ready."""
    s = APIServer(env["vars"], log=env["tmp"] / f"{name}.log", args=args, extra_env=extra_env, port=port)
    try:
        return s.wait_ready()
    except BaseException:
        s.kill()
        raise
