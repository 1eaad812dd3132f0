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
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from gencli.model.checkpoint import LoadedModel, load_model
from gencli.model.textgen import TextGenerator
from gencli.storage.settings import Settings
from gencli.storage.store import Claim, Store
from gencli.worker import supervise
from gencli.worker.batcher import Batcher
from gencli.worker.keys import Keys
from gencli.worker.running import RunningJob
from gencli.worker.stream import Publisher, end_event
from gencli.worker.supervise import OUTAGES

log = logging.getLogger("gencli.worker")


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

    def publisher(self, job_id: str, owner: str | None) -> Publisher:
        s = self.settings
        return Publisher(self.redis, self.keys, job_id, owner=owner, ttl=s.stream_ttl, max_events=s.stream_max_events)

    def run_job(self, job_id: str, body: Callable[[RunningJob], str], *, stoppable: bool = False) -> str:
        """Claim the job under a fresh lease owner and run body(run) while it is one of the running
        jobs; or return why it was not claimed. stoppable: body stops the job at its hard time
        limit (else the lease thread ends the process)."""
        owner = uuid.uuid4().hex
        s = self.settings
        claim = self.store.claim(job_id, owner=owner, worker=self.worker_name, device=self.device,
                                 lease_seconds=s.lease_seconds, max_deliveries=s.max_deliveries)
        if not claim.ok:
            self._not_run(job_id, claim)
            return claim.reason
        run = RunningJob(job_id, owner, claim.attempt, self.publisher(job_id, owner), self.redis, self.keys,
                         run_seconds_before=claim.run_seconds, stoppable=stoppable, cancel_seen=claim.cancelled)
        self.running[job_id] = run
        try:
            self.redis.delete(self.keys.sent(job_id))
            return body(run)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            # Redis stayed away longer than the client's retries (about a minute): the job is not
            # failed for it but given back, its progress checkpointed in the store; a worker sends
            # it again once Redis is back (serve._resend_lost) and resumes it from the checkpoint.
            given_back = self.store.release(job_id, owner, run_seconds=run.elapsed())
            log.error("job %s: Redis unreachable (%s: %s); %s", job_id, type(e).__name__, e,
                      "given back to the queue" if given_back else "its lease was already lost")
            return "released"
        except OUTAGES:
            raise  # the store away: the job's lease runs out and another worker takes it over
        except BaseException as e:  # noqa: BLE001 (a bug in the job's thread: supervise's rule)
            supervise.crash("job", e)
            raise
        finally:
            self.running.pop(job_id, None)

    def _not_run(self, job_id: str, claim: Claim) -> None:
        """Say why a delivery was not run; a job ended by the claim gets its "end" event."""
        log.info("job %s not run: %s", job_id, claim.reason)
        try:
            if claim.reason in ("too many deliveries", "cancelled"):
                job = self.store.get_job(job_id)
                self.publisher(job_id, None).publish([end_event(job.status, job.error_message)])
            elif claim.reason == "missing":  # not this store's job: kept for a person to look at, never dropped
                store = self.store.engine.url.render_as_string()
                log.error("job %s: a message for a job this worker's store (%s) does not know; kept in Redis "
                          "list %s", job_id, store, self.keys.unknown_jobs)
                self.redis.rpush(self.keys.unknown_jobs, json.dumps(
                    {"job": job_id, "worker": self.worker_name, "store": store, "at": time.time()}))
        except redis.RedisError as e:  # the store has the job's end; tailers read it from there
            log.error("job %s: %s, and Redis did not take it (%s: %s)", job_id, claim.reason, type(e).__name__, e)
