"""One thread owns the model and decodes every running job's sequences in one batch.

A worker holds up to --max-jobs jobs at once, each a Celery task on its own thread of Celery's
threads pool. Why that pool: a task returns (and its message is acked) only when its job has
ended, as with one job at a time, and since prefetch is one message per pool thread a worker
with every thread busy takes no more messages (back-pressure). The other way, the solo pool with
several prefetched messages, runs one task at a time, so a task could only hand its job over and
return at once, acking its message long before the job ends. The pool threads only wait and
write to the store; the model is this module's thread's alone.

Three kinds of thread:
- the batcher (`Batcher`): admits the jobs' sequences into the engine (priority, then age, a
  cap of slots per job), steps it, turns ids into text and stream events, and hands each step's
  events to the outbox; it never waits on Redis or the store;
- the outbox (`Outbox`): publishes the events of every job of a step in one Redis round trip
  (several steps' worth when Redis was slow), reading the jobs' cancel flags in the same trip,
  counts what each item has published, and tells a job when its items ended;
- each job's thread (runner.GenerationJob): checkpoints what was published, saves finished
  items, watches cancel, lease and time limits, and ends the job.

Out of memory: the engine preempts its newest sequences and runs fewer rows (each rung is
recorded on the jobs that had rows running); with one row left on a GPU, that job's sequences go
on on a CPU copy of the model, stepped by this thread too; on the CPU the job fails.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import redis
import torch

from gencli.model.engine import Engine
from gencli.model.textgen import Delta, TextGenerator
from gencli.worker import supervise
from gencli.worker.events import tok as tok_event
from gencli.worker.logprobs import event_lp
from gencli.worker.messages import (
    CancelRequested,
    DecodeFailed,
    MemoryRung,
    Published,
    PublishFailed,
    RedisLost,
    Stopped,
    StreamTaken,
)
from gencli.worker.rows import ItemRun
from gencli.worker.running import Decoding
from gencli.worker.stream import publish_many

log = logging.getLogger("gencli.worker")


@dataclass(frozen=True)
class _Add:
    """A job's items, to decode beside the rest."""

    job: Decoding
    runs: tuple[ItemRun, ...]


@dataclass(frozen=True)
class _Stop:
    """Take a job's rows out (Batcher.stop)."""

    job: Decoding
    cancelled: bool


# What the batcher hands the outbox, a list of these per step:
@dataclass
class _Emitted:
    """A job's events of one step, and its items that ended with them."""

    job: Decoding
    events: list[dict]
    ended: list[ItemRun]


@dataclass(frozen=True)
class _Halted:
    """A job's rows left the batch: once what came before is published, the job is told Stopped."""

    job: Decoding


