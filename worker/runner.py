"""Running a generation job on a worker: `GenerationJob`, one object per running job.

The job's thread (a Celery pool thread, see worker/batcher.py) claims the job, resumes its
pending items, and hands them to the worker's batcher as engine sequences, beside every other
running job's. While the batcher decodes, this thread takes what the outbox published for the
job: it saves each finished item in the store at once, checkpoints the ids each running item
has published every few hundred milliseconds, and watches the job's cancel, lease and time
limits, taking the job's rows out of the batch when one is hit. Ways a job is interrupted, each
handled by resuming items where they were:
- out of memory: the engine preempts sequences and runs fewer rows; a preempted sequence is
  prefilled again from its ids so far, so the output does not change (worker/batcher.py);
- the worker died: the next worker continues each item from the replay log when the log is
  whole (so a tailer sees no token twice), else from the store's checkpoint, telling tailers
  with a "resync" event; tokens of an item's earlier epoch (before a retry) are never reused;
- cancel: the running items stop within a step and keep their partial output; a job cancelled
  while its worker was dead or stopped is claimed once more only to end each item with what
  it had made (Store.claim's `cancelled`), so the store keeps what readers saw.
"""

from __future__ import annotations

import logging
import secrets
import time

import redis

from gencli.model.errors import GencliError
from gencli.model.params import SamplingParams, resolve_sampling
from gencli.storage.db import ItemStatus, JobRow, JobStatus
from gencli.worker import events, supervise
from gencli.worker.context import Ending, WorkerContext
from gencli.worker.logprobs import record_of
from gencli.worker.messages import DecodeFailed, Idle, MemoryRung, Published, PublishFailed, RedisLost, Stopped
from gencli.worker.rows import ItemRun
from gencli.worker.running import (
    HardTimeLimitExceeded,
    JobCancelled,
    LeaseLost,
    PublishRefused,
    RunningJob,
    TimeLimitExceeded,
    error_fields,
)
from gencli.worker.stream import gapless, read_log

log = logging.getLogger("gencli.worker")
WATCH_EVERY = 0.25  # seconds between a job's looks at its soft time limit (flags set elsewhere wake it at once)


class ModelChanged(Exception):
    """A replay job reached a worker whose model is not the one its original ran on."""


def sampling_record(params: SamplingParams, drawn: bool) -> dict:
    """What an item samples with, as the store records it (model/params.py's keys, resolved)."""
    return params.as_json() | {"seed_drawn": drawn}


def run_generation_job(ctx: WorkerContext, job_id: str) -> str:
    """Run (or resume) one job; return how it ended, or why it was not run."""
    return ctx.run_job(job_id, Generation(ctx))


class Generation:
    """The generation kind of job (context.JobKind): its body is a GenerationJob's."""

    stoppable = True  # its rows leave the batch at a hard time limit, and the process lives on

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.device = ctx.device
        self.provenance = ctx.provenance

    def run(self, run: RunningJob, job: JobRow, attempt: int, start: int) -> Ending:
        return GenerationJob(self.ctx, run, attempt).execute(job, start)


