"""Faults under load: a worker killed, a worker stopped past its lease, Redis lost, while jobs run.

Run from the repository root:

    python -m bench.faults             # 500 jobs x 24 tokens, 3 CPU workers, PostgreSQL
    python -m bench.faults --quick     # smoke test: 60 jobs x 12 tokens
    python -m bench.faults --sqlite    # a SQLite store and 2 workers instead
    python -m bench.faults --json      # the same, with one JSON object as the last line of stdout

What it measures: whether every job still ends once, with the output an unfaulted run makes,
when workers and Redis fail under load; how long a faulted job waits to be taken over; and the
jobs/s the deployment holds over the whole run, faults included.

Set-up: a redis-server of its own on a free loopback port (nothing on disk: a restart is empty),
a temporary GENCLI_HOME, the `tiny` preset model (random weights, cl100k_base, ChatML, seed 3),
and a store: a fresh PostgreSQL database `gencli_bench_<hex>` on the server of
GENCLI_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432/test), dropped at the end, or
with --sqlite a SQLite file. Workers are `gencli worker --threads 1` subprocesses, each in its own
session, with GENCLI_LEASE_SECONDS=3, a fresh GENCLI_NAMESPACE and no other GENCLI_* variable of
the shell. Everything it starts is stopped, and the temporary directory removed, at the end.

Load: one single-prompt job per prompt ("story <i>:"), alternately greedy (temperature 0) and
seeded sampling (temperature 1.0, top_k 50, seed i), submitted with `Client.submit` from the main
thread as fast as it takes them (the submit rate is that loop's).

Faults, each once, when a fixed share of the jobs has succeeded (polled in the store), each in a
thread of its own, so they may overlap (a fault does not wait for the one before to recover; a
worker under one fault, or a job already a victim, is never picked by another):
- kill (15%): SIGKILL to a worker's process group while the store shows it running a job, then
  the same command started again under the same name (as a supervisor would);
- stop (35%): SIGSTOP to a worker running a job, for 6 s (twice the lease), then SIGCONT;
- redis (60%, once every job is submitted): redis-server SIGKILLed, down 1 s, started again
  empty on the same port (queued jobs' messages, stream logs and heartbeats are gone).
The victim of a fault is the job the store has running under the faulted worker's name when
it is faulted (the heartbeat's `job` field is refreshed every 2 s and a job lasts a fraction of
that, so it would often name a finished job); a kill or stop that lands between two jobs is
undone (the worker restarted, or continued) and tried again. For Redis, the victim is a job
running when Redis is killed. A fault's recovery time runs from the fault until the store shows
its victim claimed again (attempts up, running) or ended (polled every 20 ms); also reported, the
time until the store shows it queued again (its lease seen expired: the rest is its wait in the
queue). For Redis, also the time until the first job that was queued at the restart (its message
lost) is claimed. "Longest takeover" is the largest recovery time of the kill and stop victims.

Checks, once every job has ended (bounded: 15 minutes from the first submit, 5 with --quick):
- lost: jobs not `succeeded` (or with no item row);
- duplicated: jobs run to completion twice: more than one item row, or a stream log
  (`read_log`) with two "end" events or a repeated seq, or two "job <id> succeeded" lines in the
  worker logs;
- wrong: succeeded jobs whose output differs from the same job run with no faults, in this
  process: `TextGenerator.generate` on one prompt at a time, one torch thread, with the sampling
  params, seed and stop strings that `resolve_sampling` makes of the job's stored params, as the
  worker does.
All three must be 0: the exit status is 1 otherwise, or when the run itself failed.
Also reported: jobs run more than once (attempts > 1), and stream logs that hold tokens twice
(whole logs with no resync event and more token events than the item's tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench._services import PG_URL_DEFAULT, PrivateRedis, Proc, child_env, fresh_pg_database, log

MODEL = "tiny"
LEASE_SECONDS = 3
STOP_SECONDS = 6.0  # a stopped worker stays stopped this long: twice its lease
REDIS_DOWN_SECONDS = 1.0
PLAN = (("kill", 0.15), ("stop", 0.35), ("redis", 0.60))  # fault, share of the jobs succeeded first
MAX_TRIES = 20  # kills or stops that land between two jobs, before giving up
POLL = 0.02  # seconds between store reads while a fault recovers


@dataclass(frozen=True)
class Config:
    jobs: int
    max_tokens: int
    workers: int
    backend: str  # "postgresql" or "sqlite"
    timeout_s: float  # from the first submit until every job has ended


def job_specs(n: int, max_tokens: int) -> list[dict]:
    """n single-prompt jobs: even ones greedy, odd ones seeded sampling."""
    specs = []
    for i in range(n):
        sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 1.0, "top_k": 50, "seed": i}
        specs.append({"prompt": f"story {i}:", "max_tokens": max_tokens, **sampling})
    return specs


# --- the store, read-only ------------------------------------------------------------------------

def status_counts(store) -> dict[str, int]:
    from sqlalchemy import func, select

    from gencli.storage.db import JobRow

    with store.Session() as s:
        return dict(s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all())


def running_jobs(store) -> list:
    """The jobs running now, oldest first."""
    from sqlalchemy import select

    from gencli.storage.db import JobRow, JobStatus

    with store.Session() as s:
        return list(s.scalars(select(JobRow).where(JobRow.status == JobStatus.RUNNING.value).order_by(JobRow.created_at)))


def queued_ids(store) -> list[str]:
    from sqlalchemy import select

    from gencli.storage.db import JobRow, JobStatus

    with store.Session() as s:
        return list(s.scalars(select(JobRow.id).where(JobRow.status == JobStatus.QUEUED.value)))


def any_left_queue(store, ids: list[str]) -> bool:
    """Whether any of these jobs is no longer queued: claimed, ended, or gone (a submit whose
    message could not be sent, Redis being down, removes the job it had recorded)."""
    from sqlalchemy import func, select

    from gencli.storage.db import JobRow, JobStatus

    with store.Session() as s:
        return s.scalar(select(func.count()).where(JobRow.id.in_(ids), JobRow.status == JobStatus.QUEUED.value)) < len(ids)


def run_span_seconds(store) -> float:
    """First job created -> last job finished, by the database's clock."""
    from sqlalchemy import func, select

    from gencli.storage.db import JobRow

    with store.Session() as s:
        first, last = s.execute(select(func.min(JobRow.created_at), func.max(JobRow.finished_at))).one()
    return (last - first).total_seconds()