class Batcher:
    def __init__(self, gen: TextGenerator, r: redis.Redis, *, slots: int, max_per_group: int | None,
                 cpu_generator: Callable[[], TextGenerator], inject_crash: str | None = None):
        """gen: the model to decode with; r: where the outbox publishes; slots: rows decoded
        together, over all jobs, at most max_per_group of one job's; cpu_generator: the model on
        the CPU, made when a GPU runs out of memory at one row; inject_crash: GENCLI_INJECT_CRASH."""
        self.gen = gen
        self.slots, self.max_per_group = slots, max_per_group
        self.cpu_generator = cpu_generator
        self.engine = self.gen.engine(slots, max_per_group=max_per_group)
        self._cpu: tuple[TextGenerator, Engine] | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.inject_crash = inject_crash
        self.outbox = Outbox(r, inject_crash)
        self.step_started: float | None = None  # when the step running now began (None: between steps)
        self._load = {"running": 0, "waiting": 0}  # replaced whole by this thread, read by the heartbeat
        # Since the worker started (the heartbeat carries them to the API's /metrics):
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "oom_retries": 0, "preemptions": 0}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def add(self, job: Decoding, runs: list[ItemRun]) -> None:
        """Decode these items of a job, beside whatever else is running."""
        self._start()
        self._inbox.put(_Add(job, tuple(runs)))

    def stop(self, job: Decoding, *, cancelled: bool) -> None:
        """Take a job's rows out: cancelled ends each unfinished item with its held-back text (a
        cancel, a time limit); else they are just forgotten (the lease is lost, the job failed).
        Either way the job is then told Stopped, through the outbox, after every event of its rows."""
        self._inbox.put(_Stop(job, cancelled))

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self.outbox.start()
                self._thread = supervise.start("batcher", self._loop)

    def load(self) -> dict:
        """Sequences decoding now and waiting for a slot, as of this thread's last look, and the
        counters (read by the heartbeat, which must not walk the engine's structures meanwhile)."""
        return {**self._load, **self.counters}

    def _note_load(self) -> None:
        engines = [e for _, e in self._engines()]
        self._load = {"running": sum(len(e.running) for e in engines),
                      "waiting": sum(len(e.scheduler) for e in engines)}

    def _engines(self) -> list[tuple[TextGenerator, Engine]]:
        return [(self.gen, self.engine)] + ([self._cpu] if self._cpu else [])

    def _loop(self) -> None:
        while True:
            self._take_inbox(block=not any(e for _, e in self._engines()))
            self._note_load()
            for gen, engine in self._engines():
                if not engine:
                    continue
                self.step_started = time.monotonic()
                try:
                    deltas = gen.step(engine)
                except torch.OutOfMemoryError:
                    deltas = []
                    self._out_of_memory_at_one_row(engine)
                except Exception as e:  # a bug or a broken device: fail the jobs in the step, not the worker
                    log.exception("decoding step failed")
                    deltas = []
                    for job in {s.group for s in engine.running}:
                        self._fail(job, e)
                finally:
                    self.step_started = None
                self._record_rungs(engine)
                if deltas:
                    supervise.crash_point(self.inject_crash, "batcher")
                    self._emit(deltas)

    def _take_inbox(self, block: bool) -> None:
        while True:
            try:
                msg = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return
            block = False
            match msg:
                case _Add(job, runs):
                    try:
                        for r in runs:
                            if r.rescore is not None:
                                r.seq = self.gen.rescoring(r.prompt_ids, r.params, r.rescore, r.stream,
                                                           index=r.idx, group=job, priority=job.priority)
                            else:
                                r.seq = self.gen.sequence(r.prompt_ids, r.params, resume=r.stream,
                                                          index=r.idx, group=job, priority=job.priority)
                            r.engine = self.engine
                            self.engine.add(r.seq)
                            self.counters["prompt_tokens"] += len(r.prompt_ids)
                    except Exception as e:  # an item the engine refuses fails its job, not the batcher
                        log.exception("job %s: its items could not join the batch", job.run.job_id)
                        self._fail(job, e)
                case _Stop(job, cancelled):
                    self._stop(job, cancelled)

    def _stop(self, job: Decoding, cancelled: bool) -> None:
        events, ended = [], []
        for r in job.runs.values():
            if r.seq is None or r.seq.finished:
                continue
            r.engine.finish(r.seq)
            if cancelled:
                if r.rescore is None:  # (a rescored item ended before: it keeps its end, its logprobs unmade)
                    events.append(_tok(r, None, r.stream.finish("cancelled"), "cancelled"))
                ended.append(r)
        self.outbox.put([_Emitted(job, events, ended), _Halted(job)])

    def _fail(self, job: Decoding, error: BaseException) -> None:
        job.run.tell(DecodeFailed(error))
        self._stop(job, cancelled=False)

    def _emit(self, deltas: list[Delta]) -> None:
        per_job: dict[Decoding, tuple[list[dict], list[ItemRun]]] = {}
        for d in deltas:
            job = d.seq.group
            r = job.runs[d.seq.index]
            events, ended = per_job.setdefault(job, ([], []))
            if r.rescore is None:  # (a rescored item's tokens and end were published by its first worker)
                events.append(_tok(r, d.token, d.text, d.finish_reason, event_lp(d.seq) if d.token is not None else None))
            self.counters["generation_tokens"] += d.token is not None
            if d.finish_reason:
                ended.append(r)
        self.outbox.put([_Emitted(job, events, ended) for job, (events, ended) in per_job.items()])

    def _record_rungs(self, engine: Engine) -> None:
        for rung in engine.rungs:
            self.counters["oom_retries"] += 1
            self.counters["preemptions"] += len(rung.preempted)
            for job in dict.fromkeys(s.group for s in rung.running):
                job.run.tell(MemoryRung(rung.limit))
                log.warning("job %s: out of memory on %s at %d rows; going on at %d rows, %d preempted",
                            job.run.job_id, engine.device, len(rung.running), rung.limit, len(rung.preempted))
        engine.rungs.clear()

    def _out_of_memory_at_one_row(self, engine: Engine) -> None:
        """One row and still out of memory: on a GPU the job goes on on the CPU copy; on the CPU it fails."""
        job = engine.running[0].group
        self.counters["oom_retries"] += 1
        if engine.device.type == "cpu":
            job.run.tell(MemoryRung(1))
            self._fail(job, MemoryError("out of memory even on the CPU at batch size 1"))
            return
        log.warning("job %s: out of memory on %s at batch size 1; going on on the CPU", job.run.job_id,
                    engine.device)
        if self._cpu is None:
            gen = self.cpu_generator()
            self._cpu = (gen, gen.engine(self.slots, max_per_group=self.max_per_group))
        cpu = self._cpu[1]
        job.run.tell(MemoryRung(1, "cpu"))
        for r in job.runs.values():
            if r.seq is not None and not r.seq.finished and r.engine is engine:
                r.seq = engine.take_out(r.seq)
                r.engine = cpu
                cpu.add(r.seq)


