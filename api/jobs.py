"""gencli's own routes: the jobs of `gencli submit`, `list`, `show`, `results`, `cancel`, `retry`
and `tail`, as JSON (and the stream as server-sent events, `id:` its sequence number). Reads come
from the store and work with Redis down; the stream needs Redis."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Literal

import redis
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gencli.api import sse
from gencli.api.errors import APIError
from gencli.model.chat import require_text
from gencli.model.errors import ContextOverflowError, GencliError
from gencli.storage.status import JobStatus, iso
from gencli.storage.store import SearchError
from gencli.worker.client import Client, Job, RedisUnavailable
from gencli.worker.prompts import PromptItem, prompt_line, score_line

router = APIRouter(tags=["jobs"])


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class JobRequest(BaseModel):
    """A generation job: `prompt` (one) or `prompts` (many: text, a chat conversation, or an object
    as on a .jsonl line: {"prompt" or "messages", "custom_id", sampling overrides})."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    prompt: str | None = None
    prompts: list[str | dict] | None = Field(default=None, min_length=1)
    chat: bool = False
    truncate: bool = False
    priority: int = Field(default=0, ge=0, le=9)
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None


class ScoreRequest(BaseModel):
    """A scoring job (`gencli score`): each line's log-likelihood and perplexity, nothing generated."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    lines: list[dict] = Field(min_length=1, description='{"text"}, {"prompt", "completion"} (the completion '
                                                        'scored) or {"messages"} (the assistant turns scored), '
                                                        'each with an optional "custom_id"')
    per_token: bool = Field(default=False, description="results give each scored token's [id, logprob] too")
    top: int = Field(default=0, ge=0, le=20, description="the N likeliest tokens' logprobs kept at each position")
    priority: int = Field(default=0, ge=0, le=9)


def client_of(request: Request) -> Client:
    return request.app.state.client



def job_json(job, items=None) -> dict:
    out = {
        "id": job.id, "object": "job", "kind": job.kind, "model": job.model, "status": job.status,
        "priority": job.priority, "params": job.params, "created_at": iso(job.created_at),
        "started_at": iso(job.started_at), "finished_at": iso(job.finished_at), "worker": job.worker,
        "device": job.final_device or job.device, "attempts": job.attempts, "n_items": job.n_items,
        "completion_tokens": job.completion_tokens, "tokens_per_s": job.tokens_per_s,
        "oom_retries": job.oom_retries, "result": job.result,
        "error": None if not job.error_class else {"class": job.error_class, "message": job.error_message},
    }
    score = (job.params.get("meta") or {}).get("score")
    if score is not None:
        out["score"] = score
    if items is not None:
        out["items"] = [item_json(it) for it in items]
    return out


def item_json(it) -> dict:
    return {"index": it.idx, "line": it.line, "custom_id": it.custom_id, "prompt": it.prompt, "status": it.status,
            "output": it.output, "finish_reason": it.finish_reason, "error": it.error,
            "usage": {"prompt_tokens": it.prompt_tokens, "completion_tokens": it.completion_tokens}}


@router.post("/v1/jobs", status_code=201)
def submit(body: JobRequest, request: Request, idempotency_key: str | None = Header(default=None, max_length=200)):
    """Queue a generation job; its id comes back at once (201), before any worker takes it."""
    if (body.prompt is None) == (body.prompts is None):
        raise APIError(422, 'give "prompt" (one) or "prompts" (a list), one of them', param="prompt")
    raw = [body.prompt] if body.prompt is not None else body.prompts
    seen: dict[str, int] = {}
    items = []
    for n, p in enumerate(raw, start=1):
        where = "" if body.prompt is not None else f"prompts[{n - 1}]: "
        if isinstance(p, str):
            try:
                item = PromptItem(require_text(p, where), n)
            except GencliError as e:
                raise APIError(422, str(e), param=where[:-2] or "prompt") from None
        else:
            item = prompt_line(p, n, where, seen)
        item.where = where
        items.append(item)
    sampling = {k: getattr(body, k) for k in ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop")
                if getattr(body, k) is not None}
    client = client_of(request)
    try:
        job = client.submit(items, model=body.model, chat=body.chat, truncate=body.truncate,
                            priority=body.priority, idempotency_key=idempotency_key, **sampling)
    except ContextOverflowError as e:
        raise APIError(422, str(e).replace("pass --truncate", 'send "truncate": true'), param="max_tokens",
                       code="context_length_exceeded") from None
    out = job_json(job.record())
    if not client.served_models().get(body.model):
        out["warning"] = f"no live worker serves model {body.model} yet: the job waits for one"
    return out


@router.post("/v1/scores", status_code=201)
def submit_score(body: ScoreRequest, request: Request,
                 idempotency_key: str | None = Header(default=None, max_length=200)):
    """Queue a scoring job; its id comes back at once (201). Its results (GET /v1/jobs/{id}/results)
    are one JSON line per line: tokens, logprob, mean_logprob, perplexity."""
    seen: dict[str, int] = {}
    items = [score_line(obj, n, f"lines[{n - 1}]: ", seen) for n, obj in enumerate(body.lines, start=1)]
    client = client_of(request)
    try:
        job = client.submit_score(items, model=body.model, top=body.top, per_token=body.per_token,
                                  priority=body.priority, idempotency_key=idempotency_key)
    except ContextOverflowError as e:
        raise APIError(422, str(e), param="lines", code="context_length_exceeded") from None
    out = job_json(job.record())
    if not client.served_models().get(body.model):
        out["warning"] = f"no live worker serves model {body.model} yet: the job waits for one"
    return out


@router.get("/v1/jobs")
def list_jobs(request: Request, status: JobStatus | None = None, model: str | None = None,
              kind: Literal["generate", "prep"] | None = None, limit: int = Query(default=20, ge=1, le=1000),
              after: str | None = Query(default=None, description="the last id of the page before"),
              q: str | None = Query(default=None, max_length=1000,
                                    description="jobs with a prompt or output holding every word of it"),
              since: Annotated[datetime | None, Query(description="jobs created since then (ISO 8601; UTC unless "
                                                                  "it names its zone)")] = None):
    """Jobs, newest first, a page at a time: `after` = the page's `last_id` gives the next."""
    client = client_of(request)
    if after is not None:
        after = client.job(after).id  # 404 for an id that is not there
    try:
        found = client.list_jobs(status=status and status.value, model=model, kind=kind, limit=limit + 1,
                                 after=after, query=q, since=since)
    except SearchError as e:
        raise APIError(422, str(e), param="q") from None
    page = found[:limit]
    return {"object": "list", "data": [job_json(j) for j in page], "has_more": len(found) > limit,
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: str, request: Request):
    """A job, each prompt and its output so far."""
    job = client_of(request).job(job_id)
    return job_json(job.record(), job.items())