# --- workers -------------------------------------------------------------------------------------

class Aborted(Exception):
    """The run is over (or failed): a fault still waiting gives up."""


def redis_has(r: redis.Redis, key: str) -> bool:
    try:
        return bool(r.exists(key))
    except (redis.RedisError, OSError):
        return False


class Worker:
    """One `gencli worker` subprocess, restartable under the same name (a log file per start)."""

    def __init__(self, name: str, cmd: list[str], env: dict, tmp: Path, key: str):
        self.name, self.cmd, self.env, self.tmp, self.key = name, cmd, env, tmp, key
        self.logs: list[Path] = []
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        path = self.tmp / f"{self.name.split('@')[0]}-{len(self.logs) + 1}.log"
        self.logs.append(path)
        self.proc = Proc(self.cmd, self.env, path)

    def is_ready(self, r: redis.Redis) -> bool:
        """Its log says "ready" and its heartbeat key exists."""
        return "ready" in self.proc.text() and redis_has(r, self.key)

    def wait_ready(self, r: redis.Redis, timeout: float = 180, abort: threading.Event | None = None) -> None:
        """Until it is ready (Aborted when abort is set)."""
        def ready() -> bool:
            if abort is not None and abort.is_set():
                raise Aborted()
            return self.is_ready(r)

        self.proc.wait_for(ready, timeout, f"worker {self.name}")

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.proc.wait(10)

    def stop(self) -> None:
        if self.proc.proc.poll() is None:
            try:
                self.signal(signal.SIGCONT)  # a stopped process cannot take its SIGTERM
            except ProcessLookupError:
                pass
        self.proc.stop()

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


def start_workers(cfg: Config, model_dir: Path, env: dict, tmp: Path, keys, run_id: str) -> list[Worker]:
    workers = []
    for n in range(1, cfg.workers + 1):
        name = f"w{n}-{run_id}@bench"
        cmd = [sys.executable, "-m", "gencli.cli", "worker", "--model", str(model_dir), "--model-name", MODEL,
               "--device", "cpu", "--name", name, "--threads", "1"]
        workers.append(Worker(name, cmd, env, tmp, keys.worker(name)))
    return workers


