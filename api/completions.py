"""OpenAI's completions, chat completions and models, over gencli's durable queue.

A request is one gencli job: its prompts (times `n`) are the job's items, each with a seed of its
own (the request's `seed` + the choice's index, or a random one), so a worker that dies mid-way is
taken over and the text goes on exactly where the store's checkpoint left it. The response (or
stream) is the job's text. A client that disconnects before the end cancels the job, unless it sent
`X-Gencli-Keep: 1`; every response names its job in `X-Gencli-Job`, whose stream
(GET /v1/jobs/{id}/stream) and results stay readable.

Defaults are OpenAI's, not gencli's: temperature 1, top_p 1, no top-k cut, and max_tokens 16 for
completions (the model's default for chat). Penalties, logit_bias, and vLLM's repetition_penalty,
min_tokens, min_p, stop_token_ids and ignore_eos are gencli's sampling keys (model/params.py);
response_format (json_object, json_schema) and vLLM's structured_outputs (json, regex, choice,
grammar) hold the reply to a structure (model/structured.py). Parameters gencli does not implement
(best_of, suffix, tools) are refused with 422 unless at their neutral value.

Log-probabilities (api/logprobs.py has their shapes) are the model's own distribution, before
temperature, top_k and top_p, whichever way a token was picked: vLLM's default (raw logprobs), what
lm-evaluation-harness and a perplexity need. Completions take `logprobs: N` (0-20) and `echo` (the
prompt and its tokens' logprobs first; with `max_tokens: 0` the prompt is scored and nothing made),
and token-id prompts; chat takes `logprobs: true` with `top_logprobs: N`. Streamed too, but `echo`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any, Literal

import anyio
import anyio.to_thread
import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gencli.api import logprobs, sse
from gencli.api.errors import APIError
from gencli.api.jobs import client_of
from gencli.api.metrics import TokenClock
from gencli.model.errors import ContextOverflowError
from gencli.model.params import MAX_LOGPROBS, SEED_RANGE
from gencli.model.tokenizer import Tokenizer
from gencli.worker.client import Client, Job
from gencli.worker.fold import StreamDelta
from gencli.worker.prompts import PromptItem

router = APIRouter(tags=["openai"])

MAX_N = 16
MAX_STOP = 4
KEEP_HEADER = "x-gencli-keep"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Sampling(BaseModel):
    """What both routes take. Unsupported fields are typed loosely so that a neutral value passes
    and any other gets a 422 that names the field (see request_items)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    max_tokens: int | None = Field(default=None, ge=0, description="0: none made (completions with echo: the "
                                                                     "prompt scored)")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, description="gencli's extension, as in vLLM: 0 or null for no cut")
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = Field(default=None, description='{"type": "text" | "json_object" | '
                                                   '"json_schema", "json_schema": {"name", "schema", "strict"}}')
    # vLLM's extra body fields
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    min_p: float | None = None
    stop_token_ids: list[Any] | None = None
    ignore_eos: bool | None = None
    structured_outputs: dict[str, Any] | None = Field(default=None, description='vLLM\'s: one of {"json": SCHEMA}, '
                                                      '{"regex": R}, {"choice": [...]}, {"grammar": LARK}, '
                                                      '{"json_object": true}')