class GenerationJob:
    """One running job, and this thread's alone: its claim (`run`, whose inbox the batcher, the
    outbox and the lease thread write to), its items (`runs`, by index) and the out-of-memory
    rungs that hit it (`stats`)."""

    def __init__(self, ctx: WorkerContext, run: RunningJob, attempt: int):
        self.ctx = ctx
        self.run = run
        self.runs: dict[int, ItemRun] = {}
        self.priority = 0
        self.attempt = attempt  # this claim's number among the job's recorded attempts
        self.stats = {"oom_retries": 0, "final_batch_size": ctx.batcher.engine.limit, "final_device": ctx.device}

    def execute(self, job: JobRow, start: int) -> Ending:
        """Resume the job's items after what the log before `start` holds, decode them, and say
        how the job ended (LeaseLost when another worker owns it)."""
        ctx, run = self.ctx, self.run
        store, job_id = ctx.store, run.job_id
        self.priority = job.priority
        earlier = read_log(ctx.redis, ctx.keys, job_id, upto=start - 1)  # no stale publish lands after the claim
        streamed = _streamed_ids(earlier) if gapless(earlier, 0, start - 1) else None
        status, error = JobStatus.SUCCEEDED, {}
        runs, resynced = self._resume_items(job, streamed)
        if resynced:
            run.publish([events.resync([(r.idx, r.epoch, r.stream.text) for r in resynced])])
        if runs:
            supervise.crash_point(ctx.settings.inject_crash, "job")
        t0 = time.perf_counter()
        tokens_before = sum(len(r.stream.ids) for r in runs)
        try:
            if run.cancel_seen:  # cancelled before this claim (Claim.cancelled) or since: end, do not decode
                self._end_cancelled(runs)
                raise JobCancelled()
            self._check_model(job)
            self._decode(runs)
        except JobCancelled:
            status = JobStatus.CANCELLED
        except (LeaseLost, redis.ConnectionError, redis.TimeoutError):
            raise  # not the job's end (another worker owns it; Redis away for good: run_job gives it back)
        except Exception as e:  # the job fails; the worker lives on to take the next one
            status = JobStatus.FAILED
            error = error_fields(e, self.stats)
            log.error("job %s failed: %s: %s", job_id, type(e).__name__, e)
        elapsed = time.perf_counter() - t0
        all_items = store.items(job_id)
        failed_items = sum(1 for it in all_items if it.status == ItemStatus.FAILED.value)
        if status is JobStatus.SUCCEEDED and failed_items:
            status = JobStatus.FAILED
            error = {"error_class": "ItemsFailed",
                     "error_message": f"{failed_items} of {len(all_items)} items failed: see gencli show {job_id}"}
        made = sum(len(r.stream.ids) for r in runs) - tokens_before
        completion = sum(it.completion_tokens or 0 for it in all_items)
        fields = dict(completion_tokens=completion, tokens_per_s=made / elapsed if elapsed > 0 and made else None,
                      **self.stats)
        summary = (f": {made} tokens in {elapsed:.2f} s ({made / elapsed if elapsed > 0 else 0.0:.1f} tokens/s) "
                   f"on {self.stats['final_device']}")
        return Ending(status, error, fields, summary=summary)

    def _decode(self, runs: list[ItemRun]) -> None:
        """Hand the items to the batcher and look after them until each has ended; raise what
        stopped the job early (JobCancelled, a time limit, LeaseLost, a failure). What the other
        threads have to say arrives on the job's inbox (worker/messages.py); the lease thread
        checkpoints what was published meanwhile, from the snapshot `run.checkpoint`."""
        if not runs:
            return
        run, batcher = self.run, self.ctx.batcher
        self.runs = {r.idx: r for r in runs}
        pending = set(self.runs)
        limit = self.ctx.settings.soft_time_limit
        self._snapshot(pending)
        batcher.add(self, runs)
        stopping: BaseException | None = None  # raised once the batcher has let go of the job's rows
        try:
            while pending or stopping is not None:
                wait = WATCH_EVERY if not limit else max(0.0, min(WATCH_EVERY, limit - run.elapsed()))
                match run.wait(wait):
                    case Published(ids, ended):
                        for idx, new in ids.items():
                            self.runs[idx].published.extend(new)
                        for r in ended:  # published, to its last event
                            self._save(r)
                            pending.discard(r.idx)
                        self._snapshot(pending)
                    case Stopped():
                        if stopping is not None:
                            raise stopping
                    case RedisLost(error):
                        batcher.stop(self, cancelled=False)
                        raise error
                    case DecodeFailed(error):
                        stopping = stopping or error  # the batcher took the rows out already
                    case PublishFailed(error):  # take the rows out, then fail
                        if stopping is None:
                            batcher.stop(self, cancelled=False)
                        stopping = stopping or PublishRefused(f"Redis refused the job's events: {error}")
                    case Idle():  # nothing published for a while: a cancel must not wait for the step
                        run.look_for_cancel(WATCH_EVERY)
                    case MemoryRung(batch_size, device):
                        self.stats["oom_retries"] += 1
                        self.stats["final_batch_size"] = batch_size
                        if device is not None:
                            self.stats["final_device"] = device
                if stopping is None:
                    try:
                        run.check(polling=False)
                        if limit and run.elapsed() > limit:
                            raise TimeLimitExceeded(f"soft time limit of {limit:g} s exceeded")
                    except LeaseLost:
                        batcher.stop(self, cancelled=False)
                        raise
                    except HardTimeLimitExceeded:
                        stopping = HardTimeLimitExceeded.after(self.ctx.settings.hard_time_limit)
                        batcher.stop(self, cancelled=True)
                    except (JobCancelled, TimeLimitExceeded) as e:
                        stopping = e
                        batcher.stop(self, cancelled=True)
        finally:
            run.checkpoint = None  # no checkpoint after this: the items are saved, or the job is stopped

    def _snapshot(self, pending: set[int]) -> None:
        """What the lease thread checkpoints next: each running item's ids published so far."""
        self.run.checkpoint = tuple((r.idx, r.epoch, tuple(r.published)) for r in self.runs.values()
                                    if r.idx in pending)

    def _end_cancelled(self, runs: list[ItemRun]) -> None:
        """End each resumed item as cancelled, with what earlier attempts made of it: the text
        readers saw (from the log), or the checkpoint they were told to resync to."""
        if not runs:
            return
        try:
            self.run.publish([events.tok(r.idx, r.epoch, None, r.stream.finish("cancelled"), "cancelled")
                              for r in runs])
        except redis.ResponseError as e:  # Redis refused it (full, say): the store's record is what counts
            log.warning("job %s: its cancelled lines' last events were not published (%s); the store has them",
                        self.run.job_id, e)
        for r in runs:
            self._save(r)

    def _check_model(self, job) -> None:
        """A replay job (gencli replay --queue) runs only on the model its original ran on."""
        want = ((job.params.get("meta") or {}).get("replay") or {}).get("model_sha256")
        have = self.ctx.provenance["model"]["sha256"]
        if want and want != have:
            raise ModelChanged(f"this replay needs the model with sha256 {want}; worker {self.ctx.worker_name} "
                               f"serves {self.ctx.model_name} with sha256 {have}")

    def _save(self, r: ItemRun) -> None:
        status = ItemStatus.CANCELLED if r.stream.finish_reason == "cancelled" else ItemStatus.SUCCEEDED
        model = (r.engine or self.ctx.batcher.engine).model
        if not self.ctx.store.save_item(self.run.job_id, self.run.owner, r.idx, epoch=r.epoch, status=status,
                                        output=r.stream.text, finish_reason=r.stream.finish_reason,
                                        prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.stream.ids),
                                        ids=r.stream.ids, attempt=self.attempt, device=str(model.lm_head.weight.device),
                                        dtype=model.dtype_name, logprobs=record_of(r.seq, r.spans)):
            self.ctx.batcher.stop(self, cancelled=False)
            raise LeaseLost(f"job {self.run.job_id}: lease lost")

    def _save_failed(self, idx: int, epoch: int, error: str) -> None:
        if not self.ctx.store.save_item(self.run.job_id, self.run.owner, idx, epoch=epoch, status=ItemStatus.FAILED,
                                        output=None, finish_reason=None, prompt_tokens=None,
                                        completion_tokens=None, error=error):
            raise LeaseLost(f"job {self.run.job_id}: lease lost")
        self.run.publish([events.item_failed(idx, error)])

    def _resume_items(self, job, streamed) -> tuple[list[ItemRun], list[ItemRun]]:
        """The job's pending items, each continued from where an earlier attempt left it: (to run,
        those resumed from the store's checkpoint rather than the log). streamed: per item, the
        (epoch, id, finish) the whole replay log holds, or None when the log lost events."""
        gen = self.ctx.generator
        chat, truncate = bool(job.params.get("chat")), bool(job.params.get("truncate"))
        runs, resynced, finished, starting = [], [], [], []
        for item in self.ctx.store.items(self.run.job_id):
            if item.status != ItemStatus.PENDING.value:
                continue
            try:
                params = resolve_sampling(job.params, item.params, gen.block_size,
                                          vocab_size=gen.model.config.vocab_size)
                ids, spans = gen.encode_line(item.prompt, chat=chat)
                ids = gen.fit(ids, params.max_tokens, truncate=truncate)
            except GencliError as e:
                self._save_failed(item.idx, item.epoch, str(e))
                continue
            if item.sampling:  # an earlier attempt started it: the same seed, so it samples what it would have
                params = params.seeded(item.sampling["seed"])
            else:  # recorded before its first token, a drawn seed too, so the line can be replayed
                drawn = params.seed is None
                params = params.seeded(secrets.randbelow(2**63)) if drawn else params
                starting.append((item.idx, item.epoch, sampling_record(params, drawn)))
            stream = gen.new_stream(params)
            checkpoint = list(item.ids or [])
            logged = [(t, f) for epoch, t, f in (streamed or {}).get(item.idx, []) if epoch == item.epoch]
            logged_ids = [t for t, _ in logged if t is not None]
            from_log = streamed is not None and logged_ids[:len(checkpoint)] == checkpoint
            if from_log:  # what tailers saw: continue right after it
                for token, finish in logged:
                    if token is not None:
                        stream.feed(token)
                    if finish and not stream.finished:
                        stream.finish(finish)
            else:  # the log lost events: the store's checkpoint is the record
                for token in checkpoint:
                    stream.feed(token)
            if not stream.finished and stream.ids and len(stream.ids) >= params.max_tokens:
                stream.finish("length")
            r = ItemRun(item.idx, item.epoch, ids, stream, params, published=list(stream.ids),
                        spans=spans)
            if not from_log:  # what readers saw of it may be more than the checkpoint: rebase them
                resynced.append(r)
            if stream.finished and not params.scores:  # made whole, but the worker died before recording it
                finished.append(r)
            else:
                if stream.finished:  # ...and its logprobs, which the store keeps, are made again
                    r.rescore = logged_ids if from_log else checkpoint
                runs.append(r)
        if not self.ctx.store.start_items(self.run.job_id, self.run.owner, starting):
            raise LeaseLost(f"job {self.run.job_id}: lease lost")
        for r in finished:
            self._save(r)
        return runs, resynced


def _streamed_ids(events: list[dict]) -> dict[int, list[tuple[int, int | None, str | None]]]:
    """Per item, the (epoch, token id, finish reason) triples of its "tok" events."""
    out: dict[int, list[tuple[int, int | None, str | None]]] = {}
    for e in events:
        if e["t"] == "tok":
            out.setdefault(e["i"], []).append((e.get("e", 0), e["id"], e.get("finish")))
    return out