PUBLISHED_EVERY = 0.1  # seconds: how stale a job's checkpoint snapshot may be beyond the lease thread's own pace


def _tok(r: ItemRun, token: int | None, text: str, finish: str | None, lp: list | None = None) -> dict:
    return tok_event(r.idx, r.epoch, token, text, finish, lp)


class Outbox:
    """Publishes steps' events off the decoding thread, all jobs of a step in one round trip."""

    def __init__(self, r: redis.Redis, inject_crash: str | None = None):
        self.r = r
        self.inject_crash = inject_crash
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._told_cancel: weakref.WeakSet = weakref.WeakSet()  # jobs told of their Redis cancel flag
        self._held_back: weakref.WeakSet = weakref.WeakSet()  # jobs whose lease clock ran out
        # ids published but not yet told to their job (it is told when items end, when it is
        # stopped, and at most every PUBLISHED_EVERY seconds: not woken at every step)
        self._untold: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._told_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def start(self) -> None:
        self._thread = supervise.start("outbox", self._loop)

    def put(self, step: list[_Emitted | _Halted]) -> None:
        """One step's events, job by job, in order."""
        self._q.put(step)

    def _loop(self) -> None:
        while True:
            steps = [self._q.get()]
            while True:  # what piled up while Redis was slow goes out together
                try:
                    steps.append(self._q.get_nowait())
                except queue.Empty:
                    break
            batch: dict[Decoding, _Emitted] = {}  # per job, what piled up, in order
            for step in steps:
                for entry in step:
                    match entry:
                        case _Halted(job):  # flush what came before, then say so
                            self._send(list(batch.values()))
                            batch = {}
                            if job in self._untold:
                                self._tell_published(job, ())
                            job.run.tell(Stopped())
                        case _Emitted(job, events, ended) if job in batch:
                            batch[job].events.extend(events)
                            batch[job].ended.extend(ended)
                        case _Emitted(job, events, ended):
                            batch[job] = _Emitted(job, list(events), list(ended))
            self._send(list(batch.values()))

    def _tell_published(self, job: Decoding, ended) -> None:
        ids = self._untold.pop(job, {})
        self._told_at[job] = time.monotonic()
        job.run.tell(Published({i: tuple(v) for i, v in ids.items()}, tuple(ended)))

    def _send(self, batch: list[_Emitted]) -> None:
        live = []
        for job, events, ended in ((e.job, e.events, e.ended) for e in batch):
            if events and not job.run.lease.holds():  # (see running.LeaseClock) the job's thread stops it
                if job not in self._held_back:
                    self._held_back.add(job)
                    log.warning("job %s: its lease may have run out (was this worker stopped?): its events are "
                                "held back, and another worker takes the job over", job.run.job_id)
                    job.run.tell(StreamTaken("its lease may have run out"))
            elif events:
                live.append((job, events, ended))
            elif ended:
                self._tell_published(job, ended)
        if not live:
            return
        supervise.crash_point(self.inject_crash, "outbox")
        cancels = tuple(job.run.keys.cancel(job.run.job_id) for job, _, _ in live)
        try:  # the jobs' cancel flags ride along: no job thread polls Redis for its own
            refusals, cancelled = publish_many(self.r, [(job.run.pub, events) for job, events, _ in live], cancels)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            for job, _, _ in live:
                job.run.tell(RedisLost(e))
            return
        except redis.RedisError as e:  # Redis refused the publish itself (out of memory, say): the jobs
            for job, _, _ in live:     # fail, and their rows must leave the batch
                job.run.tell(PublishFailed(e))
            return
        for (job, events, ended), refused, cancel in zip(live, refusals, cancelled, strict=True):
            if refused:
                job.run.tell(StreamTaken(refused))
            else:
                ids = self._untold.setdefault(job, {})
                for e in events:
                    if e["id"] is not None:
                        ids.setdefault(e["i"], []).append(e["id"])
                if ended or time.monotonic() - self._told_at.get(job, 0.0) >= PUBLISHED_EVERY:
                    self._tell_published(job, ended)
            if cancel and job not in self._told_cancel:
                self._told_cancel.add(job)
                job.run.tell(CancelRequested())
