"""A job's token stream: Redis pub/sub for live delivery, a Redis stream as the replay log.

Every event carries a sequence number (1, 2, ...) per job. The worker writes each event to the
job's replay log (XADD with id `<seq>-0`) and publishes it on the job's channel in one Lua
script, which also checks that the worker still owns the job's stream (Publisher). A follower
subscribes first, then reads the log, then takes live messages: an event it has seen is skipped,
a gap is filled from the log, and after a lost connection it resumes from its last sequence
number. So a late or reconnecting follower sees every event once. Redis is transport: a log that
lost events shows a gap event where they were, and the store holds what the job made.

Events are JSON objects whose schema and constructors live in worker/events.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import redis

from gencli.worker.events import gap as gap_event
from gencli.worker.keys import Keys

RUNNING_TTL = 7 * 24 * 3600  # added to a running job's log TTL: no job runs longer


class StreamRefused(Exception):
    """A publish was refused: another worker owns the job's stream now (this one lost its lease)."""


class FenceExpired(StreamRefused):
    """A publish reached Redis past its fence (at `redis_now`, by Redis's clock)."""

    def __init__(self, message: str, redis_now: float):
        super().__init__(message)
        self.redis_now = redis_now


# Appends events to the log and publishes them, in one atomic step. Modes: "claim" makes owner the
# stream's owner and numbers on from the log; "owner" publishes only while owner still owns the
# stream, with the seq numbers the publisher expects (never a number already in the log); "any"
# (the submit side: a queued job's cancel, a retry's reset) numbers on from the log. A claim or an
# "any" publish that finds no log at all numbers from ARGV[7] (the floor, see seq_floor), so that a
# log Redis lost and a new attempt starts again is never numbered below what readers have seen.
# ARGV[8], a worker's fence: the moment its lease may run out, by Redis's clock; a claim or an
# "owner" publish that arrives later is refused, however long the worker was stopped between
# deciding to publish and its call reaching Redis (and even where Redis lost the owner key).
_PUBLISH = """
local mode, owner = ARGV[1], ARGV[2]
if ARGV[8] ~= '' and mode ~= 'any' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  if now > tonumber(ARGV[8]) then return {-3, tostring(now)} end
end
if mode == 'owner' then
  local cur = redis.call('GET', KEYS[3])
  if cur and cur ~= owner then return {-1, 0} end
  if not cur then redis.call('SET', KEYS[3], owner, 'EX', ARGV[6]) end
elseif mode == 'claim' then
  redis.call('SET', KEYS[3], owner, 'EX', ARGV[6])
end
local last = 0
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top > 0 then last = tonumber(string.match(top[1][1], '^(%d+)')) end
local first = last + 1
if mode == 'owner' then
  first = tonumber(ARGV[3])
  if last >= first then return {-2, last} end
elseif last == 0 then
  first = math.max(1, tonumber(ARGV[7]))
end
for i = 9, #ARGV do
  local data = '{"seq":' .. (first + i - 9) .. ',' .. string.sub(ARGV[i], 2)
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], (first + i - 9) .. '-0', 'e', data)
  redis.call('PUBLISH', KEYS[2], data)
end
if tonumber(ARGV[4]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
return {first, last}
"""


