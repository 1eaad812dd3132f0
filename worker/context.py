"""What a worker process holds for its whole life, and the steps every kind of job shares."""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from gencli.model.checkpoint import LoadedModel, load_model
from gencli.model.textgen import TextGenerator
from gencli.storage.settings import Settings
from gencli.storage.store import Claim, Store
from gencli.worker.app import sent_key
from gencli.worker.stream import Publisher, read_log

log = logging.getLogger("gencli.worker")


@dataclass
class WorkerContext:
    """The model (loaded once; None on a worker that only preps datasets) and the clients."""

    settings: Settings
    store: Store
    redis: redis.Redis
    worker_name: str
    model_name: str | None = None
    loaded: LoadedModel | None = None
    batch_size: int = 8
    current: dict | None = None  # {"job": id, "owner": lease owner} while a job runs
    lease_lost: set = field(default_factory=set)  # owners whose lease renewal failed
    generator: TextGenerator | None = field(init=False, default=None)
    _cpu: TextGenerator | None = field(init=False, default=None)

    def __post_init__(self):
        if self.loaded is not None:
            self.generator = TextGenerator(self.loaded)

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

    def run_job(self, job_id: str, body: Callable[[str, str, int], str]) -> str:
        """Claim the job under a fresh lease owner and run body(job_id, owner, attempt) while it is
        the current job; or return why it was not claimed."""
        owner = uuid.uuid4().hex
        claim = self.claim(job_id, owner)
        if not claim.ok:
            return claim.reason
        self.current = {"job": job_id, "owner": owner, "started": time.monotonic()}
        try:
            return body(job_id, owner, claim.attempt)
        finally:
            self.current = None
            self.lease_lost.discard(owner)

    def claim(self, job_id: str, owner: str) -> Claim:
        """Take the job under a lease, or say why not; a job ended here gets its "end" event."""
        s = self.settings
        claim = self.store.claim(job_id, owner=owner, worker=self.worker_name, device=self.device,
                                 lease_seconds=s.lease_seconds, max_deliveries=s.max_deliveries)
        if claim.ok:
            self.redis.delete(sent_key(job_id))
        else:
            log.info("job %s not run: %s", job_id, claim.reason)
            if claim.reason in ("too many deliveries", "cancelled"):
                job = self.store.get_job(job_id)
                self.publisher(job_id).publish([end_event(job.status, job.error_message)])
        return claim

    def publisher(self, job_id: str, events: list[dict] | None = None) -> Publisher:
        """A publisher numbering on from the job's log (events: the log, if already read)."""
        events = read_log(self.redis, job_id) if events is None else events
        return Publisher(self.redis, job_id, last_seq=events[-1]["seq"] if events else 0, ttl=self.settings.stream_ttl)


def end_event(status: str, error: str | None = None) -> dict:
    return {"t": "end", "status": status, "error": error}


def error_fields(e: BaseException, stats: dict | None = None) -> dict:
    """How a failure is stored: class, message, and where (file:line, device, batch size)."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{tb[-1].filename}:{tb[-1].lineno} in {tb[-1].name}" if tb else ""
    if stats:
        where += f"; device {stats.get('final_device')}, batch size {stats.get('final_batch_size')}"
    return {"error_class": type(e).__name__, "error_message": str(e)[:2000], "error_where": where}