# --- faults --------------------------------------------------------------------------------------

@dataclass
class Fault:
    kind: str
    at_succeeded: int  # jobs succeeded when it was injected
    worker: str | None = None
    victim: str | None = None
    victim_attempt: int = 0  # the victim's attempts when it was faulted
    requeued_s: float | None = None  # fault -> the store has the victim queued again (its lease ran out)
    recovery_s: float | None = None  # fault -> the victim claimed again or ended
    recovered: str = ""  # how: "claimed by W (attempt N)" or "succeeded on W (attempt N)"
    tries: int = 1  # faults needed to land one on a running job
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        who = f" {short(self.worker)}" if self.worker else ""
        text = (f"{self.kind:<5}{who:<4} at {self.at_succeeded:>3} succeeded: victim {self.victim or '-'}"
                f" (attempt {self.victim_attempt})")
        if self.requeued_s is not None:
            text += f" requeued after {self.requeued_s:.2f} s,"
        text += f" {self.recovered} after {self.recovery_s:.2f} s"
        if self.tries > 1:
            text += f" ({self.tries} tries)"
        for k, v in self.extra.items():
            text += f"; {k.replace('_', ' ')} {v:.2f}" if isinstance(v, float) else f"; {k.replace('_', ' ')} {v}"
        return text


def short(worker: str | None) -> str:
    """w1-<runid>@bench -> w1"""
    return (worker or "-").split("-")[0]


class VictimWatch:
    """A faulted job, polled in the store: when it is first seen queued again, and when it is
    claimed again (attempts up, running) or has ended."""

    def __init__(self, store, fault: Fault, t0: float):
        self.store, self.fault, self.t0 = store, fault, t0

    def recovered(self) -> bool:
        from gencli.storage.db import JobStatus

        f = self.fault
        j = self.store.get_job(f.victim)
        now = time.monotonic() - self.t0
        if j.status == JobStatus.QUEUED.value and f.requeued_s is None:
            f.requeued_s = now
        elif JobStatus(j.status).done:
            f.recovery_s, f.recovered = now, f"{j.status} on {short(j.worker)} (attempt {j.attempts})"
        elif j.status == JobStatus.RUNNING.value and j.attempts > f.victim_attempt:
            f.recovery_s, f.recovered = now, f"claimed by {short(j.worker)} (attempt {j.attempts})"
        return f.recovery_s is not None


