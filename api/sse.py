"""Server-sent events from a blocking iterator (a job's stream follows Redis), and what happens
when the client goes away before the end.

Each stream has a pump thread that runs the iterator and hands its items to the event loop; the
response sends whatever has piled up in one write. If the client disconnects first (Starlette
cancels the response), `on_disconnect` runs (an OpenAI request's job is cancelled, so its stream
ends soon) and the pump stops at its next item, closing the iterator, which lets go of its Redis
connection.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import anyio.to_thread

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def event(data: dict | str, *, id: int | None = None, name: str | None = None) -> str:
    """One SSE event: `id:` and `event:` lines when given, then the data (JSON unless a string)."""
    lines = [] if id is None else [f"id: {id}"]
    if name:
        lines.append(f"event: {name}")
    lines.append(f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}")
    return "\n".join(lines) + "\n\n"


def _pump(blocking: Iterator[str], put: Callable[[object], None], stop: threading.Event) -> None:
    try:
        for item in blocking:
            put(item)
            if stop.is_set():
                break
    except BaseException as e:  # handed to the response, which raises it there
        put(_Failed(e))
    finally:
        close = getattr(blocking, "close", None)
        if close is not None:
            close()
        put(_END)


async def stream(blocking: Iterator[str], *, on_disconnect: Callable[[], None] | None = None) -> AsyncIterator[str]:
    """`blocking`'s items, as they come, several at once when they pile up."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is stopping
            stop.set()

    threading.Thread(target=_pump, args=(blocking, put, stop), daemon=True, name="gencli-sse").start()
    finished = False
    try:
        while True:
            batch = [await items.get()]
            while not items.empty():
                batch.append(items.get_nowait())
            text = [x for x in batch if isinstance(x, str)]
            if text:
                yield "".join(text)
            for x in batch:
                if isinstance(x, _Failed):
                    raise x.error
            if batch[-1] is _END:
                finished = True
                return
    finally:
        stop.set()
        if not finished and on_disconnect is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(on_disconnect)
