"""A worker process: pin a device, load the model once, warm it up, serve jobs until stopped.

The Celery worker runs with the threads pool, one thread per job held (--max-jobs): the tasks
run in this process, which holds the model, so nothing forks after CUDA is initialised, and one
thread decodes every job's sequences together (worker/batcher.py says why this pool). Two
background threads besides:
- the lease keeper renews every running job's lease in the store, and only that, so a Redis
  that is away never costs a live worker its jobs; it also passes on a cancel the store records,
  and stops a job past GENCLI_HARD_TIME_LIMIT (ending the process only when a decoding step
  itself is stuck that long, or for a dataset job, which cannot be stopped any gentler);
- the heartbeat keeps the worker's entry in Redis (for `gencli status`, with short timeouts),
  takes over jobs whose worker died (their lease ran out) by putting them back on their queue,
  and sends again queued jobs whose message a restarted Redis lost.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import redis
import torch
from celery import signals

from gencli.model.checkpoint import load_model
from gencli.model.device import describe, resolve_device
from gencli.model.errors import GencliError
from gencli.model.params import SamplingParams
from gencli.model.provenance import model_identity, runtime_record
from gencli.storage.db import JobStatus
from gencli.storage.settings import Settings
from gencli.storage.store import Store, StoreBusy, open_store
from gencli.worker import broker, events, supervise
from gencli.worker.app import (
    GENERATE_TASK,
    PREP_QUEUE,
    PREP_TASK,
    check_model_name,
    make_app,
    model_name_for,
    queue_for,
    queue_of,
    send_job,
)
from gencli.worker.client import keys_for
from gencli.worker.context import WorkerContext
from gencli.worker.messages import CancelRequested, HardLimitPassed, LeaseGone
from gencli.worker.redis_boot import patient_client, resolve_redis_url, shown_url
from gencli.worker.runner import run_generation_job
from gencli.worker.running import HardTimeLimitExceeded
from gencli.worker.stream import StreamRefused
from gencli.worker.supervise import OUTAGES

log = logging.getLogger("gencli.worker")
HEARTBEAT_SECONDS = 2.0
EXIT_HARD_LIMIT = 70  # the process status after a hard time limit
RESEND_LOCK_SECONDS = 60  # held while one worker resends lost messages (released when it is done)
TAKEOVER_PRIORITY = 9  # a job taken from a dead worker goes to the front of its queue


def default_name(label: str) -> str:
    """A worker's default name, unique among live processes: `<label>.<pid>@<host>`, where label
    is the device (cpu0, gpu1) or the role (prep)."""
    return f"{label}.{os.getpid()}@{socket.gethostname()}"


def device_label(device: str) -> str:
    """cpu -> cpu0, cuda -> gpu0, cuda:1 -> gpu1, mps -> mps0."""
    label = device.replace("cuda:", "gpu").replace("cuda", "gpu0")
    return label if label[-1].isdigit() else label + "0"


def serve(
    settings: Settings,
    *,
    model_path: str | None,
    model_name: str | None,
    device: str,
    name: str | None,
    batch_size: int,
    dtype: str = "auto",
    max_jobs: int | None = None,
    max_slots_per_job: int | None = None,
    tokenizer: str | None = None,
    chat_format: str | None = None,
    prep: bool = False,
    extra_queues: tuple[str, ...] = (),
    loglevel: str = "INFO",
) -> int:
    """Serve a model's generation jobs (model_path), dataset-prep jobs (prep), or both; return
    Celery's exit status (non-zero when it stopped on an error it calls unrecoverable)."""
    logging.basicConfig(level=loglevel, format="[%(asctime)s %(levelname)s %(name)s] %(message)s")
    if model_path is None and not prep:
        raise GencliError("give --model PATH to serve a model, or --prep to serve dataset jobs (or both)")
    store = _open_store(settings)  # the record first: a store that cannot be opened says so at once
    keys = keys_for(settings, store)
    redis_url = resolve_redis_url(settings) if not settings.redis_url_given else settings.redis_url
    r = patient_client(redis_url)
    app = make_app(settings, redis_url, keys)
    queues: list[str] = []
    info = None
    if model_path is not None:
        model_name = check_model_name(model_name or model_name_for(model_path))
        dev = resolve_device(device)
        name = name or default_name(device_label(str(dev)))
        t0 = time.perf_counter()
        loaded = load_model(model_path, tokenizer=tokenizer, chat_format=chat_format, device=dev, dtype=dtype)
        log.info("worker %s: model %s (%s, %.1fM params) on %s in %s, loaded in %.2f s", name, model_name,
                 loaded.kind, loaded.model.num_params() / 1e6, describe(dev), loaded.dtype, time.perf_counter() - t0)
        t0 = time.perf_counter()
        identity = model_identity(loaded.path, settings.home)
        log.info("worker %s: model sha256 %s (%.2f s)", name, identity["sha256"], time.perf_counter() - t0)
        ctx = WorkerContext(settings=settings, store=store, redis=r, keys=keys, worker_name=name,
                            model_name=model_name, loaded=loaded, slots=batch_size,
                            max_jobs=max_jobs or batch_size, max_slots_per_job=_per_job(batch_size, max_slots_per_job),
                            provenance=runtime_record(loaded, model_name, identity))
        _warm_up(ctx)
        info = {"block_size": loaded.model.config.block_size, "tokenizer": loaded.tokenizer.spec_name,
                "chat_format": loaded.chat_format.value, "vocab_size": loaded.model.config.vocab_size,
                "sha256": identity["sha256"]}
        queues.append(queue_for(model_name))

        @app.task(name=GENERATE_TASK)
        def generate(job_id: str) -> str:  # thin: the runner does the work
            return run_generation_job(ctx, job_id)
    else:
        name = name or default_name("prep")
        ctx = WorkerContext(settings=settings, store=store, redis=r, keys=keys, worker_name=name,
                            max_jobs=max_jobs or 1)
    if prep:
        from gencli.worker.prep_runner import run_prep_job

        queues.append(PREP_QUEUE)

        @app.task(name=PREP_TASK)
        def prep_dataset(job_id: str) -> str:
            return run_prep_job(ctx, job_id)

        log.info("worker %s: serving dataset prep jobs", name)
    queues += [q for q in extra_queues if q not in queues]
    short_redis = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)  # never waits long
    _take_name(ctx, short_redis, tuple(queues), shown_url(redis_url))
    supervise.start("lease", _keep_lease, ctx)
    supervise.start("heartbeat", _heartbeat, ctx, short_redis, app, tuple(queues), info)
    try:
        log.info("worker %s: up to %d jobs at once, %d slots%s", name, ctx.max_jobs, ctx.slots,
                 f", at most {ctx.max_slots_per_job} per job" if ctx.max_slots_per_job and model_path else "")
        quiet = [] if settings.task_events else ["--without-heartbeat"]  # event heartbeats: Flower's
        ended: dict = {}  # Celery's worker_main returns nothing: its exit status comes with this signal
        signals.worker_shutdown.connect(lambda sender, **_: ended.setdefault("code", sender.exitcode), weak=False)
        app.worker_main(["worker", "--pool=threads", f"--concurrency={ctx.max_jobs}", "--queues", ",".join(queues),
                         "--hostname", name, f"--loglevel={loglevel}", "--without-gossip", "--without-mingle",
                         *quiet])
        return ended.get("code") or 0
    finally:
        try:  # gone from `gencli status` at once, not when the heartbeat expires
            short_redis.delete(keys.worker(name))
            short_redis.srem(keys.workers, name)
        except redis.RedisError:
            pass


