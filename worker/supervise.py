"""One rule for a worker's long-lived threads: an expected outage is caught by name and waited
out; anything else is a bug, logged with its traceback, and it ends the process with
EXIT_CRASHED, so that `gencli workers`, compose or systemd start a fresh one and the jobs it held
are taken over (a worker with a dead thread would hold them, and wait on it, forever).

The threads: the batcher and the outbox (worker/batcher.py), the lease keeper and the heartbeat
(worker/serve.py), and each job's own thread (a Celery pool thread, worker/context.py's
`run_job`; a job's own failure, such as a prompt the engine refuses, fails that job and is not a
crash). GENCLI_INJECT_CRASH=batcher|outbox|lease|heartbeat|job raises a bug in that thread the
first time it works for a running job (`crash_point`), for the tests.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable

import redis
from sqlalchemy.exc import SQLAlchemyError

from gencli.worker.app import BrokerUnavailable

log = logging.getLogger("gencli.worker")

# What a thread may meet and wait out: Redis or the store away, a socket or file error.
OUTAGES: tuple[type[BaseException], ...] = (redis.RedisError, SQLAlchemyError, OSError, BrokerUnavailable)
EXIT_CRASHED = 71  # EX_OSERR: a thread of the worker met a bug; its supervisor starts a fresh worker


class InjectedCrash(RuntimeError):
    """GENCLI_INJECT_CRASH's bug."""


def crash(where: str, error: BaseException) -> None:
    """Log the bug with its traceback and end the process at once (no thread can be trusted to
    finish it gently: the one that died may be the one the others wait on)."""
    log.critical("worker thread %s crashed; the worker exits with status %d and its jobs are taken over",
                 where, EXIT_CRASHED, exc_info=error)
    for h in logging.getLogger().handlers + log.handlers:
        try:
            h.flush()
        except Exception:  # noqa: BLE001 (a handler that cannot flush must not keep the process alive)
            pass
    sys.stderr.flush()
    os._exit(EXIT_CRASHED)


def guarded(where: str, target: Callable[..., object], *args) -> None:
    """Run target(*args); a bug escaping it ends the process (crash)."""
    try:
        target(*args)
    except BaseException as e:  # noqa: BLE001 (the supervisor's rule: whatever escapes is a crash)
        crash(where, e)
    else:
        crash(where, RuntimeError(f"the {where} thread returned; it must run for the worker's life"))


def start(where: str, target: Callable[..., object], *args) -> threading.Thread:
    """A daemon thread running target(*args) under `guarded`."""
    t = threading.Thread(target=guarded, args=(where, target, *args), daemon=True, name=f"gencli-{where}")
    t.start()
    return t


def crash_point(inject: str | None, where: str) -> None:
    """Raise InjectedCrash when GENCLI_INJECT_CRASH (Settings.inject_crash: inject) names this thread."""
    if inject == where:
        raise InjectedCrash(f"injected by GENCLI_INJECT_CRASH={where}")