class Faults:
    """PLAN's faults, each in a thread of its own that waits for its share of the jobs to succeed.

    Faults may overlap (a short load does not wait for one fault to recover before the next):
    a worker under a fault, and a job already a victim, are never picked by another.
    """

    def __init__(self, *, store, redis_server: PrivateRedis, r: redis.Redis, workers: list[Worker], total: int,
                 submitted: threading.Event, plan: tuple[tuple[str, float], ...] = PLAN):
        self.store, self.redis_server, self.r, self.workers = store, redis_server, r, workers
        self.plan = plan
        self.total, self.submitted = total, submitted
        self.ended = threading.Event()  # every job has ended: nothing left to fault
        self.abort = threading.Event()  # the run is over: stop following recoveries too
        self.lock = threading.Lock()
        self.faulted: set[str] = set()  # workers under a fault now
        self.victims: set[str] = set()
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self.stage: dict[str, str] = {}  # what each fault's thread is doing now: said when it never ends
        self.threads = [threading.Thread(target=self._one, args=(kind, share), daemon=True, name=f"fault-{kind}")
                        for kind, share in plan]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self, grace: float) -> None:
        """Every job has ended (or the run failed): a fault not begun is skipped, one in progress gets
        up to grace seconds to see its victim recover."""
        self.ended.set()
        deadline = time.monotonic() + grace
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.abort.set()
        for t in self.threads:
            t.join(30)

    def missing(self) -> list[str]:
        """The faults of the plan not injected (or not seen to end), each with where it stopped."""
        done = {f.kind for f in self.faults}
        return [f"{kind} ({self.stage.get(kind, 'not started')})" for kind, _ in self.plan if kind not in done]

    def injected(self) -> list[Fault]:
        order = [kind for kind, _ in self.plan]
        return sorted(self.faults, key=lambda f: order.index(f.kind))

    def _one(self, kind: str, share: float) -> None:
        try:
            due = math.ceil(share * self.total)
            self.stage[kind] = f"waiting for {due} jobs to succeed"
            self._wait(lambda: self._succeeded() >= due, until_ended=True)
            self.stage[kind] = "picking its victim"
            fault = getattr(self, f"fault_{kind}")()
            with self.lock:
                self.faults.append(fault)
            log(f"  fault: {fault.line()}")
        except Aborted:
            pass
        except BaseException as e:  # noqa: BLE001 - reported with the results
            self.errors.append(f"{kind}: {type(e).__name__}: {e}")

    def _succeeded(self) -> int:
        return status_counts(self.store).get("succeeded", 0)

    def _wait(self, cond, poll: float = 0.05, *, until_ended: bool = False) -> None:
        """Until cond(); Aborted when the run is over (or, with until_ended, every job has ended)."""
        while not cond():
            if self.abort.wait(poll) or (until_ended and self.ended.is_set()):
                raise Aborted()

    def _follow(self, watch: VictimWatch, until: float | None = None, marks: dict | None = None) -> None:
        """Poll watch until its victim recovers (or `until`); the first time each of marks'
        predicates holds goes into the fault's extra, as seconds since the fault."""
        marks = dict(marks or {})
        while True:
            for name, holds in list(marks.items()):
                if holds():
                    watch.fault.extra[name] = time.monotonic() - watch.t0
                    del marks[name]
            if watch.recovered() or (until is not None and time.monotonic() > until):
                return
            if self.abort.wait(POLL):
                raise Aborted()

    def _pick_worker(self, prefer: int) -> Worker:
        """A live worker not under another fault that the store shows running a job not yet a
        victim (from workers[prefer] on, round), marked as under a fault."""
        order = self.workers[prefer:] + self.workers[:prefer]
        found: list[Worker] = []

        def busy() -> bool:
            names = {j.worker for j in running_jobs(self.store) if j.id not in self.victims}
            with self.lock:
                for w in order:
                    if w.name in names and w.name not in self.faulted and w.proc.proc.poll() is None:
                        self.faulted.add(w.name)
                        found.append(w)
                        return True
            return False

        self._wait(busy, poll=0.005, until_ended=True)
        return found[0]

    def _victim_on(self, w: Worker):
        """The job the store has running under w's name (w is dead or stopped), not yet a victim."""
        with self.lock:
            job = next((j for j in running_jobs(self.store) if j.worker == w.name and j.id not in self.victims), None)
            if job is not None:
                self.victims.add(job.id)
            return job

    def _release(self, w: Worker) -> None:
        with self.lock:
            self.faulted.discard(w.name)

    def fault_kill(self) -> Fault:
        fault = Fault("kill", self._succeeded())
        for tries in range(1, MAX_TRIES + 1):
            w = self._pick_worker(prefer=0)
            w.kill()
            t0 = time.monotonic()
            victim = self._victim_on(w)  # it is dead: what the store still has it running
            w.start()  # at once, under the same name
            if victim is not None:
                break
            w.wait_ready(self.r, abort=self.abort)  # it died between two jobs: again, once it is back
            self._release(w)
        else:
            raise RuntimeError(f"{MAX_TRIES} kills all landed between two jobs")
        fault.tries, fault.worker, fault.victim, fault.victim_attempt = tries, w.name, victim.id, victim.attempts
        self.stage["kill"] = f"following victim {victim.id} of {w.name}"
        self._follow(VictimWatch(self.store, fault, t0), marks={"restarted_ready_s": lambda: w.is_ready(self.r)})
        if "restarted_ready_s" not in fault.extra:
            w.wait_ready(self.r, abort=self.abort)
            fault.extra["restarted_ready_s"] = time.monotonic() - t0
        self._release(w)
        return fault

    def fault_stop(self) -> Fault:
        fault = Fault("stop", self._succeeded())
        for tries in range(1, MAX_TRIES + 1):
            w = self._pick_worker(prefer=1 % len(self.workers))
            w.signal(signal.SIGSTOP)
            t0 = time.monotonic()
            victim = self._victim_on(w)
            if victim is not None:
                break
            w.signal(signal.SIGCONT)  # stopped between two jobs: let it go and try again
            self._release(w)
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{MAX_TRIES} stops all landed between two jobs")
        fault.tries, fault.worker, fault.victim, fault.victim_attempt = tries, w.name, victim.id, victim.attempts
        self.stage["stop"] = f"following victim {victim.id} of {w.name}"
        watch = VictimWatch(self.store, fault, t0)
        try:
            self._follow(watch, until=t0 + STOP_SECONDS)
            time.sleep(max(0.0, t0 + STOP_SECONDS - time.monotonic()))
        finally:
            w.signal(signal.SIGCONT)
            self._release(w)
        fault.extra["stopped_s"] = time.monotonic() - t0
        self._follow(watch)
        return fault

    def fault_redis(self) -> Fault:
        self._wait(self.submitted.is_set, until_ended=True)  # a submit while Redis is down is refused
        fault = Fault("redis", self._succeeded())
        found: list = []

        def pick() -> bool:  # a running job on a worker under no other fault
            with self.lock:
                found[:] = [j for j in running_jobs(self.store)
                            if j.id not in self.victims and j.worker not in self.faulted][:1]
                if found:
                    self.victims.add(found[0].id)
            return bool(found)

        self._wait(pick, poll=0.005, until_ended=True)
        victim, waiting = found[0], queued_ids(self.store)
        t0 = time.monotonic()
        self.stage["redis"] = f"restarting Redis, victim {victim.id}"
        self.redis_server.restart(REDIS_DOWN_SECONDS)
        self.stage["redis"] = f"following victim {victim.id} after the restart"
        fault.extra["down_s"] = time.monotonic() - t0
        fault.victim, fault.victim_attempt = victim.id, victim.attempts
        fault.extra["running_on"] = short(victim.worker)
        fault.extra["queued_at_restart"] = len(waiting)
        resumed = (lambda: any_left_queue(self.store, waiting)) if waiting else (lambda: True)
        self._follow(VictimWatch(self.store, fault, t0), marks={"queue_resumed_s": resumed})
        if "queue_resumed_s" not in fault.extra:
            self.stage["redis"] = f"waiting for one of the {len(waiting)} jobs queued at the restart to leave the queue"
            self._wait(resumed, poll=POLL)
            fault.extra["queue_resumed_s"] = time.monotonic() - t0
        return fault


