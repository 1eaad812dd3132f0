"""OpenAI's Files and Batch API over gencli's store and queue.

An input file (purpose "batch") is kept in the store. A batch is one gencli job: each line of its
file, `{"custom_id", "method": "POST", "url": <the batch's endpoint>, "body": <a request>}`, becomes
that request's items (its prompts, `n` choices each), all checked before anything is recorded; a
bad line is refused with its number (422) and nothing is queued. Since the job is the record, a
batch survives worker deaths and server restarts, and its output and error files are made from the
store whenever they are read: file ids `file-batch-output-<job>` and `file-batch-errors-<job>`.

Status: a queued job is "validating" (accepted, waiting for a worker), a running one
"in_progress" ("cancelling" once a cancel is asked), a succeeded or failed one "completed" (its
failed lines are in the error file), a cancelled one "cancelled".
"""

from __future__ import annotations

import json
from datetime import timezone
from typing import Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gencli.api.completions import (
    ChatRequest,
    CompletionRequest,
    ResponseKind,
    check_served,
    request_items,
    tokenizer_for,
)
from gencli.api.errors import APIError
from gencli.api.jobs import client_of
from gencli.model.errors import GencliError
from gencli.worker.client import Client, Job, JobNotFound
from gencli.worker.unicode import check_json, utf8_position

router = APIRouter(tags=["batch"])

ENDPOINTS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest}
OUTPUT, ERRORS = "file-batch-output-", "file-batch-errors-"
BATCH = "batch_"


def _ts(t) -> int | None:
    """A stored time (naive UTC) as Unix seconds."""
    return None if t is None else int(t.replace(tzinfo=timezone.utc).timestamp())


# --- files ---------------------------------------------------------------------------------------
def _file_json(id: str, *, purpose: str, filename: str, size: int, created) -> dict:
    return {"id": id, "object": "file", "bytes": size, "created_at": _ts(created), "filename": filename,
            "purpose": purpose, "status": "processed", "status_details": None}


@router.post("/v1/files")
async def upload(request: Request, file: UploadFile = File(...), purpose: str = Form(...)):  # noqa: B008
    """Upload a file: purpose "batch", JSON lines (see POST /v1/batches)."""
    if purpose != "batch":
        raise APIError(422, f"purpose {purpose!r} is not served: gencli takes files of purpose 'batch'",
                       param="purpose")
    content = await file.read()
    if not content.strip():
        raise APIError(422, "the file is empty: give one JSON request per line", param="file")
    name = (file.filename or "upload.jsonl")[:255]
    rec = client_of(request).upload_file(purpose=purpose, filename=name, content=content)
    return _file_json(rec.id, purpose=rec.purpose, filename=rec.filename, size=rec.bytes, created=rec.created_at)


def _batch_job(client: Client, batch_id: str) -> Job:
    job_id = batch_id.removeprefix(BATCH) if batch_id.startswith(BATCH) else None
    try:
        job = client.job(job_id) if job_id and len(job_id) == 32 else None
    except JobNotFound:
        job = None
    if job is None or "batch" not in (job.record().params.get("meta") or {}):
        raise APIError(404, f"no batch {batch_id}: see GET /v1/batches", code="not_found")
    return job


def _output_file(client: Client, file_id: str) -> tuple[Job, bool]:
    """(the batch's job, errors?) of a batch output or error file id; 409 before the batch ended."""
    errors = file_id.startswith(ERRORS)
    job = _batch_job(client, BATCH + file_id.removeprefix(ERRORS if errors else OUTPUT))
    if not job.status.done:
        raise APIError(409, f"batch {BATCH}{job.id} is {_status(job.record())}: its output comes when it ends",
                       code="not_finished")
    return job, errors


@router.get("/v1/files")
def list_files(request: Request, purpose: str | None = None, limit: int = Query(default=100, ge=1, le=10_000)):
    """Uploaded files, newest first (a batch's output files are listed on its batch)."""
    found = client_of(request).files(purpose=purpose, limit=limit + 1)
    return {"object": "list", "data": [_file_json(f.id, purpose=f.purpose, filename=f.filename, size=f.bytes,
                                                  created=f.created_at) for f in found[:limit]],
            "has_more": len(found) > limit}


@router.get("/v1/files/{file_id}")
def file_info(file_id: str, request: Request):
    client = client_of(request)
    if file_id.startswith((OUTPUT, ERRORS)):
        job, errors = _output_file(client, file_id)
        return _file_json(file_id, purpose="batch_output", filename=f"{file_id}.jsonl",
                          size=len(_render(job, errors=errors)), created=job.record().finished_at)
    rec = client.file(file_id)
    if rec is None:
        raise APIError(404, f"no file {file_id}", code="not_found")
    return _file_json(rec.id, purpose=rec.purpose, filename=rec.filename, size=rec.bytes, created=rec.created_at)