class Publisher:
    """Appends a job's events to its log and publishes them, each with the next sequence number.

    A worker's publisher is guarded by its lease owner: `claim()` takes the stream, and every later
    publish is refused (StreamRefused) once another owner has claimed it, so a worker that stalled
    past its lease and woke up after a takeover writes nothing more. Its fence, where given, says
    until when (by Redis's clock, seconds since the epoch) its lease surely holds: Redis refuses a
    publish that reaches it later, which guards also a log whose owner key Redis lost. A publisher
    without an owner (the submit side) just numbers on from the log.
    """

    def __init__(self, r: redis.Redis, keys: Keys, job_id: str, *, owner: str | None, ttl: int,
                 max_events: int = 200_000, fence: Callable[[], float] | None = None):
        self.r = r
        self.keys = keys
        self.job_id = job_id
        self.owner = owner
        self.fence = fence
        self.ttl = ttl
        self.max_events = max_events
        self.seq = 0  # the last number this publisher wrote
        self._script = r.register_script(_PUBLISH)

    def claim(self, event: dict, *, attempt: int) -> int:
        """Take the stream for this owner with its first event; its seq (the log's last + 1, or
        where the log is gone, seq_floor(attempt)). attempt: the claim's number among the job's
        attempts (the store's, counted over retries too)."""
        self._run("claim", [event], seq_floor(attempt))
        return self.seq

    def publish(self, events: list[dict], *, floor: int = 0) -> None:
        """floor: where a submit-side publish that finds no log numbers from (see seq_floor)."""
        if events:
            self._run("owner" if self.owner else "any", events, floor)

    def _run(self, mode: str, events: list[dict], floor: int = 0) -> None:
        while True:
            try:
                return self._accept(self._script(**self._call(mode, events, floor)), events)
            except FenceExpired as e:
                if not self.renewed_since(e):
                    raise

    def renewed_since(self, refusal: FenceExpired) -> bool:
        """Whether the lease, renewed since the refused call was built, holds at the moment Redis
        refused it: then the call was only held back (a Redis outage the client waited out, retrying
        the call as built), and it goes again with the new fence. A worker whose lease ran out has
        had no renewal to move its fence on."""
        return self.fence is not None and self.fence() > refusal.redis_now

    def _call(self, mode: str, events: list[dict], floor: int = 0) -> dict:
        ttl = 0  # the log's TTL is set at a job's start and end only: the log outlives the job by ttl
        if mode == "claim" or any(e["t"] in ("start", "end") for e in events):
            ttl = self.ttl + (0 if events[-1]["t"] == "end" else RUNNING_TTL)
        payload = [json.dumps(e, ensure_ascii=False) for e in events]
        return {"keys": [self.keys.log(self.job_id), self.keys.channel(self.job_id), self.keys.owner(self.job_id)],
                "args": [mode, self.owner or "", self.seq + 1, ttl, self.max_events, self.ttl + RUNNING_TTL, floor,
                         "" if self.fence is None else repr(self.fence()), *payload]}

    def _accept(self, result, events: list[dict]) -> None:
        first, last = result
        if first == -1:
            raise StreamRefused(f"job {self.job_id}: another worker owns its stream now")
        if first == -2:
            raise StreamRefused(f"job {self.job_id}: seq {self.seq + 1} is already in its log (up to {last})")
        if first == -3:
            raise FenceExpired(f"job {self.job_id}: its lease may have run out before the publish reached Redis",
                               float(last))
        for n, e in enumerate(events):
            e["seq"] = first + n
        self.seq = first + len(events) - 1


SEQ_SPAN = 1 << 32  # sequence numbers one attempt's log may use (far more events than any job makes)