# --- the run -------------------------------------------------------------------------------------

def submit_all(client, specs: list[dict]) -> tuple[list[str], float]:
    """Every job, as fast as the client takes them; (ids, seconds)."""
    ids = []
    t0 = time.perf_counter()
    for s in specs:
        sampling = {k: v for k, v in s.items() if k != "prompt"}
        ids.append(client.submit([s["prompt"]], model=MODEL, **sampling).id)
    return ids, time.perf_counter() - t0


def wait_all_done(store, n: int, deadline: float, faults: Faults, timeout_s: float) -> None:
    """Until every job has ended; progress on stderr every 10 s."""
    last_report = time.monotonic()
    while True:
        counts = status_counts(store)
        ended = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
        if ended >= n:
            return
        if faults.errors:
            raise RuntimeError(f"fault injection failed: {'; '.join(faults.errors)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every job ended within {timeout_s:.0f} s of the first submit: {counts}")
        if time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            log(f"  {counts.get('succeeded', 0)}/{n} succeeded, {counts.get('running', 0)} running,"
                f" {counts.get('queued', 0)} queued, {ended - counts.get('succeeded', 0)} ended otherwise")
        time.sleep(0.2)


# --- checks --------------------------------------------------------------------------------------

def reference_outputs(store, model_dir: Path, job_ids: list[str]) -> dict[str, tuple[str, list[int]]]:
    """Each job's (text, ids) as one unfaulted run makes it: what the worker resolves, one prompt
    at a time, one torch thread (the workers run with --threads 1)."""
    import torch

    from gencli.model.checkpoint import load_model
    from gencli.model.params import resolve_sampling
    from gencli.model.textgen import TextGenerator

    torch.set_num_threads(1)
    tg = TextGenerator(load_model(model_dir))
    out = {}
    for job_id in job_ids:
        job, items = store.get_job(job_id), store.items(job_id)
        if not items:
            continue  # lost: nothing to compare
        item = items[0]
        params = resolve_sampling(job.params, item.params, tg.block_size)
        ids = tg.fit(tg.encode(item.prompt, chat=bool(job.params.get("chat"))), params.max_tokens,
                     truncate=bool(job.params.get("truncate")))
        s = tg.generate([ids], params)[0]
        out[job_id] = (s.text, list(s.ids))
    return out


