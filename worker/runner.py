"""Running a generation job on a worker: plain functions, called by the Celery task and by tests.

A job runs in micro-batches of its pending items. Each decoding step's tokens go out through
the job's stream (worker.stream), guarded by the job's lease; every few hundred milliseconds the
ids each running item has made so far are checkpointed in the store, and each finished item is
written there at once. Three ways a job can be interrupted are all handled by resuming items
where they were:
- out of memory: free memory, halve the micro-batch and retry the failed part, down to 1, then
  go on on the CPU (a second copy of the model, loaded when first needed);
- the worker died: the next worker continues each item from the replay log when the log is
  whole (so a tailer sees no token twice), else from the store's checkpoint, telling tailers
  with a "resync" event; tokens of an item's earlier epoch (before a retry) are never reused;
- cancel: the running items stop within a step and keep their partial output.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import redis
import torch

from gencli.model.errors import GencliError
from gencli.model.params import SamplingParams, resolve_sampling
from gencli.model.textgen import TextGenerator
from gencli.model.textstream import TextStream
from gencli.storage.db import ItemStatus, JobStatus
from gencli.worker.context import (
    JobCancelled,
    LeaseLost,
    RunningJob,
    TimeLimitExceeded,
    WorkerContext,
    end_event,
    error_fields,
)
from gencli.worker.stream import read_log, whole

log = logging.getLogger("gencli.worker")
CHECKPOINT_EVERY = 0.3  # seconds between checkpoints of the running items' ids


@dataclass
class ItemRun:
    idx: int
    epoch: int
    prompt_ids: list[int]
    stream: TextStream
    seed: int | None
    params: SamplingParams


def run_generation_job(ctx: WorkerContext, job_id: str) -> str:
    """Run (or resume) one job; return how it ended, or why it was not run."""
    return ctx.run_job(job_id, lambda run: _run_claimed(ctx, run))


def _run_claimed(ctx: WorkerContext, run: RunningJob) -> str:
    store, job_id = ctx.store, run.job_id
    job = store.get_job(job_id)
    start = run.pub.claim({"t": "start", "worker": ctx.worker_name, "device": ctx.device, "attempt": run.attempt})
    earlier = read_log(ctx.redis, ctx.keys, job_id, upto=start - 1)  # no stale publish lands after the claim
    streamed = _streamed_ids(earlier) if whole(earlier, 0, start - 1) else None
    runs, resynced = _resume_items(ctx, run, job, streamed)
    if resynced:
        run.publish([{"t": "resync", "items": [{"i": r.idx, "e": r.epoch, "text": r.stream.text} for r in resynced]}])

    t0 = time.perf_counter()
    tokens_before = sum(len(r.stream.ids) for r in runs)
    stats = {"oom_retries": 0, "final_batch_size": None, "final_device": ctx.device}
    status, error = JobStatus.SUCCEEDED, {}
    try:
        _run_ladder(ctx, run, runs, stats)
    except JobCancelled:
        status = JobStatus.CANCELLED
    except LeaseLost:
        log.warning("job %s: lease lost to another worker; stopping without writing", job_id)
        return "lease lost"
    except (redis.ConnectionError, redis.TimeoutError):
        raise  # Redis away for good: not the job's fault (WorkerContext.run_job gives it back)
    except Exception as e:  # the job fails; the worker lives on to take the next one
        status = JobStatus.FAILED
        error = error_fields(e, stats)
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
    if not store.finish(job_id, run.owner, status, run_seconds=run.unsaved_seconds(), completion_tokens=completion,
                        tokens_per_s=made / elapsed if elapsed > 0 and made else None, **stats, **error):
        return "lease lost"
    try:
        run.publish([end_event(status.value, error.get("error_message"))])
    except LeaseLost:
        pass  # the store has the end; tailers read it from there
    ctx.redis.delete(ctx.keys.cancel(job_id))
    log.info("job %s %s: %d tokens in %.2f s (%.1f tokens/s) on %s", job_id, status.value, made, elapsed,
             made / elapsed if elapsed > 0 else 0.0, stats["final_device"])
    return status.value


def _resume_items(ctx: WorkerContext, run: RunningJob, job, streamed) -> tuple[list[ItemRun], list[ItemRun]]:
    """The job's pending items, each continued from where an earlier attempt left it: (to run,
    those resumed from the store's checkpoint rather than the log). streamed: per item, the
    (epoch, id, finish) the whole replay log holds, or None when the log lost events."""
    gen = ctx.generator
    chat, truncate = bool(job.params.get("chat")), bool(job.params.get("truncate"))
    runs, resynced = [], []
    for item in ctx.store.items(run.job_id):
        if item.status != ItemStatus.PENDING.value:
            continue
        try:
            params, seed, stop = resolve_sampling(job.params, item.params, gen.block_size)
            ids = gen.fit(gen.encode(item.prompt, chat=chat), params.max_tokens, truncate=truncate)
        except GencliError as e:
            _save_failed(ctx, run, item.idx, item.epoch, str(e))
            continue
        stream = gen.new_stream(stop)
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
        if not stream.finished and len(stream.ids) >= params.max_tokens:
            stream.finish("length")
        r = ItemRun(item.idx, item.epoch, ids, stream, seed, params)
        if not from_log:  # what readers saw of it may be more than the checkpoint: rebase them
            resynced.append(r)
        if stream.finished:  # made whole, but the worker died before recording it
            _save(ctx, run, r)
        else:
            runs.append(r)
    return runs, resynced


def _streamed_ids(events: list[dict]) -> dict[int, list[tuple[int, int | None, str | None]]]:
    """Per item, the (epoch, token id, finish reason) triples of its "tok" events."""
    out: dict[int, list[tuple[int, int | None, str | None]]] = {}
    for e in events:
        if e["t"] == "tok":
            out.setdefault(e["i"], []).append((e.get("e", 0), e["id"], e.get("finish")))
    return out


def _run_ladder(ctx: WorkerContext, run: RunningJob, runs: list[ItemRun], stats: dict) -> None:
    """Micro-batches with the out-of-memory ladder: halve, down to 1, then the CPU."""
    gen = ctx.generator
    bs = ctx.batch_size
    todo = list(runs)
    while todo:
        batch = todo[:bs]
        stats["final_batch_size"] = bs
        try:
            _run_batch(ctx, gen, run, batch)
            todo = [r for r in todo if not r.stream.finished]
        except torch.OutOfMemoryError:
            stats["oom_retries"] += 1
            _free_memory()
            todo = [r for r in todo if not r.stream.finished]
            if bs > 1:
                bs = max(1, bs // 2)
                log.warning("job %s: out of memory on %s; retrying at batch size %d", run.job_id, gen.loaded.device,
                            bs)
            elif gen.loaded.device.type != "cpu":
                log.warning("job %s: out of memory on %s at batch size 1; going on on the CPU", run.job_id,
                            gen.loaded.device)
                gen = ctx.cpu_generator()
                stats["final_device"] = "cpu"
            else:
                raise MemoryError(
                    f"out of memory even on the CPU at batch size 1 ({stats['oom_retries']} out-of-memory retries)"
                ) from None


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_batch(ctx: WorkerContext, gen: TextGenerator, run: RunningJob, batch: list[ItemRun]) -> None:
    """Decode one micro-batch, streaming each step, checkpointing, and saving items as they finish."""
    by_params: dict[SamplingParams, list[ItemRun]] = {}
    for r in batch:  # items with their own sampling overrides decode in their own group
        by_params.setdefault(r.params, []).append(r)
    limit = ctx.settings.soft_time_limit
    for params, group in by_params.items():
        tg = gen.stream([r.prompt_ids for r in group], params, seeds=[r.seed for r in group],
                        resume=[r.stream for r in group])
        last_checkpoint = time.monotonic()
        for deltas in tg:
            events = []
            for d in deltas:
                r = group[d.index]
                events.append({"t": "tok", "i": r.idx, "e": r.epoch, "id": d.token, "text": d.text,
                               "finish": d.finish_reason})
            run.publish(events)
            for d in deltas:
                if d.finish_reason:
                    _save(ctx, run, group[d.index])
            if time.monotonic() - last_checkpoint > CHECKPOINT_EVERY:
                last_checkpoint = time.monotonic()
                _checkpoint(ctx, run, [r for r in group if not r.stream.finished])
            try:
                run.check()
                if limit and run.elapsed() > limit:
                    raise TimeLimitExceeded(f"soft time limit of {limit:g} s exceeded")
            except (JobCancelled, TimeLimitExceeded):
                _stop_group(ctx, run, group, tg, "cancelled")
                raise
        _checkpoint(ctx, run, [])  # the running time, at least


def _checkpoint(ctx: WorkerContext, run: RunningJob, running: list[ItemRun]) -> None:
    progress = [(r.idx, r.epoch, r.stream.ids) for r in running]
    if not ctx.store.checkpoint(run.job_id, run.owner, progress, run_seconds=run.unsaved_seconds()):
        raise LeaseLost(f"job {run.job_id}: lease lost")


def _stop_group(ctx: WorkerContext, run: RunningJob, group: list[ItemRun], tg, reason: str) -> None:
    events = []
    for d in tg.cancel():
        r = group[d.index]
        events.append({"t": "tok", "i": r.idx, "e": r.epoch, "id": None, "text": d.text, "finish": reason})
        _save(ctx, run, r, status=ItemStatus.CANCELLED)
    run.publish(events)


def _save(ctx: WorkerContext, run: RunningJob, r: ItemRun, status: ItemStatus = ItemStatus.SUCCEEDED) -> None:
    if not ctx.store.save_item(run.job_id, run.owner, r.idx, epoch=r.epoch, status=status, output=r.stream.text,
                               finish_reason=r.stream.finish_reason, prompt_tokens=len(r.prompt_ids),
                               completion_tokens=len(r.stream.ids), ids=r.stream.ids):
        raise LeaseLost(f"job {run.job_id}: lease lost")


def _save_failed(ctx: WorkerContext, run: RunningJob, idx: int, epoch: int, error: str) -> None:
    if not ctx.store.save_item(run.job_id, run.owner, idx, epoch=epoch, status=ItemStatus.FAILED, output=None,
                               finish_reason=None, prompt_tokens=None, completion_tokens=None, error=error):
        raise LeaseLost(f"job {run.job_id}: lease lost")
    run.publish([{"t": "item", "i": idx, "status": "failed", "error": error}])
