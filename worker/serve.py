"""A worker process: pin a device, load the model once, warm it up, serve jobs until stopped.

The Celery worker runs with the solo pool: the task runs in this process, which holds the
model, so nothing forks after CUDA is initialised. A background thread keeps the worker's
heartbeat in Redis (for `gencli status`), renews the lease of the job in progress, and takes
over jobs whose worker died (their lease ran out) by putting them back on their queue.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta

import redis
import torch

from gencli.model.checkpoint import load_model
from gencli.model.device import describe, resolve_device
from gencli.model.errors import GencliError
from gencli.model.params import SamplingParams
from gencli.storage.db import JobStatus, utcnow
from gencli.storage.settings import Settings
from gencli.storage.store import open_store
from gencli.worker.app import (
    GENERATE_TASK,
    PREP_QUEUE,
    PREP_TASK,
    check_model_name,
    make_app,
    model_name_for,
    queue_for,
    send_job,
    sent_key,
)
from gencli.worker.client import model_info_key, worker_key
from gencli.worker.context import WorkerContext, end_event
from gencli.worker.redis_boot import patient_client, resolve_redis_url
from gencli.worker.runner import run_generation_job

log = logging.getLogger("gencli.worker")
HEARTBEAT_SECONDS = 2.0
RESEND_LOCK = "gencli:resend-lock"  # held by the one worker checking for lost messages
EXIT_HARD_LIMIT = 70  # the process status after a hard time limit


def default_name(device: str) -> str:
    label = device.replace("cuda:", "gpu").replace("cuda", "gpu0")
    label = label if label[-1].isdigit() else label + "0"
    return f"{label}@{socket.gethostname()}"


def serve(
    settings: Settings,
    *,
    model_path: str | None,
    model_name: str | None,
    device: str,
    name: str | None,
    batch_size: int,
    tokenizer: str | None = None,
    chat_format: str | None = None,
    prep: bool = False,
    extra_queues: tuple[str, ...] = (),
    loglevel: str = "INFO",
) -> None:
    """Serve a model's generation jobs (model_path), dataset-prep jobs (prep), or both."""
    logging.basicConfig(level=loglevel, format="[%(asctime)s %(levelname)s %(name)s] %(message)s")
    if model_path is None and not prep:
        raise GencliError("give --model PATH to serve a model, or --prep to serve dataset jobs (or both)")
    redis_url = resolve_redis_url(settings) if not settings.redis_url_given else settings.redis_url
    store = open_store(settings.db_url)
    r = patient_client(redis_url)
    app = make_app(settings, redis_url)
    queues: list[str] = []
    info = None
    if model_path is not None:
        model_name = check_model_name(model_name or model_name_for(model_path))
        dev = resolve_device(device)
        name = name or default_name(str(dev))
        t0 = time.perf_counter()
        loaded = load_model(model_path, tokenizer=tokenizer, chat_format=chat_format, device=dev)
        log.info("worker %s: model %s (%s, %.1fM params) on %s, loaded in %.2f s", name, model_name, loaded.kind,
                 loaded.model.num_params() / 1e6, describe(dev), time.perf_counter() - t0)
        ctx = WorkerContext(settings=settings, store=store, redis=r, worker_name=name, model_name=model_name,
                            loaded=loaded, batch_size=batch_size)
        _warm_up(ctx)
        info = {"block_size": loaded.model.config.block_size, "tokenizer": loaded.tokenizer.spec_name,
                "chat_format": loaded.chat_format.value, "vocab_size": loaded.model.config.vocab_size}
        queues.append(queue_for(model_name))

        @app.task(name=GENERATE_TASK)
        def generate(job_id: str) -> str:  # thin: the runner does the work
            return run_generation_job(ctx, job_id)
    else:
        name = name or f"prep@{socket.gethostname()}"
        ctx = WorkerContext(settings=settings, store=store, redis=r, worker_name=name)
    if prep:
        from gencli.worker.prep_runner import run_prep_job

        queues.append(PREP_QUEUE)

        @app.task(name=PREP_TASK)
        def prep_dataset(job_id: str) -> str:
            return run_prep_job(ctx, job_id)

        log.info("worker %s: serving dataset prep jobs", name)
    queues += [q for q in extra_queues if q not in queues]
    beat = threading.Thread(target=_heartbeat, args=(ctx, app, tuple(queues), info), daemon=True,
                            name="gencli-heartbeat")
    beat.start()
    try:
        app.worker_main(["worker", "--pool=solo", "--queues", ",".join(queues), "--hostname", name,
                         f"--loglevel={loglevel}", "--without-gossip", "--without-mingle", "--without-heartbeat"])
    finally:
        try:  # gone from `gencli status` at once, not when the heartbeat expires
            r.delete(worker_key(name))
        except redis.RedisError:
            pass


