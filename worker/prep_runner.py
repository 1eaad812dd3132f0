"""Running a dataset-prep job on a worker: `prep.prepare` with its progress streamed.

Progress goes out through the job's stream like tokens do (a "progress" event, worker/events.py),
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
from gencli.storage.db import JobRow, JobStatus
from gencli.worker import events
from gencli.worker.context import Ending, WorkerContext
from gencli.worker.running import JobCancelled, LeaseLost, RunningJob, error_fields

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
    return ctx.run_job(job_id, Prep(ctx))


class Prep:
    """The dataset-prep kind of job (context.JobKind)."""

    device = "cpu"
    stoppable = False  # prepare() cannot be stopped midway: at the hard limit the process ends

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.provenance = {"kind": "prep", "device": "cpu", "software": software()}

    def run(self, run: RunningJob, job: JobRow, attempt: int, start: int) -> Ending:
        last = 0.0
        t0 = time.perf_counter()

        def progress(done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < PROGRESS_EVERY and done < total:
                return
            last = now
            run.publish([events.progress(done, total, "conversations", time.perf_counter() - t0)])
            run.check(every=0)

        status, error, result = JobStatus.SUCCEEDED, {}, None
        try:
            spec = PrepSpec.from_dict(job.params["spec"])
            res = prepare(spec, force=bool(job.params.get("force")), progress=progress)
            result = summary(res, spec)
        except JobCancelled:
            status = JobStatus.CANCELLED
        except (LeaseLost, redis.ConnectionError, redis.TimeoutError):
            raise  # not the job's end (another worker owns it; Redis away for good: run_job gives it back)
        except Exception as e:  # the job fails; the worker lives on
            status, error = JobStatus.FAILED, error_fields(e)
            log.error("prep job %s failed: %s: %s", run.job_id, type(e).__name__, e)
        note = " (up to date: nothing rewritten)" if result and result["skipped"] else ""
        return Ending(status, error, {"final_device": "cpu"}, result=result,
                      summary=f" (dataset prep) in {time.perf_counter() - t0:.2f} s{note}")
