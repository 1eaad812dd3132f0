"""Scoring jobs: `gencli score` and Client.submit_score through a real worker, Redis and store (SQLite
and PostgreSQL), each line's scores checked against the model run alone in-process, bit for bit,
and against a plain forward pass; what a line may be (model/scoring.py) checked on its own."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from services import start_worker
from tailing import reference, scored_reference, wait_for

from gencli.cli.main import main
from gencli.model.chat import ChatFormat
from gencli.model.checkpoint import load_model
from gencli.model.errors import InvalidParameterError
from gencli.model.params import SamplingParams
from gencli.model.scoring import score_ids, scores, windows
from gencli.model.tokenizer import Tokenizer, load_encoding
from gencli.storage.db import JobStatus
from gencli.worker.prompts import PromptItem

TOK = Tokenizer(load_encoding("cl100k_base"), chatml=True)
SCORING = SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=0)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A bird?"},
        {"role": "assistant", "content": "A kestrel."}, {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "A heron, <|im_end|> as text."}]


# --- what a line is -------------------------------------------------------------------------------


def test_what_each_kind_of_line_scores():
    ids, spans = score_ids(TOK, ChatFormat.CHATML, {"text": "Hello world"})
    assert ids == [TOK.eot_id] + TOK.encode("Hello world") and spans == [[1, len(ids)]]  # every text token
    ids, spans = score_ids(TOK, ChatFormat.CHATML, {"prompt": "Q: 2+2? A:", "completion": " 4"})
    p = TOK.encode("Q: 2+2? A:")
    assert ids == p + TOK.encode(" 4") and spans == [[len(p), len(ids)]]
    ids, spans = score_ids(TOK, ChatFormat.CHATML, {"messages": CHAT})
    scored = [TOK.decode(ids[a:b]) for a, b in spans]
    assert scored == ["A kestrel.<|im_end|>", "A heron, <|im_end|> as text.<|im_end|>"]  # replies and their end
    assert ids.count(TOK.im_end_id) == len(CHAT)  # the reply's "<|im_end|>" text stayed text
    assert windows(list(range(10)), 4) == [{"token_ids": [0, 1, 2, 3], "from": 1},
                                           {"token_ids": [3, 4, 5, 6], "from": 1},
                                           {"token_ids": [6, 7, 8, 9], "from": 1}]  # each id but the first once
    assert [w["token_ids"] for w in windows(list(range(5)), 4)] == [[0, 1, 2, 3], [3, 4]]
    for bad, needle in [({"text": ""}, "an empty text"), ({"prompt": "x", "completion": ""}, "an empty completion"),
                        ({"messages": CHAT[:2]}, "needs an assistant message"), ({"txt": "x"}, "a line to score is"),
                        ({"text": "x", "extra": 1}, "a line to score is")]:
        with pytest.raises(InvalidParameterError, match=needle):
            score_ids(TOK, ChatFormat.CHATML, bad)


def test_scores_sum_the_spans_entries():
    record = {"prompt": [[5, None, []], [6, -1.5, []], [7, -0.5, []], [8, -2.0, []]], "scored": [[1, 2], [3, 4]]}
    s = scores(record, record["scored"], per_token=True)
    assert s == {"tokens": 2, "logprob": -3.5, "mean_logprob": -1.75, "perplexity": math.exp(1.75),
                 "token_logprobs": [[6, -1.5], [8, -2.0]]}


# --- through the queue -------------------------------------------------------------------------------



LINES = [{"text": "The kestrel hovers over the field."},
         {"prompt": "Question: what hunts mice? Answer:", "completion": " an owl", "custom_id": "qa"},
         {"messages": CHAT},
         {"text": "Ünïcödé, 日本語 and emoji 🦅 split across tokens"}]


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def forward_logprobs(model_dir: str, ids: list[int]) -> torch.Tensor:
    """Each position's log-softmax of a plain forward pass over the whole line: the textbook reference."""
    model = load_model(model_dir).model
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].float(), dim=-1)


