"""A job's token stream: Redis pub/sub for live delivery, a Redis stream as the replay log.

Every event carries a sequence number (1, 2, ...) per job. The worker writes each event to the
job's replay log (XADD with id `<seq>-0`) and publishes it on the job's channel in one
MULTI/EXEC. A follower subscribes first, then reads the log, then takes live messages: an event
it has seen is skipped, a gap is filled from the log, and after a lost connection it resumes
from its last sequence number. So a late or reconnecting follower sees every event once.

Events are JSON objects:
  {"seq", "t": "start", "worker", "device", "attempt"}
  {"seq", "t": "tok", "i": item, "id": token id, "text": delta, "finish": reason or null}
  {"seq", "t": "item", "i": item, "status", "error"}      an item failed on its own
  {"seq", "t": "progress", ...}                             dataset prep
  {"seq", "t": "reset", "items": [...]}                    gencli retry: these items start over
  {"seq", "t": "end", "status", "error"}                    the last event of a job
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import redis

RUNNING_TTL = 7 * 24 * 3600  # added to a running job's log TTL: no job runs longer


def channel(job_id: str) -> str:
    return f"gencli:chan:{job_id}"


def log_key(job_id: str) -> str:
    return f"gencli:log:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"gencli:cancel:{job_id}"


class Publisher:
    """Appends a job's events to its log and publishes them, numbering them from `last_seq`."""

    def __init__(self, r: redis.Redis, job_id: str, *, last_seq: int, ttl: int):
        self.r = r
        self.job_id = job_id
        self.seq = last_seq
        self.ttl = ttl

    def publish(self, events: list[dict]) -> None:
        if not events:
            return
        pipe = self.r.pipeline(transaction=True)
        for e in events:
            self.seq += 1
            e["seq"] = self.seq
            data = json.dumps(e, ensure_ascii=False)
            pipe.xadd(log_key(self.job_id), {"e": data}, id=f"{self.seq}-0")
            pipe.publish(channel(self.job_id), data)
        if any(e["t"] in ("start", "end") for e in events):  # the log outlives the job by ttl
            pipe.expire(log_key(self.job_id), self.ttl + (0 if events[-1]["t"] == "end" else RUNNING_TTL))
        pipe.execute()


def read_log(r: redis.Redis, job_id: str, after: int = 0, count: int = 10_000) -> list[dict]:
    """Logged events with seq > after, in order."""
    out: list[dict] = []
    start = f"{after + 1}-0"
    while True:
        rows = r.xrange(log_key(job_id), min=start, count=count)
        out += [json.loads(fields[b"e"]) for _, fields in rows]
        if len(rows) < count:
            return out
        start = f"{out[-1]['seq'] + 1}-0"


def last_seq(r: redis.Redis, job_id: str) -> int:
    rows = r.xrevrange(log_key(job_id), count=1)
    return json.loads(rows[0][1][b"e"])["seq"] if rows else 0


def follow(
    url: str,
    job_id: str,
    *,
    after: int = 0,
    is_done=None,
    poll: float = 1.0,
    reconnect_for: float = 60.0,
) -> Iterator[dict]:
    """Every event of the job after seq `after`, each once, in order, up to its "end" event.

    An "end" that more events follow in the log (a retried job) does not stop following.
    is_done(): a fallback for a job that ended without an "end" in the log (the log expired, or
    Redis lost it): checked when nothing arrives for `poll` seconds; when it returns True and the
    log has nothing new, following stops.
    """
    seen = after
    down_since = None
    while True:
        r = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=None)
        ps = r.pubsub(ignore_subscribe_messages=True)
        try:
            ps.subscribe(channel(job_id))  # before reading the log: nothing falls between
            down_since = None
            backlog = read_log(r, job_id, seen)
            while True:
                yield from backlog
                if backlog:
                    seen = backlog[-1]["seq"]
                    if backlog[-1]["t"] == "end":
                        return
                msg = ps.get_message(timeout=poll)
                if msg is not None:
                    e = json.loads(msg["data"])
                    if e["seq"] <= seen:
                        backlog = []
                        continue
                    if e["seq"] == seen + 1:
                        backlog = [e]
                        continue
                # a gap, or a quiet channel: catch up from the log
                backlog = read_log(r, job_id, seen)
                if not backlog and msg is None and is_done is not None and is_done():
                    yield from read_log(r, job_id, seen)
                    return
        except (redis.ConnectionError, redis.TimeoutError):
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > reconnect_for:
                raise
            time.sleep(0.5)
        finally:
            try:
                ps.close()
                r.close()
            except redis.RedisError:
                pass