def _warm_up(ctx: WorkerContext) -> None:
    t0 = time.perf_counter()
    gen = ctx.generator
    try:
        gen.generate([gen.tokenizer.encode("Hello")], SamplingParams(max_tokens=2, temperature=0))
    except torch.OutOfMemoryError as e:
        log.warning("warm-up ran out of memory (%s); jobs will go down the out-of-memory ladder", e)
        return
    log.info("warmed up in %.2f s", time.perf_counter() - t0)


def _hard_limit(ctx: WorkerContext, cur: dict) -> None:
    """The job outran GENCLI_HARD_TIME_LIMIT: fail it, then end this process (a job stuck
    in a step cannot be stopped any gentler); a supervisor (`gencli workers`) restarts it."""
    limit = ctx.settings.hard_time_limit
    msg = f"hard time limit of {limit:g} s exceeded: worker {ctx.worker_name} was ended"
    log.error("job %s: %s", cur["job"], msg)
    try:
        if ctx.store.finish(cur["job"], cur["owner"], JobStatus.FAILED, error_class="HardTimeLimitExceeded",
                            error_message=msg, error_where=f"worker {ctx.worker_name}, device {ctx.device}"):
            # best effort: the job's own thread may publish the same sequence number first;
            # tailers then learn the end from the store
            ctx.publisher(cur["job"]).publish([end_event(JobStatus.FAILED.value, msg)])
    except Exception as e:
        log.warning("hard time limit: %s: %s", type(e).__name__, e)
    finally:
        os._exit(EXIT_HARD_LIMIT)


def _resend_lost(ctx: WorkerContext, app) -> None:
    """Send again the queued jobs whose message is gone: the store has them queued, Redis has no
    "sent" mark (it restarted empty). One worker at a time; a duplicate message is harmless, as a
    claim takes a job once."""
    s = ctx.settings
    grace = max(10.0, s.lease_seconds)  # a submit marks its job within milliseconds of recording it
    if not ctx.redis.set(RESEND_LOCK, ctx.worker_name, nx=True, ex=max(1, int(s.lease_seconds / 3))):
        return
    jobs = ctx.store.queued_before(utcnow() - timedelta(seconds=grace))
    if not jobs:
        return
    pipe = ctx.redis.pipeline(transaction=False)
    for job in jobs:
        pipe.exists(sent_key(job.id))
    for job, sent in zip(jobs, pipe.execute(), strict=True):
        if not sent:
            log.warning("job %s: queued in the store but its message is gone (Redis restarted?); sent again",
                        job.id)
            send_job(app, ctx.redis, job.id, kind=job.kind, model=job.model, priority=job.priority)


def _heartbeat(ctx: WorkerContext, app, queues: tuple[str, ...], info: dict | None) -> None:
    """Every couple of seconds: heartbeat, lease renewal, and taking over dead workers' jobs."""
    s = ctx.settings
    last_reap = 0.0
    while True:
        try:
            if info is not None:
                ctx.redis.set(model_info_key(ctx.model_name), json.dumps(info))
            cur = ctx.current
            ctx.redis.set(worker_key(ctx.worker_name), json.dumps({
                "name": ctx.worker_name, "model": ctx.model_name, "device": ctx.device, "queues": list(queues),
                "pid": os.getpid(), "host": socket.gethostname(), "job": cur["job"] if cur else None,
            }), ex=int(HEARTBEAT_SECONDS * 5))
            if cur:
                ours, _ = ctx.store.renew(cur["job"], cur["owner"], s.lease_seconds)
                if not ours:
                    ctx.lease_lost.add(cur["owner"])
                elif s.hard_time_limit and time.monotonic() - cur["started"] > s.hard_time_limit:
                    _hard_limit(ctx, cur)
            if time.monotonic() - last_reap > max(1.0, s.lease_seconds / 3):
                last_reap = time.monotonic()
                for job in ctx.store.take_expired():
                    log.warning("job %s: its worker %s stopped renewing its lease; requeued", job.id, job.worker)
                    send_job(app, ctx.redis, job.id, kind=job.kind, model=job.model, priority=job.priority)
                _resend_lost(ctx, app)
        except Exception as e:  # Redis or the store away for a moment: keep beating
            log.warning("heartbeat: %s: %s", type(e).__name__, e)
        time.sleep(HEARTBEAT_SECONDS)
