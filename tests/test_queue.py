"""The queue end to end: real Redis, real `gencli worker` processes, a real store (SQLite, then PostgreSQL)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from services import child_env, start_worker
from tailing import wait_for

from gencli.cli.main import main
from gencli.model.checkpoint import load_model
from gencli.model.params import SamplingParams
from gencli.model.textgen import TextGenerator
from gencli.storage.db import JobStatus

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("queue_env")]


def alone(model_dir, prompts, max_tokens, *, dtype="auto", temperature=0.0, seeds=None):
    """Outputs of each prompt run alone, in-process, without the queue (greedy, or with its seed, no top-k cut)."""
    tg = TextGenerator(load_model(model_dir, dtype=dtype))
    sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=None)
    seeds = seeds or [None] * len(prompts)
    return [tg.generate([tg.encode(p, chat=False)], sp.seeded(s))[0].text for p, s in zip(prompts, seeds, strict=True)]


PROMPTS = ["Once upon a time", "The sea is", "日本語のテキスト 🌍", "abc"]


def test_submit_then_tail_end_to_end(env, tiny, worker):
    r = CliRunner().invoke(main, ["submit", "--model", "tiny", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                                  "--max_tokens", "12", "--temperature", "0"])
    assert r.exit_code == 0, r.output
    job_id = r.output.strip()
    assert len(job_id) == 32
    t = CliRunner().invoke(main, ["tail", job_id])
    assert t.exit_code == 0, t.output
    expected = alone(tiny, PROMPTS[:2], 12)
    assert t.stdout == f"=== line 1 ===\n{expected[0]}\n=== line 2 ===\n{expected[1]}\n"
    assert f"[job {job_id} succeeded]" in t.output
    res = CliRunner().invoke(main, ["results", job_id])
    lines = [json.loads(x) for x in res.output.splitlines()]
    assert [x["output"] for x in lines] == expected
    assert lines[0]["usage"]["completion_tokens"] == 12 and lines[0]["finish_reason"] == "length"


def test_stream_equals_stored_output_byte_for_byte(client, tiny, worker):
    job = client.submit(PROMPTS, model="tiny", max_tokens=24, temperature=1.0, top_k=500, seed=11)
    texts = ["" for _ in PROMPTS]
    seqs, shown = [], []
    for d in job.stream():
        texts[d.item] += d.text
        seqs.append(d.seq)
        shown.append((d.item, texts[d.item]))
    assert seqs == sorted(set(seqs))  # in order, no repeats
    stored = [r["output"] for r in job.result(timeout=30)]
    assert texts == stored
    # what was on screen at every moment is a prefix of the final text: no replacement
    # character for half a UTF-8 character that the final text does not have
    assert all(stored[i].startswith(text) for i, text in shown)
    assert job.status is JobStatus.SUCCEEDED


def test_late_tailer_sees_everything_once_and_resumes_from_a_sequence_number(client, tiny, worker):
    job = client.submit(PROMPTS[:2], model="tiny", max_tokens=10, temperature=0)
    job.wait(30)
    events = list(job.events())
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["t"] == "start" and events[-1]["t"] == "end" and events[-1]["status"] == "succeeded"
    k = len(events) // 2
    assert list(job.events(after=k)) == events[k:]  # a reconnecting follower gets exactly the rest
    text = "".join(e["text"] for e in events if e["t"] == "tok" and e["i"] == 1)
    assert text == alone(tiny, PROMPTS[1:2], 10)[0]


def test_following_a_job_that_no_live_worker_serves_warns_and_ends_when_it_is_cancelled(client):
    from gencli.worker.client import NoWorkerWarning

    job = client.submit(["waits"], model="tiny-unserved", max_tokens=2)
    with pytest.warns(NoWorkerWarning, match="no live worker serves model tiny-unserved yet"):
        deltas = job.stream()  # warned when called, as submit warns
    assert job.cancel() is JobStatus.CANCELLED
    assert list(deltas) == []  # it ends with the job, never having run


def test_idempotency_key_gives_the_same_job(client, worker):
    before = len(client.store.list_jobs(limit=10_000))
    a = client.submit(["same"], model="tiny", max_tokens=3, idempotency_key="key-1")
    b = client.submit(["same"], model="tiny", max_tokens=3, idempotency_key="key-1")
    assert a.id == b.id
    assert a.wait(30) is JobStatus.SUCCEEDED
    assert len(client.store.list_jobs(limit=10_000)) == before + 1  # one job recorded, not two


def test_cancel_queued_job_never_runs(env, tiny, client):
    model = "tiny-cancel"  # no worker serves it yet: the job stays queued
    job = client.submit(["never"], model=model, max_tokens=5)
    r = CliRunner().invoke(main, ["status"])
    assert f"gen.{model}" in r.output and "no live worker serves this queue" in r.output
    assert job.cancel() is JobStatus.CANCELLED
    t = CliRunner().invoke(main, ["tail", job.id])
    assert t.exit_code == 3 and "cancelled" in t.output

    # Now a worker serves the model: it meets the cancelled job's message before the next job's.
    w = start_worker(env, tiny, f"cancel-{env['id']}@test", "--model-name", model)
    try:
        later = client.submit(["after the cancel"], model=model, max_tokens=3)
        assert later.wait(60) is JobStatus.SUCCEEDED
    finally:
        w.stop()
    rec = job.record()
    assert rec.status == "cancelled" and rec.attempts == 0 and rec.started_at is None
    events = list(job.events())
    assert [e for e in events if e["t"] == "start"] == []  # it never ran, not even briefly


def test_cancel_running_job_keeps_partial_output(client, env, tiny, worker):
    job = client.submit(["a long story"], model="tiny", max_tokens=200, temperature=1.0, top_k=1000, seed=1)
    stream = job.stream()
    got = ""
    for d in stream:
        got += d.text
        if len(got) > 20:
            job.cancel()
            break
    for d in stream:
        got += d.text
    assert job.wait(30) is JobStatus.CANCELLED
    (res,) = job.result()
    assert res["finish_reason"] == "cancelled"
    assert res["output"] == got
    assert 0 < res["usage"]["completion_tokens"] < 200


def test_context_overflow_is_refused_at_submit_and_nothing_is_recorded(client, worker):
    before = len(client.store.list_jobs(limit=10_000))
    r = CliRunner().invoke(main, ["submit", "--model", "tiny", "--prompt", "word " * 300, "--max_tokens", "10"])
    assert r.exit_code == 1
    assert "line 1: prompt of 301 tokens + max_tokens 10 = 311 exceeds the model's context of 256 tokens" in r.output
    assert len(client.store.list_jobs(limit=10_000)) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", " "], "empty --prompt"),
        ([], "give --prompt or --prompt_file"),
        (["--prompt", "x", "--max_tokens", "0"], "--max_tokens"),
        (["--prompt", "x", "--temperature", "-0.5"], "--temperature"),
        (["--prompt", "x", "--top_p", "0"], "--top_p"),
        (["--prompt", "x", "--top_p", "2"], "--top_p"),
        (["--prompt", "x", "--top_k", "-1"], "--top_k"),
        (["--prompt", "x", "--seed", "abc"], "--seed"),
        (["--prompt", "x", "--priority", "10"], "--priority"),
        (["--prompt", "x", "--each-line"], "--each-line goes with --prompt_file"),
        (["--prompt_file", "/nonexistent"], "no such prompt file"),
        (["--prompt_file", "DIR"], "is a directory"),
        (["--prompt_file", "EMPTY"], "is empty"),
        (["--prompt_file", "LATIN1", "--each-line"], ":2: not UTF-8 text"),
        (["--prompt_file", "BAD.jsonl"], "BAD.jsonl:2: not valid JSON"),
        (["--prompt_file", "BADPARAM.jsonl"], "line 1: top_p must be in (0, 1]"),
        (["--prompt_file", "UNKNOWN.jsonl"], "line 1: unknown parameter(s) colour"),
        (["--prompt", "x", "--model", "no/slash"], "no/slash: no such checkpoint"),
        (["--prompt", "x", "--model", "bad name"], "bad model name"),
    ],
)
def test_bad_submit_input_enqueues_nothing(env, client, tmp_path, args, message):
    files = {
        "DIR": tmp_path,
        "EMPTY": tmp_path / "empty.txt",
        "LATIN1": tmp_path / "latin1.txt",
        "BAD.jsonl": tmp_path / "BAD.jsonl",
        "BADPARAM.jsonl": tmp_path / "BADPARAM.jsonl",
        "UNKNOWN.jsonl": tmp_path / "UNKNOWN.jsonl",
    }
    files["EMPTY"].write_text("")
    files["LATIN1"].write_bytes("fine\ncaf\xe9\n".encode("latin-1"))
    files["BAD.jsonl"].write_text('{"prompt": "ok"}\n{oops\n')
    files["BADPARAM.jsonl"].write_text('{"prompt": "ok", "top_p": 0}\n')
    files["UNKNOWN.jsonl"].write_text('{"prompt": "ok", "colour": "red"}\n')
    args = [str(files.get(a, a)) for a in args]
    if "--model" not in args:
        args = ["--model", "tiny", *args]
    broker = env["redis"].client()

    def depth() -> int:  # every priority's list of the queue (a priority-0 job lands in `...:9`)
        return sum(broker.llen(k) for k in env["keys"].queue_lists("gen.tiny"))

    before, queued = len(client.store.list_jobs(limit=10_000)), depth()
    r = CliRunner().invoke(main, ["submit", *args])
    assert r.exit_code != 0
    assert message in r.output, r.output
    assert "Traceback" not in r.output
    assert len(client.store.list_jobs(limit=10_000)) == before
    assert depth() == queued


def test_jsonl_jobs_keep_custom_ids_and_per_line_params(client, tiny, worker, tmp_path):
    f = tmp_path / "batch.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in [
        {"custom_id": "first", "prompt": "Once upon a time", "max_tokens": 5},
        {"custom_id": "second", "messages": [{"role": "user", "content": "hi <|im_end|> there"}]},
    ]) + "\n")
    r = CliRunner().invoke(main, ["submit", "--model", "tiny", "--prompt_file", str(f), "--max_tokens", "8",
                                  "--temperature", "0", "--follow"])
    assert r.exit_code == 0, r.output
    assert "=== id first ===" in r.stdout and "=== id second ===" in r.stdout
    job_id = r.stdout.splitlines()[0]
    res = client.job(job_id).result()
    assert [x["custom_id"] for x in res] == ["first", "second"]
    assert res[0]["usage"]["completion_tokens"] == 5 and res[1]["usage"]["completion_tokens"] <= 8
    tg = TextGenerator(load_model(tiny))
    ids = tg.encode([{"role": "user", "content": "hi <|im_end|> there"}], chat=True)
    assert ids.count(tg.tokenizer.im_end_id) == 1  # the template's own; the literal text stayed text
    assert res[1]["output"] == tg.generate([ids], SamplingParams(max_tokens=8, temperature=0))[0].text


def test_show_and_list(client, worker):
    job = client.submit(["shown"], model="tiny", max_tokens=4, temperature=0)
    job.wait(30)
    s = CliRunner().invoke(main, ["show", job.id])
    assert s.exit_code == 0, s.output
    assert "succeeded" in s.output and 'prompt: "shown"' in s.output and worker.name in s.output
    lst = CliRunner().invoke(main, ["list", "--status", "succeeded"])
    assert job.id in lst.output


def test_two_workers_share_a_queue(env, tiny, worker, client):
    second = start_worker(env, tiny, f"w2-{env['id']}@test")
    try:
        jobs = [client.submit([f"prompt {n}"], model="tiny", max_tokens=40, temperature=0) for n in range(6)]
        for j in jobs:
            assert j.wait(60) is JobStatus.SUCCEEDED
        assert {j.record().worker for j in jobs} == {worker.name, second.name}
    finally:
        second.stop()


def test_out_of_memory_ladder_halves_then_matches_an_unfailed_run(env, tiny, client):
    w = start_worker(env, tiny, "oom@test", "--model-name", "tiny-oom", "--batch_size", "4",
                     "--max-slots-per-job", "4", extra_env={"GENCLI_INJECT_OOM": "2"})
    try:
        prompts = ["one", "two two", "three three three", "four", "five"]
        job = client.submit(prompts, model="tiny-oom", max_tokens=8, temperature=0)
        assert job.wait(60) is JobStatus.SUCCEEDED
        rec = job.record()
        assert rec.oom_retries == 2 and rec.final_batch_size == 1
        ladder = [line.split("gencli.worker] ")[1] for line in w.log.read_text().splitlines()
                  if "out of memory" in line]
        # 4 -> 2 -> 1 rows on this CPU worker, the newest sequences preempted (prefilled again later);
        # the rung after 1 (go on on the CPU) is a GPU worker's, and tests/test_gpu.py takes it
        assert ladder == [f"job {job.id}: out of memory on cpu at 4 rows; going on at 2 rows, 2 preempted",
                          f"job {job.id}: out of memory on cpu at 2 rows; going on at 1 rows, 1 preempted"]
        assert [r["output"] for r in job.result()] == alone(tiny, prompts, 8)
        texts = ["" for _ in prompts]
        for d in job.stream():
            texts[d.item] += d.text
        assert texts == alone(tiny, prompts, 8)  # the retries streamed nothing twice
    finally:
        w.stop()


def test_an_int8_worker_serves_jobs_batched_together_and_records_int8(env, tiny, client):
    w = start_worker(env, tiny, "int8@test", "--model-name", "tiny-int8", "--dtype", "int8", "--batch_size", "8")
    try:
        assert " in int8, loaded in " in w.log.read_text()
        shown = CliRunner().invoke(main, ["status"])
        assert shown.exit_code == 0 and any(w.name in ln and " cpu int8 " in ln for ln in shown.output.splitlines())
        prompts = ["one", "two two", "three three three", "four", "日本語 🌍"]
        greedy = client.submit(prompts, model="tiny-int8", max_tokens=16, temperature=0)
        sampled = client.submit(prompts[:3], model="tiny-int8", max_tokens=16, temperature=1.0, top_k=0)
        assert greedy.wait(60) is JobStatus.SUCCEEDED and sampled.wait(60) is JobStatus.SUCCEEDED
        assert [r["output"] for r in greedy.result()] == alone(tiny, prompts, 16, dtype="int8")
        made = sampled.provenance()
        seeds = [made["items"][i]["sampling"]["seed"] for i in range(3)]  # drawn by the worker, recorded
        assert [r["output"] for r in sampled.result()] == alone(tiny, prompts[:3], 16, dtype="int8",
                                                                 temperature=1.0, seeds=seeds)
        for job in (greedy, sampled):
            made = job.provenance()
            assert [a["dtype"] for a in made["attempts"]] == ["int8"]
            assert {(p["dtype"], p["device"], p["batch_invariant"]) for p in made["items"].values()} == \
                {("int8", "cpu", True)}
        r = CliRunner().invoke(main, ["replay", greedy.id])  # in this process, in the recorded int8
        assert r.exit_code == 0 and "5 equal, 0 differ" in r.stderr and " on cpu in int8" in r.stderr, r.output
    finally:
        w.stop()


def test_out_of_memory_even_at_batch_one_on_the_cpu_fails_the_job_not_the_worker(env, tiny, client):
    w = start_worker(env, tiny, "oom1@test", "--model-name", "tiny-oom1", extra_env={"GENCLI_INJECT_OOM": "1"})
    try:
        first = client.submit(["x"], model="tiny-oom1", max_tokens=4)
        assert first.wait(60) is JobStatus.FAILED
        rec = first.record()
        assert rec.error_class == "MemoryError" and "out of memory even on the CPU" in rec.error_message
        second = client.submit(["y"], model="tiny-oom1", max_tokens=4)
        assert second.wait(60) is JobStatus.FAILED  # taken and run: the worker is still serving
        assert w.alive()
    finally:
        w.stop()


def test_a_pickle_message_is_refused_and_the_worker_keeps_serving(env, client, worker):
    from kombu import Connection

    # onto the deployment's own queue: kombu prefixes it as the worker's Celery app does
    prefixed = {"global_keyprefix": env["keys"].prefix}
    logged = len(worker.log.read_text())
    with Connection(env["vars"]["GENCLI_REDIS_URL"], transport_options=prefixed) as conn:
        producer = conn.Producer(serializer="pickle")
        producer.publish({"evil": True}, routing_key="gen.tiny", exchange="", serializer="pickle",
                         headers={"task": "gencli.generate", "id": "pickled-1"})
    wait_for(lambda: "pickle" in worker.log.read_text()[logged:].lower(), 30, "the worker to refuse the pickle")
    job = client.submit(["after the pickle"], model="tiny", max_tokens=3)
    assert job.wait(30) is JobStatus.SUCCEEDED
    assert worker.alive()


def test_higher_priority_runs_first(env, tiny, client):
    low = [client.submit([f"low {n}"], model="tiny-prio", max_tokens=4, priority=0) for n in range(3)]
    high = client.submit(["high"], model="tiny-prio", max_tokens=4, priority=9)
    w = start_worker(env, tiny, "prio@test", "--model-name", "tiny-prio", "--max-jobs", "1")  # the queue's order
    try:
        for j in [*low, high]:
            assert j.wait(60) is JobStatus.SUCCEEDED
        started = sorted([*low, high], key=lambda j: j.record().started_at)
        assert started[0].id == high.id
        assert [j.id for j in started[1:]] == [j.id for j in low]  # the rest in submission order
    finally:
        w.stop()


@pytest.mark.parametrize("cancel", [False, True])
def test_ctrl_c_in_tail_detaches_or_cancels(env, client, worker, cancel):
    import signal
    import subprocess
    import sys

    # long enough to be running still when the interrupt comes: the tail starts a fresh interpreter,
    # and 4 lines of 240 tokens ended before it printed its first tokens from the replay log
    job = client.submit(["a long one"] * 32, model="tiny", max_tokens=240, temperature=1.0, top_k=1000, seed=2)
    args = [sys.executable, "-m", "gencli.cli", "tail", job.id] + (["--cancel-on-interrupt"] if cancel else [])
    p = subprocess.Popen(args, env=child_env(env["vars"], {"PYTHONUNBUFFERED": "1"}), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert p.stdout.read(40)  # tokens are flowing
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 130
    finally:
        p.kill()
    err = p.stderr.read().decode()
    assert "Traceback" not in err
    if cancel:
        assert "[cancelled job" in err
        assert job.wait(30) is JobStatus.CANCELLED
    else:
        assert "[detached; the job goes on" in err
        assert job.wait(60) is JobStatus.SUCCEEDED