def check_log(events: list[dict], item) -> dict:
    """What a job's stream log says: ends, repeated seqs, starts, whole, tokens streamed twice."""
    from gencli.worker.stream import gapless

    seqs = [e["seq"] for e in events]
    ends = [e for e in events if e["t"] == "end"]
    is_whole = bool(events) and gapless(events, 0)
    toks = [e for e in events if e["t"] == "tok" and e.get("id") is not None and e.get("e", 0) == item.epoch]
    resynced = any(e["t"] == "resync" for e in events)
    return {
        "ends": len(ends),
        "succeeded_ends": sum(1 for e in ends if e.get("status") == "succeeded"),
        "repeated_seq": len(set(seqs)) != len(seqs) or seqs != sorted(seqs),
        "starts": sum(1 for e in events if e["t"] == "start"),
        "whole": is_whole,
        "restreamed": is_whole and not resynced and len(toks) > (item.completion_tokens or 0),
    }


def verify(store, r: redis.Redis, keys, job_ids: list[str], refs: dict, worker_logs: str) -> dict:
    from gencli.worker.stream import read_log

    succeeded_lines = Counter(re.findall(r"job ([0-9a-f]{32}) succeeded:", worker_logs))
    lost, duplicated, wrong, retried, restreamed = [], [], [], [], []
    logs_read = logs_whole = 0
    for job_id in job_ids:
        job, items = store.get_job(job_id), store.items(job_id)
        events = read_log(r, keys, job_id)
        logs_read += bool(events)
        if job.status != "succeeded" or not items:
            lost.append(job_id)
        if job.attempts > 1:
            retried.append(job_id)
        if not items:
            continue
        info = check_log(events, items[0])
        logs_whole += info["whole"]
        if (len(items) > 1 or info["ends"] > 1 or info["succeeded_ends"] > 1 or info["repeated_seq"]
                or succeeded_lines[job_id] > 1):
            duplicated.append(job_id)
        if info["restreamed"]:
            restreamed.append(job_id)
        if job.status == "succeeded" and items[0].output != refs[job_id][0]:
            wrong.append(job_id)
    return {"lost": lost, "duplicated": duplicated, "wrong": wrong, "retried": retried,
            "restreamed": restreamed, "logs_read": logs_read, "logs_whole": logs_whole,
            "succeeded_log_lines": sum(succeeded_lines.values())}


def log_notes(text: str) -> dict:
    """Counts of the worker log lines that show faults being handled, and the errors."""
    lines = text.splitlines()
    errors = [ln for ln in lines if " ERROR " in ln or ln.startswith("Traceback") or "CRITICAL" in ln]
    return {
        "requeued": sum("stopped renewing its lease; requeued" in ln for ln in lines),
        "sent_again": sum("its message is gone" in ln for ln in lines),
        "lease_lost": sum("lease lost to another worker" in ln for ln in lines),
        "not_run": sum(" not run: " in ln for ln in lines),
        "warnings": sum(" WARNING " in ln for ln in lines),
        "errors": len(errors),
        "first_errors": errors[:8],
    }


# --- main ----------------------------------------------------------------------------------------

def stop_workers(workers: list[Worker]) -> None:
    for w in reversed(workers):
        try:
            w.stop()
        except OSError as e:  # keep stopping the others
            log(f"stopping {w.name}: {e}")


def gencli_env(tmp: Path, redis_url: str, db_url: str, namespace: str) -> dict[str, str]:
    return {"GENCLI_HOME": str(tmp / "home"), "GENCLI_REDIS_URL": redis_url, "GENCLI_DB_URL": db_url,
            "GENCLI_NAMESPACE": namespace, "GENCLI_LEASE_SECONDS": str(LEASE_SECONDS)}


