"""Running a dataset-prep job on a worker: `prep.prepare` with its progress streamed.

Progress goes out through the job's stream like tokens do ({"t": "progress", "done", "total"}),
so `gencli tail JOB` shows it; the dataset's counts, and the sha256 and size of every input and
output file (from meta.json), land in the job's `result`; the attempt's provenance (software,
device) is recorded when it starts (store.record_attempt). Cancelling stops
the prep between chunks; its files are written under temporary names until complete, so a
stopped or killed job leaves nothing half-written under a final name.
"""

from __future__ import annotations

import logging
import time

import redis

from gencli.model.provenance import software
from gencli.prep.run import prepare
from gencli.prep.spec import PrepResult, PrepSpec
from gencli.storage.db import JobStatus
from gencli.worker.context import WorkerContext
from gencli.worker.running import JobCancelled, LeaseLost, RunningJob, error_fields
from gencli.worker.stream import end_event

log = logging.getLogger("gencli.worker")
PROGRESS_EVERY = 0.25  # seconds between progress events

SUMMARY_KEYS = ("source", "chat_format", "tokenizer", "dtype", "counts", "mean_tokens_per_turn",
                "literal_special_strings", "malformed", "fingerprint",
                "inputs", "outputs")  # [{path, split, sha256, bytes}], {file: {sha256, bytes}}


def summary(result: PrepResult, spec: PrepSpec) -> dict:
    """What the store keeps of a prep run: its counts, where the files are, and what went in and
    came out (each file's sha256 and bytes; for a skipped run, the existing meta.json's)."""
    meta = result.meta
    out = {k: meta[k] for k in SUMMARY_KEYS if k in meta}
    out.update(out=spec.out, skipped=result.skipped)
    return out


def run_prep_job(ctx: WorkerContext, job_id: str) -> str:
    return ctx.run_job(job_id, lambda run: _run(ctx, run))


def _run(ctx: WorkerContext, run: RunningJob) -> str:
    job_id = run.job_id
    job = ctx.store.get_job(job_id)
    provenance = {"kind": "prep", "device": "cpu", "software": software()}
    attempt = ctx.store.record_attempt(job_id, run.owner, worker=ctx.worker_name, provenance=provenance)
    if attempt is None:
        log.warning("prep job %s: lease lost to another worker before it started; stopping", job_id)
        return "lease lost"
    run.pub.claim({"t": "start", "worker": ctx.worker_name, "device": "cpu", "attempt": run.attempt}, attempt=attempt)
    last = 0.0
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < PROGRESS_EVERY and done < total:
            return
        last = now
        run.publish([{"t": "progress", "done": done, "total": total, "unit": "conversations",
                      "elapsed": round(time.perf_counter() - t0, 3)}])
        run.check(every=0)

    status, error, result = JobStatus.SUCCEEDED, {}, None
    try:
        spec = PrepSpec.from_dict(job.params["spec"])
        res = prepare(spec, force=bool(job.params.get("force")), progress=progress)
        result = summary(res, spec)
    except JobCancelled:
        status = JobStatus.CANCELLED
    except LeaseLost:
        log.warning("prep job %s: lease lost to another worker; stopping without writing", job_id)
        return "lease lost"
    except (redis.ConnectionError, redis.TimeoutError):
        raise  # Redis away for good: not the job's fault (WorkerContext.run_job gives it back)
    except Exception as e:  # the job fails; the worker lives on
        status, error = JobStatus.FAILED, error_fields(e)
        log.error("prep job %s failed: %s: %s", job_id, type(e).__name__, e)
    if not ctx.store.finish(job_id, run.owner, status, run_seconds=run.elapsed(), result=result,
                            final_device="cpu", **error):
        return "lease lost"
    try:
        run.publish([dict(end_event(status.value, error.get("error_message")), result=result)])
    except LeaseLost:
        pass  # the store has the end; tailers read it from there
    ctx.redis.delete(ctx.keys.cancel(job_id))
    log.info("prep job %s %s in %.2f s%s", job_id, status.value, time.perf_counter() - t0,
             " (up to date: nothing rewritten)" if result and result["skipped"] else "")
    return status.value