class CompletionRequest(Sampling):
    prompt: str | list[str | int | list[int]] = Field(description="text, a list of texts, token ids, or a list of "
                                                                  "lists of token ids")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="each token's logprob and "
                                                                                  "the N likeliest tokens'")
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    """A content part: {"type": "text", "text": ...}. The other types (image_url, input_audio,
    file, ...) are typed loosely so that each is refused by name (see prompts_of)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None


NEUTRAL = {  # field -> the values that ask for nothing gencli lacks
    "best_of": (None, 1), "suffix": (None,), "tools": (None, []), "tool_choice": (None, "none"),
}
# request field -> gencli's sampling key, where given (model/params.py checks the values)
PASSED = ("presence_penalty", "frequency_penalty", "logit_bias", "repetition_penalty", "min_tokens", "min_p",
          "stop_token_ids", "ignore_eos")


def structured_of(body: CompletionRequest | ChatRequest) -> dict | None:
    """gencli's `structured` from OpenAI's response_format or vLLM's structured_outputs (not both),
    checked here so that an error names the field the request used."""
    from gencli.model.structured import check_structured  # (llguidance: where structure is asked for)

    fmt, vllm = body.response_format, body.structured_outputs
    if fmt is not None and vllm is not None and fmt.get("type") != "text":
        raise APIError(422, "give response_format or structured_outputs, not both", param="response_format")
    if vllm is not None:
        if vllm.get("json_object") is True and len(vllm) == 1:
            return {"json": {"type": "object"}}
        return check_structured(vllm, field="structured_outputs")  # gencli's own rules, named as sent
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text" and len(fmt) == 1:
        return None
    if kind == "json_object" and len(fmt) == 1:
        return {"json": {"type": "object"}}
    if kind == "json_schema" and set(fmt) == {"type", "json_schema"} and isinstance(fmt["json_schema"], dict):
        spec = fmt["json_schema"]
        schema = spec.get("schema", {})
        if set(spec) - {"name", "schema", "strict", "description"} or not isinstance(schema, dict):
            raise APIError(422, "response_format.json_schema takes name, schema (an object), strict and description",
                           param="response_format")
        return check_structured({"json": schema}, field="response_format", name="response_format.json_schema.schema")
    raise APIError(422, 'response_format must be {"type": "text"}, {"type": "json_object"} or {"type": '
                        '"json_schema", "json_schema": {"name": ..., "schema": {...}}}', param="response_format")


def _seeds(seed: int | None, count: int) -> list[int]:
    """One seed per choice: seed, seed + 1, ... (within the seed range), or random ones."""
    lo, hi = SEED_RANGE
    base = secrets.randbelow(2**63) if seed is None else seed
    return [lo + (base + k - lo) % (hi - lo) for k in range(count)]


def prompts_of(body: CompletionRequest | ChatRequest) -> list:
    """The request's prompts: a completion's texts, or a chat's one conversation (as gencli's messages)."""
    if isinstance(body, ChatRequest):
        return [[{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content, i)}
                 for i, m in enumerate(body.messages)]]
    given = body.prompt
    if isinstance(given, str):
        prompts = [given]
    elif given and all(type(p) is int for p in given):  # one prompt of ids
        prompts = [{"token_ids": given}]
    elif all(isinstance(p, str) for p in given):
        prompts = list(given)
    elif all(isinstance(p, list) for p in given):
        prompts = [{"token_ids": p} for p in given]
    else:
        raise APIError(422, "prompt: give text, a list of texts, a list of token ids or a list of such lists, not a "
                            "mix", param="prompt")
    if not prompts or any(not p.strip() if isinstance(p, str) else not p["token_ids"] for p in prompts):
        raise APIError(422, "prompt is empty: give some text (or at least one token id)", param="prompt")
    return prompts


def _text_of(content: str | list[ContentPart], i: int) -> str:
    """A message's text: its content, or its text parts joined; any other part is refused by name."""
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if part.type != "text":
            raise APIError(422, f"{where}: {part.type!r} content parts (images, audio, files) are not supported: "
                                "gencli's models read text only", param=where, code="unsupported_content")
        if part.text is None:
            raise APIError(422, f"{where}.text: required", param=f"{where}.text")
        if part.model_extra:
            field = f"{where}.{next(iter(part.model_extra))}"
            raise APIError(422, f"{field}: unknown field: remove it", param=field)
    return "".join(part.text for part in content)


