"""The README's queue claims, from the command line: cancel, retry, tail --from-seq and --line,
tail's exit status for a failed job, --stop, the delivery limit end to end, `gencli workers`
restarting a worker that exited 70, and the stored error_where.

Real `gencli worker` processes, a real redis-server, SQLite and PostgreSQL (the `env` fixture).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from services import child_env, start_worker
from tailing import reference, wait_for

from gencli.cli.main import main
from gencli.model.errors import GencliError
from gencli.storage.db import JobStatus

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("queue_env")]


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_cancel_and_retry_from_the_command_line(env, client, tiny, tmp_path):
    # the cancel comes while the job runs, however slow this machine: its worker's decoding waits
    # while the stall file exists (a 240-token line alone can end before a busy CLI call does)
    model = f"tiny-cancel-{env['id']}"
    stall = tmp_path / "stall"
    w = start_worker(env, tiny, f"cancel-{env['id']}@test", "--model-name", model,
                     extra_env={"GENCLI_INJECT_STALL": str(stall)})
    try:
        stall.touch()
        job = client.submit(["cancel me"], model=model, max_tokens=240, temperature=1.0, top_k=1000, seed=4)
        wait_for(lambda: job.status is JobStatus.RUNNING, 30, "the job to run")
        r = cli("cancel", job.id)
        assert r.exit_code == 0 and "asked to stop" in r.output, r.output
        stall.unlink()
        assert job.wait(30) is JobStatus.CANCELLED
        t = cli("tail", job.id)
        assert t.exit_code == 3 and f"[job {job.id} cancelled" in t.stderr
        r = cli("retry", job.id)
        assert r.exit_code == 0 and "1 line(s) queued again" in r.output, r.output
        assert job.wait(60) is JobStatus.SUCCEEDED
    finally:
        stall.unlink(missing_ok=True)
        w.stop()
    (res,) = job.result()
    assert res["output"] == reference(tiny, ["cancel me"], 240, temperature=1.0, top_k=1000, seed=4)[0]
    r = cli("retry", job.id)
    assert r.exit_code == 0 and "nothing to retry" in r.output
    r = cli("cancel", "0" * 32)
    assert r.exit_code == 1 and "no job" in r.output and "Traceback" not in r.output


def test_tail_from_seq_and_line(client, worker, tiny):
    job = client.submit(["first line", "second line"], model="tiny", max_tokens=12, temperature=0)
    assert job.wait(60) is JobStatus.SUCCEEDED
    expected = reference(tiny, ["first line", "second line"], 12)
    t = cli("tail", job.id, "--line", "2")
    assert t.exit_code == 0 and t.stdout == expected[1] + "\n", t.output
    events = list(job.events())
    k = next(e["seq"] for e in events if e["t"] == "tok" and e["i"] == 1) - 1  # up to line 2's first token
    t = cli("tail", job.id, "--line", "2", "--from-seq", str(k))
    assert t.exit_code == 0 and t.stdout == expected[1] + "\n", t.output
    line2 = [e["seq"] for e in events if e["t"] == "tok" and e["i"] == 1]
    later = line2[len(line2) // 2]  # resume in the middle of line 2
    t = cli("tail", job.id, "--line", "2", "--from-seq", str(later))
    assert t.exit_code == 0
    rest = "".join(e["text"] for e in events if e["t"] == "tok" and e["i"] == 1 and e["seq"] > later)
    assert t.stdout == rest + "\n"  # exactly what came after that event, nothing before
    t = cli("tail", job.id, "--line", "7")
    assert t.exit_code == 1 and "no prompt at line 7" in t.output


def test_stop_strings_end_lines_on_the_queue_side(client, worker, tiny):
    text = reference(tiny, ["Once upon a time"], 40)[0]
    stop = text[10:14]
    assert stop and stop in text
    r = cli("submit", "--model", "tiny", "--prompt", "Once upon a time", "--max_tokens", "40", "--temperature", "0",
            "--stop", stop, "--follow")
    assert r.exit_code == 0, r.output
    job = client.job(r.stdout.splitlines()[0])
    (res,) = job.result()
    assert res["output"] == text[: text.index(stop)] and res["finish_reason"] == "stop"


def test_a_failed_job_tails_with_exit_1_and_shows_where_it_failed(env, tiny, client):
    model = f"tiny-oomcpu-{env['id']}"
    w = start_worker(env, tiny, f"oomcpu-{env['id']}@test", "--model-name", model,
                     extra_env={"GENCLI_INJECT_OOM": "1"})
    try:
        job = client.submit(["x"], model=model, max_tokens=4)
        assert job.wait(60) is JobStatus.FAILED
        t = cli("tail", job.id)
        assert t.exit_code == 1 and "out of memory even on the CPU" in t.stderr
        rec = job.record()
        assert "runner.py" in rec.error_where and rec.error_where.endswith("; device cpu, batch size 1")
        s = cli("show", job.id)
        assert s.exit_code == 0 and f"  at {rec.error_where}" in s.output
    finally:
        w.stop()


def test_a_job_that_keeps_killing_its_worker_fails_after_the_delivery_limit(env, tiny, client):
    model = f"tiny-crash-{env['id']}"
    extra = {"GENCLI_MAX_DELIVERIES": "2"}
    job = client.submit(["crash", "crash again"], model=model, max_tokens=240, temperature=0)
    for n in range(2):  # each delivery: the worker dies while it runs the job
        w = start_worker(env, tiny, f"crash{n}-{env['id']}@test", "--model-name", model, "--batch_size", "1",
                         extra_env=extra)
        wait_for(lambda n=n: job.record().attempts == n + 1 and job.status is JobStatus.RUNNING, 60, "a delivery")
        w.kill(signal.SIGKILL)
        w.proc.wait(10)
    w = start_worker(env, tiny, f"crash2-{env['id']}@test", "--model-name", model, extra_env=extra)
    try:
        assert job.wait(60) is JobStatus.FAILED
        rec = job.record()
        assert rec.error_class == "DeliveryLimit" and "delivered 2 times" in rec.error_message
        assert {it["status"] for it in job.result()} == {"failed"}  # retry can run them
        other = client.submit(["fine"], model=model, max_tokens=3)
        assert other.wait(60) is JobStatus.SUCCEEDED  # other jobs keep flowing
    finally:
        w.stop()


def test_workers_restarts_a_worker_that_exited_70_after_a_hard_time_limit(env, tiny, client):
    model = f"tiny-pool70-{env['id']}"
    log = env["tmp"] / f"pool70-{env['id']}.log"
    stall = env["tmp"] / f"pool70-stall-{env['id']}"  # while it exists, decoding steps do not return
    proc = subprocess.Popen(
        [sys.executable, "-m", "gencli.cli", "workers", "--model", tiny, "--model-name", model, "--cpus", "1",
         "--batch_size", "1"],
        env=child_env(env["vars"], {"GENCLI_HARD_TIME_LIMIT": "1", "GENCLI_INJECT_STALL": str(stall)}),
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "ready" in log.read_text(), 60, "the worker")
        stall.touch()
        stuck = client.submit(["long"] * 30, model=model, max_tokens=240, temperature=0)
        assert stuck.wait(90) is JobStatus.FAILED and stuck.record().error_class == "HardTimeLimitExceeded"
        wait_for(lambda: "exited with 70; restarting" in log.read_text(), 60, "the supervisor's restart")
        stall.unlink()
        after = client.submit(["short"], model=model, max_tokens=3)
        assert after.wait(90) is JobStatus.SUCCEEDED  # served by the restarted worker
        beats = [json.loads(env["redis"].client().get(k)) for k in
                 env["redis"].client().scan_iter(env["keys"].worker("*"))]
        assert any(b["model"] == model for b in beats)
    finally:
        stall.unlink(missing_ok=True)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.1)


def test_an_idempotency_key_reused_for_a_different_request_is_refused(client, worker):
    first = cli("submit", "--model", "tiny", "--prompt", "same", "--max_tokens", "3", "--idempotency-key", "k-reuse")
    assert first.exit_code == 0, first.output
    again = cli("submit", "--model", "tiny", "--prompt", "same", "--max_tokens", "3", "--idempotency-key", "k-reuse")
    assert again.exit_code == 0 and again.stdout == first.stdout  # the same request: the same job
    before = len(client.store.list_jobs(limit=1000))
    for change in (["--prompt", "other"], ["--prompt", "same", "--max_tokens", "4"]):
        r = cli("submit", "--model", "tiny", *change, "--idempotency-key", "k-reuse")
        assert r.exit_code == 1 and "was used for a different request" in r.output, r.output
    assert len(client.store.list_jobs(limit=1000)) == before


def test_a_custom_id_used_twice_is_refused_by_submit_and_generate(client, tiny, tmp_path):
    f = tmp_path / "dup.jsonl"
    f.write_text('{"custom_id": "a", "prompt": "one"}\n{"custom_id": "b", "prompt": "two"}\n'
                 '{"custom_id": "a", "prompt": "three"}\n')
    before = len(client.store.list_jobs(limit=1000))
    for args in (["submit", "--model", "tiny"], ["generate", "--model", tiny, "--device", "cpu"]):
        r = cli(*args, "--prompt_file", str(f))
        assert r.exit_code == 1, r.output
        assert "dup.jsonl:3: custom_id 'a' is used again (first on line 1)" in r.output
    assert len(client.store.list_jobs(limit=1000)) == before


def test_text_that_is_not_valid_unicode_is_refused_by_submit_in_one_line_and_queues_nothing(env, client, tmp_path):
    """Real processes, as a shell runs them: Python decodes an argument that is not UTF-8 with
    surrogateescape (the byte 0xff arrives as U+DCFF), which CliRunner would not reproduce."""
    model = f"nobody-{env['id']}"  # no worker takes its messages: one that was queued would stay there
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"prompt": "fine"}\n{"messages": [{"role": "user", "content": "abc\\ud83c"}]}\n')
    surrogate = "a lone surrogate (U+D83C) at character 3 is not valid Unicode: send UTF-8 text"
    cases = [
        ([b"--prompt", b"abc\xff"], None, 1,
         "Error: --prompt: not valid UTF-8 (byte 0xff at character 3): give UTF-8 text"),
        ([b"--prompt", b"fine", b"--prompt", b"\xfe"], None, 1,
         "Error: --prompt 2: not valid UTF-8 (byte 0xfe at character 0): give UTF-8 text"),
        ([b"--prompt", b"fine", b"--idempotency-key", b"key-\xff"], None, 1,
         "Error: idempotency_key: not valid UTF-8 (byte 0xff at character 4): give UTF-8 text"),
        ([b"--prompt_file", str(lone).encode()], None, 1, f"Error: {lone}:2: messages[0].content: {surrogate}"),
        ([b"--prompt_file", b"-"], b"fine\nabc\xff\n", 1,
         "Error: <stdin>:2: not UTF-8 text (byte 0xff at character 3); save the file as UTF-8"),
        ([b"--prompt", b"fine", b"--stop", b"\xfe"], None, 2,
         "Error: Invalid value for '--stop': not valid UTF-8 (byte 0xfe at character 0): give UTF-8 text"),
    ]
    before = len(client.store.list_jobs(limit=10_000))
    for args, stdin, status, message in cases:
        r = subprocess.run([sys.executable, "-m", "gencli.cli", "submit", "--model", model, *args], input=stdin or b"",
                           env=child_env(env["vars"]), capture_output=True, timeout=60, check=False)
        err = r.stderr.decode(errors="replace")
        assert r.returncode == status and "Traceback" not in err, (args, err)
        assert err.strip().splitlines()[-1] == message, (args, err)
        assert status != 1 or err.count("\n") == 1, err  # (a usage error adds click's usage lines)
    assert len(client.store.list_jobs(limit=10_000)) == before
    broker = env["redis"].client()
    assert sum(broker.llen(k) for k in env["keys"].queue_lists(f"gen.{model}")) == 0

    # the submit library holds its callers to the same: a str from JSON or os.fsdecode, say
    for call, message in [
        (lambda: client.submit(["fine", "abc\ud83c"], model=model), f"prompts[1]: {surrogate}"),
        (lambda: client.submit([[{"role": "user", "content": "abc\udcff"}]], model=model, chat=True),
         "prompts[0][0].content: not valid UTF-8 (byte 0xff at character 3): give UTF-8 text"),
        (lambda: client.submit(["fine"], model=model, stop=["abc\ud83c"]), f"stop[0]: {surrogate}"),
        (lambda: client.submit(["fine"], model=model, meta={"user": "abc\ud83c"}), f"meta.user: {surrogate}"),
    ]:
        with pytest.raises(GencliError) as e:
            call()
        assert str(e.value) == message
    assert len(client.store.list_jobs(limit=10_000)) == before


def test_submit_to_a_model_no_worker_serves_warns_or_with_wait_for_worker_fails(client, worker):
    r = cli("submit", "--model", "tiny-typo", "--prompt", "hello")
    assert r.exit_code == 0 and len(r.stdout.strip()) == 32  # queued all the same: a worker may start later
    assert "no live worker serves model tiny-typo yet" in r.stderr and "models served now: tiny" in r.stderr
    client.job(r.stdout.strip()).cancel()
    before = len(client.store.list_jobs(limit=1000))
    r = cli("submit", "--model", "tiny-typo", "--prompt", "hello", "--wait-for-worker", "0.5")
    assert r.exit_code == 1 and "no live worker serves model tiny-typo after 0.5 s: nothing was submitted" in r.output
    assert len(client.store.list_jobs(limit=1000)) == before
    r = cli("submit", "--model", "tiny", "--prompt", "hello", "--max_tokens", "2", "--wait-for-worker", "5")
    assert r.exit_code == 0 and "no live worker" not in r.stderr


def test_ctrl_c_during_submit_exits_130_without_a_traceback_and_queues_nothing(env, client):
    before = len(client.store.list_jobs(limit=1000))
    p = subprocess.Popen([sys.executable, "-m", "gencli.cli", "submit", "--model", "tiny-nobody", "--prompt", "hi",
                          "--wait-for-worker", "60"], env=child_env(env["vars"]), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert b"waiting up to 60 s" in p.stderr.readline()  # waiting for a worker that never comes
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 130
    finally:
        p.kill()
    err = p.stderr.read().decode()
    assert "[interrupted]" in err and "Traceback" not in err and "Aborted" not in err
    assert len(client.store.list_jobs(limit=1000)) == before


def test_show_and_results_read_well(client, worker, tiny):
    job = client.submit(["first line", "second line"], model="tiny", max_tokens=6, temperature=0)
    assert job.wait(60) is JobStatus.SUCCEEDED
    s = cli("show", job.id)
    assert s.exit_code == 0
    import re

    assert re.search(r"created \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC  started .+ UTC  finished .+ UTC", s.output)
    assert re.search(r"tokens/s \d+\.\d\b", s.output), s.output
    t = cli("results", job.id, "--format", "text")
    expected = reference(tiny, ["first line", "second line"], 6)
    assert t.stdout == f"=== line 1 ===\n{expected[0]}\n=== line 2 ===\n{expected[1]}\n"
    log = worker.log.read_text()  # the banner tells the truth: up to 8 jobs at once, on 8 slots
    assert "concurrency: 8 (thread)" in log and "up to 8 jobs at once, 8 slots, at most 6 per job" in log


def test_submit_past_gencli_max_queued_is_refused_and_records_nothing(env, client, monkeypatch):
    model = f"unserved-bound-{env['id']}"
    monkeypatch.setenv("GENCLI_MAX_QUEUED", "2")
    for _ in range(2):
        assert cli("submit", "--model", model, "--prompt", "wait").exit_code == 0
    before = len(client.store.list_jobs(limit=10_000))
    r = cli("submit", "--model", model, "--prompt", "one too many")
    assert r.exit_code == 1 and "has 2 queued jobs already (GENCLI_MAX_QUEUED=2)" in r.output, r.output
    assert "Traceback" not in r.output and len(client.store.list_jobs(limit=10_000)) == before
    monkeypatch.setenv("GENCLI_MAX_QUEUED", "many")
    r = cli("submit", "--model", model, "--prompt", "x")
    assert r.exit_code == 1 and "GENCLI_MAX_QUEUED='many': use a whole number >= 1" in r.output, r.output


def test_submit_num_samples_runs_each_prompt_n_times_with_seed_plus_k(client, worker, tiny):
    r = cli("submit", "--model", "tiny", "--prompt", "Once", "--prompt", "Twice", "--num_samples", "3",
            "--seed", "40", "--max_tokens", "8", "--temperature", "1.0")
    assert r.exit_code == 0, r.output
    job = client.job(r.stdout.strip())
    assert job.wait(60) is JobStatus.SUCCEEDED
    rows = [json.loads(x) for x in cli("results", job.id).stdout.splitlines()]
    assert [(x["prompt"], x["sample"]) for x in rows] == [(p, k) for p in ("Once", "Twice") for k in (1, 2, 3)]
    for p in ("Once", "Twice"):  # sample k is what generate's sample k makes: seed + k
        want = [reference(tiny, [p], 8, temperature=1.0, seed=40 + k)[0] for k in range(3)]
        assert [x["output"] for x in rows if x["prompt"] == p] == want
    t = cli("tail", job.id)
    assert t.exit_code == 0 and "line 2, sample 3" in t.output, t.output


def test_list_shows_a_running_jobs_tokens_so_far(client, worker):
    job = client.submit([f"a long story {i}" for i in range(24)], model="tiny", max_tokens=240, temperature=0)
    try:
        wait_for(lambda: client.store.live_progress([job.id])[job.id][0] > 0 and job.status is JobStatus.RUNNING, 60,
                 "checkpointed tokens")
        r = cli("list")
        row = next(x for x in r.output.splitlines() if x.startswith(job.id))
        status, tokens, tps = row.split()[1], int(row.split()[-2]), row.split()[-1]
        assert tokens > 0 and tps != "-", row
        assert status == "running" or job.status.done  # (it may have ended just then)
    finally:
        job.cancel()


def test_a_structured_job_from_the_command_line_validates_shows_its_schema_and_replays(client, worker, tmp_path):
    """`gencli submit --json-schema` through the queue: every line that ends with stop validates (a
    random model: the constraint alone), `show --provenance` prints the schema each line ran with,
    its keys in the order given, and `gencli replay` makes every line again, equal."""
    import jsonschema

    schema = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 6},
                                               "ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["word", "ok", "n"], "additionalProperties": False}
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(schema))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a record:\nanother record:\na third:\n")
    r = cli("submit", "--model", "tiny", "--json-schema", str(f), "--prompt_file", str(prompts), "--each-line",
            "--max_tokens", "60", "--temperature", "1", "--seed", "3")
    assert r.exit_code == 0, r.output
    job = client.job(r.stdout.strip().splitlines()[-1])
    assert job.wait(120) is JobStatus.SUCCEEDED
    rows = job.result()
    assert any(row["finish_reason"] == "stop" for row in rows), rows
    for row in rows:
        if row["finish_reason"] == "stop":
            jsonschema.validate(json.loads(row["output"]), schema)
            assert list(json.loads(row["output"])) == ["word", "ok", "n"]
    shown = cli("show", job.id, "--provenance").output
    assert shown.count(f"  structured {json.dumps({'json': schema})}") == 3, shown
    replayed = cli("replay", job.id)
    assert replayed.exit_code == 0 and "3 equal, 0 differ" in replayed.stderr, replayed.output
