"""Provenance and replay through the queue's faults: jobs that ran out of memory, were taken over
after a SIGKILL, or were cancelled and retried replay byte for byte on the CPU in float32, their
drawn seeds included; a seeded prompt makes the same text alone, in a batch of 8, beside another
job, through the out-of-memory ladder and a takeover; a changed model is refused, in-process and on
the workers (`replay --queue`), with both hashes.

Real `gencli worker` processes, a real redis-server of the module's own, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest
from click.testing import CliRunner
from services import start_worker
from tailing import reference, wait_for

from gencli.cli.main import main
from gencli.model.checkpoint import create_model
from gencli.model.provenance import model_identity
from gencli.storage.db import JobStatus
from gencli.worker.stream import read_log

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("queue_env")]

PROBE = "the probe:"


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _replay_ok(job_id: str, lines: int, *args: str, workers=()) -> str:
    r = cli("replay", job_id, *args)
    if r.exit_code != 0:  # keep the evidence: the record and what the workers logged of this job
        shown = cli("show", job_id, "--provenance").output
        logs = "\n".join(f"--- {w.name}:\n" + "\n".join(ln for ln in w.log.read_text().splitlines() if job_id in ln)
                         for w in workers)
        raise AssertionError(f"{r.output}\n--- gencli show --provenance:\n{shown}\n{logs}")
    assert f"replayed {lines} line(s) of job {job_id}" in r.stderr and f"{lines} equal, 0 differ" in r.stderr, r.output
    assert r.stdout.count(": equal, ") == lines
    return r.output


def test_jobs_through_oom_a_takeover_and_a_cancelled_retry_replay_byte_for_byte(env, tiny, client):
    model = f"tiny-replay-{env['id']}"
    # Out of memory at 5 rows or more: the two jobs' 11 rows go down the ladder at once. Both are
    # queued before the worker starts, so it takes them together (submitted to a running worker, the
    # first could end before the second arrived, on a busy machine: then nothing of it is taken over).
    drawn = client.submit(["drawn one:", "drawn two:", "drawn three:"], model=model, max_tokens=96,
                          temperature=1.0, top_k=1000)
    probes = [PROBE] + [f"company {n}:" for n in range(7)]
    seeded = client.submit(probes, model=model, max_tokens=96, temperature=0.9, top_k=500, seed=7)
    a = start_worker(env, tiny, f"oomy-{env['id']}@test", "--model-name", model, "--batch_size", "8",
                     extra_env={"GENCLI_INJECT_OOM": "5"})
    b = None
    try:
        r = env["redis"].client()
        wait_for(lambda: all(len(read_log(r, env["keys"], j.id)) > 30 for j in (drawn, seeded)), 60, "both decoding")
        a.kill(signal.SIGKILL)
        b = start_worker(env, tiny, f"heir-{env['id']}@test", "--model-name", model, "--batch_size", "8")
        for j in (drawn, seeded):
            assert j.wait(120) is JobStatus.SUCCEEDED
            assert j.record().attempts == 2 and j.record().worker == b.name
        assert "out of memory on cpu at" in a.log.read_text()

        # Determinism: the seeded probe is what it makes alone, after all of that.
        out = [x["output"] for x in seeded.result()]
        assert out == reference(tiny, probes, 96, temperature=0.9, top_k=500, seed=7)

        # Each unseeded line drew a seed, recorded before its first token and kept by the takeover.
        rows = drawn.result(provenance=True)
        seeds = [x["provenance"]["sampling"]["seed"] for x in rows]
        assert len(set(seeds)) == 3 and all(x["provenance"]["sampling"]["seed_drawn"] for x in rows)
        assert [x["output"] for x in rows] == [
            reference(tiny, [p], 96, temperature=1.0, top_k=1000, seed=s)[0]
            for p, s in zip(["drawn one:", "drawn two:", "drawn three:"], seeds, strict=True)]
        p = rows[0]["provenance"]
        assert p["attempt"] == 2 and p["worker"] == b.name and p["device"] == "cpu" and p["dtype"] == "float32"
        assert p["batch_invariant"] is True and p["model"]["sha256"] == model_identity(tiny)["sha256"]
        assert p["tokenizer"]["name"] == "cl100k_base" and p["sampling"]["max_tokens"] == 96

        # A job cancelled mid-way, then retried: a new epoch, a new drawn seed, replayed too.
        third = client.submit(["cut short:"], model=model, max_tokens=200, temperature=1.0, top_k=1000)
        wait_for(lambda: len(read_log(r, env["keys"], third.id)) > 10, 60, "the third job decoding")
        third.cancel()
        assert third.wait(30) is JobStatus.CANCELLED
        cut_seed = third.items()[0].sampling["seed"]
        _replay_ok(third.id, 1, workers=(a, b))  # as far as it went
        assert third.retry() == 1 and third.wait(60) is JobStatus.SUCCEEDED
        assert third.items()[0].sampling["seed"] != cut_seed

        for j, n in ((drawn, 3), (seeded, 8), (third, 1)):
            _replay_ok(j.id, n, workers=(a, b))
        shown = cli("show", drawn.id, "--provenance")
        assert shown.exit_code == 0, shown.output
        assert "attempt 1: " in shown.output and f"attempt 2: {b.name}" in shown.output
        assert f"sha256 {model_identity(tiny)['sha256']}" in shown.output and "(drawn)" in shown.output
        lines = [json.loads(x) for x in cli("results", drawn.id).stdout.splitlines()]
        assert [x["provenance"]["sampling"]["seed"] for x in lines] == seeds
        bare = [json.loads(x) for x in cli("results", drawn.id, "--no-provenance").stdout.splitlines()]
        assert all("provenance" not in x for x in bare) and [x["output"] for x in bare] == [x["output"] for x in rows]
    finally:
        a.stop()
        if b:
            b.stop()


def test_a_changed_model_is_refused_in_process_and_on_the_workers_with_both_hashes(env, client):
    tmp = env["tmp"] / f"swap-{env['id']}"
    path = create_model(tmp / "model", preset="tiny", tokenizer="cl100k_base", chat_format="chatml", seed=11)
    kept = shutil.copytree(path, tmp / "copy")
    model = f"swap-{env['id']}"
    w = start_worker(env, str(path), f"first-{env['id']}@test", "--model-name", model)
    try:
        job = client.submit(["one:", "two:"], model=model, max_tokens=30, temperature=0.8)
        assert job.wait(60) is JobStatus.SUCCEEDED
        out = _replay_ok(job.id, 2, "--queue", "--timeout", "60")  # on the workers: the same bytes
        assert "on job " in out
    finally:
        w.stop()
    r = cli("replay", job.id, "--queue", "--timeout", "1")  # nobody serves it now: said, and given up on
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"no live worker serves model {model}" in r.stderr and "still queued after 1" in r.output, r.output
    before = model_identity(path)["sha256"]
    create_model(path, preset="tiny", tokenizer="cl100k_base", chat_format="chatml", seed=12)  # new weights
    after = model_identity(path)["sha256"]
    assert before != after
    r = cli("replay", job.id)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "changed since" in r.output and before in r.output and after in r.output, r.output
    _replay_ok(job.id, 2, "--model", str(kept))  # a copy of the recorded weights is accepted
    w = start_worker(env, str(path), f"second-{env['id']}@test", "--model-name", model)
    try:
        r = cli("replay", job.id, "--queue", "--timeout", "60")
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert before in r.output and after in r.output, r.output
    finally:
        w.stop()
    r = cli("replay", job.id, "--line", "9")
    assert r.exit_code == 1 and "no prompt at line 9" in r.output
