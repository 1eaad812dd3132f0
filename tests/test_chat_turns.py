"""A chat reply ends where the model opens the next turn, by every way a reply is asked for.

A ChatML model made to emit `<|im_start|>` (it opens the next turn without closing its own) serves
`gencli generate --chat`, `gencli submit --chat`, the API's chat completions (streamed and not) and
the Batch API: every reply ends there with finish_reason `stop`, and no role name is spelled out.
Real processes: a redis-server of the module's own, a worker, `gencli serve`, the `openai` client.
"""

from __future__ import annotations

import json
import uuid

import openai
import pytest
from click.testing import CliRunner
from conftest import build_gpt, force_tokens
from services import RedisServer, start_api, start_worker
from tailing import wait_for

from gencli.cli.main import main
from gencli.model.chat import ChatFormat
from gencli.model.checkpoint import save_model, vocab_for
from gencli.model.tokenizer import Tokenizer, load_encoding
from gencli.storage.settings import get_settings
from gencli.worker.client import Client

pytestmark = pytest.mark.slow

MODEL = "turn-taker"
SAY = " well"  # the only words the model says, before it opens the next turn


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("turns")
    tok = Tokenizer(load_encoding("cl100k_base"), chatml=True)
    (well,) = tok.encode(SAY)
    model = force_tokens(build_gpt(vocab_for(tok), block_size=128), {well: 14.0, tok.im_start_id: 13.0})
    path = save_model(model, tmp / MODEL, tokenizer="cl100k_base", chat_format=ChatFormat.CHATML)
    server = RedisServer(tmp)
    values = {"GENCLI_HOME": str(tmp / "home"), "GENCLI_REDIS_URL": server.url,
              "GENCLI_DB_URL": f"sqlite:///{tmp / 'store.db'}", "GENCLI_NAMESPACE": f"t{uuid.uuid4().hex[:8]}"}
    env = {"vars": values, "tmp": tmp, "redis": server}
    worker = api = None
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        try:
            worker = start_worker(env, str(path), f"turns-{values['GENCLI_NAMESPACE']}@test")
            api = start_api(env)
            yield {"path": str(path), "api": api, "tmp": tmp}
        finally:
            for proc in (api, worker):
                if proc:
                    proc.stop()
            server.stop()


def _ended_at_the_turn(text: str, finish_reason: str) -> None:
    assert finish_reason == "stop"
    assert text == SAY * (len(text) // len(SAY)), text  # only what it said before the turn: no "user", no "\n"


def test_generate_and_submit_end_a_reply_at_the_next_turn(served):
    r = CliRunner().invoke(main, ["generate", "--model", served["path"], "--chat", "--prompt", "hi",
                                  "--max_tokens", "60", "--temperature", "1", "--top_k", "2", "--seed", "3",
                                  "--num_samples", "4", "--out", str(served["tmp"] / "out")])
    assert r.exit_code == 0, r.output
    rows = [json.loads(p.read_text()) for p in sorted((served["tmp"] / "out").glob("*.json"))]
    assert len(rows) == 4
    for row in rows:
        _ended_at_the_turn(row["output"], row["finish_reason"])
    assert any(row["output"] for row in rows)  # it says something before it opens the next turn
    job = Client(get_settings()).submit(["hi", "how are you?"], model=MODEL, chat=True, max_tokens=60,
                                        temperature=1.0, top_k=2, seed=5)
    assert job.wait(60).value == "succeeded"
    for row in job.result():
        _ended_at_the_turn(row["output"], row["finish_reason"])


def test_the_api_and_the_batch_api_end_a_reply_at_the_next_turn(served):
    oai = openai.OpenAI(base_url=served["api"].url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "hi"}]
    chat = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, n=4, seed=1,
                                       extra_body={"top_k": 2})
    for choice in chat.choices:
        _ended_at_the_turn(choice.message.content, choice.finish_reason)
    parts, finish = [], None
    for chunk in oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, seed=2, stream=True,
                                             extra_body={"top_k": 2}):
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    _ended_at_the_turn("".join(parts), finish)

    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "messages": messages, "max_tokens": 60, "seed": i, "top_k": 2}}
             for i in range(3)]
    path = served["tmp"] / "batch.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    f = oai.files.create(file=open(path, "rb"), purpose="batch")
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: oai.batches.retrieve(batch.id).status == "completed", 60, "the batch")
    out = [json.loads(x) for x in oai.files.content(oai.batches.retrieve(batch.id).output_file_id).text.splitlines()]
    assert len(out) == 3
    for o in out:
        choice = o["response"]["body"]["choices"][0]
        _ended_at_the_turn(choice["message"]["content"], choice["finish_reason"])
