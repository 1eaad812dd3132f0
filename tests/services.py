"""Real services for tests: a Redis database of their own, and worker processes started as users do.

Imported by conftest.py, which turns these into fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

DEFAULT_REDIS = "redis://127.0.0.1:6379"
TEST_DB = 13  # a database number of our own on a shared Redis, flushed around each use


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


class RedisServer:
    """The Redis at 127.0.0.1:6379 (database 13) when it answers, else (or when private) a
    redis-server of our own that keeps nothing on disk, as the development machines' Redis."""

    def __init__(self, workdir: Path, *, private: bool = False):
        self.proc = None
        self.workdir = workdir
        if not private and _answers(DEFAULT_REDIS):
            self.url = f"{DEFAULT_REDIS}/{TEST_DB}"
            return
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("the tests need Redis: none answers at 127.0.0.1:6379 and there is no redis-server")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/{TEST_DB}"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL)
        deadline = time.time() + 10
        while not _answers(self.url):
            if time.time() > deadline:
                raise RuntimeError("redis-server did not start")
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
        self.client().flushdb()

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)


class Worker:
    """`gencli worker` in a subprocess, as a user starts it."""

    def __init__(self, model: str | None, env: dict, *, name: str, log: Path, args: tuple[str, ...] = (),
                 extra_env: dict | None = None):
        self.name = name
        self.log = log
        self.env = dict(env, **(extra_env or {}))
        serve = ["--model", model] if model else []
        cmd = [sys.executable, "-m", "gencli.cli", "worker", *serve, "--device", "cpu", "--name", name, *args]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, r: redis.Redis, timeout: float = 60) -> Worker:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log.read_text()[-2000:]}")
            if r.get(f"gencli:worker:{self.name}") and "ready" in self.log.read_text():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready after {timeout} s: {self.log.read_text()[-2000:]}")

    def current_job(self, r: redis.Redis) -> str | None:
        raw = r.get(f"gencli:worker:{self.name}")
        return json.loads(raw)["job"] if raw else None

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


def start_worker(env: dict, model: str | None, name: str, *args: str, extra_env: dict | None = None) -> Worker:
    """A worker on the test module's Redis and store (env: the conftest `env` fixture), ready."""
    w = Worker(model, dict(os.environ, **env["vars"]), name=name, log=env["tmp"] / f"{name}.log", args=args,
               extra_env=extra_env)
    return w.wait_ready(env["redis"].client())
