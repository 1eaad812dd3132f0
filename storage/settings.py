"""Configuration, read in one place from GENCLI_* environment variables.

CLI options that mirror these variables pass their values in; tests override them with
monkeypatch.setenv.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from gencli.model.errors import GencliError

_NAMESPACE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Settings:
    home: Path  # GENCLI_HOME: data dir (history, default store, private Redis)
    redis_url: str  # GENCLI_REDIS_URL
    redis_url_given: bool  # False: the default, and gencli may start a private Redis
    db_url: str  # GENCLI_DB_URL: sqlite:///PATH or postgresql://...; default a SQLite file in home
    lease_seconds: float  # GENCLI_LEASE_SECONDS: a running job's lease; a dead worker's job is
    #                       taken over this long after its last renewal
    max_deliveries: int  # GENCLI_MAX_DELIVERIES: a job that crashed its worker this often fails
    soft_time_limit: float | None  # GENCLI_SOFT_TIME_LIMIT seconds per job (None: no limit)
    hard_time_limit: float | None  # GENCLI_HARD_TIME_LIMIT
    visibility_timeout: int  # GENCLI_VISIBILITY_TIMEOUT: broker redelivery of unacked messages
    stream_ttl: int  # GENCLI_STREAM_TTL: seconds a job's token replay log is kept after it ends
    stream_max_events: int  # GENCLI_STREAM_MAX_EVENTS: a replay log's cap (older events are trimmed;
    #                         readers of a trimmed log fall back to the store)
    task_events: bool  # GENCLI_TASK_EVENTS: Celery task events and worker event heartbeats, for Flower
    #                    (default on; 0 turns them off)
    max_queued: int | None  # GENCLI_MAX_QUEUED: queued jobs per model beyond which a submit is refused
    #                        (None: no bound)
    namespace: str | None  # GENCLI_NAMESPACE: this deployment's Redis namespace (default: the
    #                        store's deployment id), for deployments that share one Redis
    inject_crash: str | None = None  # GENCLI_INJECT_CRASH: fault injection for the tests, one of
    #                                 CRASH_POINTS: that worker thread raises a bug while a job runs

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        home = Path(env.get("GENCLI_HOME") or platformdirs.user_data_dir("gencli")).expanduser()
        redis_url = _redis_url(env.get("GENCLI_REDIS_URL") or "")
        return cls(
            home=home,
            redis_url=redis_url or DEFAULT_REDIS_URL,
            redis_url_given=bool(redis_url),
            db_url=env.get("GENCLI_DB_URL") or f"sqlite:///{home / 'gencli.db'}",
            lease_seconds=float(env.get("GENCLI_LEASE_SECONDS", "30")),
            max_deliveries=int(env.get("GENCLI_MAX_DELIVERIES", "3")),
            soft_time_limit=_opt_float(env.get("GENCLI_SOFT_TIME_LIMIT")),
            hard_time_limit=_opt_float(env.get("GENCLI_HARD_TIME_LIMIT")),
            visibility_timeout=int(env.get("GENCLI_VISIBILITY_TIMEOUT", str(6 * 3600))),
            stream_ttl=int(env.get("GENCLI_STREAM_TTL", str(24 * 3600))),
            stream_max_events=int(env.get("GENCLI_STREAM_MAX_EVENTS", "200000")),
            task_events=_flag(env.get("GENCLI_TASK_EVENTS", "1"), "GENCLI_TASK_EVENTS"),
            max_queued=_opt_int(env.get("GENCLI_MAX_QUEUED"), "GENCLI_MAX_QUEUED"),
            namespace=_namespace(env.get("GENCLI_NAMESPACE")),
            inject_crash=_crash_point(env.get("GENCLI_INJECT_CRASH")),
        )

    @property
    def default_store(self) -> bool:
        """Whether the store is the default SQLite file in GENCLI_HOME (whose directory gencli makes)."""
        return self.db_url == f"sqlite:///{self.home / 'gencli.db'}"

    @property
    def history_file(self) -> Path:
        return self.home / "history"


REDIS_SCHEMES = ("redis", "rediss", "unix")  # what redis-py's from_url takes


def _redis_url(v: str) -> str:
    """GENCLI_REDIS_URL checked for being a Redis URL at all (whether one answers is checked on use)."""
    if not v:
        return v
    scheme, sep, rest = v.partition("://")
    if not sep or scheme.lower() not in REDIS_SCHEMES or not rest.strip("/"):
        raise GencliError(f"GENCLI_REDIS_URL={v!r} is not a Redis URL: use redis://HOST:PORT/DB "
                          "(e.g. redis://127.0.0.1:6379/0), rediss:// for TLS, or unix:///path/to/redis.sock")
    return v


def _namespace(v: str | None) -> str | None:
    if not v:
        return None
    if not _NAMESPACE.match(v):
        raise GencliError(f"GENCLI_NAMESPACE={v!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
    return v


CRASH_POINTS = ("batcher", "outbox", "lease", "heartbeat", "job")  # a worker's long-lived threads


def _crash_point(v: str | None) -> str | None:
    if not v:
        return None
    if v not in CRASH_POINTS:
        raise GencliError(f"GENCLI_INJECT_CRASH={v!r}: use one of {', '.join(CRASH_POINTS)}, or unset it")
    return v


def _flag(v: str, name: str) -> bool:
    word = v.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise GencliError(f"{name}={v!r}: use 1 or 0")


def _opt_int(v: str | None, name: str) -> int | None:
    if not v:
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise GencliError(f"{name}={v!r}: use a whole number >= 1, or unset it for no bound")
    return n


def _opt_float(v: str | None) -> float | None:
    return float(v) if v else None


def get_settings() -> Settings:
    return Settings.from_env()
