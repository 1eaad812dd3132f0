"""What a worker process holds for its whole life, and the jobs it is running now.

`WorkerContext` is the process: settings, store, Redis, the model and the batcher that decodes
every running job's sequences together, and the claim of each job (`run_job`); one claimed job
is a `RunningJob` (worker/running.py).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import redis

from gencli.model.checkpoint import LoadedModel, load_model
from gencli.model.textgen import TextGenerator
from gencli.storage.db import JobRow, JobStatus
from gencli.storage.settings import Settings
from gencli.storage.store import Claim, Store
from gencli.worker import events, supervise
from gencli.worker.batcher import Batcher
from gencli.worker.keys import Keys
from gencli.worker.running import LeaseClock, LeaseLost, PublishRefused, RunningJob, error_fields
from gencli.worker.stream import Publisher
from gencli.worker.supervise import OUTAGES

log = logging.getLogger("gencli.worker")


class Outcome(str, Enum):
    """How a delivery of a job went: the job's end, or why it was not run (Claim.reason's values)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # ended cancelled, by its run or by the claim that found it cancelled
    LEASE_LOST = "lease lost"  # another worker owns it now: this one stopped without writing
    RELEASED = "released"  # Redis stayed away: given back to the queue
    DONE = "done"  # ended already (a redelivered message)
    LEASED = "leased"  # another worker's live lease holds it
    TOO_MANY_DELIVERIES = "too many deliveries"
    MISSING = "missing"  # not this store's job


@dataclass
class Ending:
    """How a job's body ended: its status, error fields (error_class, error_message, error_where),
    the store's other columns to set (stats), a dataset job's result, and what the log line adds."""

    status: JobStatus
    error: dict = field(default_factory=dict)
    fields: dict = field(default_factory=dict)
    result: dict | None = None
    summary: str = ""


class JobKind(Protocol):
    """What differs between kinds of job (generation: runner.Generation; dataset prep:
    prep_runner.Prep); the rest of a job's life is WorkerContext.run_job's."""

    device: str  # where its attempts run, as the store and the "start" event say
    provenance: dict  # what runs it, recorded per attempt
    stoppable: bool  # its body stops the job at the hard time limit (else the lease thread ends the process)

    def run(self, run: RunningJob, job: JobRow, attempt: int, start: int) -> Ending:
        """The body, between the "start" event (numbered start) and the end; raises LeaseLost
        when another worker owns the job, Redis connection errors when Redis is away for good."""
        ...