def use_env(stack: ExitStack, gencli_vars: dict[str, str]) -> None:
    """This process sees only gencli_vars of GENCLI_*; the shell's come back at the end."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("GENCLI_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(gencli_vars)

    def restore():
        for k in [k for k in os.environ if k.startswith("GENCLI_")]:
            del os.environ[k]
        os.environ.update(saved)

    stack.callback(restore)


def deployment(stack: ExitStack, backend: str, name: str, namespace: str) -> tuple[Path, PrivateRedis, dict]:
    """What a benchmark that breaks things runs on, undone by stack: a temporary directory (kept,
    logs and all, with BENCH_KEEP_TMP), a redis-server of its own, a store (a SQLite file, or a
    fresh PostgreSQL database on GENCLI_TEST_PG_URL's server), and this process's GENCLI_*
    variables set to them: (directory, server, the variables)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"gencli-bench-{name}-"))
    if os.environ.get("BENCH_KEEP_TMP"):  # keep the logs and the store for a look
        stack.callback(log, f"kept {tmp}")
    else:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    server = PrivateRedis(tmp)
    stack.callback(server.stop)
    if backend == "sqlite":
        db_url = f"sqlite:///{tmp / 'store.db'}"
    else:
        db_url = stack.enter_context(fresh_pg_database(os.environ.get("GENCLI_TEST_PG_URL") or PG_URL_DEFAULT))
    gencli_vars = gencli_env(tmp, server.url, db_url, namespace)
    use_env(stack, gencli_vars)
    return tmp, server, gencli_vars


def run(cfg: Config, result: dict) -> None:
    from gencli.model.checkpoint import create_model
    from gencli.storage.settings import get_settings
    from gencli.worker.client import Client

    run_id = uuid.uuid4().hex[:8]
    with ExitStack() as stack:
        tmp, server, gencli_vars = deployment(stack, cfg.backend, "faults", f"bench{run_id}")
        model_dir = create_model(tmp / "tiny", preset="tiny", tokenizer="cl100k_base", chat_format="chatml", seed=3)
        client = Client(get_settings(), start_redis=False)  # the store is made (migrated) here, before any worker
        stack.callback(client.store.engine.dispose)  # before the database is dropped
        r = redis.Redis.from_url(server.url, socket_connect_timeout=2, socket_timeout=10)

        log(f"{cfg.workers} workers on {cfg.backend} ({tmp}) ...")
        workers = start_workers(cfg, model_dir, child_env(gencli_vars), tmp, client.keys, run_id)
        stack.callback(stop_workers, workers)
        for w in workers:
            w.wait_ready(r)
        client.redis.ping()  # connected, and the Celery app made, before the timed loop
        _ = client.app

        specs = job_specs(cfg.jobs, cfg.max_tokens)
        submitted = threading.Event()
        faults = Faults(store=client.store, redis_server=server, r=r, workers=workers, total=cfg.jobs,
                        submitted=submitted)
        faults.start()
        stack.callback(faults.finish, 0)  # before the workers stop: one may be restarting a worker
        log(f"submitting {cfg.jobs} jobs x {cfg.max_tokens} tokens ...")
        deadline = time.monotonic() + cfg.timeout_s
        job_ids, submit_s = submit_all(client, specs)
        submitted.set()
        log(f"  submitted in {submit_s:.2f} s ({cfg.jobs / submit_s:.0f} jobs/s)")
        wait_all_done(client.store, cfg.jobs, deadline, faults, cfg.timeout_s)
        faults.finish(grace=120)
        span_s = run_span_seconds(client.store)
        injected = faults.injected()
        missing = faults.missing()

        stop_workers(workers)  # their logs complete, the CPU free for the reference
        worker_logs = "".join(w.log_text() for w in workers)
        log(f"all ended in {span_s:.1f} s; the unfaulted reference, in this process ...")
        refs = reference_outputs(client.store, model_dir, job_ids)
        checks = verify(client.store, redis.Redis.from_url(server.url), client.keys, job_ids, refs, worker_logs)
        takeovers = [f.recovery_s for f in injected if f.kind in ("kill", "stop")]
        result.update({
            "submit_jobs_per_s": cfg.jobs / submit_s,
            "submit_s": submit_s,
            "jobs_per_s": cfg.jobs / span_s,
            "run_s": span_s,
            "max_takeover_s": max(takeovers) if takeovers else None,
            "faults": [vars(f) for f in injected],
            "faults_missing": missing,
            "lost": len(checks["lost"]), "duplicated": len(checks["duplicated"]), "wrong": len(checks["wrong"]),
            "lost_ids": checks["lost"][:10], "duplicated_ids": checks["duplicated"][:10],
            "wrong_ids": checks["wrong"][:10],
            "retried": len(checks["retried"]), "restreamed": len(checks["restreamed"]),
            "restreamed_ids": checks["restreamed"][:10],
            "logs_read": checks["logs_read"], "logs_whole": checks["logs_whole"],
            "succeeded_log_lines": checks["succeeded_log_lines"],
            "worker_logs": log_notes(worker_logs),
            "status_counts": status_counts(client.store),
        })
        if missing or faults.errors:
            result["error"] = "; ".join(faults.errors + ([f"faults not injected: {', '.join(missing)}"] if missing else []))