@router.get("/v1/files/{file_id}/content", response_class=Response,
            responses={200: {"content": {"application/jsonl": {}}}})
def file_content(file_id: str, request: Request):
    """An uploaded file's bytes, or a finished batch's output (or error) lines."""
    client = client_of(request)
    if file_id.startswith((OUTPUT, ERRORS)):
        job, errors = _output_file(client, file_id)
        return Response(_render(job, errors=errors), media_type="application/jsonl")
    content = client.file_content(file_id)
    if content is None:
        raise APIError(404, f"no file {file_id}", code="not_found")
    return Response(content, media_type="application/octet-stream")


# --- batches -------------------------------------------------------------------------------------
class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input_file_id: str
    endpoint: Literal["/v1/completions", "/v1/chat/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def _line_error(n: int, e: Exception) -> APIError:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
        text = f"{where}: {msg}" if where else msg
    else:
        text = e.message if isinstance(e, APIError) else str(e)
    return APIError(422, f"input file line {n}: {text}", param="input_file_id", code="invalid_batch_line")


def parse_batch(content: bytes, endpoint: str) -> tuple[str, list]:
    """(model, items) of an input file, every line checked; APIError naming the first bad line."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, at = utf8_position(content, e)
        raise APIError(422, f"input file line {line}: not valid UTF-8 (byte 0x{content[e.start]:02x} at character "
                            f"{at}): save the file as UTF-8", param="input_file_id",
                       code="invalid_batch_line") from None
    request_type = ENDPOINTS[endpoint]
    items, seen, model = [], {}, None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            check_json(obj)  # a "\ud83c" escape decodes to a lone surrogate, "\u0000" to a NUL
            if not isinstance(obj, dict):
                raise APIError(422, 'each line must be a JSON object {"custom_id", "method", "url", "body"}')
            custom_id = obj.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                raise APIError(422, "custom_id: a non-empty string is required")
            if custom_id in seen:
                raise APIError(422, f"custom_id {custom_id!r} is used again (first on line {seen[custom_id]})")
            seen[custom_id] = n
            if obj.get("method") != "POST":
                raise APIError(422, f"method must be POST, got {obj.get('method')!r}")
            if obj.get("url") != endpoint:
                raise APIError(422, f"url must be the batch's endpoint {endpoint}, got {obj.get('url')!r}")
            extra = set(obj) - {"custom_id", "method", "url", "body"}
            if extra:
                raise APIError(422, f"unknown key(s) {', '.join(sorted(extra))}")
            body = request_type.model_validate(obj.get("body"))
            if body.stream:
                raise APIError(422, "body.stream: a batch's requests cannot stream")
            if model is not None and body.model != model:
                raise APIError(422, f"body.model {body.model!r}: every line of a batch uses one model "
                                    f"(line {next(iter(seen.values()))} uses {model!r})")
            model = body.model
            items += request_items(body, line=n, custom_id=custom_id)
        except json.JSONDecodeError as e:
            raise _line_error(n, GencliError(f"not valid JSON ({e.msg} at column {e.colno})")) from None
        except (ValidationError, APIError, GencliError) as e:
            raise _line_error(n, e) from None
    if model is None:
        raise APIError(422, "the input file holds no requests", param="input_file_id")
    return model, items


@router.post("/v1/batches")
def create_batch(body: BatchRequest, request: Request):
    """Run every request of an uploaded file as one durable job; poll GET /v1/batches/{id}."""
    client = client_of(request)
    info = client.file(body.input_file_id)
    if info is None:
        raise APIError(404, f"no file {body.input_file_id}: upload it with POST /v1/files", param="input_file_id",
                       code="not_found")
    if info.purpose != "batch":
        raise APIError(422, f"file {info.id} has purpose {info.purpose!r}, not 'batch'", param="input_file_id")
    model, items = parse_batch(client.file_content(info.id), body.endpoint)
    check_served(client, model)
    meta = {"batch": {"endpoint": body.endpoint, "input_file_id": info.id,
                      "completion_window": body.completion_window, "metadata": body.metadata}}
    try:
        job = client.submit(items, model=model, chat=body.endpoint == "/v1/chat/completions", meta=meta)
    except GencliError as e:  # the context check names the file's line
        if "line" in str(e).split(":")[0]:
            raise APIError(422, f"input file {e}", param="input_file_id", code="invalid_batch_line") from None
        raise
    return batch_json(job)


@router.get("/v1/batches/{batch_id}")
def get_batch(batch_id: str, request: Request):
    return batch_json(_batch_job(client_of(request), batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, request: Request):
    """Cancel: requests not started never run; running ones stop within a few tokens."""
    job = _batch_job(client_of(request), batch_id)
    if not job.status.done:
        job.cancel()
    return batch_json(job)


@router.get("/v1/batches")
def list_batches(request: Request, limit: int = Query(default=20, ge=1, le=100), after: str | None = None):
    """Batches, newest first (`after`: the last id of the page before)."""
    client = client_of(request)
    cursor = _batch_job(client, after).id if after else None
    found: list[dict] = []
    scanned = 0
    while len(found) <= limit and scanned < 10_000:  # batches are jobs among others: page through those
        page = client.list_jobs(kind="generate", limit=200, after=cursor)
        if not page:
            break
        scanned += len(page)
        cursor = page[-1].id
        found += [batch_json(Job(client, j.id), j) for j in page if "batch" in (j.params.get("meta") or {})]
    data = found[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(found) > limit}


def _status(rec) -> str:
    if rec.status == "queued":
        return "validating"
    if rec.status == "running":
        return "cancelling" if rec.cancel_requested else "in_progress"
    return {"succeeded": "completed", "failed": "completed", "cancelled": "cancelled"}[rec.status]


def _lines(items) -> dict[int, list]:
    """The items of each input line, in order."""
    out: dict[int, list] = {}
    for it in items:
        out.setdefault(it.line, []).append(it)
    return out


def batch_json(job: Job, rec=None) -> dict:
    rec = rec or job.record()
    meta = rec.params["meta"]["batch"]
    lines = _lines(job.items())
    done = rec.status in ("succeeded", "failed", "cancelled")
    ok = sum(all(it.status == "succeeded" for it in group) for group in lines.values())
    bad = sum(any(it.status in ("failed", "cancelled") for it in group) for group in lines.values()) if done else \
        sum(any(it.status == "failed" for it in group) for group in lines.values())
    status = _status(rec)
    finished = _ts(rec.finished_at)
    return {
        "id": BATCH + rec.id, "object": "batch", "endpoint": meta["endpoint"], "errors": None,
        "input_file_id": meta["input_file_id"], "completion_window": meta["completion_window"], "status": status,
        "output_file_id": OUTPUT + rec.id if done else None,
        "error_file_id": ERRORS + rec.id if done and bad else None,
        "created_at": _ts(rec.created_at), "in_progress_at": _ts(rec.started_at),
        "expires_at": _ts(rec.created_at) + 24 * 3600, "finalizing_at": None,
        "completed_at": finished if status == "completed" else None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": finished if status == "cancelled" else None,
        "request_counts": {"total": len(lines), "completed": ok, "failed": bad},
        "metadata": meta.get("metadata"),
    }


def _render(job: Job, *, errors: bool) -> bytes:
    """A finished batch's output lines (each line whose requests all succeeded) or error lines."""
    rec = job.record()
    meta = rec.params["meta"]["batch"]
    response_kind = ResponseKind(chat=meta["endpoint"] == "/v1/chat/completions")
    choices = _choices(job.client.file_content(meta["input_file_id"]) or b"")
    out = []
    for line, group in _lines(job.items()).items():
        ok = all(it.status == "succeeded" for it in group)
        if ok == errors:
            continue
        entry: dict[str, Any] = {"id": f"batch_req_{rec.id}_{line}", "custom_id": group[0].custom_id}
        if ok:
            body = response_kind.body(f"{rec.id}-{line}", _ts(rec.finished_at), rec.model, group,
                                      choices.get(line, 1), tokenizer_for(job.client, rec.model, group))
            entry |= {"response": {"status_code": 200, "request_id": f"req_{rec.id}_{line}", "body": body},
                      "error": None}
        else:
            bad = next(it for it in group if it.status != "succeeded")
            code = "batch_cancelled" if bad.status in ("cancelled", "pending") else "generation_failed"
            message = bad.error or f"the request was {bad.status}"
            entry |= {"response": None, "error": {"code": code, "message": message}}
        out.append(json.dumps(entry, ensure_ascii=False))
    return "".join(line + "\n" for line in out).encode()


def _choices(content: bytes) -> dict[int, int]:
    """Each input line's `n` (choices per prompt), read again from the input file (it was checked
    when the batch was made)."""
    out = {}
    for n, line in enumerate(content.decode("utf-8-sig").splitlines(), start=1):
        if line.strip():
            out[n] = json.loads(line)["body"].get("n", 1)
    return out