def request_items(body: CompletionRequest | ChatRequest, *, line: int | None = None,
                  custom_id: str | None = None) -> list[PromptItem]:
    """The request as job items: each prompt `n` times, each with the request's sampling and a seed
    of its own. Refuses what gencli does not implement."""
    for field, neutral in NEUTRAL.items():
        if field in type(body).model_fields and getattr(body, field) not in neutral:
            raise APIError(422, f"{field} is not supported by gencli: leave it out", param=field,
                           code="unsupported_parameter")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stop is not None and len(stop) > MAX_STOP:
        raise APIError(422, f"stop takes up to {MAX_STOP} strings, got {len(stop)}", param="stop")
    if stop is not None and "" in stop:
        raise APIError(422, "stop: an empty stop string is not allowed (it would end every choice at once): leave it "
                            "out", param="stop")
    if isinstance(body, ChatRequest):
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens == 0:
            raise APIError(422, "max_tokens 0 makes no reply: ask for at least 1", param="max_tokens")
        if body.top_logprobs and not body.logprobs:
            raise APIError(422, "top_logprobs needs logprobs: true", param="top_logprobs")
        top, prompt_top = (body.top_logprobs or 0) if body.logprobs else None, None
    else:
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise APIError(422, "max_tokens 0 makes nothing: set echo to score the prompt, or ask for at least 1",
                           param="max_tokens")
        if body.echo and body.stream:
            raise APIError(422, "echo is not supported with stream: leave one out", param="echo",
                           code="unsupported_parameter")
        # echo: the prompt's ids scored (so the response can give their logprobs, and its text)
        top, prompt_top = body.logprobs, (body.logprobs or 0) if body.echo else None
    sampling = {"max_tokens": max_tokens, "temperature": 1.0 if body.temperature is None else body.temperature,
                "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": body.top_k or 0,  # 0: no cut
                "stop": stop or [], "logprobs": top, "prompt_logprobs": prompt_top,
                "structured": structured_of(body)}
    sampling |= {k: getattr(body, k) for k in PASSED if getattr(body, k) is not None}
    given = prompts_of(body)
    if line is not None:
        where = None  # "line N: " of the batch's input file
    else:  # one prompt (or conversation): its errors need no label
        where = "" if isinstance(body, ChatRequest) or isinstance(body.prompt, str) else None
    prompts = [(p, f"prompt[{i}]: " if where is None else where) for i, p in enumerate(given) for _ in range(body.n)]
    seeds = _seeds(body.seed, len(prompts))
    return [PromptItem(p, line=line or k + 1, custom_id=custom_id, extra={**sampling, "seed": seeds[k]},
                       where=None if line is not None else w)
            for k, (p, w) in enumerate(prompts)]


def check_served(client: Client, model: str) -> None:
    served = client.served_models_after_a_restart(model)
    if model not in served:
        listed = ", ".join(sorted(served)) or "none"
        raise APIError(404, f"model {model!r} is not served by any live worker (served now: {listed}): start one "
                            "with gencli worker --model PATH [--model-name NAME]", param="model",
                       code="model_not_found")


def _submit(request: Request, body: CompletionRequest | ChatRequest) -> Job:
    client = client_of(request)
    items = request_items(body)
    check_served(client, body.model)
    api = "chat.completions" if isinstance(body, ChatRequest) else "completions"
    meta = {"api": api} | ({"user": body.user} if body.user else {})
    try:
        return client.submit(items, model=body.model, chat=isinstance(body, ChatRequest), meta=meta)
    except ContextOverflowError as e:  # (the CLI's --truncate is not offered here)
        raise APIError(422, str(e).replace(", or pass --truncate to drop the oldest prompt tokens", ""),
                       param="max_tokens", code="context_length_exceeded") from None


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    """OpenAI's completions: `prompt` (one or a list), `n` choices each."""
    request.state.arrived = time.perf_counter()
    job = await anyio.to_thread.run_sync(_submit, request, body)
    return await _respond(request, job, body, ResponseKind(chat=False))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    """OpenAI's chat completions: `messages` rendered in the model's chat format (their text stays
    text: `<|im_end|>` in a message is never the special token)."""
    request.state.arrived = time.perf_counter()
    job = await anyio.to_thread.run_sync(_submit, request, body)
    return await _respond(request, job, body, ResponseKind(chat=True))


@router.get("/v1/models")
def models(request: Request):
    """The models that live workers serve now."""
    served = client_of(request).served_models()
    return {"object": "list", "data": [_model(name, n) for name, n in sorted(served.items())]}


@router.get("/v1/models/{model}")
def model(model: str, request: Request):
    served = client_of(request).served_models()
    if model not in served:
        raise APIError(404, f"model {model!r} is not served by any live worker", param="model",
                       code="model_not_found")
    return _model(model, served[model])


def _model(name: str, workers: int) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "gencli", "workers": workers}