@dataclass
class WorkerContext:
    """The model (loaded once; None on a worker that only preps datasets), the clients, and the
    jobs running now (several at once: see worker/batcher.py)."""

    settings: Settings
    store: Store
    redis: redis.Redis
    keys: Keys
    worker_name: str
    model_name: str | None = None
    loaded: LoadedModel | None = None
    slots: int = 8  # sequences decoded together, over all jobs
    max_jobs: int = 8  # jobs held at once
    max_slots_per_job: int | None = None  # None: no cap
    provenance: dict | None = None  # what runs its jobs (model/provenance.py runtime_record), recorded per attempt
    running: dict[str, RunningJob] = field(default_factory=dict)  # job id -> the job, running now
    redis_clock_offset: float = 0.0  # Redis's clock less this machine's, in seconds (the heartbeat's)
    generator: TextGenerator | None = field(init=False, default=None)
    batcher: Batcher | None = field(init=False, default=None)
    _cpu: TextGenerator | None = field(init=False, default=None)

    def __post_init__(self):
        if self.loaded is not None:
            self.generator = TextGenerator(self.loaded)
            self.batcher = Batcher(self.generator, self.redis, slots=self.slots, max_per_group=self.max_slots_per_job,
                                   cpu_generator=self.cpu_generator, inject_crash=self.settings.inject_crash)

    @property
    def device(self) -> str:
        return str(self.loaded.device) if self.loaded else "cpu"

    def cpu_generator(self) -> TextGenerator:
        """The model on the CPU, for the end of the out-of-memory ladder."""
        if self.loaded.device.type == "cpu":
            return self.generator
        if self._cpu is None:
            lm = self.loaded
            self._cpu = TextGenerator(
                load_model(lm.path, tokenizer=lm.tokenizer.spec_name, chat_format=lm.chat_format.value, device="cpu")
            )
        return self._cpu

    def publisher(self, job_id: str, owner: str | None, lease: LeaseClock | None = None) -> Publisher:
        """The job's stream publisher; with lease, fenced by it (Redis refuses what arrives past it)."""
        s = self.settings
        fence = None if lease is None else (lambda: lease.until_unix() + self.redis_clock_offset)
        return Publisher(self.redis, self.keys, job_id, owner=owner, ttl=s.stream_ttl, max_events=s.stream_max_events,
                         fence=fence)

    def run_job(self, job_id: str, kind: JobKind) -> str:
        """Claim the job under a fresh lease owner and run it, its kind's body in the one lifecycle
        every job has (record the attempt, publish "start", the body, store the end, publish
        "end"), while it is one of the running jobs; return how it ended, or why it was not run
        (an Outcome's value)."""
        owner = uuid.uuid4().hex
        s = self.settings
        since = time.monotonic()
        claim = self.store.claim(job_id, owner=owner, worker=self.worker_name, device=kind.device,
                                 lease_seconds=s.lease_seconds, max_deliveries=s.max_deliveries)
        if not claim.ok:
            self._not_run(job_id, claim)
            return Outcome(claim.reason).value
        lease = LeaseClock(s.lease_seconds, since)
        run = RunningJob(job_id, owner, claim.attempt, self.publisher(job_id, owner, lease), self.redis, self.keys,
                         lease, run_seconds_before=claim.run_seconds, stoppable=kind.stoppable,
                         cancel_seen=claim.cancelled)
        self.running[job_id] = run
        try:
            self.redis.delete(self.keys.sent(job_id))
            return self._lifecycle(run, kind).value
        except (redis.ConnectionError, redis.TimeoutError) as e:
            # Redis stayed away longer than the client's retries (about a minute): the job is not
            # failed for it but given back, its progress checkpointed in the store; a worker sends
            # it again once Redis is back (serve._resend_lost) and resumes it from the checkpoint.
            given_back = self.store.release(job_id, owner, run_seconds=run.elapsed())
            log.error("job %s: Redis unreachable (%s: %s); %s", job_id, type(e).__name__, e,
                      "given back to the queue" if given_back else "its lease was already lost")
            return Outcome.RELEASED.value
        except OUTAGES:
            raise  # the store away: the job's lease runs out and another worker takes it over
        except BaseException as e:  # noqa: BLE001 (a bug in the job's thread: supervise's rule)
            supervise.crash("job", e)
            raise
        finally:
            self.running.pop(job_id, None)

    def _lifecycle(self, run: RunningJob, kind: JobKind) -> Outcome:
        store, job_id = self.store, run.job_id
        job = store.get_job(job_id)
        attempt = store.record_attempt(job_id, run.owner, worker=self.worker_name, provenance=kind.provenance)
        if attempt is None:
            log.warning("job %s: lease lost before it started", job_id)
            return Outcome.LEASE_LOST
        try:
            start = run.pub.claim(events.start(self.worker_name, kind.device, run.attempt), attempt=attempt)
        except redis.ResponseError as e:  # Redis refuses writes (full to its maxmemory): the job fails, as it
            refused = PublishRefused(f"Redis refused the job's events: {e}")  # does when a later publish is
            ending = Ending(JobStatus.FAILED, error_fields(refused))          # refused, not left running
        else:
            try:
                ending = kind.run(run, job, attempt, start)
            except LeaseLost:
                log.warning("job %s: lease lost to another worker; stopping without writing", job_id)
                return Outcome.LEASE_LOST
        result = {} if ending.result is None else {"result": ending.result}
        if not store.finish(job_id, run.owner, ending.status, run_seconds=run.elapsed(), **result,
                            **ending.fields, **ending.error):
            return Outcome.LEASE_LOST
        try:
            run.publish([events.end(ending.status.value, ending.error.get("error_message"), ending.result)])
        except LeaseLost:
            pass  # the store has the end; tailers read it from there
        except redis.RedisError as e:  # likewise
            log.warning("job %s: its end was not published (%s: %s); the store has it", job_id, type(e).__name__, e)
        try:
            self.redis.delete(self.keys.cancel(job_id))
        except redis.RedisError:
            pass  # it expires
        log.info("job %s %s%s", job_id, ending.status.value, ending.summary)
        return Outcome(ending.status.value)

    def _not_run(self, job_id: str, claim: Claim) -> None:
        """Say why a delivery was not run; a job ended by the claim gets its "end" event."""
        log.info("job %s not run: %s", job_id, claim.reason)
        try:
            if claim.reason in ("too many deliveries", "cancelled"):
                job = self.store.get_job(job_id)
                self.publisher(job_id, None).publish([events.end(job.status, job.error_message)])
            elif claim.reason == "missing":  # not this store's job: kept for a person to look at, never dropped
                store = self.store.engine.url.render_as_string()
                log.error("job %s: a message for a job this worker's store (%s) does not know; kept in Redis "
                          "list %s", job_id, store, self.keys.unknown_jobs)
                self.redis.rpush(self.keys.unknown_jobs, json.dumps(
                    {"job": job_id, "worker": self.worker_name, "store": store, "at": time.time()}))
        except redis.RedisError as e:  # the store has the job's end; tailers read it from there
            log.error("job %s: %s, and Redis did not take it (%s: %s)", job_id, claim.reason, type(e).__name__, e)
