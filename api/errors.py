"""Errors as the API answers them: OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
on every route, with one line of text that says what to fix."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from gencli.model.errors import ContextOverflowError, GencliError, InvalidParameterError
from gencli.worker.client import JobNotFound, JobStateError, ModelNotServed, QueueFull, RedisUnavailable
from gencli.worker.unicode import InvalidText


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_domain(e: GencliError) -> APIError:
    """A client error as its HTTP answer."""
    msg = str(e)
    if isinstance(e, RedisUnavailable):
        return APIError(503, msg, type="service_unavailable", code="redis_unavailable")
    if isinstance(e, QueueFull):
        return APIError(429, msg, type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(QueueFull.retry_after)})
    if isinstance(e, JobNotFound):
        return APIError(404, msg, code="not_found")
    if isinstance(e, ModelNotServed):
        return APIError(404, msg, param="model", code="model_not_found")
    if isinstance(e, JobStateError):
        return APIError(409, msg, code="conflict")
    if isinstance(e, InvalidText):
        return APIError(422, msg, param=e.param, code="invalid_text")
    if isinstance(e, InvalidParameterError):
        return APIError(422, msg, param=e.param)
    if isinstance(e, ContextOverflowError):
        return APIError(422, msg, param="max_tokens", code="context_length_exceeded")
    return APIError(422, msg)