def _open_store(settings: Settings) -> Store:
    """The store, waited for while another process holds its write lock (SQLite), as Redis is
    waited for; any other reason it cannot be opened ends the worker with that reason."""
    said = False
    while True:
        try:
            return open_store(settings.db_url, make_dir=settings.default_store)
        except StoreBusy as e:
            if not said:
                log.warning("%s; waiting for it", e)
                said = True


def _per_job(slots: int, given: int | None) -> int | None:
    """Slots one job may hold: given, else three quarters of them (at least 1), so that a job
    arriving beside a big one finds a free slot at once."""
    if given is not None:
        return min(given, slots)
    return None if slots < 4 else max(1, slots * 3 // 4)


def _warm_up(ctx: WorkerContext) -> None:
    t0 = time.perf_counter()
    gen = ctx.generator
    try:
        gen.generate([gen.tokenizer.encode("Hello")], SamplingParams(max_tokens=2, temperature=0))
    except torch.OutOfMemoryError as e:
        log.warning("warm-up ran out of memory (%s); jobs will go down the out-of-memory ladder", e)
        return
    log.info("warmed up in %.2f s", time.perf_counter() - t0)


def _beat(ctx: WorkerContext, queues: tuple[str, ...]) -> str:
    batcher = ctx.batcher
    return json.dumps({"name": ctx.worker_name, "model": ctx.model_name, "device": ctx.device,
                       "dtype": ctx.loaded.dtype if ctx.loaded else None, "queues": list(queues),
                       "pid": os.getpid(), "host": socket.gethostname(), "jobs": list(ctx.running.copy()),
                       "engine": batcher.load() if batcher is not None else None})


def _take_name(ctx: WorkerContext, r: redis.Redis, queues: tuple[str, ...], url: str) -> None:
    """Register this worker's name, refusing one a live worker of another process holds (a process
    on this host that is gone leaves its name free at once)."""
    key = ctx.keys.worker(ctx.worker_name)
    waited = False
    for _ in range(3):
        while True:  # a worker started while Redis is down waits for it, as its Celery consumer does
            try:
                taken = r.set(key, _beat(ctx, queues), nx=True, ex=int(HEARTBEAT_SECONDS * 5))
                break
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if not waited:  # said once; then a quiet wait
                    log.warning("worker %s: Redis at %s does not answer (%s); waiting for it: start Redis, or "
                                "fix GENCLI_REDIS_URL", ctx.worker_name, url, e)
                    waited = True
                time.sleep(1.0)
        if waited:
            log.info("worker %s: Redis at %s answers", ctx.worker_name, url)
            waited = False
        if taken:
            r.sadd(ctx.keys.workers, ctx.worker_name)
            return
        raw = r.get(key)
        held = json.loads(raw) if raw else None
        if held is None:
            continue
        if held.get("host") == socket.gethostname() and not _pid_alive(held.get("pid")):
            r.delete(key)
            continue
        raise GencliError(f"a live worker is already named {ctx.worker_name} (pid {held.get('pid')} on "
                          f"{held.get('host')}): choose another --name, or leave it out for a unique default")
    raise GencliError(f"could not register worker name {ctx.worker_name} in Redis")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _hard_limit(ctx: WorkerContext, runs: list) -> None:
    """Jobs past GENCLI_HARD_TIME_LIMIT (over all their attempts) that cannot be stopped any gentler
    (a dataset job, or a decoding step stuck that long): fail them, then end this process; a
    supervisor (`gencli workers`) restarts it. The process's other jobs are taken over elsewhere."""
    limit = ctx.settings.hard_time_limit
    msg = f"{HardTimeLimitExceeded.after(limit)}: worker {ctx.worker_name} was ended"
    for run in runs:
        log.error("job %s: %s", run.job_id, msg)
        try:
            if ctx.store.finish(run.job_id, run.owner, JobStatus.FAILED, run_seconds=run.elapsed(),
                                error_class="HardTimeLimitExceeded", error_message=msg,
                                error_where=f"worker {ctx.worker_name}, device {ctx.device}"):
                # best effort: the job's own thread may publish the same sequence number first (then
                # this one is refused); tailers then learn the end from the store
                run.pub.publish([events.end(JobStatus.FAILED.value, msg)])
        except (*OUTAGES, StreamRefused) as e:  # (StreamRefused: the job's own thread published first)
            log.warning("hard time limit: %s: %s", type(e).__name__, e)
    os._exit(EXIT_HARD_LIMIT)


def _resend_lost(ctx: WorkerContext, r: redis.Redis, app) -> None:
    """Send again the queued jobs whose message is gone, one worker at a time. A job the store has
    had queued for the grace period (counted from when it was last queued) is sent again when
    - Redis has no "sent" mark for it (Redis restarted empty, and the message went with it);
    - a consumer took its message more than the grace period ago and never claimed the job (the
      worker was killed between taking and claiming: kombu would put the message back only after
      the visibility timeout, hours);
    - its queue is empty and no consumer holds its message (taken by a process that died before
      kombu recorded it as held).
    A job claimed while this looks is not sent again (the store is asked once more); a duplicate
    message would be harmless anyway, as a claim takes a job once."""
    s = ctx.settings
    grace = max(10.0, s.lease_seconds)  # a submit marks its job before it sends it
    lock = ctx.keys.resend_lock
    if not r.set(lock, ctx.worker_name, nx=True, ex=RESEND_LOCK_SECONDS):
        return
    try:
        jobs = ctx.store.queued_for(grace)
        if not jobs:
            return
        # each queue's Redis lists, one per priority
        lists = {name: ctx.keys.queue_lists(name) for name in {queue_of(job.kind, job.model) for job in jobs}}
        pipe = r.pipeline(transaction=False)
        for job in jobs:
            pipe.exists(ctx.keys.sent(job.id))
        for key in (key for keys in lists.values() for key in keys):
            pipe.llen(key)
        answers = pipe.execute()
        marked, lengths = answers[: len(jobs)], iter(answers[len(jobs):])
        waiting = {name: sum(next(lengths) for _ in keys) for name, keys in lists.items()}
        held = broker.held_messages(r, ctx.keys)
        now = time.time()
        lost = []
        for job, sent in zip(jobs, marked, strict=True):
            h = held.get(job.id)
            if not sent:
                lost.append((job, None, "its message is gone (Redis restarted?)"))
            elif h is not None and h.since < now - grace:
                lost.append((job, h, f"a consumer took its message {now - h.since:.0f} s ago and never "
                                     "claimed it (was its worker killed?)"))
            elif h is None and not waiting[queue_of(job.kind, job.model)]:
                lost.append((job, None, "its queue is empty and no consumer holds its message"))
        still = {job.id for job in ctx.store.queued_for(grace)} if lost else set()
        for job, h, why in lost:
            if job.id in still:
                log.warning("job %s: queued in the store but %s; sent again", job.id, why)
                if h is not None:
                    broker.drop_held(r, ctx.keys, h.tag)
                priority = TAKEOVER_PRIORITY if job.started_at else job.priority
                send_job(app, r, ctx.keys, job.id, kind=job.kind, model=job.model, priority=priority)
    finally:
        if r.get(lock) == ctx.worker_name.encode():
            r.delete(lock)


CHECKPOINT_EVERY = 0.3  # seconds between checkpoints of the running items' ids


def _keep_lease(ctx: WorkerContext) -> None:
    """Renew the running jobs' leases and checkpoint their items, in the store and only there:
    Redis being away never delays it. The checkpoints of every running job go in one write. What
    it learns it tells each job's thread (worker/messages.py), once per claim."""
    s = ctx.settings
    every = min(HEARTBEAT_SECONDS, s.lease_seconds / 3)
    last_renew = 0.0
    told: dict[str, set[type]] = {}  # lease owner -> the messages its job was sent
    while True:
        runs = list(ctx.running.copy().values())
        told = {run.owner: told.get(run.owner, set()) for run in runs}  # only claims still running
        try:
            _checkpoint(ctx, runs, told)
        except OUTAGES as e:  # the store away for a moment: try again soon
            log.warning("checkpoint: %s: %s", type(e).__name__, e)
        if runs:
            supervise.crash_point(s.inject_crash, "lease")
        if time.monotonic() - last_renew >= every:
            last_renew = time.monotonic()
            _renew(ctx, runs, told)
        time.sleep(min(CHECKPOINT_EVERY, every))


def _tell_once(run, told: dict[str, set[type]], msg) -> None:
    sent = told.setdefault(run.owner, set())
    if type(msg) not in sent:
        sent.add(type(msg))
        run.tell(msg)


def _checkpoint(ctx: WorkerContext, runs: list, told: dict[str, set[type]]) -> None:
    """Write each running job's latest snapshot (RunningJob.checkpoint); tell a job whose lease the
    store says is gone."""
    entries, which = [], []
    for run in runs:
        snapshot = run.checkpoint
        if snapshot is not None and LeaseGone not in told.get(run.owner, ()):
            entries.append((run.job_id, run.owner, [(i, e, list(ids)) for i, e, ids in snapshot], run.elapsed()))
            which.append(run)
    if entries:
        for run, ours in zip(which, ctx.store.checkpoint_many(entries), strict=True):
            if not ours and run.checkpoint is not None:  # (a job that ended meanwhile is not lost)
                _tell_once(run, told, LeaseGone())


def _renew(ctx: WorkerContext, runs: list, told: dict[str, set[type]]) -> None:
    s = ctx.settings
    since = time.monotonic()
    try:
        cancels = ctx.store.renew_many([(run.job_id, run.owner) for run in runs], s.lease_seconds)
    except OUTAGES as e:  # the store away for a moment: try again soon
        log.warning("lease renewal: %s: %s", type(e).__name__, e)
        return
    over = []
    for run in runs:
        ours = run.job_id in cancels
        if not ours:
            _tell_once(run, told, LeaseGone())
            continue
        run.lease.renewed(since)
        if cancels[run.job_id]:
            _tell_once(run, told, CancelRequested())
        if s.hard_time_limit and run.elapsed() > s.hard_time_limit:
            _tell_once(run, told, HardLimitPassed())  # a generation job's thread takes its rows out
            over.append(run)
    if over:
        began = ctx.batcher.step_started if ctx.batcher else None
        stuck = began is not None and time.monotonic() - began > s.hard_time_limit
        ended = [run for run in over if stuck or not run.stoppable]
        if ended:
            _hard_limit(ctx, ended)


def _heartbeat(ctx: WorkerContext, r: redis.Redis, app, queues: tuple[str, ...], info: dict | None) -> None:
    """Every couple of seconds: heartbeat, and taking over dead workers' jobs."""
    s = ctx.settings
    last_reap = 0.0
    failing = False  # an outage is logged when it starts and when it ends, not at every beat
    while True:
        if ctx.running:
            supervise.crash_point(s.inject_crash, "heartbeat")
        try:
            if info is not None:
                r.set(ctx.keys.model_info(ctx.model_name), json.dumps(info))
            beat = r.pipeline(transaction=False)
            beat.set(ctx.keys.worker(ctx.worker_name), _beat(ctx, queues), ex=int(HEARTBEAT_SECONDS * 5))
            beat.sadd(ctx.keys.workers, ctx.worker_name)
            beat.time()
            sent = time.time()
            (sec, usec) = beat.execute()[-1]
            ctx.redis_clock_offset = sec + usec / 1e6 - (sent + time.time()) / 2  # (the publishers' fences)
            if time.monotonic() - last_reap > max(1.0, s.lease_seconds / 3):
                last_reap = time.monotonic()
                for job in ctx.store.take_expired():
                    log.warning("job %s: its worker %s stopped renewing its lease; requeued at the front",
                                job.id, job.worker)
                    send_job(app, r, ctx.keys, job.id, kind=job.kind, model=job.model, priority=TAKEOVER_PRIORITY)
                _resend_lost(ctx, r, app)
            if failing:
                log.info("heartbeat: beating again")
                failing = False
        except OUTAGES as e:  # Redis or the store away for a moment: keep beating
            if not failing:
                log.warning("heartbeat: %s: %s (retrying every %g s, quietly until it works again)",
                            type(e).__name__, e, HEARTBEAT_SECONDS)
                failing = True
        time.sleep(HEARTBEAT_SECONDS)