@pytest.mark.slow
@pytest.mark.usefixtures("queue_env")
def test_gencli_score_a_file_gives_each_lines_scores_as_the_model_alone(env, tiny, worker, client, tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    r = run("score", "--model", "tiny", str(path), "--per-token", "--follow")
    assert r.exit_code == 0, r.output
    job_id = r.output.splitlines()[0]
    job = client.job(job_id)
    assert job.status is JobStatus.SUCCEEDED and job.record().kind == "generate"
    rows = [json.loads(line) for line in run("results", job_id).output.splitlines()]
    assert [r["custom_id"] for r in rows] == [None, "qa", None, None]
    for row, line in zip(rows, LINES):
        spec = {k: v for k, v in line.items() if k != "custom_id"}
        ids, spans = score_ids(TOK, ChatFormat.CHATML, spec)
        (ref, _), = scored_reference(tiny, [ids], SCORING)
        want = scores(ref, spans, per_token=True)
        assert {k: row[k] for k in want} == want  # bit for bit what the model computes alone
        full = forward_logprobs(tiny, ids)  # and what a plain forward pass computes, to float32's rounding
        for (token, lp), k in zip(row["token_logprobs"], [k for a, b in spans for k in range(a, b)]):
            assert token == ids[k] and lp == pytest.approx(full[k - 1, ids[k]].item(), abs=1e-4)
    total = sum(r["logprob"] for r in rows)
    n = sum(r["tokens"] for r in rows)
    assert f"{len(LINES)} lines, {n} tokens: logprob {total:.4f}" in r.output  # --follow ends with the totals
    assert job.score_summary()["perplexity"] == pytest.approx(math.exp(-total / n))
    text = run("results", job_id, "--format", "text").output
    assert "id qa: 2 tokens" in text and f"perplexity {math.exp(-total / n):.4f}" in text
    assert "scores 4 lines" in run("show", job_id).output
    replay = run("replay", job_id)  # the scores are checked again, float for float
    assert replay.exit_code == 0 and "4 equal" in replay.output, replay.output


@pytest.mark.slow
@pytest.mark.usefixtures("queue_env")
def test_scoring_rows_share_the_batch_with_generation_and_change_nothing(env, tiny, client):
    """A scoring job and a sampled generation job on one worker at once: each line's scores are bit
    for bit those alone, and the generated text is what it is alone."""
    model = f"tiny-mixed-{env['id']}"
    w = start_worker(env, tiny, f"mixed-{env['id']}@test", "--model-name", model, "--batch_size", "8")
    try:
        prompts = [f"story number {n}:" for n in range(4)]
        gen = client.submit(prompts, model=model, max_tokens=60, temperature=1.0, top_k=0, seed=3)
        lines = [PromptItem({"text": f"line {n}: " + "the heron waits " * n}, n + 1) for n in range(8)]
        job = client.submit_score(lines, model=model)
        assert gen.wait(120) is JobStatus.SUCCEEDED and job.wait(120) is JobStatus.SUCCEEDED
        assert [x["output"] for x in gen.result()] == reference(tiny, prompts, 60, temperature=1.0, top_k=None, seed=3)
        for it, row in zip(client.store.items(job.id), job.scores()):
            ids, spans = score_ids(TOK, ChatFormat.CHATML, it.prompt["score"])
            (ref, _), = scored_reference(tiny, [ids], SCORING)
            assert it.logprobs["prompt"] == ref["prompt"]
            assert row["logprob"] == math.fsum(e[1] for a, b in spans for e in ref["prompt"][a:b])
    finally:
        w.stop()


@pytest.mark.slow
@pytest.mark.usefixtures("queue_env")
def test_gencli_score_data_scores_a_prepped_split_in_windows_of_the_context(env, tiny, worker, client, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    ids = np.array(TOK.encode("The kestrel hovers. " * 120), dtype=np.uint32)  # 600 ids: 3 windows of 256
    ids.tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({"tokenizer": "cl100k_base", "encoding": "cl100k_base",
                                                "chat_format": "chatml", "dtype": "uint32"}))
    r = run("score", "--model", "tiny", "--data", str(data), "--split", "val")
    assert r.exit_code == 0, r.output
    job = client.job(r.output.split()[0])
    assert job.wait(120) is JobStatus.SUCCEEDED
    rows = job.scores()
    assert len(rows) == math.ceil((len(ids) - 1) / 255) and sum(r["tokens"] for r in rows) == len(ids) - 1
    (ref, _), = scored_reference(tiny, [ids[:256].tolist()], SCORING)
    assert rows[0]["logprob"] == math.fsum(e[1] for e in ref["prompt"][1:])
    assert job.scoring == {"per_token": False, "top": 0, "data": str(data), "split": "val"}
    (data / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "encoding": "gpt2", "chat_format": "legacy",
                                                "dtype": "uint32"}))
    bad = run("score", "--model", "tiny", "--data", str(data))
    assert bad.exit_code == 1 and "prep it again for this model" in bad.output


