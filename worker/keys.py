"""Every Redis name gencli uses, built in one place, under one deployment's namespace.

Deployments that share a Redis but not a store must not see each other: every key, channel and
queue of one lives under `gencli:<namespace>:`. The namespace is GENCLI_NAMESPACE when set, else
the store's own deployment id (made once, when the store is created), so every machine on one
PostgreSQL agrees on it whatever URL it reaches the database by, and two SQLite stores never do.
Celery's queues get the same prefix through kombu's `global_keyprefix`, so a queue named
`gen.tiny` is the Redis list `gencli:<namespace>:gen.tiny` (and `...:gen.tiny:N` per priority).
"""

from __future__ import annotations

from dataclasses import dataclass

PRIORITY_STEPS = list(range(10))  # kombu's Redis priorities: 0 is served first
PRIORITY_SEP = ":"


@dataclass(frozen=True)
class Keys:
    namespace: str

    @property
    def prefix(self) -> str:
        return f"gencli:{self.namespace}:"

    # --- workers and models ------------------------------------------------------------
    def worker(self, name: str) -> str:
        """A live worker's heartbeat (JSON; expires when it stops beating)."""
        return f"{self.prefix}worker:{name}"

    @property
    def workers(self) -> str:
        """The set of worker names that have beaten (a reader keeps those whose heartbeat is live):
        finding the live workers never scans the keyspace."""
        return f"{self.prefix}workers"

    def model_info(self, model: str) -> str:
        """What a worker recorded about the model it serves (context, tokenizer, chat format)."""
        return f"{self.prefix}model:{model}"

    @property
    def resend_lock(self) -> str:
        """Held by the one worker checking for queued jobs whose message Redis lost."""
        return f"{self.prefix}resend-lock"

    @property
    def unknown_jobs(self) -> str:
        """Messages for jobs this deployment's store does not know: kept here, never dropped."""
        return f"{self.prefix}unknown-jobs"

    # --- one job ------------------------------------------------------------------------
    def sent(self, job_id: str) -> str:
        """Set (first) when the job's message is sent; removed when a worker claims it."""
        return f"{self.prefix}sent:{job_id}"

    def cancel(self, job_id: str) -> str:
        """A running job's fast cancel flag (the store's cancel_requested is the record)."""
        return f"{self.prefix}cancel:{job_id}"

    def channel(self, job_id: str) -> str:
        """Pub/sub channel of the job's stream events."""
        return f"{self.prefix}chan:{job_id}"

    def log(self, job_id: str) -> str:
        """The job's replay log: a Redis stream, entry id `<seq>-0`."""
        return f"{self.prefix}log:{job_id}"

    def owner(self, job_id: str) -> str:
        """The lease owner allowed to publish the job's stream (see stream.Publisher)."""
        return f"{self.prefix}owner:{job_id}"

    # --- Celery's queues ----------------------------------------------------------------
    def queue_lists(self, queue: str) -> list[str]:
        """The Redis lists that hold a queue's messages, one per priority (kombu's layout)."""
        return [self.prefix + queue] + [f"{self.prefix}{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS[1:]]

    @property
    def unacked(self) -> str:
        """kombu's hash of the messages consumers took and have not acked: delivery tag -> message."""
        return f"{self.prefix}unacked"

    @property
    def unacked_index(self) -> str:
        """kombu's sorted set of those delivery tags, scored by when each was delivered (Unix time)."""
        return f"{self.prefix}unacked_index"
