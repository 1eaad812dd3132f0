"""A job's stream events: the one home of their schema and of the functions that make them.

Every event is a JSON object with "t", its type; the publisher adds "seq", its number in the
job's stream (worker/stream.py). Readers fold them into each item's text with worker/fold.py.

  start     {"t": "start", "worker", "device", "attempt"}         a worker claimed the job
  tok       {"t": "tok", "i": item, "e": the item's epoch, "id": token id or null, "text": delta,
             "finish": reason or null, ["lp": [k, logprob, top]]}    a token (id null: an ending alone;
                                                                     lp: worker/logprobs.py)
  item      {"t": "item", "i", "status": "failed", "error"}       an item failed on its own
  progress  {"t": "progress", "done", "total", "unit", "elapsed"}  dataset prep
  reset     {"t": "reset", "items": [i...], "epochs": {i: epoch}}  gencli retry: these items start over
  resync    {"t": "resync", "items": [{"i", "e", "text"}]}       a worker resumed these items from the
                                                                     store's checkpoint: their text so far
  end       {"t": "end", "status", "error", ["result"]}           the last event of a job
And two that readers make, never published:
  gap       {"t": "gap", "after", "next"}                         the log lost events after..next
  from_store {"t": "from_store", "why"}                           Redis is away: text from the store
"""

from __future__ import annotations


def start(worker: str, device: str, attempt: int) -> dict:
    return {"t": "start", "worker": worker, "device": device, "attempt": attempt}


def tok(item: int, epoch: int, token: int | None, text: str, finish: str | None, lp: list | None = None) -> dict:
    """lp: the token's logprobs, where the item asked for them (worker/logprobs.py's event_lp)."""
    e = {"t": "tok", "i": item, "e": epoch, "id": token, "text": text, "finish": finish}
    if lp is not None:
        e["lp"] = lp
    return e


def item_failed(item: int, error: str) -> dict:
    return {"t": "item", "i": item, "status": "failed", "error": error}


def progress(done: int, total: int, unit: str, elapsed: float) -> dict:
    return {"t": "progress", "done": done, "total": total, "unit": unit, "elapsed": round(elapsed, 3)}


def reset(epochs: dict[int, int]) -> dict:
    """Items starting over, each in its new epoch."""
    return {"t": "reset", "items": list(epochs), "epochs": {str(i): e for i, e in epochs.items()}}


def resync(items: list[tuple[int, int, str]]) -> dict:
    """Items resumed from the checkpoint: (index, epoch, text so far) each."""
    return {"t": "resync", "items": [{"i": i, "e": e, "text": text} for i, e, text in items]}


def end(status: str, error: str | None = None, result: dict | None = None) -> dict:
    """A job's last event: how it ended (a dataset job's with its result)."""
    e = {"t": "end", "status": status, "error": error}
    if result is not None:
        e["result"] = result
    return e


def gap(after: int, next_seq: int | None) -> dict:
    """What a follower yields where the log lost events (Redis restarted empty, evicted or trimmed
    the log): the events after `after` up to `next_seq` (None: all of them) are gone."""
    return {"t": "gap", "after": after, "next": next_seq}


def from_store(why: str) -> dict:
    return {"t": "from_store", "why": why}
