"""A bug in any of a worker's long-lived threads ends the worker at once with a non-zero status
(worker/supervise.py), never a worker that lives on with a dead thread and holds its jobs forever;
another worker takes the job over and it ends as an unfaulted run would.

GENCLI_INJECT_CRASH makes the named thread raise the first time it works for a running job. Real
`gencli worker` processes, a real redis-server of the module's own, SQLite and PostgreSQL.
"""

from __future__ import annotations

import pytest
from services import start_worker
from tailing import Tailer, reference

from gencli.storage.db import JobStatus
from gencli.storage.settings import CRASH_POINTS
from gencli.worker.supervise import EXIT_CRASHED

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("queue_env")]

PROMPTS = [f"a tale of {n}:" for n in range(4)]


@pytest.mark.parametrize("where", CRASH_POINTS)
def test_a_bug_in_a_worker_thread_ends_the_worker_and_another_finishes_its_job(env, tiny, client, where):
    model = f"tiny-crash-{where}-{env['id']}"
    # the lease keeper and the heartbeat crash on their first round with a job running: the job's
    # decoding waits while this file exists, so that it is running when they look
    stall = env["tmp"] / f"crash-stall-{where}-{env['id']}"
    faults = {"GENCLI_INJECT_CRASH": where, "GENCLI_INJECT_STALL": str(stall)}
    a = start_worker(env, tiny, f"crashing-{where}-{env['id']}@test", "--model-name", model, "--batch_size", "2",
                     extra_env=faults)
    b = None
    try:
        if where in ("lease", "heartbeat"):
            stall.touch()  # (after the worker's warm-up)
        job = client.submit(PROMPTS, model=model, max_tokens=120, temperature=0)
        tailer = Tailer(job)
        tailer.start()
        assert a.proc.wait(30) == EXIT_CRASHED
        log = a.log.read_text()
        assert f"worker thread {where} crashed" in log and "InjectedCrash: injected by GENCLI_INJECT_CRASH" in log
        assert "Traceback (most recent call last)" in log  # the bug is logged with where it happened
        stall.unlink(missing_ok=True)
        assert job.status is JobStatus.RUNNING  # held by the dead worker's lease until it runs out
        b = start_worker(env, tiny, f"heir-{where}-{env['id']}@test", "--model-name", model, "--batch_size", "2")
        assert job.wait(60) is JobStatus.SUCCEEDED
        tailer.join(30)
        stored = [x["output"] for x in job.result()]
        assert stored == reference(tiny, PROMPTS, 120)
        assert job.record().attempts == 2 and job.record().worker == b.name
        assert tailer.texts(len(PROMPTS)) == stored and tailer.error is None
        assert "crashed" not in b.log.read_text()
    finally:
        stall.unlink(missing_ok=True)
        a.stop()
        if b:
            b.stop()