# --- answering ------------------------------------------------------------------------------------
class ResponseKind:
    """How a job's text is dressed: a completion's or a chat completion's objects and chunks."""

    def __init__(self, *, chat: bool):
        self.chat = chat
        self.kind = "chat.completion" if chat else "text_completion"
        self.prefix = "chatcmpl-" if chat else "cmpl-"

    def choice(self, index: int, item, tok: Tokenizer | None) -> dict:
        """A finished item as a choice; tok: the model's tokenizer, where an item has logprobs (or echo)."""
        text, record, lps = item.output or "", item.logprobs or {}, None
        if self.chat:
            if "tokens" in record:
                lps = logprobs.chat(tok, record)
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lps,
                    "finish_reason": item.finish_reason}
        echo = "prompt" in record  # (the API scores a completion's prompt only for echo)
        if echo:
            text = tok.decode([e[0] for e in record["prompt"]]) + text
        if "tokens" in record:
            lps = logprobs.legacy(tok, record, echo=echo)
        return {"index": index, "text": text, "logprobs": lps, "finish_reason": item.finish_reason}

    def chunk_choice(self, index: int, text: str | None, finish: str | None, *, role: bool = False,
                     lps: dict | None = None) -> dict:
        if self.chat:  # the last chunk, when a stop token ends the reply, has no text: an empty delta
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": lps, "finish_reason": finish}

    def envelope(self, id: str, created: int, model: str, *, chunk: bool) -> dict:
        kind = self.kind + (".chunk" if chunk and self.chat else "")
        return {"id": self.prefix + id, "object": kind, "created": created, "model": model,
                "system_fingerprint": None}

    def body(self, id: str, created: int, model: str, items, n: int, tok: Tokenizer | None = None) -> dict:
        """The whole response of a request whose items (n choices per prompt, in order) have ended;
        tok: the model's tokenizer, needed where an item has logprobs (tokenizer_for)."""
        return {**self.envelope(id, created, model, chunk=False),
                "choices": [self.choice(k, it, tok) for k, it in enumerate(items)],
                "usage": usage(items, n)}


def tokenizer_for(client: Client, model: str, items) -> Tokenizer | None:
    """The model's tokenizer where some item has logprobs to show (else None: not needed)."""
    return client.tokenizer_of(model).tokenizer if any(it.logprobs for it in items) else None


def usage(items, n: int) -> dict:
    prompt = sum(it.prompt_tokens or 0 for k, it in enumerate(items) if k % n == 0)  # a prompt once, not per choice
    completion = sum(it.completion_tokens or 0 for it in items)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _failure(job: Job, items) -> str | None:
    """Why the job failed, if it did."""
    rec = job.record()
    bad = [it for it in items if it.status == "failed"]
    if rec.status == "failed" or bad:
        return rec.error_message or (bad[0].error if bad else "the job failed")
    return None