@router.delete("/v1/jobs/{job_id}")
def cancel_job(job_id: str, request: Request):
    """Cancel: a queued job never runs; a running one stops within a few tokens, keeping its output
    (its status stays "running" until then); a finished one stays as it is."""
    job = client_of(request).job(job_id)
    return {"id": job.id, "object": "job", "status": job.cancel().value}


@router.post("/v1/jobs/{job_id}/retry")
def retry_job(job_id: str, request: Request):
    """Run a finished job's failed and cancelled prompts again."""
    job = client_of(request).job(job_id)
    return {"id": job.id, "object": "job", "retried": job.retry(), "status": job.status.value}


@router.get("/v1/jobs/{job_id}/results", response_class=Response,
            responses={200: {"content": {"application/jsonl": {}}}})
def results(job_id: str, request: Request, provenance: bool = Query(default=True)):
    """A finished job's outputs, one JSON line per prompt (a scoring job's: per line custom_id, line,
    status, tokens, logprob, mean_logprob, perplexity): custom_id, prompt, output, finish_reason, usage,
    "sample" (1, 2, ...) for a job submitted with several samples per prompt, and what made the
    output ("provenance": model and tokenizer hashes, dtype, device, software, seed; `provenance=false`
    leaves it out)."""
    job = client_of(request).job(job_id)
    if not job.status.done:
        raise APIError(409, f"job {job.id} is {job.status.value}: its results come when it ends "
                            f"(GET /v1/jobs/{job.id}/stream follows it)", code="not_finished")
    if job.scoring is not None:  # a scoring job: its lines' scores
        lines = [json.dumps(r, ensure_ascii=False) for r in job.scores()]
        return Response("".join(line + "\n" for line in lines), media_type="application/jsonl")
    keep = ("custom_id", "sample", "prompt", "output", "finish_reason", "status", "error", "usage", "provenance")
    lines = [json.dumps({k: r[k] for k in keep if k in r}, ensure_ascii=False)
             for r in job.result(provenance=provenance)]
    return Response("".join(line + "\n" for line in lines), media_type="application/jsonl")


@router.get("/v1/jobs/{job_id}/stream", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
def stream(job_id: str, request: Request, after: int | None = Query(default=None, ge=0),
           last_event_id: str | None = Header(default=None)):
    """The job's events as server-sent events, from its first (or after `Last-Event-ID`, or `after`)
    to its end; `id:` is each event's sequence number, `event:` its kind (tok, start, item, reset,
    resync, gap, end; see worker/stream.py). A stream opened after the end replays it all. Leaving
    early does not cancel the job."""
    job = client_of(request).job(job_id)
    start = after if after is not None else _last_id(last_event_id)
    job.client.require_redis("the stream needs it; GET /v1/jobs/{id} and /results answer from the store")
    return StreamingResponse(sse.stream(_events(job, start)), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Gencli-Job": job.id})


def _last_id(value: str | None) -> int:
    if value is None:
        return 0
    if not value.strip().isdigit():
        raise APIError(422, f"Last-Event-ID must be an event's id (a whole number), got {value[:40]!r}",
                       param="Last-Event-ID")
    return int(value)


def _events(job: Job, after: int):
    try:
        for e in job.events(after):
            yield sse.event(e, id=e.get("seq"), name=e["t"])
    except GencliError as e:
        yield sse.event({"error": {"message": str(e), "type": "server_error"}}, name="error")
    except (redis.RedisError, OSError) as e:  # Redis went away for longer than a follower waits
        yield sse.event({"error": {"message": f"lost Redis ({type(e).__name__}): resume with Last-Event-ID",
                                   "type": "service_unavailable"}}, name="error")


@router.get("/healthz", tags=["health"])
def healthz(request: Request):
    """The store, Redis and the live workers per model; 503 when the store or Redis does not answer."""
    client = client_of(request)
    health: dict = {"store": "ok", "redis": "ok", "models": {}}
    try:
        client.store_time()
    except Exception as e:  # SQLAlchemy's and the driver's errors alike
        health["store"] = f"error: {type(e).__name__}"
    try:
        health["models"] = client.served_models()
    except RedisUnavailable:  # (no details: this route needs no token)
        health["redis"] = "unavailable"
    ok = health["store"] == health["redis"] == "ok"
    return JSONResponse(health, status_code=200 if ok else 503)
