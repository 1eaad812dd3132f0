"""The ASGI app: `create_app()` builds it, `gencli serve` runs it under uvicorn.

Before any route runs, two pieces of middleware answer on their own: a bearer token, when one is
configured, is required everywhere but /healthz (401), and a body over the size limit gets 413
before it is read whole. Text must be valid Unicode, on every route: a JSON body of bytes that are
not UTF-8, or a string (a key too) of the body, the query or the path that holds a lone surrogate
(from a `\\ud83c` escape) or a NUL, gets 422 naming the first, before the route's fields are
checked (valid_text). Every error, the routes' and the framework's, leaves in OpenAI's shape
(errors.py); an unexpected one is logged with its traceback and answered 500 without it.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gencli import __version__
from gencli.api.errors import APIError, from_domain
from gencli.api.metrics import Metrics, Timing
from gencli.model.errors import GencliError
from gencli.worker.client import Client
from gencli.worker.unicode import check_json

log = logging.getLogger("gencli.api")

DEFAULT_MAX_BODY = 2 * 1024 * 1024
OPEN_PATHS = ("/healthz",)  # answered without the token
THREADS = 1024  # blocking calls (the store, following a stream) in flight at once


class TokenAuth:
    """`Authorization: Bearer <token>` on every route but OPEN_PATHS (pure ASGI: nothing is read first)."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
                why = "no bearer token" if not given else "a wrong bearer token"
                err = APIError(401, f"{why}: send the header 'Authorization: Bearer <GENCLI_API_TOKEN>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over `limit` bytes: at once when Content-Length says so, else as soon as the
    bytes read pass it (the body is held until then, so the route never sees part of one)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    def _too_large(self) -> APIError:
        return APIError(413, f"request body over {self.limit} bytes: send less, or start the server with a larger "
                             "--max-body", code="body_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large().response()(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large().response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the disconnect, when it comes

        await self.app(scope, replay, send)


def _one_line(exc: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's first error as `param: what is wrong`."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return "the body is not valid JSON: send a JSON object", None
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field: remove it (see /docs for the fields this route takes)"
    if err.get("type") == "missing":
        msg = "required"
        if param is None:
            return "the body is missing: send a JSON object (content-type: application/json)", None
    if param is None and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return "the body must be a JSON object (content-type: application/json)", None
    return (f"{param}: {msg}" if param else msg), param


async def valid_text(request: Request) -> None:
    """InvalidText (422) for a path, query or JSON body that holds a string, or a key, that gencli
    refuses (worker/unicode.py). A dependency of every route, so it runs after FastAPI parsed the
    body and before the route's model checks it: no route, and no error message, sees such a string."""
    check_json(request.path_params)
    for name, value in request.query_params.multi_items():
        check_json({name: value})
    if "json" not in request.headers.get("content-type", ""):
        return
    try:
        body = await request.json()  # what FastAPI parsed for the route (the request keeps it)
    except ValueError:
        return  # not JSON: a route that takes a body has said so already; one that takes none ignores it
    check_json(body)


def _not_utf8(e: StarletteHTTPException) -> APIError | None:
    """FastAPI's 400 "error parsing the body" when the cause is bytes that are not UTF-8, said so."""
    cause = e.__cause__
    if not isinstance(cause, UnicodeDecodeError):
        return None
    return APIError(422, f"the body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at byte {cause.start}): "
                         "send UTF-8 JSON", code="invalid_text")


def create_app(client: Client | None = None, *, token: str | None = None, max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The app over `client` (default: one on this process's settings)."""
    from gencli.api import batches, completions, jobs, tokenize

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        yield

    app = FastAPI(title="gencli", version=__version__, lifespan=lifespan, dependencies=[Depends(valid_text)],
                  description="Durable text generation: gencli's jobs, OpenAI's completions, chat and Batch API.")
    app.state.client = client or Client()
    app.state.metrics = Metrics(app.state.client)

    @app.get("/metrics", tags=["health"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    def metrics():
        """Prometheus text: jobs, queues, workers' sequences and tokens, request and token latencies."""
        body, content_type = app.state.metrics.render()
        return Response(body, media_type=content_type)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(GencliError)
    async def _domain_error(request: Request, e: GencliError):
        return from_domain(e).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        msg, param = _one_line(e)
        return APIError(422, msg, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if (not_utf8 := _not_utf8(e)) is not None:
            return not_utf8.response()
        what = {404: f"no route {request.url.path}: see /docs", 405: f"{request.method} is not allowed on "
                f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return APIError(e.status_code, what, code={404: "not_found"}.get(e.status_code)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return APIError(500, f"internal error ({type(e).__name__}); the server's log has the details",
                        type="server_error").response()

    app.include_router(jobs.router)
    app.include_router(completions.router)
    app.include_router(batches.router)
    app.include_router(tokenize.router)
    app.add_middleware(BodyLimit, limit=max_body)
    app.add_middleware(Timing, metrics=app.state.metrics)
    if token:
        app.add_middleware(TokenAuth, token=token)  # added last: runs first
    return app
