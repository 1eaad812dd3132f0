"""Shared set-up for the queue benchmarks (bench.queue, bench.concurrent, bench.faults): not a benchmark itself.

- BenchEnv: a Redis database of the benchmark's own (flushed at start and end; a private
  redis-server on a free port when nothing answers at 127.0.0.1:6379), a temporary GENCLI_HOME
  and SQLite store, set in os.environ for this process and passed to every subprocess.
- Proc: a subprocess (gencli worker, celery worker) in its own session, stopped at the end.
- small_model(): the `small` preset model (cl100k_base, ChatML) in the temporary directory.
- PrivateRedis, fresh_pg_database(), child_env(): for benchmarks that break things (bench.faults):
  a redis-server they may kill and restart empty, a PostgreSQL database made and dropped for the
  run, and a subprocess environment free of the shell's GENCLI_* variables.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import redis

from gencli.worker.keys import Keys

DEFAULT_REDIS = "redis://127.0.0.1:6379"
REPO_ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


class Proc:
    """A subprocess in its own session (so its children stop with it), output to a log file."""

    def __init__(self, cmd: list[str], env: dict, log_path: Path, *, cwd: Path = REPO_ROOT):
        self.cmd = cmd
        self.log_path = log_path
        with open(log_path, "w") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited ({self.proc.returncode}): {self.text()[-2000:]}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{what} not ready after {timeout} s: {self.text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass


class BenchEnv:
    """Redis database `db` of our own, a temporary home and store; everything undone on close.
    private: always a redis-server of our own on a free port, even when one answers at 6379."""

    def __init__(self, db: int, prefix: str, *, private: bool = False):
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.redis_proc: subprocess.Popen | None = None
        if not private and _answers(DEFAULT_REDIS):
            self.url = f"{DEFAULT_REDIS}/{db}"
        else:
            binary = shutil.which("redis-server")
            if binary is None:
                raise RuntimeError("no Redis answers at 127.0.0.1:6379 and there is no redis-server to start")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.redis_proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.tmp)], stdout=subprocess.DEVNULL, start_new_session=True)
            self.url = f"redis://127.0.0.1:{port}/{db}"
            deadline = time.monotonic() + 10
            while not _answers(self.url):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
        self.r = redis.Redis.from_url(self.url)
        self.r.flushdb()
        self.keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
        self.vars = {
            "GENCLI_HOME": str(self.tmp / "home"),
            "GENCLI_REDIS_URL": self.url,
            "GENCLI_DB_URL": f"sqlite:///{self.tmp / 'store.db'}",
            "GENCLI_NAMESPACE": self.keys.namespace,
        }
        self._saved = {k: os.environ.get(k) for k in [*self.vars, "GENCLI_INJECT_OOM"]}
        os.environ.update(self.vars)
        os.environ.pop("GENCLI_INJECT_OOM", None)
        self.procs: list[Proc] = []

    def env(self, **extra: str) -> dict:
        return dict(os.environ, **self.vars, **extra)

    def start(self, cmd: list[str], name: str, **extra_env: str) -> Proc:
        p = Proc(cmd, self.env(**extra_env), self.tmp / f"{name}.log")
        self.procs.append(p)
        return p

    def start_worker(self, model_dir: Path, name: str, *, model_name: str, batch_size: int,
                     threads: int | None = None, timeout: float = 120, args: tuple[str, ...] = ()) -> Proc:
        """`gencli worker` as a user starts it (args: more of its options); returns once it is ready."""
        cmd = [sys.executable, "-m", "gencli.cli", "worker", "--model", str(model_dir), "--device", "cpu",
               "--name", name, "--model-name", model_name, "--batch_size", str(batch_size), *args]
        if threads:
            cmd += ["--threads", str(threads)]
        p = self.start(cmd, f"worker-{name}")
        p.wait_for(lambda: self.r.get(self.keys.worker(name)) is not None and "ready" in p.text(), timeout,
                   f"worker {name}")
        return p

    def close(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop()
            except (OSError, subprocess.SubprocessError) as e:  # keep stopping the others
                log(f"stopping {p.cmd[:4]}: {e}")
        try:
            self.r.flushdb()
            self.r.close()
        except redis.RedisError:
            pass
        if self.redis_proc is not None:
            self.redis_proc.terminate()
            self.redis_proc.wait(10)
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if os.environ.get("BENCH_KEEP_TMP"):  # keep the logs and the store for a look
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def worker_threads(worker: Proc) -> int | None:
    """The worker's torch thread count, from its start-up line `... on cpu (N threads)`."""
    m = re.search(r"on cpu \((\d+) threads\)", worker.text())
    return int(m.group(1)) if m else None


def small_model(tmp: Path, name: str) -> Path:
    from gencli.model.checkpoint import create_model

    return create_model(tmp / name, preset="small", tokenizer="cl100k_base", chat_format="chatml", seed=0)


def prompts(n: int) -> list[str]:
    """n distinct plain-text prompts of a few different lengths (so batches need padding)."""
    stems = ["Once upon a time", "The history of the northern sea routes begins with",
             "Write a short note about", "In the beginning the city was quiet and the streets were empty, and"]
    return [f"{stems[i % len(stems)]} (#{i})" for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of the benchmark's own on a free loopback port, keeping nothing on disk;
    restart() kills it and starts it again, empty, on the same port."""

    def __init__(self, workdir: Path):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("this benchmark starts a redis-server of its own: put redis-server on PATH")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while not _answers(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start: {self.log_tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, down_seconds: float) -> None:
        """SIGKILL, stay down down_seconds, start again on the same port: every key is gone."""
        self.kill()
        time.sleep(down_seconds)
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-1000:] if self.log.exists() else ""


PG_URL_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_connect(url: str, database: str):
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url).set(drivername="postgresql", database=database)
    return psycopg.connect(u.render_as_string(hide_password=False), connect_timeout=5, autocommit=True)


@contextmanager
def fresh_pg_database(url: str, prefix: str = "gencli_bench_") -> Iterator[str]:
    """A new database <prefix><hex> on url's server (made through its `postgres` database); yields
    its SQLAlchemy URL and drops it afterwards WITH (FORCE), ending any session still on it."""
    from sqlalchemy.engine import make_url

    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    with _pg_connect(url, "postgres") as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with _pg_connect(url, "postgres") as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def child_env(gencli_vars: Mapping[str, str]) -> dict[str, str]:
    """This process's environment less every GENCLI_* variable, plus gencli_vars."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("GENCLI_")}, **gencli_vars}