async def _respond(request: Request, job: Job, body: CompletionRequest | ChatRequest,
                   response_kind: ResponseKind):
    arrived = request.state.arrived
    keep = request.headers.get(KEEP_HEADER) == "1"
    headers = {"X-Gencli-Job": job.id}
    created = int(time.time())
    if body.stream:
        with_usage = bool(body.stream_options and body.stream_options.include_usage)
        clock = TokenClock(request.app.state.metrics, body.model, arrived)
        chunks = _chunks(job, response_kind, body, created, with_usage, clock)
        return StreamingResponse(sse.stream(chunks, on_disconnect=None if keep else job.cancel),
                                 media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
    await _until_end(request, job, keep)
    items = await anyio.to_thread.run_sync(job.items)
    why = await anyio.to_thread.run_sync(_failure, job, items)
    if why:
        raise APIError(500, f"job {job.id} failed: {why}", type="server_error", code="generation_failed")
    tok = await anyio.to_thread.run_sync(tokenizer_for, job.client, body.model, items)
    return JSONResponse(response_kind.body(job.id, created, body.model, items, body.n, tok), headers=headers)


async def _until_end(request: Request, job: Job, keep: bool) -> None:
    """Wait for the job's end; if the client disconnects first, cancel it (unless keep) and stop."""
    async with anyio.create_task_group() as tg:
        async def watch():
            while True:
                await anyio.sleep(0.25)
                if await request.is_disconnected():
                    if not keep:
                        await anyio.to_thread.run_sync(job.cancel)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        await anyio.to_thread.run_sync(_follow_to_end, job, abandon_on_cancel=True)
        tg.cancel_scope.cancel()


def _follow_to_end(job: Job) -> None:
    try:
        for _ in job.events():
            pass
    except (redis.RedisError, OSError):
        job.wait()  # Redis is gone for longer than a follower waits: the store says when it ends


def _chunks(job: Job, response_kind: ResponseKind, body: Sampling, created: int, include_usage: bool,
            clock: TokenClock) -> Iterator[str]:
    """The job's text as OpenAI's chunks: per choice, text only ever grows (a worker that resumed
    from the store's checkpoint replays tokens the client has; they are not sent twice)."""
    env = response_kind.envelope(job.id, created, body.model, chunk=True)

    def chunk(choices: list[dict], **extra) -> str:
        return sse.event({**env, "choices": choices, **extra})

    def error(message: str, type: str = "server_error") -> str:
        return sse.event({"error": {"message": message, "type": type, "param": None, "code": None}})

    text: dict[int, str] = {}  # the folded text of each choice
    sent: dict[int, str] = {}  # what the client has of it
    finished: set[int] = set()
    wants = body.logprobs is not None and body.logprobs is not False  # (completions' 0: the token's own alone)
    tok = job.client.tokenizer_of(body.model).tokenizer if wants else None
    made: dict[int, dict[int, list]] = {}  # per choice, its tokens' logprob entries by position
    given: dict[int, int] = {}  # per choice, how many of them the client has
    legacy: dict[int, logprobs.Legacy] = {}

    def lps(i: int) -> dict | None:
        """The logprobs of choice i's tokens the client does not have yet, in order."""
        if tok is None:
            return None
        have, new = given.get(i, 0), []
        while have + len(new) in made.get(i, {}):
            new.append(made[i][have + len(new)])
        given[i] = have + len(new)
        if response_kind.chat:
            return logprobs.chat(tok, {"tokens": new})
        obj = legacy.setdefault(i, logprobs.Legacy(tok))
        for e in new:
            obj.add(e)
        return obj.take()
    if response_kind.chat:  # one conversation: n choices
        yield chunk([response_kind.chunk_choice(i, None, None, role=True) for i in range(body.n)])

    def advance(i: int, finish: str | None) -> Iterator[str]:
        have, now = sent.get(i, ""), text.get(i, "")
        if not now.startswith(have):
            if not have.startswith(now):  # the text went another way: cannot be taken back
                raise _Diverged(i)
            return  # replayed tokens the client has already
        if len(now) > len(have) or (finish and i not in finished):
            sent[i] = now
            if finish:
                finished.add(i)
            clock.tick()
            yield chunk([response_kind.chunk_choice(i, now[len(have):], finish, lps=lps(i))])

    try:
        for d in job.watch():
            if isinstance(d, StreamDelta):
                text[d.item] = d.text if d.restart else text.get(d.item, "") + d.text
                if d.lp is not None:
                    made.setdefault(d.item, {})[d.lp[1][0]] = [d.lp[0], d.lp[1][1], d.lp[1][2]]
                yield from advance(d.item, d.finish_reason)
            elif d["t"] == "item" and d.get("status") == "failed":
                yield error(f"choice {d['i']} failed: {d.get('error')}")
                break
        else:
            items = job.items()
            why = _failure(job, items)
            if why:
                yield error(f"job {job.id} failed: {why}")
            else:
                for it in items:  # the store's text is the record: anything the stream lacked comes now
                    text[it.idx] = it.output or ""
                    for k, e in enumerate((it.logprobs or {}).get("tokens", [])):
                        made.setdefault(it.idx, {})[k] = e
                    yield from advance(it.idx, it.finish_reason)
                    if tok is not None and given.get(it.idx, 0) < len(made.get(it.idx, {})):  # logprobs of
                        yield chunk([response_kind.chunk_choice(it.idx, None, None, lps=lps(it.idx))])  # held text
                if include_usage:
                    yield chunk([], usage=usage(items, body.n))
    except _Diverged as e:
        yield error(f"choice {e.args[0]} restarted with other text after a worker failure: its final text is at "
                    f"GET /v1/jobs/{job.id}/results")
    except (redis.RedisError, OSError) as e:
        yield error(f"lost Redis ({type(e).__name__}): the job goes on; GET /v1/jobs/{job.id}/stream resumes it",
                    "service_unavailable")
    yield "data: [DONE]\n\n"


class _Diverged(Exception):
    pass