def seq_floor(attempt: int, *, after: bool = False) -> int:
    """Where a job's log starts when Redis has lost it (restarted empty, expired, flushed): an
    attempt's own span, above every number any earlier attempt used. A reader that saw numbers up
    to N of the lost log then sees a jump (a gap, which it handles), never numbers it takes for
    ones it has. The first attempt starts at 1. after: the submit side's numbers, once the job's
    attempt `attempt` has run (a retry's reset, a cancel's end): above that attempt's, below the
    next's."""
    if attempt < 1:
        return 1
    return attempt * SEQ_SPAN + (SEQ_SPAN // 2 if after else 0) if (attempt > 1 or after) else 1


def publish_many(r: redis.Redis, batch: list[tuple[Publisher, list[dict]]],
                 exists: tuple[str, ...] = ()) -> tuple[list[StreamRefused | None], list[bool]]:
    """Publish several jobs' events in one Redis round trip (a pipeline of each job's guarded
    script), each with at least one event, and in the same trip ask whether the keys `exists`
    exist (the jobs' cancel flags). Per job, the refusal or None; per key, whether it exists.
    Redis errors other than a refusal are raised."""
    if not batch and not exists:
        return [], []
    for tries_left in (1, 0):
        pipe = r.pipeline(transaction=False)
        for pub, events in batch:
            pub._script(**pub._call("owner" if pub.owner else "any", events), client=pipe)  # (workers: no floor)
        for key in exists:
            pipe.exists(key)
        try:
            results = pipe.execute()
            break
        except redis.exceptions.NoScriptError:
            # Redis restarted empty between the pipeline's script check and its run (redis-py
            # retries a pipeline after a reconnect without loading its scripts again): no script
            # ran, so nothing was published; build it again, which loads the script
            if not tries_left:
                raise
    out: list[StreamRefused | None] = []
    for (pub, events), result in zip(batch, results[: len(batch)], strict=True):
        try:
            try:
                pub._accept(result, events)
            except FenceExpired as e:
                if not pub.renewed_since(e):
                    raise
                pub.publish(events)  # held back by an outage, not past its lease: again, with its new fence
            out.append(None)
        except StreamRefused as e:
            out.append(e)
    return out, [bool(x) for x in results[len(batch):]]


def read_log(r: redis.Redis, keys: Keys, job_id: str, after: int = 0, upto: int | None = None,
             count: int = 10_000) -> list[dict]:
    """Logged events with after < seq (<= upto), in order."""
    out: list[dict] = []
    start, end = f"{after + 1}-0", "+" if upto is None else f"{upto}-0"
    while True:
        rows = r.xrange(keys.log(job_id), min=start, max=end, count=count)
        out += [json.loads(fields[b"e"]) for _, fields in rows]
        if len(rows) < count:
            return out
        start = f"{out[-1]['seq'] + 1}-0"


def gapless(events: list[dict], after: int = 0, upto: int | None = None) -> bool:
    """True when events are exactly seq after+1, after+2, ... (up to upto): nothing lost."""
    if upto is not None and (events[-1]["seq"] if events else after) != upto:
        return False
    return all(e["seq"] == after + 1 + n for n, e in enumerate(events))


def follow(
    url: str,
    keys: Keys,
    job_id: str,
    *,
    after: int = 0,
    is_done=None,
    poll: float = 1.0,
    reconnect_for: float = 60.0,
) -> Iterator[dict]:
    """Every event of the job after seq `after`, each once, in order, up to its "end" event.

    Where the log lost events (Redis restarted empty, or evicted or trimmed the log), a gap event
    (see worker/events.py gap) stands in for them: a follower never takes a stream with a hole for whole.
    An "end" that more events follow in the log, or that is_done() denies (a retried job), does not
    stop following. is_done(): a fallback for a job that ended without an "end" in the log (the log expired, or
    Redis lost it): checked when nothing arrives for `poll` seconds; when it returns True and the
    log has nothing new, following stops, after a gap event for what is missing.
    """
    seen = after
    down_since = None
    while True:
        r = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=None)
        ps = r.pubsub(ignore_subscribe_messages=True)
        try:
            ps.subscribe(keys.channel(job_id))  # before reading the log: nothing falls between
            down_since = None
            backlog = _catch_up(read_log(r, keys, job_id, seen), seen)
            if not backlog and seen and _ends_at(r, keys, job_id, seen) and (is_done is None or is_done()):
                return  # resumed after the job's "end": nothing more to send
            while True:
                for e in backlog:
                    yield e
                    seen = e["seq"] if e["t"] != "gap" else e["next"] - 1
                if backlog and backlog[-1]["t"] == "end" and (is_done is None or is_done()):
                    return  # (an "end" the store does not agree with was an attempt's: a retry follows)
                msg = ps.get_message(timeout=poll)
                if msg is not None:
                    e = json.loads(msg["data"])
                    if e["seq"] <= seen:
                        backlog = []
                        continue
                    if e["seq"] == seen + 1:
                        backlog = [e]
                        continue
                # a jump in the live numbers, or a quiet channel: catch up from the log
                logged = read_log(r, keys, job_id, seen)
                if not logged and msg is not None:  # the log is gone, live events go on
                    logged = [e]
                backlog = _catch_up(logged, seen)
                if not backlog and msg is None and is_done is not None and is_done():
                    backlog = _catch_up(read_log(r, keys, job_id, seen), seen)
                    yield from backlog
                    ended = backlog[-1]["t"] == "end" if backlog else _ends_at(r, keys, job_id, seen)
                    if not ended:  # (a reader that has the "end" already is missing nothing)
                        yield gap_event(backlog[-1]["seq"] if backlog else seen, None)
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


def _ends_at(r: redis.Redis, keys: Keys, job_id: str, seq: int) -> bool:
    """Whether the log's last event is an "end" numbered seq (a reader that has seen seq has it all)."""
    top = r.xrevrange(keys.log(job_id), "+", "-", count=1)
    if not top:
        return False
    e = json.loads(top[0][1][b"e"])
    return e["seq"] == seq and e["t"] == "end"


def _catch_up(events: list[dict], seen: int) -> list[dict]:
    """events (seq > seen, in order) with a gap event before each jump in their numbers."""
    out: list[dict] = []
    for e in events:
        if e["seq"] != seen + 1:
            out.append(gap_event(seen, e["seq"]))
        out.append(e)
        seen = e["seq"]
    return out
