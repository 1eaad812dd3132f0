"""The HTTP API against a real `gencli serve` (uvicorn), a real worker, real Redis and a real store
(SQLite and PostgreSQL), spoken to with httpx and with OpenAI's own client."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import httpx
import jsonschema
import openai
import pytest
from click.testing import CliRunner
from services import child_env, free_port, start_api, start_worker
from tailing import reference, scored_reference, sse_events, wait_for

from gencli.cli.main import main
from gencli.model.chat import ChatFormat
from gencli.model.params import SamplingParams
from gencli.model.prompt import encode_prompt
from gencli.model.provenance import model_identity
from gencli.model.tokenizer import Tokenizer, load_encoding
from gencli.storage.status import JobStatus

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("queue_env")]

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def api(env, worker):
    s = start_api(env)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(api):
    return openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def jobs_recorded(client) -> int:
    return len(client.store.list_jobs(limit=10_000))


def error_of(r: httpx.Response) -> dict:
    """The OpenAI-shaped error of a response, checked to be one line with no traceback."""
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "\n" not in err["message"] and "Traceback" not in r.text
    return err


# --- health, models, schema, metrics -----------------------------------------------------------------


def test_health_models_schema_and_metrics(api, worker):
    h = httpx.get(api.url + "/healthz")
    assert h.status_code == 200 and h.json() == {"store": "ok", "redis": "ok", "models": {"tiny": 1}}
    models = httpx.get(api.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"
    assert httpx.get(api.url + "/v1/models/nope").status_code == 404

    schema = httpx.get(api.url + "/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    for path, method in [("/v1/jobs", "post"), ("/v1/jobs/{job_id}/stream", "get"), ("/v1/completions", "post"),
                         ("/v1/chat/completions", "post"), ("/v1/files", "post"), ("/v1/batches", "post"),
                         ("/v1/batches/{batch_id}/cancel", "post"), ("/metrics", "get"), ("/healthz", "get")]:
        assert method in schema["paths"][path], (path, method)
    assert "max_completion_tokens" in schema["components"]["schemas"]["ChatRequest"]["properties"]
    assert httpx.get(api.url + "/docs").status_code == 200

    text = httpx.get(api.url + "/metrics").text
    for name in ("gencli_jobs{", "gencli_workers{", "gencli_request_duration_seconds_bucket",
                 "gencli_num_requests_running{", "gencli_generation_tokens_total{"):
        assert name in text, name
    assert 'gencli_workers{model="tiny"} 1.0' in text
    assert 'gencli_queue_depth{kind="generate",model="tiny"} 0.0' in text  # a served model's empty queue


def test_gencli_health_checks_this_hosts_worker_and_the_api(api, env):
    """The containers' health check (docker/): 0 with a worker beating from this host, or the API
    answering; 1 and one line otherwise."""
    base = child_env(env["vars"])
    run = lambda *a, e=base: subprocess.run([sys.executable, "-m", "gencli.cli", "health", *a], env=e,  # noqa: E731
                                            capture_output=True, text=True, timeout=60)
    r = run()
    assert r.returncode == 0 and r.stdout.startswith("ok: ") and "(cpu, tiny)" in r.stdout
    r = run("--url", api.url)
    assert r.returncode == 0 and "'tiny': 1" in r.stdout
    r = run("--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "does not answer" in r.stderr
    r = run(e={**base, "GENCLI_NAMESPACE": "nobody-here"})  # a deployment with no worker at all
    assert r.returncode == 1 and "no live worker on" in r.stderr and r.stderr.count("\n") == 1


# --- native routes ----------------------------------------------------------------------------------


def test_a_native_job_runs_and_reads_back(api, tiny, client):
    body = {"model": "tiny", "temperature": 0, "max_tokens": 12,
            "prompts": ["Once upon a time", {"prompt": "The sea", "custom_id": "sea", "max_tokens": 5}]}
    key = {"Idempotency-Key": f"k-{time.time()}"}
    r = httpx.post(api.url + "/v1/jobs", json=body, headers=key)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["object"] == "job" and job["status"] in ("queued", "running") and job["n_items"] == 2
    again = httpx.post(api.url + "/v1/jobs", json=body, headers=key)
    assert again.json()["id"] == job["id"]

    wait_for(lambda: httpx.get(f"{api.url}/v1/jobs/{job['id']}").json()["status"] == "succeeded", 60, "the job")
    shown = httpx.get(f"{api.url}/v1/jobs/{job['id']}").json()
    assert [it["custom_id"] for it in shown["items"]] == [None, "sea"]
    lines = [json.loads(x) for x in httpx.get(f"{api.url}/v1/jobs/{job['id']}/results").text.splitlines()]
    assert [x["output"] for x in lines] == reference(tiny, ["Once upon a time"], 12) + reference(tiny, ["The sea"], 5)
    assert lines[1]["usage"]["completion_tokens"] <= 5 and "sample" not in lines[0]
    made = lines[0]["provenance"]  # what made it, as `gencli results` gives it
    assert made["model"]["sha256"] == model_identity(tiny)["sha256"] and made["sampling"]["max_tokens"] == 12
    bare = httpx.get(f"{api.url}/v1/jobs/{job['id']}/results", params={"provenance": "false"}).text.splitlines()
    assert all("provenance" not in json.loads(x) for x in bare)

    # cancelling a finished job leaves it as it is; retrying it has nothing to do
    assert httpx.delete(f"{api.url}/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    assert httpx.post(f"{api.url}/v1/jobs/{job['id']}/retry").json()["retried"] == 0

    # pages: newest first, `after` the last id of the page before
    other = httpx.post(api.url + "/v1/jobs", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}).json()
    first = httpx.get(api.url + "/v1/jobs", params={"limit": 1}).json()
    assert [j["id"] for j in first["data"]] == [other["id"]] and first["has_more"]
    second = httpx.get(api.url + "/v1/jobs", params={"limit": 1, "after": first["last_id"]}).json()
    assert [j["id"] for j in second["data"]] == [job["id"]]
    assert httpx.get(api.url + "/v1/jobs", params={"after": "0" * 32}).status_code == 404


@pytest.mark.parametrize("body, needle", [
    ({"model": "tiny", "prompt": "  "}, "empty prompt: give some text"),
    ({"model": "tiny", "prompt": "x", "top_k": 200.0}, "top_k"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, "temperature must be"),
    ({"model": "tiny", "prompt": "x", "colour": "red"}, "colour: unknown field"),
    ({"model": "tiny", "prompt": "x", "prompts": ["y"]}, 'give "prompt" (one) or "prompts"'),
    ({"model": "tiny", "prompts": [{"prompt": "a", "top_p": 0}]}, "prompts[0]: top_p must be in (0, 1]"),
    ({"model": "tiny", "prompt": "word " * 300, "max_tokens": 10}, 'of 256 tokens: shorten the prompt, lower '
                                                                    'max_tokens, or send "truncate": true'),
    ({"model": "bad name!", "prompt": "x"}, "model"),
])
def test_a_refused_job_is_a_422_that_says_why_and_records_nothing(api, client, body, needle):
    before = jobs_recorded(client)
    r = httpx.post(api.url + "/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert needle in error_of(r)["message"]
    assert jobs_recorded(client) == before


def test_bad_bodies_and_unknown_things(api):
    r = httpx.post(api.url + "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in error_of(r)["message"]
    r = httpx.post(api.url + "/v1/completions")
    assert r.status_code == 422 and "the body is missing" in error_of(r)["message"]
    r = httpx.post(api.url + "/v1/jobs", data={"model": "tiny", "prompt": "x"})  # a form, not JSON
    assert r.status_code == 422 and "must be a JSON object" in error_of(r)["message"]
    assert error_of(httpx.get(api.url + "/v1/jobs/" + "f" * 32))["code"] == "not_found"
    assert httpx.get(api.url + "/v1/nothing-here").status_code == 404
    assert httpx.put(api.url + "/v1/jobs").status_code == 405
    r = httpx.get(api.url + "/v1/jobs/" + "f" * 32 + "/stream", headers={"Last-Event-ID": "x"})
    assert r.status_code in (404, 422)


# --- text that is not valid Unicode: refused, never recorded ----------------------------------------

LONE = "abc\ud83c"  # what the JSON text "abc\ud83c" decodes to: a lone surrogate at character 3
WHY = "a lone surrogate (U+D83C) at character 3 is not valid Unicode: send UTF-8 text"


def as_json(body) -> bytes:
    """body as JSON text with its lone surrogates as \\u escapes, as curl sends them (httpx's and
    openai's own encoders cannot encode such a str at all)."""
    return json.dumps(body).encode()


def queued(env, model: str) -> int:
    """Messages on a model's queue, every priority's list."""
    broker = env["redis"].client()
    return sum(broker.llen(k) for k in env["keys"].queue_lists(f"gen.{model}"))


@pytest.mark.parametrize("route, body, param", [
    ("/completions", {"prompt": LONE}, "prompt"),
    ("/completions", {"prompt": ["fine", LONE]}, "prompt[1]"),
    ("/completions", {"prompt": "fine", "stop": ["ok", LONE]}, "stop[1]"),
    ("/completions", {"prompt": "fine", "user": LONE}, "user"),
    ("/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
    ("/chat/completions", {"messages": [{"role": "system", "content": "hi"}, {"role": "user", "content": [
        {"type": "text", "text": "fine"}, {"type": "text", "text": LONE}]}]}, "messages[1].content[1].text"),
])
def test_a_lone_surrogate_in_an_openai_request_is_a_422_naming_the_field(oai, env, client, route, body, param):
    before, waiting = jobs_recorded(client), queued(env, "tiny")
    with pytest.raises(openai.UnprocessableEntityError) as e:  # the openai client, sending the JSON text as given
        oai.post(route, cast_to=object, content=as_json({"model": "tiny", "max_tokens": 2, **body}))
    assert e.value.param == param and e.value.code == "invalid_text" and e.value.type == "invalid_request_error"
    assert e.value.body["message"] == f"{param}: {WHY}"
    assert jobs_recorded(client) == before and queued(env, "tiny") == waiting


@pytest.mark.parametrize("body, param, message", [
    ({"prompt": LONE}, "prompt", None),
    ({"prompts": ["fine", {"prompt": "fine", "custom_id": LONE}]}, "prompts[1].custom_id", None),
    ({"prompts": [{"messages": [{"role": "user", "content": LONE}]}]}, "prompts[0].messages[0].content", None),
    ({"prompt": "fine", "stop": LONE}, "stop", None),
    ({"prompt": "fine", LONE: 1}, None, f"a key: {WHY}"),
])
def test_a_lone_surrogate_in_a_native_job_is_a_422_and_nothing_is_recorded_or_queued(api, env, client, body, param,
                                                                                     message):
    model = f"nobody-{env['id']}"  # no worker takes its messages: one that was queued would stay there
    before = jobs_recorded(client)
    r = httpx.post(api.url + "/v1/jobs", content=as_json({"model": model, **body}),
                   headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    err = error_of(r)
    assert err["param"] == param and err["code"] == "invalid_text"
    assert err["message"] == (message or f"{param}: {WHY}")
    assert jobs_recorded(client) == before and queued(env, model) == 0


def test_a_nul_is_refused_in_a_body_a_query_and_a_path_on_either_store(api, env, client):
    """PostgreSQL's text cannot hold U+0000 (a 500 there, once): refused alike on both stores."""
    model = f"nobody-{env['id']}"
    before = jobs_recorded(client)
    nul = "a NUL character (U+0000) at character 3 is not taken: remove it"
    for method, path, kwargs, param in [
        ("POST", "/v1/jobs", {"json": {"model": model, "prompt": "abc\x00"}}, "prompt"),
        ("GET", "/v1/files", {"params": {"purpose": "abc\x00"}}, "purpose"),
        ("GET", "/v1/files/abc%00", {}, "file_id"),
    ]:
        r = httpx.request(method, api.url + path, **kwargs)
        assert r.status_code == 422, r.text
        assert error_of(r)["param"] == param and error_of(r)["message"] == f"{param}: {nul}"
    assert jobs_recorded(client) == before and queued(env, model) == 0


def test_a_body_that_is_not_utf8_is_a_422_and_records_nothing(api, env, client):
    before = jobs_recorded(client)
    for route in ("/v1/jobs", "/v1/completions", "/v1/chat/completions"):
        r = httpx.post(api.url + route, content=b'{"model": "tiny", "prompt": "abc\xff"}',
                       headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert error_of(r)["message"] == "the body is not valid UTF-8 (byte 0xff at byte 32): send UTF-8 JSON"
    assert jobs_recorded(client) == before


def test_a_batch_with_text_that_is_not_valid_unicode_is_refused_with_its_line(oai, api, env, client, tmp_path):
    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
    lone = {**good, "custom_id": "b", "body": {**good["body"], "messages": [{"role": "user", "content": LONE}]}}
    files = {
        "escape": (as_json(good) + b"\n" + as_json(lone) + b"\n",
                   f"input file line 2: body.messages[0].content: {WHY}"),
        "bytes": (as_json(good) + b'\n{"custom_id": "c", "body": "abc\xff"}\n',
                  "input file line 2: not valid UTF-8 (byte 0xff at character 31): save the file as UTF-8"),
        "custom_id": (as_json(good) + b"\n" + as_json({**good, "custom_id": LONE}) + b"\n",
                      f"input file line 2: custom_id: {WHY}"),
    }
    for name, (content, message) in files.items():
        f = oai.files.create(file=(f"{name}.jsonl", content), purpose="batch")
        before, waiting = jobs_recorded(client), queued(env, "tiny")
        with pytest.raises(openai.UnprocessableEntityError) as e:
            oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert e.value.body["message"] == message and e.value.param == "input_file_id", name
        assert e.value.code == "invalid_batch_line"
        assert jobs_recorded(client) == before and queued(env, "tiny") == waiting

    f = oai.files.create(file=("good.jsonl", as_json(good) + b"\n"), purpose="batch")  # the metadata too
    before = jobs_recorded(client)
    r = httpx.post(api.url + "/v1/batches", headers={"content-type": "application/json"}, content=as_json(
        {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
         "metadata": {"who": LONE}}))
    assert r.status_code == 422 and error_of(r)["param"] == "metadata.who", r.text
    assert jobs_recorded(client) == before


def test_the_sse_stream_resumes_with_last_event_id_and_replays_after_the_end(api, client):
    job = httpx.post(api.url + "/v1/jobs", json={"model": "tiny", "prompt": "A long story", "max_tokens": 100,
                                                 "temperature": 0}).json()
    url = f"{api.url}/v1/jobs/{job['id']}/stream"
    got: list[dict] = []
    with httpx.stream("GET", url, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-gencli-job"] == job["id"]
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if sum(1 for x in lines if x.startswith("id: ")) >= 5 and line == "":
                break  # leave mid-stream
    got = sse_events(lines)
    assert [e["id"] for e in got] == list(range(1, len(got) + 1))
    with httpx.stream("GET", url, headers={"Last-Event-ID": str(got[-1]["id"])}, timeout=60) as r:
        rest = sse_events(list(r.iter_lines()) + [""])
    assert rest[0]["id"] == got[-1]["id"] + 1  # exactly the missing ones, none twice
    events = got + rest
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["event"] == "end" and json.loads(events[-1]["data"])["status"] == "succeeded"
    assert client.job(job["id"]).status is JobStatus.SUCCEEDED  # leaving the native stream cancelled nothing
    text = "".join(json.loads(e["data"])["text"] for e in events if e["event"] == "tok")
    assert text == client.job(job["id"]).items()[0].output

    with httpx.stream("GET", url, timeout=60) as r:  # opened after the end: all of it, then closed
        replay = sse_events(list(r.iter_lines()) + [""])
    assert [e["id"] for e in replay] == [e["id"] for e in events]
    t0 = time.monotonic()  # resumed after the end (an EventSource reconnecting): nothing more, no gap
    with httpx.stream("GET", url, headers={"Last-Event-ID": str(events[-1]["id"])}, timeout=60) as r:
        assert sse_events(list(r.iter_lines()) + [""]) == []
    assert time.monotonic() - t0 < 1.0


def test_results_name_each_sample_of_a_job_submitted_with_several(api):
    r = CliRunner().invoke(main, ["submit", "--model", "tiny", "--prompt", "Hi", "--num_samples", "2", "--seed", "5",
                                  "--max_tokens", "4"])
    assert r.exit_code == 0, r.output
    job_id = r.output.split()[-1]
    wait_for(lambda: httpx.get(f"{api.url}/v1/jobs/{job_id}").json()["status"] == "succeeded", 60, "the job")
    lines = [json.loads(x) for x in httpx.get(f"{api.url}/v1/jobs/{job_id}/results").text.splitlines()]
    assert [x["sample"] for x in lines] == [1, 2] and all(x["prompt"] == "Hi" for x in lines)  # as `gencli results`


# --- OpenAI's client --------------------------------------------------------------------------------


def test_openai_completions_greedy_equal_the_model_and_seeds_repeat(oai, tiny):
    r = oai.completions.create(model="tiny", prompt=["Once upon a time", "The sea"], max_tokens=10, temperature=0)
    assert [c.text for c in r.choices] == reference(tiny, ["Once upon a time", "The sea"], 10)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20 and r.usage.total_tokens == r.usage.prompt_tokens + 20
    assert r.id.startswith("cmpl-") and r.object == "text_completion"

    a = oai.completions.create(model="tiny", prompt="Hello", max_tokens=12, seed=1234, n=3)
    b = oai.completions.create(model="tiny", prompt="Hello", max_tokens=12, seed=1234, n=3)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # a seed gives the same text twice
    assert len({c.text for c in a.choices}) > 1  # n choices are drawn apart
    c = oai.completions.create(model="tiny", prompt="Hello", max_tokens=12, seed=1234, n=1)
    assert c.choices[0].text == a.choices[0].text

    s = oai.completions.create(model="tiny", prompt="Hello", max_tokens=12, seed=1234, n=3, stream=True)
    texts = {}
    for chunk in s:
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert [texts[i] for i in range(3)] == [ch.text for ch in a.choices]


def test_openai_chat_streams_in_openais_shape(oai, api, tiny, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"}]
    full = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=15, seed=7)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    chunks = list(oai.chat.completions.create(model="tiny", messages=messages, max_tokens=15, seed=7, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content for c in content) == full.choices[0].message.content
    with_choices = [c for c in chunks if c.choices]  # finish_reason on the last (content, or an empty delta)
    assert with_choices[-1].choices[0].finish_reason == full.choices[0].finish_reason is not None
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)

    # the message's "<|im_end|>" stayed text: the prompt is the template's ids with it encoded as ordinary text
    tok = Tokenizer(load_encoding("cl100k_base"), chatml=True)
    assert full.usage.prompt_tokens == len(encode_prompt(tok, ChatFormat.CHATML, messages, chat=True))

    # max_completion_tokens is honoured, and `stop` cuts the text before the stop string
    r = oai.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=3, seed=7)
    assert r.usage.completion_tokens == 3
    long = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    word = long.choices[0].message.content[5:8]
    cut = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0, stop=[word])
    assert word not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
    assert long.choices[0].message.content.startswith(cut.choices[0].message.content)


@pytest.mark.parametrize("kwargs, status, needle", [
    ({"logprobs": 21}, 422, "logprobs"),
    ({"max_tokens": 0}, 422, "max_tokens 0 makes nothing: set echo to score the prompt"),
    ({"echo": True, "stream": True}, 422, "echo is not supported with stream"),
    ({"best_of": 2}, 422, "best_of is not supported"),
    ({"presence_penalty": 2.5}, 422, "presence_penalty must be a number from -2 to 2, got 2.5"),
    ({"extra_body": {"structured_outputs": {"json": {"not": {}}}}}, 422,
     'structured_outputs.json cannot be enforced: Unimplemented keys: ["not"]'),
    ({"extra_body": {"response_format": {"type": "xml"}}}, 422, "response_format must be"),
    ({"logit_bias": {"999999": 5}}, 422, "logit_bias: token id 999999 is not in the model's vocabulary"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 422, "stop takes up to 4"),
    ({"n": 0}, 422, "n:"),
    ({"max_tokens": 500}, 422, "max_tokens 500 leaves no room"),
    ({"prompt": "word " * 250, "max_tokens": 10}, 422, "shorten the prompt, lower max_tokens"),
    ({"model": "missing"}, 404, "not served by any live worker"),
])
def test_openai_refusals(oai, client, kwargs, status, needle):
    before = jobs_recorded(client)
    args = {"model": "tiny", "prompt": "Hello", "max_tokens": 5} | kwargs
    with pytest.raises(openai.APIStatusError) as e:
        oai.completions.create(**args)
    assert e.value.status_code == status and needle in e.value.message and "--truncate" not in e.value.message
    assert jobs_recorded(client) == before
    # the neutral values of what gencli lacks are taken
    assert oai.completions.create(model="tiny", prompt="Hi", max_tokens=2, presence_penalty=0, best_of=1)


# --- log-probabilities ------------------------------------------------------------------------------


def scored_alone(model_dir: str, prompt_ids: tuple[int, ...], max_tokens: int, top: int, *, chat: bool = False):
    """A greedy line's logprobs record and text, computed in-process, alone: the oracle."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, top_k=None, logprobs=top,
                        prompt_logprobs=None if chat else top)
    return scored_reference(model_dir, [list(prompt_ids)], sp)[0]


def test_completions_logprobs_echo_and_token_id_prompts_equal_the_model_alone(oai, api, tiny):
    """logprobs: N and echo (the legacy object), bit for bit what the model computes for the line
    alone in-process; a token-id prompt is the same line; max_tokens 0 with echo scores the prompt."""
    tok = Tokenizer(load_encoding("cl100k_base"), chatml=True)
    prompt = "The kestrel hovers over the field, then"
    ids = tok.encode(prompt)
    ref, text = scored_alone(tiny, tuple(ids), 6, 3)
    entries = ref["prompt"] + ref["tokens"]
    for given in (prompt, ids):
        r = oai.completions.create(model="tiny", prompt=given, max_tokens=6, temperature=0, logprobs=3, echo=True)
        c = r.choices[0]
        assert c.text == prompt + text
        lp = c.logprobs
        assert lp.token_logprobs == [e[1] for e in entries]  # exactly: JSON carries the engine's floats
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.tokens == [tok.decode([e[0]]) for e in entries]
        assert [list(t.values()) for t in lp.top_logprobs[1:]] == [[v for _, v in e[2]] for e in entries[1:]]
        assert lp.text_offset == [len(tok.decode([e[0] for e in entries[:k]])) for k in range(len(entries))]
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref["tokens"])
    # without echo: the generated tokens' alone; with logprobs 0, no alternatives
    plain = oai.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=0)
    assert plain.choices[0].text == text
    assert plain.choices[0].logprobs.token_logprobs == [e[1] for e in ref["tokens"]]
    assert plain.choices[0].logprobs.top_logprobs == [{}] * len(ref["tokens"])
    # max_tokens 0 with echo: the prompt scored, nothing made (a list of id lists: one choice each)
    scored = oai.completions.create(model="tiny", prompt=[ids, ids[:4]], max_tokens=0, echo=True, logprobs=1)
    assert [c.text for c in scored.choices] == [prompt, tok.decode(ids[:4])]
    assert scored.choices[0].logprobs.token_logprobs == [e[1] for e in ref["prompt"]]
    assert scored.choices[1].logprobs.token_logprobs == [e[1] for e in ref["prompt"][:4]]
    assert scored.usage.completion_tokens == 0 and scored.choices[0].finish_reason == "length"
    # streamed: each chunk carries its tokens' logprobs; together they are the whole line's
    chunks = list(oai.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                         stream=True))
    streamed = [v for ch in chunks if ch.choices and ch.choices[0].logprobs
                for v in ch.choices[0].logprobs.token_logprobs]
    assert streamed == [e[1] for e in ref["tokens"]]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text


def test_scoring_through_post_v1_scores_and_the_batch_api_equals_the_model_alone(api, oai, tiny, tmp_path, client):
    """POST /v1/scores queues a scoring job whose results are each line's scores; a Batch API file
    of completions with echo and max_tokens 0 scores its prompts: both bit for bit the model alone."""
    tok = Tokenizer(load_encoding("cl100k_base"), chatml=True)
    lines = [{"text": "The heron waits in the reeds."}, {"prompt": "Owls hunt", "completion": " at night",
                                                         "custom_id": "owls"}]
    r = httpx.post(api.url + "/v1/scores", json={"model": "tiny", "lines": lines, "per_token": True})
    assert r.status_code == 201 and r.json()["score"] == {"per_token": True, "top": 0}
    job = client.job(r.json()["id"])
    assert job.wait(60) is JobStatus.SUCCEEDED
    rows = [json.loads(x) for x in httpx.get(api.url + f"/v1/jobs/{job.id}/results").text.splitlines()]
    text_ids = [tok.eot_id] + tok.encode(lines[0]["text"])
    (ref, _), = scored_reference(tiny, [text_ids], SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=0))
    assert rows[0]["token_logprobs"] == [[e[0], e[1]] for e in ref["prompt"][1:]]
    assert rows[0]["logprob"] == math.fsum(e[1] for e in ref["prompt"][1:])
    assert rows[1]["custom_id"] == "owls" and rows[1]["tokens"] == len(tok.encode(" at night"))
    bad = httpx.post(api.url + "/v1/scores", json={"model": "tiny", "lines": [{"text": "ok"}, {"messages": [
        {"role": "user", "content": "hi"}]}]})
    assert bad.status_code == 422 and error_of(bad)["message"].startswith("lines[1]: a conversation to score needs")

    prompts = ["The kestrel hovers.", "Herons wade."]
    batch = [{"custom_id": f"s{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny", "prompt": p, "max_tokens": 0, "echo": True, "logprobs": 0}}
             for i, p in enumerate(prompts)]
    f = oai.files.create(file=open(_batch_file(tmp_path, batch), "rb"), purpose="batch")
    b = oai.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    done = wait_for(lambda: (x := oai.batches.retrieve(b.id)).status in ("completed", "failed") and x, 60,
                    "the batch")
    out = [json.loads(x) for x in oai.files.content(done.output_file_id).text.splitlines()]
    for line, p in zip(out, prompts):
        ids = tok.encode(p)
        (ref, _), = scored_reference(tiny, [ids], SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=0))
        choice = line["response"]["body"]["choices"][0]
        assert choice["text"] == p and choice["logprobs"]["token_logprobs"] == [e[1] for e in ref["prompt"]]


def test_llm_records_the_logprobs_of_a_completion_model_served_by_gencli(api, tiny, tmp_path, monkeypatch):
    """Simon Willison's `llm`, as a user sets it up for an OpenAI-compatible completion model
    (extra-openai-models.yaml), asked for `-o logprobs 2`: what it records per streamed chunk are
    the line's top logprobs, bit for bit those of the line alone in-process."""
    llm = pytest.importorskip("llm")
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: gencli-tiny\n  model_name: tiny\n  api_base: {api.url}/v1\n  completion: true\n")
    tok = Tokenizer(load_encoding("cl100k_base"), chatml=True)
    prompt = "The kestrel hovers over the field, then"
    ref, text = scored_alone(tiny, tuple(tok.encode(prompt)), 6, 2)
    response = llm.get_model("gencli-tiny").prompt(prompt, logprobs=2, max_tokens=6, temperature=0)
    assert response.text() == text
    recorded = [top for chunk in response.response_json["logprobs"] for top in chunk["top_logprobs"]]
    assert [list(t.values()) for t in recorded] == [[v for _, v in e[2]] for e in ref["tokens"]]
    assert "".join(chunk["text"] for chunk in response.response_json["logprobs"]) == text


def test_chat_logprobs_are_openais_content_list_streamed_too(oai, tiny):
    tok = Tokenizer(load_encoding("cl100k_base"), chatml=True)
    messages = [{"role": "user", "content": "Name a bird of prey"}]
    ids = encode_prompt(tok, ChatFormat.CHATML, messages, chat=True)
    ref, text = scored_alone(tiny, tuple(ids), 8, 2, chat=True)
    reply = [e for e in ref["tokens"] if e[0] not in tok.stop_ids]
    r = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                    top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == text
    assert [c.logprob for c in content] == [e[1] for e in reply]
    assert [bytes(c.bytes) for c in content] == [tok.encoding.decode_single_token_bytes(e[0]) for e in reply]
    assert [[t.logprob for t in c.top_logprobs] for c in content] == [[v for _, v in e[2]] for e in reply]
    for c in content:  # a token that is not whole UTF-8 alone is named by its bytes
        raw = bytes(c.bytes)
        try:
            assert c.token == raw.decode("utf-8")
        except UnicodeDecodeError:
            assert c.token == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    stream = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=2, stream=True)
    streamed = [c.logprob for ch in stream if ch.choices and ch.choices[0].logprobs
                for c in ch.choices[0].logprobs.content]
    assert streamed == [e[1] for e in reply]


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


def test_openai_structured_output_and_the_sampling_api(oai, api, tiny, client):
    """response_format and vLLM's fields, from the openai client: schema-valid JSON from a random model
    (the constraint alone), choices held to their strings, and the sampling keys taken end to end."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["name", "n"], "additionalProperties": False}
    schema["properties"] = {"zeta": {"type": "boolean"}, **schema["properties"]}  # not in alphabetical order
    schema["required"].append("zeta")
    messages = [{"role": "user", "content": "A record, please."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "rec", "schema": schema, "strict": True}}
    r = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=60, seed=3, n=4, response_format=fmt)
    done = [c for c in r.choices if c.finish_reason == "stop"]
    assert done, "no reply finished within 60 tokens"
    for c in done:
        jsonschema.validate(json.loads(c.message.content), schema)
        assert list(json.loads(c.message.content)) == ["zeta", "name", "n"]  # the schema's order, as OpenAI's
    obj = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=40, seed=5,
                                      response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    pick = oai.completions.create(model="tiny", prompt="Answer:", max_tokens=8, seed=1, n=3,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert {c.text for c in pick.choices} <= {"yes", "no"} and all(c.finish_reason == "stop" for c in pick.choices)
    # ignore_eos runs to max_tokens; min_tokens, penalties, min_p and logit_bias are taken
    long = oai.completions.create(model="tiny", prompt="Hi", max_tokens=12, seed=2, temperature=1.0,
                                  extra_body={"ignore_eos": True, "min_p": 0.01, "repetition_penalty": 1.2},
                                  presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"15": -100})
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 12


@pytest.mark.parametrize("kind, kwargs, param, message", [
    ("completions", {"prompt": [1, "two", 3]}, "prompt",
     "prompt: give text, a list of texts, a list of token ids or a list of such lists, not a mix"),
    ("completions", {"prompt": [[1, 2], []]}, "prompt", "prompt is empty: give some text (or at least one token id)"),
    ("chat", {"top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs: true"),
    ("chat", {"max_tokens": 0}, "max_tokens", "max_tokens 0 makes no reply: ask for at least 1"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, IMAGE]}]},
     "messages[0].content[1]", ("messages[0].content[1]: 'image_url' content parts (images, audio, files) are not "
                                "supported: gencli's models read text only")),
    ("completions", {"prompt": ["Hi", "there"], "stop": [""]}, "stop",
     "stop: an empty stop string is not allowed (it would end every choice at once): leave it out"),
    ("chat", {"stop": ""}, "stop",
     "stop: an empty stop string is not allowed (it would end every choice at once): leave it out"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format",
     'response_format.json_schema.schema cannot be enforced: Unimplemented keys: ["uniqueItems"]: fix it, or use '
     "a spec without that part"),
    ("completions", {"prompt": "Hi", "extra_body": {"structured_outputs": {"regex": "[a-z"}}}, "structured_outputs",
     None),  # llguidance's whole reason, not cut
    ("completions", {"prompt": "Hi", "extra_body": {"min_tokens": 9}}, "min_tokens",
     "min_tokens 9 exceeds max_tokens 2: lower min_tokens"),
    ("chat", {"logit_bias": {"999999": 5}}, "logit_bias", None),
])
def test_openai_refusals_of_what_gencli_lacks_name_the_field(oai, client, kind, kwargs, param, message):
    before = jobs_recorded(client)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        if kind == "chat":
            oai.chat.completions.create(**{"model": "tiny", "max_tokens": 2,
                                           "messages": [{"role": "user", "content": "Hi"}]} | kwargs)
        else:
            oai.completions.create(model="tiny", max_tokens=2, **kwargs)
    assert e.value.param == param and e.value.type == "invalid_request_error"
    assert e.value.body["message"] == message if message else e.value.body["message"].startswith(f"{param}")
    assert "prompt[" not in e.value.body["message"]
    assert jobs_recorded(client) == before


def test_a_client_that_goes_away_cancels_its_request_unless_it_asked_to_keep_it(env, api, tiny, client, tmp_path):
    # the hang-up comes while the job runs, however slow or fast this machine: the worker's first
    # forward pass waits while the stall file exists, the client hangs up once its job is running
    # (claimed, stalled before its first token), and the stall ends only once the hang-up is recorded
    model = f"tiny-hangup-{env['id']}"
    stall = tmp_path / "stall"
    w = start_worker(env, tiny, f"hangup-{env['id']}@test", "--model-name", model,
                     extra_env={"GENCLI_INJECT_STALL": str(stall)})
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me everything"}], "max_tokens": 110,
            "stream": True, "temperature": 0}
    ids = {}
    try:
        for keep in (False, True):
            headers = {"X-Gencli-Keep": "1"} if keep else {}
            stall.touch()
            with httpx.stream("POST", api.url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
                ids[keep] = r.headers["x-gencli-job"]
                wait_for(lambda: client.job(ids[keep]).status is JobStatus.RUNNING, 30, "the job to run")
            if not keep:
                wait_for(lambda: client.job(ids[False]).record().cancel_requested, 20, "the abandoned request's cancel")
            stall.unlink()
        wait_for(lambda: client.job(ids[False]).status is JobStatus.CANCELLED, 20, "the abandoned request's cancel")
        assert client.job(ids[True]).wait(60) is JobStatus.SUCCEEDED
    finally:
        stall.unlink(missing_ok=True)
        w.stop()
    assert not client.job(ids[True]).record().cancel_requested
    assert len(httpx.get(f"{api.url}/v1/jobs/{ids[True]}/results").text.splitlines()) == 1
    got = client.job(ids[False]).items()[0]
    assert got.finish_reason == "cancelled" and got.completion_tokens < 110


def test_a_non_streaming_client_that_times_out_cancels_its_job_unless_kept(env, api, tiny, client, tmp_path):
    model = f"tiny-stall-{env['id']}"
    stall = tmp_path / "stall"
    w = start_worker(env, tiny, f"stall-{env['id']}@test", "--model-name", model,
                     extra_env={"GENCLI_INJECT_STALL": str(stall)})
    try:
        body = {"model": model, "prompt": "Wait for it", "max_tokens": 20, "temperature": 0}
        ids = {}
        for keep in (False, True):
            stall.touch()  # every decoding step waits while the file is there
            headers = {"X-Gencli-Keep": "1"} if keep else {}
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
                httpx.post(api.url + "/v1/completions", json=body, headers=headers, timeout=1.5)
            (job,) = client.list_jobs(model=model, limit=1)  # (a whole response names its job in X-Gencli-Job)
            ids[keep] = job.id
            if not keep:
                wait_for(lambda: client.job(ids[False]).record().cancel_requested, 20, "the cancel")
            stall.unlink()
        assert client.job(ids[False]).wait(30) is JobStatus.CANCELLED
        assert client.job(ids[True]).wait(30) is JobStatus.SUCCEEDED
        assert not client.job(ids[True]).record().cancel_requested
    finally:
        stall.unlink(missing_ok=True)
        w.stop()


def test_a_job_that_fails_is_an_error_event_before_done_or_a_500(env, api, tiny, client):
    model = f"tiny-oom-{env['id']}"
    w = start_worker(env, tiny, f"oom-{env['id']}@test", "--model-name", model,
                     extra_env={"GENCLI_INJECT_OOM": "1"})  # out of memory at every row count, on the CPU
    try:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
        with httpx.stream("POST", api.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]" and json.loads(data[0])["choices"][0]["delta"]["role"] == "assistant"
        err = json.loads(data[-2])["error"]
        assert "out of memory even on the CPU" in err["message"] and err["type"] == "server_error"
        with pytest.raises(openai.InternalServerError) as e:  # not streamed: a 500 in OpenAI's shape
            openai.OpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0).completions.create(
                model=model, prompt="hi", max_tokens=5)
        assert "failed: out of memory even on the CPU" in e.value.message
    finally:
        w.stop()


def test_non_streaming_requests_from_many_clients_at_once(api, tiny):
    import concurrent.futures as cf

    prompts = [f"Line {i}" for i in range(12)]

    def ask(p):
        r = httpx.post(api.url + "/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 8,
                                                          "temperature": 0}, timeout=60)
        return r.json()["choices"][0]["text"]

    with cf.ThreadPoolExecutor(12) as pool:
        got = list(pool.map(ask, prompts))
    assert got == reference(tiny, prompts, 8)


# --- the Batch API ----------------------------------------------------------------------------------


def _batch_file(tmp_path, lines: list[dict]):
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_the_batch_api_end_to_end_through_a_server_restart(env, worker, tiny, tmp_path, client):
    prompts = [f"Question {i}" for i in range(6)]
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny", "prompt": p, "max_tokens": 40, "temperature": 0}}
             for i, p in enumerate(prompts)]
    lines[2]["body"]["n"] = 2
    first = start_api(env, name="api-batch")
    second = None
    try:
        oai = openai.OpenAI(base_url=first.url + "/v1", api_key="unused", max_retries=0)
        f = oai.files.create(file=open(_batch_file(tmp_path, lines), "rb"), purpose="batch")
        assert f.purpose == "batch" and f.bytes > 0
        batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                                   metadata={"who": "test"})
        assert batch.status in ("validating", "in_progress") and batch.request_counts.total == 6

        first.kill()  # the server dies while the batch runs; a new one on another port knows it from the store
        second = start_api(env, name="api-batch-restarted")
        oai2 = openai.OpenAI(base_url=second.url + "/v1", api_key="unused", max_retries=0)
        wait_for(lambda: oai2.batches.retrieve(batch.id).status == "completed", 90, "the batch")
        done = oai2.batches.retrieve(batch.id)
        assert done.request_counts.completed == 6 and done.request_counts.failed == 0
        assert done.metadata == {"who": "test"} and done.error_file_id is None
        assert batch.id in [b.id for b in oai2.batches.list().data]
        out = [json.loads(x) for x in oai2.files.content(done.output_file_id).text.splitlines()]
        assert [o["custom_id"] for o in out] == [f"q{i}" for i in range(6)]
        texts = [o["response"]["body"]["choices"][0]["text"] for o in out]
        assert texts == reference(tiny, prompts, 40)
        assert len(out[2]["response"]["body"]["choices"]) == 2 and out[0]["response"]["status_code"] == 200
        assert oai2.files.content(f.id).read() == _batch_file(tmp_path, lines).read_bytes()
        assert f.id in [x.id for x in oai2.files.list(purpose="batch").data]
    finally:
        first.kill()
        if second:
            second.stop()


def test_a_bad_batch_line_is_refused_with_its_number_and_a_cancel_stops_a_batch(api, tmp_path, client):
    oai = openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0)
    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}}
    for bad, needle in [({"custom_id": "a"}, "line 2: custom_id 'a' is used again"),
                        ({"custom_id": "b", "method": "GET"}, "line 2: method must be POST"),
                        ({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {}}, "line 2: url"),
                        ({"custom_id": "d", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": "tiny", "messages": [], "max_tokens": 2}}, "line 2: messages"),
                        ({"custom_id": "e", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                   "top_logprobs": 3}},
                         "line 2: top_logprobs needs logprobs: true")]:
        f = oai.files.create(file=open(_batch_file(tmp_path, [good, {**good, **bad}]), "rb"), purpose="batch")
        before = jobs_recorded(client)
        with pytest.raises(openai.UnprocessableEntityError) as e:
            oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert needle in e.value.message, e.value.message
        assert jobs_recorded(client) == before

    many = [{**good, "custom_id": f"r{i}"} for i in range(40)]
    f = oai.files.create(file=open(_batch_file(tmp_path, many), "rb"), purpose="batch")
    b = oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: oai.batches.retrieve(b.id).status == "in_progress", 30, "the batch to start")
    assert oai.batches.cancel(b.id).status in ("cancelling", "cancelled")
    wait_for(lambda: oai.batches.retrieve(b.id).status == "cancelled", 30, "the cancel")
    done = oai.batches.retrieve(b.id)
    assert done.request_counts.failed > 0 and done.error_file_id
    errors = [json.loads(x) for x in oai.files.content(done.error_file_id).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert len(errors) + done.request_counts.completed == 40


# --- refusals that need a server of their own ---------------------------------------------------------


def test_token_auth_and_the_body_limit(env, worker, client):
    s = start_api(env, "--max-body", "2000", extra_env={"GENCLI_API_TOKEN": TOKEN}, name="api-token")
    try:
        assert httpx.get(s.url + "/healthz").status_code == 200  # open: a load balancer's probe
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(s.url + "/v1/models", headers=auth).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
        assert httpx.get(s.url + "/metrics").status_code == 401
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key=TOKEN, max_retries=0)
        assert ok.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()

        before = jobs_recorded(client)
        big = {"model": "tiny", "prompt": "x" * 5000, "max_tokens": 2}
        r = httpx.post(s.url + "/v1/jobs", json=big, headers=auth)
        assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"

        def chunked():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b"x" * 500

        r = httpx.post(s.url + "/v1/jobs", content=chunked(), headers={**auth, "content-type": "application/json"})
        assert r.status_code == 413
        assert jobs_recorded(client) == before
    finally:
        s.stop()


def test_a_full_queue_is_429_and_redis_down_is_503(env, client, tmp_path):
    s = start_api(env, extra_env={"GENCLI_MAX_QUEUED": "1"}, name="api-bound")
    try:
        unserved = {"model": f"nobody-{env['id']}", "prompt": "x", "max_tokens": 2}
        r = httpx.post(s.url + "/v1/jobs", json=unserved)
        assert r.status_code == 201 and "no live worker serves model nobody-" in r.json()["warning"]
        before = jobs_recorded(client)
        r = httpx.post(s.url + "/v1/jobs", json=unserved)
        assert r.status_code == 429 and r.headers["retry-after"].isdigit()
        assert error_of(r)["code"] == "queue_full" and jobs_recorded(client) == before
    finally:
        s.stop()
    dead = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    s = start_api(env, extra_env={"GENCLI_REDIS_URL": dead}, name="api-no-redis")
    try:
        before = jobs_recorded(client)
        r = httpx.post(s.url + "/v1/jobs", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 503 and error_of(r)["code"] == "redis_unavailable"
        assert "does not answer" in r.text and "hunter2" not in r.text  # the URL is shown without its password
        assert jobs_recorded(client) == before
        assert httpx.get(s.url + "/v1/jobs").status_code == 200  # reads come from the store
        h = httpx.get(s.url + "/healthz")
        assert h.status_code == 503 and h.json()["redis"] == "unavailable" and h.json()["store"] == "ok"
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user",
                                                                                          "content": "x"}]})
        assert r.status_code == 503
    finally:
        s.stop()


def test_serve_refuses_a_taken_port_in_one_line(env, api):
    import subprocess
    import sys

    from services import child_env

    r = subprocess.run([sys.executable, "-m", "gencli.cli", "serve", "--port", str(api.port)],
                       env=child_env(env["vars"]), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "in use" in r.stderr and "Traceback" not in r.stderr


# --- Flower ---------------------------------------------------------------------------------------


def test_flower_sees_the_workers_and_their_tasks(env, worker, client):
    import subprocess
    import sys

    from services import child_env

    port = free_port()
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "gencli.worker.celeryapp", "flower",
                               "--address=127.0.0.1", f"--port={port}"],
                              env=child_env(env["vars"], {"FLOWER_UNAUTHENTICATED_API": "true"}),
                              stdout=open(env["tmp"] / "flower.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def workers():
            try:
                return httpx.get(url + "/api/workers", params={"refresh": "1"}, timeout=10).json()
            except (httpx.TransportError, ValueError):
                return {}

        wait_for(lambda: worker.name in workers(), 60, "Flower to list the worker")
        assert workers()[worker.name]["stats"]["pool"]["implementation"].endswith("thread:TaskPool")
        job = client.submit(["Hello Flower"], model="tiny", max_tokens=3)
        assert job.wait(60) is JobStatus.SUCCEEDED

        def task():
            tasks = httpx.get(url + "/api/tasks", timeout=10).json()
            return next((t for t in tasks.values() if job.id in (t.get("args") or "")), None)

        seen = wait_for(lambda: (t := task()) and t["state"] == "SUCCESS" and t, 30, "Flower to show the task")
        assert seen["name"] == "gencli.generate" and seen["worker"] == worker.name
    finally:
        import os
        import signal

        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(20)


# --- vLLM's tokenizer routes, as lm-evaluation-harness's remote tokenizer calls them ----------------


def test_tokenize_gives_the_ids_completions_take_and_detokenize_gives_the_text_back(api, oai):
    cl100k = Tokenizer(load_encoding("cl100k_base"), chatml=True)
    text = "Hello <|endoftext|> and <|im_end|> stay text, caf\u00e9 \U0001f600"
    # lm-eval's RemoteTokenizer: no model named (one is served), add_special_tokens false
    r = httpx.post(api.url + "/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["tokens"] == cl100k.encode(text) and got["count"] == len(got["tokens"])
    assert cl100k.eot_id not in got["tokens"] and got["max_model_len"] == 256 and got["token_strs"] is None
    assert oai.completions.create(model="tiny", prompt=text, max_tokens=1).usage.prompt_tokens == got["count"]
    named = httpx.post(api.url + "/tokenize", json={"model": "tiny", "prompt": text, "return_token_strs": True}).json()
    assert named["tokens"] == got["tokens"] and "".join(named["token_strs"]).startswith("Hello <|endoftext|>")
    back = httpx.post(api.url + "/detokenize", json={"tokens": got["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    assert httpx.post(api.url + "/detokenize", json={"tokens": [cl100k.eot_id]}).json() == {"prompt": "<|endoftext|>"}
    assert httpx.post(api.url + "/tokenize", json={"prompt": ""}).json()["tokens"] == []

    messages = [{"role": "user", "content": "Hi there"}]
    chat = httpx.post(api.url + "/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == encode_prompt(cl100k, ChatFormat.CHATML, messages, chat=True)
    reply = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert reply.usage.prompt_tokens == chat["count"]
    closed = httpx.post(api.url + "/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert chat["tokens"][: closed["count"]] == closed["tokens"] and closed["count"] < chat["count"]

    info = httpx.get(api.url + "/tokenizer_info").json()
    assert info == {"model": "tiny", "tokenizer_class": "tiktoken", "tokenizer": "cl100k_base", "chat_format": "chatml",
                    "model_max_length": 256, "vocab_size": info["vocab_size"], "eos_token": "<|endoftext|>",
                    "eos_token_id": cl100k.eot_id, "bos_token": None, "pad_token": None, "chat_template": None}
    assert info["vocab_size"] > cl100k.max_used_id


def test_tokenizer_routes_refuse_what_they_cannot_answer_in_openais_shape(api):
    cases = [
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 422, "prompt"),
        ("/tokenize", {}, 422, "prompt"),
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/tokenize", {"prompt": "x", "continue_final_message": True}, 422, None),
        ("/tokenize", {"prompt": "x", "add_generation_prompt": False}, 422, "add_generation_prompt"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages"),
        ("/detokenize", {"tokens": [10**9]}, 422, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 422, "tokens"),
        ("/detokenize", {"tokens": ["a"]}, 422, None),
    ]
    for path, body, status, param in cases:
        r = httpx.post(api.url + path, json=body)
        assert r.status_code == status, (path, body, r.text)
        err = error_of(r)
        if param is not None:
            assert err["param"] == param, (body, err)
    r = httpx.get(api.url + "/tokenizer_info", params={"model": "nope"})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    assert "gencli worker" in error_of(r)["message"]
