"""The broker transport: kombu's Redis transport, with the one repair gencli needs.

When Redis goes away while a worker holds a job's message (unacked: gencli acks late), Celery's
consumer throws its broken connection away: it first `collect()`s it, which closes the
connection's transport (the transport forgets its client) but leaves its default channel open when
closing that channel meets the dead Redis (deleting the remote-control fanout queue fails), then
closes the connection, which closes that channel again. Closing a channel puts its unacked
messages back on their queue, and to reach Redis the channel asks its transport's client for the
URL: gone, so kombu raises AttributeError("'NoneType' object has no attribute 'hostname'"), which
Celery calls an unrecoverable error, and the worker process exits (with no job running there are
no unacked messages, and it survives). kombu has had this class of bug before (celery/kombu#582).

Here a channel whose transport has been torn down does not try: its unacked messages stay where
Redis holds them (restored by kombu once the visibility timeout passes), and the ack of a job that
ends after the reconnection, which Celery sends through that same old channel, is dropped the same
way (it would meet the same AttributeError, in the consumer's loop). For gencli nothing is lost
either way: the job runs on under its store lease; a Redis that restarted empty holds no message
to restore or ack; a message Redis kept comes back after the visibility timeout and is refused,
its job having ended (a claim takes a job once); a queued job whose message is gone is sent again
by a worker (worker/serve.py's `_resend_lost`). An ack that meets Redis away before the
connection is torn down is dropped the same way, with a warning (Celery logged it as CRITICAL,
with a traceback). On a clean shutdown the transport is whole and the messages go back on their
queues as before.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from gencli.worker.keys import Keys

log = logging.getLogger("gencli.worker")


class QoS(kombu_redis.QoS):
    def _orphaned(self) -> bool:
        """Whether this channel's connection to Redis was torn down (see the module's docstring)."""
        transport = self.channel.connection
        return transport is None or transport.client is None

    def restore_unacked(self, client=None):
        if client is None and self._orphaned():
            if self._delivered:
                log.warning("broker connection lost with %d message(s) unacked: they stay in Redis (their jobs "
                            "run on under their store leases)", len(self._delivered))
            self._delivered.clear()
            return None
        return super().restore_unacked(client)

    def ack(self, delivery_tag):
        if self._orphaned():  # a message of a connection since lost: nothing to tell Redis through it
            self._delivered.pop(delivery_tag, None)
            return
        try:
            super().ack(delivery_tag)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:  # Redis away at that moment
            self._delivered.pop(delivery_tag, None)
            log.warning("could not ack a finished job's message (%s: %s): if Redis kept it, it comes back after the "
                        "visibility timeout and is refused", type(e).__name__, e)

    def reject(self, delivery_tag, requeue=False):
        if self._orphaned():
            self._delivered.pop(delivery_tag, None)
            return
        super().reject(delivery_tag, requeue=requeue)


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make redis:// and rediss:// broker URLs use this transport in this process. kombu picks a
    transport by the URL's scheme through its alias table; replacing the two entries there (rather
    than naming a transport in Celery's settings) keeps everything else the scheme decides as it
    was: TLS for rediss://, the URL in Celery's logs, Flower's broker page."""
    ours = f"{__name__}:Transport"
    for scheme in ("redis", "rediss"):
        if TRANSPORT_ALIASES.get(scheme) in ("kombu.transport.redis:Transport", ours):
            TRANSPORT_ALIASES[scheme] = ours


@dataclass(frozen=True)
class Held:
    """A job's message that a consumer took and has not acked (late acks: until the job ends)."""

    tag: str  # kombu's delivery tag
    since: float  # when it was delivered, Unix seconds (the consumer's clock)


def held_messages(r: redis.Redis, keys: Keys) -> dict[str, Held]:
    """The jobs whose message a consumer holds, from kombu's unacked hash and its index. A message
    that is not a gencli task (or that kombu's layout no longer matches) is left out."""
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(keys.unacked)
    pipe.zrange(keys.unacked_index, 0, -1, withscores=True)
    messages, index = pipe.execute()
    since = {tag.decode(): score for tag, score in index}
    held = {}
    for tag, raw in messages.items():
        tag = tag.decode()
        try:
            message = json.loads(raw)[0]
            body = message["body"]
            if message["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]  # Celery's message protocol 2: [args, kwargs, embed]
            job_id = args[0]
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if isinstance(job_id, str):
            held[job_id] = Held(tag, since.get(tag, 0.0))
    return held


def drop_held(r: redis.Redis, keys: Keys, tag: str) -> None:
    """Forget a held message whose consumer is gone (kombu would put it back on its queue once the
    visibility timeout passed; its job has been sent again instead). A late ack of it is a no-op."""
    pipe = r.pipeline(transaction=True)
    pipe.hdel(keys.unacked, tag)
    pipe.zrem(keys.unacked_index, tag)
    pipe.execute()