def report(res: dict) -> None:
    c = res["config"]
    print(f"gencli faults benchmark: {c['jobs']} jobs x {c['max_tokens']} tokens, {c['workers']} CPU workers"
          f" (--threads 1), {c['backend']}, lease {LEASE_SECONDS} s; {res['elapsed_s']:.0f} s,"
          f" load average {res['loadavg_start']:.1f} -> {res['loadavg_end']:.1f}", file=sys.stderr)
    if "jobs_per_s" in res:
        print(f"  submit               {res['submit_jobs_per_s']:7.1f} jobs/s  ({c['jobs']} in {res['submit_s']:.2f} s)",
              file=sys.stderr)
        print(f"  held over the run    {res['jobs_per_s']:7.1f} jobs/s  ({c['jobs']} in {res['run_s']:.1f} s,"
              " first submit -> last done)", file=sys.stderr)
        for f in res["faults"]:
            print(f"  {Fault(**f).line()}", file=sys.stderr)
        if res["max_takeover_s"] is not None:
            print(f"  longest takeover     {res['max_takeover_s']:7.2f} s", file=sys.stderr)
        wl = res["worker_logs"]
        print(f"  lost {res['lost']}  duplicated {res['duplicated']}  wrong {res['wrong']}"
              f"   ({res['retried']} jobs ran more than once; {res['logs_whole']}/{res['logs_read']} stream logs"
              f" left whole; {res['restreamed']} with tokens twice)", file=sys.stderr)
        print(f"  worker logs: {wl['requeued']} requeued, {wl['sent_again']} sent again, {wl['lease_lost']} lease lost,"
              f" {wl['not_run']} not run, {wl['warnings']} warnings, {wl['errors']} errors", file=sys.stderr)
        for ln in wl["first_errors"]:
            print(f"    {ln[:200]}", file=sys.stderr)
    if res.get("error"):
        print(f"  ERROR: {res['error']}", file=sys.stderr)
    print(f"  {'PASS' if res['pass'] else 'FAIL'}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="end with one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="smoke test: 60 jobs x 12 tokens, 5 minutes at most")
    ap.add_argument("--sqlite", action="store_true", help="a SQLite store and 2 workers (default: PostgreSQL, 3)")
    a = ap.parse_args()
    backend = "sqlite" if a.sqlite else "postgresql"
    cfg = Config(jobs=60 if a.quick else 500, max_tokens=12 if a.quick else 24, workers=2 if a.sqlite else 3,
                 backend=backend, timeout_s=300 if a.quick else 900)

    t0 = time.perf_counter()
    result: dict = {"bench": "faults", "config": vars(cfg) | {"quick": a.quick, "lease_seconds": LEASE_SECONDS},
                    "loadavg_start": os.getloadavg()[0]}
    try:
        run(cfg, result)
    except Exception as e:  # noqa: BLE001 - any failure is reported, with exit status 1
        result["error"] = f"{type(e).__name__}: {e}"
    result["elapsed_s"] = time.perf_counter() - t0
    result["loadavg_end"] = os.getloadavg()[0]
    result["pass"] = "error" not in result and all(result.get(k) == 0 for k in ("lost", "duplicated", "wrong"))
    report(result)
    if a.json:
        print(json.dumps(result, default=str))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