@pytest.mark.slow
@pytest.mark.usefixtures("queue_env")
def test_bad_lines_are_refused_with_their_file_and_line_and_nothing_is_queued(env, tiny, worker, client, tmp_path):
    before = len(client.store.list_jobs(limit=1000))
    for content, needle in [
        ('{"text": "ok"}\n{"messages": [{"role": "user", "content": "hi"}]}\n', "b.jsonl:2: a conversation to score "
                                                                                 "needs an assistant message"),
        ('{"text": "ok"}\n{"txt": "x"}\n', 'b.jsonl:2: a line to score is {"text"}'),
        ('{"text": "ok"}\nnot json\n', "b.jsonl:2: not valid JSON"),
        ('{"text": "ok", "custom_id": "a"}\n{"text": "no", "custom_id": "a"}\n', "custom_id 'a' is used again"),
        (json.dumps({"text": "word " * 400}) + "\n", "b.jsonl:1: its 402 tokens exceed the model's context of 256"),
    ]:
        path = tmp_path / "b.jsonl"
        path.write_text(content)
        r = run("score", "--model", "tiny", str(path))
        assert r.exit_code == 1 and needle in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    assert run("score", "--model", "tiny").exit_code == 2  # neither FILE nor --data
    assert len(client.store.list_jobs(limit=1000)) == before
    gen = client.submit(["hi"], model="tiny", max_tokens=2)
    gen.wait(60)
    r = run("results", gen.id)
    assert r.exit_code == 0 and "output" in r.output  # a generation job's results as ever


@pytest.mark.slow
@pytest.mark.usefixtures("queue_env")
def test_a_scoring_job_cancelled_then_retried_scores_every_line_once(env, tiny, client, tmp_path):
    model = f"tiny-scorecancel-{env['id']}"
    stall = tmp_path / "stall"
    w = start_worker(env, tiny, f"scorecancel-{env['id']}@test", "--model-name", model, "--batch_size", "2",
                     extra_env={"GENCLI_INJECT_STALL": str(stall)})
    try:
        stall.touch()  # the job's first step waits: the cancel comes while it runs
        lines = [PromptItem({"text": f"line {n} " * 20}, n + 1) for n in range(6)]
        job = client.submit_score(lines, model=model)
        wait_for(lambda: job.status is JobStatus.RUNNING, 30, "the job to start")
        row = next(x for x in run("list").output.splitlines() if x.startswith(job.id))
        assert row.split()[-3] == "0/6", row  # a running job's lines ended so far
        job.cancel()
        threading.Timer(1.0, stall.unlink).start()  # the worker sees the cancel within WATCH_EVERY
        assert job.wait(60) is JobStatus.CANCELLED
        assert job.retry() >= 1
        assert job.wait(60) is JobStatus.SUCCEEDED
        rows = job.scores()
        assert [r["tokens"] for r in rows] == [len(score_ids(TOK, ChatFormat.CHATML, ln.prompt)[0]) - 1 for ln in lines]
        assert all(r["status"] == "succeeded" for r in rows)
    finally:
        w.stop()
