"""Workers that die, stop or overrun: the job still ends once, and the stream stays whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from services import child_env, start_worker
from tailing import Tailer, reference, scored_reference, wait_for

from gencli.model.checkpoint import load_model
from gencli.model.params import SamplingParams
from gencli.model.textgen import TextGenerator
from gencli.storage.db import JobStatus
from gencli.worker.prompts import PromptItem

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("queue_env")]

PROMPTS = [f"story number {n}:" for n in range(6)]


def test_sigkill_mid_job_another_worker_finishes_it_once_with_a_whole_stream(env, tiny, client):
    a = start_worker(env, tiny, "doomed@test", "--model-name", "tiny-kill", "--batch_size", "2")
    b = None
    try:
        job = client.submit(PROMPTS, model="tiny-kill", max_tokens=200, temperature=0)
        tailer = Tailer(job)
        tailer.start()
        wait_for(lambda: len(tailer.deltas) > 150, 60, "tokens from the first worker")
        a.kill(signal.SIGKILL)
        killed_at = time.time()
        b = start_worker(env, tiny, "rescuer@test", "--model-name", "tiny-kill", "--batch_size", "2")
        assert job.wait(60) is JobStatus.SUCCEEDED
        assert time.time() - killed_at < 60
        tailer.join(30)
        rec = job.record()
        assert rec.attempts == 2 and rec.worker == "rescuer@test"
        seqs = [d.seq for d in tailer.deltas]
        assert seqs == sorted(set(seqs))  # nothing twice
        stored = [x["output"] for x in job.result()]
        assert tailer.texts(len(PROMPTS)) == stored  # nothing missing
        assert stored == reference(tiny, PROMPTS, 200)  # the resumed run made what one run makes
        assert len(client.store.items(job.id)) == len(PROMPTS)
    finally:
        a.stop()
        if b:
            b.stop()


def test_sigkill_mid_job_the_logprobs_stored_are_those_of_the_line_alone(env, tiny, client):
    """A worker killed mid-job: the one that takes it over computes the logprobs of the ids made
    before (fed again as they were made) and of the prompts, so each line's stored logprobs are bit
    for bit those of the line run alone in-process. Seeded, temperature 1; a line with max_tokens 0
    only scores its prompt."""
    model = f"tiny-killlp-{env['id']}"
    a = start_worker(env, tiny, f"doomed-lp-{env['id']}@test", "--model-name", model, "--batch_size", "2")
    b = None
    lines = [PromptItem(p, n + 1, extra={"max_tokens": 0} if n == 3 else None) for n, p in enumerate(PROMPTS[:4])]
    try:
        job = client.submit(lines, model=model, max_tokens=160, temperature=1.0, top_k=0, seed=11, logprobs=2,
                            prompt_logprobs=1)
        tailer = Tailer(job)
        tailer.start()
        wait_for(lambda: len(tailer.deltas) > 100, 60, "tokens from the first worker")
        a.kill(signal.SIGKILL)
        b = start_worker(env, tiny, f"rescuer-lp-{env['id']}@test", "--model-name", model, "--batch_size", "2")
        assert job.wait(90) is JobStatus.SUCCEEDED, job.record().error_message
        assert job.record().attempts == 2
        tok = TextGenerator(load_model(tiny))
        for it in client.store.items(job.id):
            budget = 0 if it.idx == 3 else 160
            sp = SamplingParams(max_tokens=budget, temperature=1.0, top_k=None, seed=11, logprobs=2, prompt_logprobs=1)
            (record, text), = scored_reference(tiny, [tok.encode(it.prompt, chat=False)], sp)
            assert it.output == text and it.logprobs == record, it.idx
            assert len(it.logprobs["tokens"]) == len(it.ids) + (it.finish_reason == "stop")  # a stop id has one too
        assert client.store.items(job.id)[3].logprobs["tokens"] == []
    finally:
        a.stop()
        if b:
            b.stop()


def test_sigterm_mid_job_finishes_the_job_before_exiting(env, tiny, client):
    w = start_worker(env, tiny, "term@test", "--model-name", "tiny-term", "--batch_size", "2")
    try:
        job = client.submit(PROMPTS[:4], model="tiny-term", max_tokens=150, temperature=0)
        wait_for(lambda: job.status is JobStatus.RUNNING, 30, "the job to start")
        w.kill(signal.SIGTERM)
        w.proc.wait(60)
        assert job.status is JobStatus.SUCCEEDED  # finished, never left running
        assert [x["output"] for x in job.result()] == reference(tiny, PROMPTS[:4], 150)
    finally:
        w.stop()


def test_soft_time_limit_fails_the_job_and_keeps_partial_output(env, tiny, client):
    w = start_worker(env, tiny, "slow@test", "--model-name", "tiny-limit", "--batch_size", "1",
                     extra_env={"GENCLI_SOFT_TIME_LIMIT": "0.3"})
    try:
        job = client.submit(PROMPTS, model="tiny-limit", max_tokens=240, temperature=0)
        assert job.wait(60) is JobStatus.FAILED
        rec = job.record()
        assert rec.error_class == "TimeLimitExceeded" and "0.3" in rec.error_message
        results = job.result()
        assert results[0]["finish_reason"] in ("length", "cancelled")
        assert any(x["status"] == "cancelled" for x in results)
    finally:
        w.stop()


def test_workers_supervisor_starts_named_cpu_workers_and_stops_them(env, tiny):
    r = env["redis"].client()
    host = os.uname().nodename
    proc = subprocess.Popen(
        [sys.executable, "-m", "gencli.cli", "workers", "--model", tiny, "--model-name", "tiny-pool", "--cpus", "2"],
        env=child_env(env["vars"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        keys = env["keys"]

        def beats() -> dict[str, dict]:  # worker name -> heartbeat, of this pool's workers
            found = {k.decode().removeprefix(keys.worker("")): r.get(k) for k in r.scan_iter(keys.worker("*"))}
            return {n: json.loads(v) for n, v in found.items() if v and json.loads(v).get("model") == "tiny-pool"}

        wait_for(lambda: len(beats()) == 2, 90, "both workers' heartbeats")
        names, infos = zip(*beats().items())
        assert sorted(n.split("@")[0].split(".")[0] for n in names) == ["cpu0", "cpu1"]  # cpu0[.tag]@host
        assert all(n.endswith(f"@{host}") for n in names)
        assert {i["device"] for i in infos} == {"cpu"}
        pids = {i["pid"] for i in infos}
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_hard_time_limit_fails_the_job_once_and_the_worker_goes_on(env, tiny, client):
    """Past its hard limit a job's rows leave the batch and the job fails; the worker, whose steps
    still run, lives on and serves the next job."""
    w = start_worker(env, tiny, "hard@test", "--model-name", "tiny-hard", "--batch_size", "2",
                     extra_env={"GENCLI_HARD_TIME_LIMIT": "1"})
    try:
        job = client.submit(PROMPTS * 20, model="tiny-hard", max_tokens=240, temperature=0)
        assert job.wait(60) is JobStatus.FAILED
        rec = job.record()
        assert rec.error_class == "HardTimeLimitExceeded" and rec.error_message == "hard time limit of 1 s exceeded"
        statuses = {x["status"] for x in job.result()}
        assert "pending" not in statuses and "cancelled" in statuses  # gencli retry can run them
        after = client.submit(["short"], model="tiny-hard", max_tokens=3)
        assert after.wait(60) is JobStatus.SUCCEEDED and w.alive()
    finally:
        w.stop()


def test_a_step_stuck_past_the_hard_time_limit_ends_the_worker(env, tiny, client):
    """A decoding step that does not return (injected: it waits while a file exists) cannot be
    stopped gently: the job fails and the process ends with 70, for a supervisor to restart."""
    stall = env["tmp"] / f"stall-{env['id']}"
    w = start_worker(env, tiny, f"stuck-{env['id']}@test", "--model-name", "tiny-stuck", "--batch_size", "2",
                     extra_env={"GENCLI_HARD_TIME_LIMIT": "1", "GENCLI_INJECT_STALL": str(stall)})
    try:
        stall.touch()
        job = client.submit(PROMPTS, model="tiny-stuck", max_tokens=240, temperature=0)
        assert w.proc.wait(60) == 70
        rec = job.record()
        assert rec.status == "failed" and rec.error_class == "HardTimeLimitExceeded"
        assert "was ended" in rec.error_message
    finally:
        stall.unlink(missing_ok=True)
        w.stop()
