"""A Celery app with no-op tasks: the floor that bench.queue measures gencli's queue against.

Started by bench.queue as `python -m celery -A bench._noop_app worker --pool=solo -Q noop` from the
repository root, with BENCH_NOOP_REDIS_URL naming the benchmark's own Redis database. The broker
settings are gencli's (worker/app.py: JSON only, late acks, prefetch 1, kombu priority steps), so
the floor is what the same Celery set-up costs with nothing in the task; a Redis result backend
times the round trip.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

URL = os.environ.get("BENCH_NOOP_REDIS_URL") or os.environ.get("GENCLI_REDIS_URL") or "redis://127.0.0.1:6379/14"
QUEUE = "noop"
MARKS = "bench:noop:marks"  # mark() pushes time.time() here
SLEPT = "bench:noop:slept"  # hold() pushes time.time() here when its sleep ends

app = Celery("bench_noop", broker=URL, backend=URL, set_as_current=False)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"priority_steps": list(range(10)), "sep": ":", "queue_order_strategy": "priority"},
    result_expires=600,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    task_default_queue=QUEUE,
)
_r = None


def _redis() -> redis.Redis:
    global _r
    if _r is None:
        _r = redis.Redis.from_url(URL)
    return _r


@app.task(name="bench.noop")
def noop():
    """Nothing; its (None) result goes to the result backend: the round trip."""
    return


@app.task(name="bench.noop_fire", ignore_result=True)
def noop_fire():
    """Nothing, no result stored: throughput."""
    return


@app.task(name="bench.mark", ignore_result=True)
def mark():
    _redis().rpush(MARKS, repr(time.time()))


@app.task(name="bench.hold", ignore_result=True)
def hold(seconds: float):
    """Keep the worker busy while the client fills the queue."""
    time.sleep(seconds)
    _redis().rpush(SLEPT, repr(time.time()))
