"""The Celery app: JSON only, late acks, one message at a time, and the queue names.

Queues: `gen.<model>` for each model's generation jobs, and `prep` for dataset jobs, under the
deployment's namespace (worker/keys.py). Redis is the broker; there is no result backend (the
SQL store is the record).
"""

from __future__ import annotations

import os
import re
import threading
from typing import TYPE_CHECKING

import redis

from gencli.model.errors import GencliError
from gencli.storage.settings import Settings
from gencli.worker.keys import PRIORITY_SEP, PRIORITY_STEPS, Keys

if TYPE_CHECKING:
    from celery import Celery

GENERATE_TASK = "gencli.generate"
PREP_TASK = "gencli.prep"
PREP_QUEUE = "prep"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class BrokerUnavailable(GencliError):
    """Redis did not take a job's message (its cause is the connection error)."""


def check_model_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise GencliError(
            f"bad model name {name!r}: use letters, digits, '.', '_' and '-' (at most 100 characters)"
        )
    return name


def model_name_for(path: str) -> str:
    """The name a checkpoint is served under by default: its file or directory name."""
    return os.path.basename(os.path.normpath(path)).removesuffix(".pt") or "model"


def queue_for(model: str) -> str:
    return f"gen.{check_model_name(model)}"


def queue_of(kind: str, model: str) -> str:
    """A job's queue: dataset prep on `prep`, generation (and scoring) on its model's."""
    return PREP_QUEUE if kind == "prep" else queue_for(model)


def broker_priority(priority: int) -> int:
    """gencli's --priority (0..9, higher first) as kombu's Redis priority (0 first)."""
    return 9 - max(0, min(9, priority))


_CELERY_IMPORT = threading.Lock()


def make_app(settings: Settings, redis_url: str, keys: Keys) -> Celery:
    with _CELERY_IMPORT:  # celery's package builds its names lazily, and two threads importing it at once
        # can see it half made ("cannot import name 'Celery'": the API server's first concurrent submits)
        from celery import Celery  # here, not at import: `gencli submit --help` needs no Celery

    from gencli.worker import broker

    broker.install()  # kombu's Redis transport, repaired for a Redis that goes away while a job runs
    app = Celery("gencli", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # a pickle message is refused, not loaded
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker started while Redis is down waits for it
        # a running job carries on when the broker connection drops: its store lease, not its
        # message, keeps it to one run (and the message may be gone with a restarted Redis)
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "priority_steps": PRIORITY_STEPS,
            "sep": PRIORITY_SEP,
            "global_keyprefix": keys.prefix,  # every kombu key of this deployment, queues included
            "queue_order_strategy": "priority",
        },
        worker_hijack_root_logger=False,
        # Flower (and `celery events`) see the workers and their tasks: task events from workers and
        # submitters, and the workers' event heartbeats (GENCLI_TASK_EVENTS=0 turns them off;
        # bench/events.py measures what they cost)
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        task_default_queue="gencli",
    )
    return app


SENT_TTL = 7 * 24 * 3600  # seconds a "sent" mark outlives an unclaimed message


def send_job(app: Celery, r: redis.Redis, keys: Keys, job_id: str, *, kind: str, model: str, priority: int) -> None:
    """Put a recorded job on its queue (generation on its model's, dataset prep on `prep`), its
    "sent" mark set first. A claim removes the mark; a job the store has had queued for a while
    without one lost its message to a Redis that restarted empty, and a worker sends it again
    (serve._resend_lost). Marked first, a message that is sent always has its mark."""
    from kombu.exceptions import OperationalError  # kombu's type for the connection errors it meets

    r.set(keys.sent(job_id), 1, ex=SENT_TTL)
    task = PREP_TASK if kind == "prep" else GENERATE_TASK
    try:
        app.send_task(task, args=[job_id], queue=queue_of(kind, model), priority=broker_priority(priority))
    except (OperationalError, redis.RedisError, OSError) as e:
        try:  # not sent: no mark either, so a resend is not held off
            r.delete(keys.sent(job_id))
        except redis.RedisError:
            pass
        raise BrokerUnavailable(f"the message of job {job_id} was not sent: {type(e).__name__}: {e}") from e
