"""Server-sent events from a blocking iterator (a job's stream follows Redis in a thread), and what
happens when the client goes away before the end: `on_disconnect` runs (an OpenAI request's job
is cancelled), then the iterator is closed, which lets go of its Redis connection."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import anyio.to_thread

_END = object()


def event(data: dict | str, *, id: int | None = None, name: str | None = None) -> str:
    """One SSE event: `id:` and `event:` lines when given, then the data (JSON unless a string)."""
    lines = [] if id is None else [f"id: {id}"]
    if name:
        lines.append(f"event: {name}")
    lines.append(f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}")
    return "\n".join(lines) + "\n\n"


async def stream(blocking: Iterator[str], *, on_disconnect: Callable[[], None] | None = None) -> AsyncIterator[str]:
    """`blocking`'s items, each taken in a worker thread; if the response is given up before the end
    (the client disconnected: Starlette cancels us), `on_disconnect()` runs, shielded."""
    finished = False
    try:
        while (item := await anyio.to_thread.run_sync(next, blocking, _END)) is not _END:
            yield item
        finished = True
    finally:
        with anyio.CancelScope(shield=True):
            if not finished and on_disconnect is not None:
                await anyio.to_thread.run_sync(on_disconnect)
            close = getattr(blocking, "close", None)
            if close is not None:
                await anyio.to_thread.run_sync(close)
