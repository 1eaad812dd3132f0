"""Running a generation job on a worker: plain functions, called by the Celery task and by tests.

A job runs in micro-batches of its pending items. Each decoding step's tokens go out through
the job's stream (worker.stream) and each finished item is written to the store at once,
guarded by the job's lease. Three ways a job can be interrupted are all handled by resuming
items from the tokens already streamed, so the stream never repeats or skips a token:
- out of memory: free memory, halve the micro-batch and retry the failed part, down to 1, then
  go on on the CPU (a second copy of the model, loaded when first needed);
- the worker died: the next worker reads the replay log and continues each item from there;
- cancel: the running items stop within a step and keep their partial output.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import torch

from gencli.model.errors import GencliError
from gencli.model.params import SamplingParams
from gencli.model.textgen import TextGenerator
from gencli.model.textstream import TextStream
from gencli.storage.db import ItemStatus, JobStatus
from gencli.worker.client import job_params
from gencli.worker.context import WorkerContext, end_event, error_fields
from gencli.worker.stream import cancel_key, read_log

log = logging.getLogger("gencli.worker")


class JobCancelled(Exception):
    pass


class LeaseLost(Exception):
    pass


class TimeLimitExceeded(Exception):
    pass


@dataclass
class ItemRun:
    idx: int
    prompt_ids: list[int]
    stream: TextStream
    seed: int | None
    params: SamplingParams


def run_generation_job(ctx: WorkerContext, job_id: str) -> str:
    """Run (or resume) one job; return how it ended, or why it was not run."""
    return ctx.run_job(job_id, lambda job_id, owner, attempt: _run_claimed(ctx, job_id, owner, attempt))


def _run_claimed(ctx: WorkerContext, job_id: str, owner: str, attempt: int) -> str:
    store = ctx.store
    job = store.get_job(job_id)
    events = read_log(ctx.redis, job_id)
    pub = ctx.publisher(job_id, events)
    pub.publish([{"t": "start", "worker": ctx.worker_name, "device": ctx.device, "attempt": attempt}])
    gen = ctx.generator
    chat = bool(job.params.get("chat"))
    truncate = bool(job.params.get("truncate"))
    streamed = _streamed_ids(events)
    runs: list[ItemRun] = []
    for item in store.items(job_id):
        if item.status != ItemStatus.PENDING.value:
            continue
        try:
            params, seed, stop = job_params(job.params, item.params, gen.block_size)
            ids = gen.fit(gen.encode(item.prompt, chat=chat), params.max_tokens, truncate=truncate)
        except GencliError as e:
            store.save_item(job_id, owner, item.idx, status=ItemStatus.FAILED, output=None, finish_reason=None,
                            prompt_tokens=None, completion_tokens=None, error=str(e))
            pub.publish([{"t": "item", "i": item.idx, "status": "failed", "error": str(e)}])
            continue
        stream = gen.new_stream(stop)
        for token, finish in streamed.get(item.idx, []):  # what an earlier attempt streamed
            if token is not None:
                stream.feed(token)
            if finish and not stream.finished:
                stream.finish(finish)
        run = ItemRun(item.idx, ids, stream, seed, params)
        if stream.finished:  # streamed whole, but the worker died before recording it
            _save(ctx, job_id, owner, run)
        else:
            runs.append(run)

    t0 = time.perf_counter()
    tokens_before = sum(len(r.stream.ids) for r in runs)
    stats = {"oom_retries": 0, "final_batch_size": None, "final_device": ctx.device}
    status, error = JobStatus.SUCCEEDED, {}
    try:
        _run_ladder(ctx, job_id, owner, pub, runs, stats, t0)
    except JobCancelled:
        status = JobStatus.CANCELLED
    except LeaseLost:
        log.warning("job %s: lease lost to another worker; stopping without writing", job_id)
        return "lease lost"
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
    if not store.finish(job_id, owner, status, completion_tokens=completion,
                        tokens_per_s=made / elapsed if elapsed > 0 and made else None, **stats, **error):
        return "lease lost"
    pub.publish([end_event(status.value, error.get("error_message"))])
    ctx.redis.delete(cancel_key(job_id))
    log.info("job %s %s: %d tokens in %.2f s (%.1f tokens/s) on %s", job_id, status.value, made, elapsed,
             made / elapsed if elapsed > 0 else 0.0, stats["final_device"])
    return status.value


def _streamed_ids(events: list[dict]) -> dict[int, list[tuple[int | None, str | None]]]:
    """Per item, the (token id, finish reason) pairs streamed since its last reset."""
    out: dict[int, list[tuple[int | None, str | None]]] = {}
    for e in events:
        if e["t"] == "tok":
            out.setdefault(e["i"], []).append((e["id"], e.get("finish")))
        elif e["t"] == "reset":  # gencli retry: these items start over
            for i in e["items"]:
                out.pop(i, None)
    return out


def _run_ladder(ctx, job_id, owner, pub, runs: list[ItemRun], stats: dict, t0: float) -> None:
    """Micro-batches with the out-of-memory ladder: halve, down to 1, then the CPU."""
    gen = ctx.generator
    bs = ctx.batch_size
    todo = list(runs)
    while todo:
        batch = [r for r in todo[:bs]]
        stats["final_batch_size"] = bs
        try:
            _run_batch(ctx, gen, job_id, owner, pub, batch, t0)
            todo = [r for r in todo if not r.stream.finished]
        except torch.OutOfMemoryError:
            stats["oom_retries"] += 1
            _free_memory()
            todo = [r for r in todo if not r.stream.finished]
            if bs > 1:
                bs = max(1, bs // 2)
                log.warning("job %s: out of memory on %s; retrying at batch size %d", job_id, gen.loaded.device, bs)
            elif gen.loaded.device.type != "cpu":
                log.warning("job %s: out of memory on %s at batch size 1; going on on the CPU", job_id,
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


def _run_batch(ctx, gen: TextGenerator, job_id, owner, pub, batch: list[ItemRun], t0: float) -> None:
    """Decode one micro-batch, streaming each step and saving items as they finish."""
    by_params: dict[SamplingParams, list[ItemRun]] = {}
    for r in batch:  # items with their own sampling overrides decode in their own group
        by_params.setdefault(r.params, []).append(r)
    limit = ctx.settings.soft_time_limit
    for params, group in by_params.items():
        tg = gen.stream([r.prompt_ids for r in group], params, seeds=[r.seed for r in group],
                        resume=[r.stream for r in group])
        last_check = 0.0
        for deltas in tg:
            events = []
            for d in deltas:
                r = group[d.index]
                events.append({"t": "tok", "i": r.idx, "id": d.token, "text": d.text, "finish": d.finish_reason})
            pub.publish(events)
            for d in deltas:
                if d.finish_reason:
                    _save(ctx, job_id, owner, group[d.index])
            now = time.monotonic()
            if now - last_check > 0.05:
                last_check = now
                if owner in ctx.lease_lost:
                    raise LeaseLost()
                if ctx.redis.exists(cancel_key(job_id)):
                    _stop_group(ctx, job_id, owner, pub, group, tg, "cancelled")
                    raise JobCancelled()
                if limit and time.perf_counter() - t0 > limit:
                    _stop_group(ctx, job_id, owner, pub, group, tg, "cancelled")
                    raise TimeLimitExceeded(f"soft time limit of {limit:g} s exceeded")


def _stop_group(ctx, job_id, owner, pub, group, tg, reason) -> None:
    events = []
    for d in tg.cancel():
        r = group[d.index]
        events.append({"t": "tok", "i": r.idx, "id": None, "text": d.text, "finish": reason})
        _save(ctx, job_id, owner, r, status=ItemStatus.CANCELLED)
    pub.publish(events)


def _save(ctx, job_id, owner, r: ItemRun, status: ItemStatus = ItemStatus.SUCCEEDED) -> None:
    if not ctx.store.save_item(job_id, owner, r.idx, status=status, output=r.stream.text,
                               finish_reason=r.stream.finish_reason, prompt_tokens=len(r.prompt_ids),
                               completion_tokens=len(r.stream.ids)):
        raise LeaseLost()
