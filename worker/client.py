"""The submit side of the queue: what `gencli submit`, `tail`, `cancel`... and the HTTP API call.

    client = Client()
    job = client.submit(["Once upon a time"], model="demo-model", max_tokens=50)
    for delta in job.stream():
        print(delta.text, end="")
    job.result()

Everything is validated before anything is recorded or enqueued, text as valid Unicode among it
(worker/unicode.py: a str holding a lone surrogate or a NUL is refused, naming where); a job that cannot be
enqueued (Redis down) is removed from the store again, so nothing is half-recorded.
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import redis

from gencli.model.chat import ChatFormat
from gencli.model.errors import ContextOverflowError, GencliError
from gencli.model.params import check_overrides, check_sampling, fit_prompt, resolve_sampling
from gencli.model.prompt import encode_prompt
from gencli.model.provenance import determinism
from gencli.model.scoring import is_scored
from gencli.model.tokenizer import Tokenizer, load_encoding
from gencli.storage.db import Item, JobStatus
from gencli.storage.settings import Settings, get_settings
from gencli.storage.store import StoreError, open_store
from gencli.worker import events
from gencli.worker.app import BrokerUnavailable, check_model_name, make_app, queue_for, send_job
from gencli.worker.fold import StreamDelta, StreamFold, texts_of
from gencli.worker.keys import Keys
from gencli.worker.prompts import PromptItem
from gencli.worker.redis_boot import resolve_redis_url, shown_url
from gencli.worker.stream import Publisher, follow, seq_floor
from gencli.worker.unicode import check_json, check_text


@lru_cache(maxsize=8)
def _tokenizer(name: str, chat_format: str) -> Tokenizer:
    return Tokenizer(load_encoding(name), chatml=chat_format == ChatFormat.CHATML.value)


class RedisUnavailable(GencliError):
    """Redis does not answer: nothing was submitted (the HTTP API's 503)."""


class QueueFull(GencliError):
    """The model's queue holds GENCLI_MAX_QUEUED jobs already: nothing was submitted (HTTP 429)."""

    retry_after = 5  # seconds a client should wait before it asks again


class NoWorkerWarning(UserWarning):
    """A job waits for a worker that no live process is: nothing will run it until one starts."""


class JobNotFound(GencliError):
    """No job has that id (HTTP 404)."""


class JobStateError(GencliError):
    """The job's state does not allow it: cancelling a finished job, retrying a running one (HTTP 409)."""


class ModelNotServed(GencliError):
    """No worker has described the model (HTTP 404)."""


@dataclass(frozen=True)
class ModelTokenizer:
    """A served model's tokenizer, as its workers described it."""

    model: str
    tokenizer: Tokenizer
    chat_format: ChatFormat
    block_size: int
    vocab_size: int


WORKERS_BACK_WITHIN = 5.0  # seconds after Redis (re)starts by which live workers have beaten (every 2 s)


def keys_for(settings: Settings, store) -> Keys:
    """This deployment's Redis names: GENCLI_NAMESPACE, else the store's deployment id."""
    return Keys(settings.namespace or store.deployment_id()[:12])


class Client:
    """The store, and Redis once something needs it: reading jobs (list, show, results) works
    with Redis down."""

    def __init__(self, settings: Settings | None = None, *, start_redis: bool = True):
        self.settings = settings or get_settings()
        self.store = open_store(self.settings.db_url, make_dir=self.settings.default_store)
        self.keys = keys_for(self.settings, self.store)
        self._start_redis = start_redis
        self._redis_url: str | None = None
        self._redis: redis.Redis | None = None
        self._app = None

    @property
    def redis_url(self) -> str:
        if self._redis_url is None:
            try:
                self._redis_url = resolve_redis_url(self.settings, start=self._start_redis)
            except GencliError as e:
                raise RedisUnavailable(str(e).replace(self.settings.redis_url, self.shown_redis_url)) from None
        return self._redis_url

    @property
    def shown_redis_url(self) -> str:
        """The Redis URL as messages show it: without its password."""
        return shown_url(self._redis_url or self.settings.redis_url)

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url, socket_connect_timeout=5, socket_timeout=10)
        return self._redis

    @property
    def app(self):
        if self._app is None:
            self._app = make_app(self.settings, self.redis_url, self.keys)
        return self._app

    # --- submitting ---------------------------------------------------------------------
    def submit(
        self,
        prompts: list[str | list[dict] | PromptItem],
        *,
        model: str,
        chat: bool = False,
        truncate: bool = False,
        priority: int = 0,
        idempotency_key: str | None = None,
        meta: dict | None = None,
        **sampling,
    ) -> Job:
        """Validate, record and enqueue one job of one or more prompts. `meta` (JSON: the API's
        route and user, a batch's file) is kept in the job's params as "meta"."""
        check_model_name(model)
        if not 0 <= priority <= 9:
            raise GencliError(f"priority must be 0..9 (higher runs first), got {priority}")
        params = check_sampling({k: v for k, v in sampling.items() if v is not None or k == "seed"})
        check_json({"idempotency_key": idempotency_key, "stop": params["stop"], "meta": meta}, from_bytes=True)
        items = [self._item(p, n) for n, p in enumerate(prompts, start=1)]
        if not items:
            raise GencliError("no prompts to submit")
        for it in items:  # a line's own parameters with the job's (max_tokens 0 needs prompt_logprobs)
            if it.get("params"):
                check_sampling({**params, **it["params"]}, it["where"])
        self._check_context(model, items, params, chat=chat, truncate=truncate)
        job = dict(params, chat=chat, truncate=truncate) | ({"meta": meta} if meta else {})
        return self._record(model=model, params=job, items=items, priority=priority,
                            idempotency_key=idempotency_key)

    def _record(self, **job) -> Job:
        """Record the job and put it on its queue; if it cannot be queued, remove it again (nothing
        half-recorded). An idempotency key already recorded returns that job."""
        if job.get("kind", "generate") == "generate":
            self._check_bound(job["model"], job.get("idempotency_key"))
        record, created = self.store.create_job(**job)
        if not created and not self._same_request(record, job):
            raise GencliError(f"idempotency key {job['idempotency_key']!r} was used for a different request "
                              f"(job {record.id}): use a new key for a new request")
        if created:
            try:
                self._enqueue(record.id, record.model, record.priority, record.kind)
            except (redis.RedisError, OSError, BrokerUnavailable) as e:
                self.store.delete_job(record.id)
                raise self._unreachable(e.__cause__ or e, "nothing was submitted") from None
        return Job(self, record.id)

    def _check_bound(self, model: str, idempotency_key: str | None) -> None:
        """GENCLI_MAX_QUEUED: refuse a new job for a model that has that many queued already (a
        submit repeated under its idempotency key is not a new job). A soft bound: submits racing
        each other may pass it by a few."""
        bound = self.settings.max_queued
        if bound is None or (idempotency_key and self.store.job_by_key(idempotency_key)):
            return
        if self.store.queued_counts().get(("generate", model), 0) >= bound:
            raise QueueFull(f"model {model} has {bound} queued jobs already (GENCLI_MAX_QUEUED={bound}): "
                            f"nothing was submitted; try again in a few seconds")

    def _same_request(self, record, job: dict) -> bool:
        """Whether a job recorded under an idempotency key is the one asked for again."""
        if (record.kind, record.model, record.params, record.priority) != (
                job.get("kind", "generate"), job["model"], job["params"], job.get("priority", 0)):
            return False
        ask = [(it["prompt"], it.get("params"), it.get("custom_id")) for it in job["items"]]
        return ask == [(it.prompt, it.params, it.custom_id) for it in self.store.items(record.id)]

    def _item(self, p, n: int) -> dict:
        if isinstance(p, PromptItem):
            where = p.where if p.where is not None else f"line {p.line}: "
            params = check_overrides(p.extra, where) if p.extra else None
            check_json({"messages" if p.is_chat else "prompt": p.prompt, "custom_id": p.custom_id, **(params or {})},
                       where=where, from_bytes=True)
            return {"prompt": p.prompt, "line": p.line, "custom_id": p.custom_id, "params": params, "where": where}
        if isinstance(p, str):
            if not p.strip():
                raise GencliError(f"prompt {n} is empty")
        elif not isinstance(p, list):
            raise GencliError(f"prompt {n} must be text or a list of chat messages")
        check_json(p, f"prompts[{n - 1}]", from_bytes=True)
        return {"prompt": p, "line": n}

    def submit_score(self, lines: list[PromptItem], *, model: str, top: int = 0, per_token: bool = False,
                     priority: int = 0, idempotency_key: str | None = None, meta: dict | None = None) -> Job:
        """Queue a scoring job: each line's prompt a spec of model/scoring.py ({"text"}, {"prompt",
        "completion"}, {"messages"} or a window of ids), scored (prompt logprobs, top N alternatives
        each), nothing generated. A generation job to the queue and the workers (its rows share their
        batches), told apart by its meta's "score"; its results are Job.scores()."""
        from gencli.model.scoring import kind_of

        items = []
        for ln in lines:
            where = ln.where if ln.where is not None else f"line {ln.line}: "
            try:
                kind_of(ln.prompt)
            except GencliError as e:
                raise type(e)(f"{where}{e}") from None
            items.append(PromptItem({"score": ln.prompt}, ln.line, ln.custom_id, None, ln.where))
        score = {"per_token": per_token, "top": top} | (meta or {})
        return self.submit(items, model=model, priority=priority, idempotency_key=idempotency_key,
                           meta={"score": score}, max_tokens=0, temperature=0.0, prompt_logprobs=top)

    def data_windows(self, model: str, data_dir: str, split: str) -> list[PromptItem]:
        """A prepped dataset's split as lines to score (model/scoring.py's windows of the model's
        context), checked to be tokenized as the model's workers tokenize."""
        from gencli.model.scoring import windows
        from gencli.model.splits import split_ids

        mt = self.tokenizer_of(model)
        meta, ids = split_ids(data_dir, split)
        if meta.get("encoding", meta["tokenizer"]) != mt.tokenizer.spec_name or \
                meta["chat_format"] != mt.chat_format.value:
            raise GencliError(f"{data_dir} was prepped with tokenizer {meta['tokenizer']} in the {meta['chat_format']} "
                              f"format; model {model} reads {mt.tokenizer.spec_name} in {mt.chat_format.value}: "
                              "prep it again for this model")
        return [PromptItem(w, n) for n, w in enumerate(windows(ids, mt.block_size), start=1)]

    def submit_prep(self, spec, *, force: bool = False, priority: int = 0, idempotency_key: str | None = None) -> Job:
        """Record and enqueue one dataset-prep job (a prep.spec.PrepSpec) on the `prep` queue."""
        from gencli.prep.spec import PrepSpec

        spec = PrepSpec.from_dict(spec.to_dict())  # validated as the worker will read it
        for p in spec.paths:
            if not os.path.exists(p):
                raise GencliError(f"{p}: no such file or directory (a {spec.source} source path)")
        return self._record(kind="prep", model=spec.source, items=[], priority=priority,
                            params={"spec": spec.to_dict(), "force": force}, idempotency_key=idempotency_key)

    def model_info(self, model: str) -> dict | None:
        """What a worker recorded about the model (context, tokenizer, chat format), if any."""
        try:
            raw = self.redis.get(self.keys.model_info(model))
        except (redis.RedisError, OSError) as e:
            raise self._unreachable(e, "nothing was submitted") from None
        return json.loads(raw) if raw else None

    def tokenizer_of(self, model: str | None) -> ModelTokenizer:
        """The tokenizer of a model its workers described (model_info). model None: the one that
        every served model shares (lm-eval's remote tokenizer names no model), else an error that
        asks for a model's name."""
        if model is not None:
            info = self.model_info(model)
            if info is None:
                raise ModelNotServed(f"no worker has served model {model!r}: start one (gencli worker --model PATH "
                                     f"--model-name {model}), or name a served model")
            infos = {model: info}
        else:
            infos = {name: info for name in sorted(self.served_models()) if (info := self.model_info(name))}
            if not infos:
                raise ModelNotServed("no model is served: start a worker (gencli worker --model PATH)")
            kinds = {(i["tokenizer"], i["chat_format"], i["block_size"], i["vocab_size"]) for i in infos.values()}
            if len(kinds) > 1:
                raise GencliError(f"the served models ({', '.join(infos)}) differ in tokenizer, chat format or "
                                  "context: name one with model")
        name, info = next(iter(infos.items()))
        return ModelTokenizer(name, _tokenizer(info["tokenizer"], info["chat_format"]),
                              ChatFormat(info["chat_format"]), info["block_size"], info["vocab_size"])

    def _unreachable(self, e: BaseException, why: str = "") -> RedisUnavailable:
        """The one way the client says Redis did not answer (and what that means for the caller)."""
        return RedisUnavailable(f"cannot reach Redis at {self.shown_redis_url} ({type(e).__name__})"
                                + (f": {why}" if why else ""))

    def redis_answers(self) -> bool:
        try:
            self.require_redis("")
        except RedisUnavailable:
            return False
        return True

    def require_redis(self, why: str) -> None:
        """RedisUnavailable (saying why it is needed) unless Redis answers."""
        try:
            self.redis.ping()
        except (redis.RedisError, OSError) as e:
            raise self._unreachable(e, why) from None

    def live_workers(self, queue: str | None = None) -> list[dict]:
        """The workers whose heartbeat is fresh (those serving queue, when given)."""
        try:
            r = self.redis
            names = sorted(n.decode() for n in r.smembers(self.keys.workers))
            beats = r.mget([self.keys.worker(n) for n in names]) if names else []
            gone = [n for n, b in zip(names, beats, strict=True) if b is None]
            if gone:
                r.srem(self.keys.workers, *gone)  # stopped beating: a new beat adds it back
            found = [json.loads(b) for b in beats if b]
        except (redis.RedisError, OSError) as e:
            raise self._unreachable(e) from None
        return [w for w in found if queue is None or queue in w["queues"]]

    def served_models(self) -> dict[str, int]:
        """Model name -> how many live workers serve it."""
        served: dict[str, int] = {}
        for w in self.live_workers():
            if w.get("model"):
                served[w["model"]] = served.get(w["model"], 0) + 1
        return served

    def served_models_after_a_restart(self, model: str) -> dict[str, int]:
        """served_models(), but right after a Redis restart (which takes every heartbeat with it)
        waited on until `model` is among them or the workers have had time to beat again: a live
        worker is not reported gone for the seconds its next heartbeat takes."""
        served = self.served_models()
        try:
            up = float(self.redis.info("server")["uptime_in_seconds"])
        except (redis.RedisError, OSError, KeyError, ValueError):
            return served
        deadline = time.monotonic() + max(0.0, WORKERS_BACK_WITHIN - up)
        while model not in served and time.monotonic() < deadline:
            time.sleep(0.1)
            served = self.served_models()
        return served

    def _check_context(self, model: str, items: list[dict], params: dict, *, chat: bool, truncate: bool) -> None:
        """Refuse prompts that do not fit the model's context, when a worker has described it."""
        info = self.model_info(model)
        if info is None:
            return  # no worker has served this model yet: the worker checks each prompt
        tok = _tokenizer(info["tokenizer"], info["chat_format"])
        fmt = ChatFormat(info["chat_format"])
        for it in items:
            try:
                ids = encode_prompt(tok, fmt, it["prompt"], chat=chat, vocab_size=info["vocab_size"])
                sampling = resolve_sampling(params, it.get("params"), info["block_size"], vocab_size=info["vocab_size"])
                if is_scored(it["prompt"]) and len(ids) > info["block_size"]:
                    raise ContextOverflowError(
                        f"its {len(ids)} tokens exceed the model's context of {info['block_size']}: shorten it (gencli "
                        "score --data scores a prepped dataset in windows of the context)")
                fit_prompt(ids, sampling.max_tokens, info["block_size"], truncate=truncate)
            except GencliError as e:
                where = it["where"] if it.get("where") is not None else f"line {it['line']}: "
                named = copy.copy(e)  # (its other fields kept: the API's "param")
                named.args = (f"{where}{e}",)
                raise named from None

    def _enqueue(self, job_id: str, model: str, priority: int, kind: str = "generate") -> None:
        send_job(self.app, self.redis, self.keys, job_id, kind=kind, model=model, priority=priority)

    # --- reading the record (answered by the store: Redis may be down) ----------------------
    def list_jobs(self, *, status: str | None = None, model: str | None = None, kind: str | None = None,
                  limit: int = 20, after: str | None = None, query: str | None = None,
                  since: datetime | None = None) -> list:
        """Newest first; `after`: the last job id of the page before. `query`: jobs whose prompts or
        outputs hold every word of it; `since`: created since then (naive: UTC)."""
        check_json({"query": query, "model": model, "after": after}, from_bytes=True)
        try:
            return self.store.list_jobs(status=status, model=model, kind=kind, limit=limit, after=after,
                                        query=query, since=since)
        except StoreError as e:
            raise JobNotFound(str(e)) from None

    def matching_items(self, job_ids: list[str], query: str) -> dict[str, list[Item]]:
        """The items of these jobs whose prompt or output holds every word of query, by job."""
        return self.store.matching_items(job_ids, query)

    def job_counts(self) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        """(jobs per status, queued jobs per (kind, model))."""
        return self.store.status_counts(), self.store.queued_counts()

    def store_time(self):
        """The store's clock: raises when the store does not answer."""
        return self.store.db_time()

    # --- uploaded files (the Batch API's input) ------------------------------------------------
    def files(self, *, purpose: str | None = None, limit: int = 100) -> list:
        """Uploaded files, newest first, without their bytes."""
        return self.store.list_files(purpose=purpose, limit=limit)

    def upload_file(self, *, purpose: str, filename: str, content: bytes):
        return self.store.create_file(purpose=purpose, filename=filename, content=content)

    def file(self, file_id: str):
        """A file's record without its bytes, or None."""
        return self.store.get_file(file_id)

    def file_content(self, file_id: str) -> bytes | None:
        return self.store.file_content(file_id)

    # --- following and controlling -------------------------------------------------------
    def job(self, job_id: str) -> Job:
        check_text(job_id, "job id")
        found = self.store.get_job(job_id)
        if found is None:
            if len(job_id) >= 6 and self.store.prefix_matches(job_id) > 1:
                raise JobNotFound(f"{job_id} begins several job ids (they begin with their time): give more of it")
            raise JobNotFound(f"no job {job_id}: see gencli list")
        return Job(self, found.id)

    def publish(self, job_id: str, events: list[dict]) -> None:
        """Append events to a job's stream from the submit side (no lease: numbered on from the log)."""
        Publisher(self.redis, self.keys, job_id, owner=None, ttl=self.settings.stream_ttl,
                  max_events=self.settings.stream_max_events).publish(
            events, floor=seq_floor(len(self.store.attempts(job_id)), after=True))


class Job:
    def __init__(self, client: Client, job_id: str):
        self.client = client
        self.id = job_id

    def record(self):
        return self.client.store.get_job(self.id)

    @property
    def status(self) -> JobStatus:
        return JobStatus(self.record().status)

    def items(self) -> list[Item]:
        return self.client.store.items(self.id)

    def events(self, after: int = 0) -> Iterator[dict]:
        """Every raw stream event after seq `after`, each once, up to the job's end (a gap event
        where the log lost some)."""
        c = self.client
        return follow(c.redis_url, c.keys, self.id, after=after, is_done=lambda: self.status.done)

    def watch(self, after: int = 0) -> Iterator[StreamDelta | dict]:
        """The job as a reader should show it: text as StreamDelta (folded: retries, resumes and
        lost events handled, see worker/fold.py), the other events ("start", "item", "progress",
        "end") as they come. When the job has ended, every item's text equals the store's: a job
        that has ended while Redis does not answer is shown from the store at once (a
        "from_store" event first). Warns here, when called (NoWorkerWarning), if the
        job is queued and no live worker serves its model: it waits for one."""
        record = self.record()
        if JobStatus(record.status).done and not self.client.redis_answers():
            return self._from_store(record, after)
        if record.status == JobStatus.QUEUED.value and record.kind == "generate" and \
                not self.client.live_workers(queue_for(record.model)):
            warnings.warn(f"no live worker serves model {record.model} yet: job {self.id} waits for one (start one "
                          f"with gencli worker --model PATH --model-name {record.model})", NoWorkerWarning, stacklevel=2)
        return self._followed(after)

    def _followed(self, after: int) -> Iterator[StreamDelta | dict]:
        fold = StreamFold(from_start=after == 0)
        seq = after
        for e in self.events(after):
            seq = e.get("seq", seq)
            if e["t"] in ("tok", "reset", "resync", "gap"):
                yield from fold.feed(e)
            if e["t"] not in ("tok", "reset", "resync"):
                yield e
        if self.status.done:
            yield from fold.settle([(it.idx, it.output, it.finish_reason) for it in self.items()], seq)

    def _from_store(self, record, after: int) -> Iterator[StreamDelta | dict]:
        yield events.from_store(f"Redis at {self.client.shown_redis_url} does not answer: the job's text is "
                                "shown from the store")
        for it in self.items():
            yield StreamDelta(after, it.idx, it.output or "", it.finish_reason, restart=True, note="from the store")
        yield events.end(record.status, record.error_message)

    def stream(self, after: int = 0) -> Iterator[StreamDelta]:
        """The job's text as it is made: deltas in order, each once, also when attached late (warns
        as watch() does, when called)."""
        return (d for d in self.watch(after) if isinstance(d, StreamDelta))

    def texts(self, after: int = 0) -> dict[int, str]:
        """Follow to the end; each item's text as the stream showed it (restarts applied)."""
        return texts_of(self.stream(after))

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> JobStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (status := self.status).done:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} is still {status.value} after {timeout} s")
            time.sleep(poll)
        return status

    @property
    def samples(self) -> int:
        """Samples per prompt (submit --num_samples): each prompt's are consecutive items."""
        return (self.record().params.get("meta") or {}).get("num_samples", 1)

    def result(self, timeout: float | None = None, *, provenance: bool = False) -> list[dict]:
        """Wait for the job; one dict per prompt (and sample): custom_id, prompt, output,
        finish_reason, usage, "sample" (1, 2, ...) when the job has several per prompt, and with
        provenance, what made the output (see `provenance`)."""
        self.wait(timeout)
        n = self.samples
        items = self.items()
        made = self.provenance(items)["items"] if provenance else {}
        return [
            {"custom_id": it.custom_id, "line": it.line, "prompt": it.prompt, "output": it.output,
             "finish_reason": it.finish_reason, "status": it.status, "error": it.error,
             "usage": {"prompt_tokens": it.prompt_tokens, "completion_tokens": it.completion_tokens}}
            | ({"sample": it.idx % n + 1} if n > 1 else {})
            | ({"provenance": made[it.idx]} if provenance else {})
            for it in items
        ]

    @property
    def scoring(self) -> dict | None:
        """A scoring job's settings (per_token, top, and where its lines came from), else None."""
        return (self.record().params.get("meta") or {}).get("score")

    def scores(self, timeout: float | None = None, *, per_token: bool | None = None) -> list[dict]:
        """Wait for a scoring job; one dict per line: custom_id, line, status, error, and for a line
        scored: tokens, logprob (summed), mean_logprob, perplexity (and token_logprobs, [id,
        logprob] each, with per_token; default: as the job was submitted)."""
        from gencli.model.scoring import scores

        settings = self.scoring
        if settings is None:
            raise GencliError(f"job {self.id} is not a scoring job: see gencli results {self.id}")
        self.wait(timeout)
        per_token = settings.get("per_token", False) if per_token is None else per_token
        out = []
        for it in self.items():
            row = {"custom_id": it.custom_id, "line": it.line, "status": it.status, "error": it.error}
            if it.status == "succeeded" and it.logprobs:
                row |= scores(it.logprobs, it.logprobs["scored"], per_token=per_token)
            out.append(row)
        return out

    def score_summary(self, rows: list[dict] | None = None) -> dict:
        """A scoring job's totals over its scored lines (model/scoring.py's summary)."""
        from gencli.model.scoring import summary

        rows = self.scores(per_token=False) if rows is None else rows
        return summary([r for r in rows if "tokens" in r]) | {"failed": sum(r["status"] == "failed" for r in rows)}

    def provenance(self, items: list[Item] | None = None) -> dict:
        """What made the job's outputs, from the store: {"attempts": [each claim's record: model
        (name, path, sha256 of its files), tokenizer (name, ranks' sha256), chat format, dtype,
        device, GPU, software, batch invariance], "items": {idx: one line's record}}. A line's
        record is its attempt's, with the device and dtype that made it (the CPU after an
        out-of-memory fall-back), the sampling it ran with (its seed, drawn or given) and the
        job's chat and truncate flags; a line no attempt finished has what is known of it."""
        record = self.record()
        attempts = self.client.store.attempts(self.id)
        by_number = {a.attempt: a for a in attempts}
        out = {}
        for it in items if items is not None else self.items():
            a = by_number.get(it.attempt) or (attempts[-1] if attempts else None)
            line = dict(a.provenance) if a else {}
            if a:
                line |= {"attempt": a.attempt, "worker": a.worker}
            if it.device:
                line |= {"device": it.device, "dtype": it.dtype}
                if it.device != (a.provenance.get("device") if a else None):
                    line["gpu"] = None
                line |= determinism(it.device, it.dtype)
            line |= {"chat": bool(record.params.get("chat")), "truncate": bool(record.params.get("truncate")),
                     "sampling": it.sampling}
            out[it.idx] = line
        return {"attempts": [{"attempt": a.attempt, "worker": a.worker, "started_at": a.started_at.isoformat() + "Z",
                              **a.provenance} for a in attempts], "items": out}

    def cancel(self) -> JobStatus:
        """A queued job never runs; a running one stops within a few tokens. The cancel is recorded
        in the store, which a running job's worker reads at each lease renewal; the Redis flag only
        makes it quicker (and a cancel works with Redis down)."""
        try:
            status = JobStatus(self.client.store.request_cancel(self.id))
        except StoreError as e:
            raise JobStateError(str(e)) from None
        try:
            if status is JobStatus.RUNNING:
                self.client.redis.set(self.client.keys.cancel(self.id), 1, ex=24 * 3600)
            elif status is JobStatus.CANCELLED:
                self.client.publish(self.id, [events.end(JobStatus.CANCELLED.value)])
        except (redis.RedisError, OSError, GencliError):
            pass  # recorded in the store: the worker, or a tailer, learns it from there
        return status

    def retry(self) -> int:
        """Run the failed and cancelled items again, each in a new epoch; how many."""
        try:
            n = self.client.store.reset_for_retry(self.id)
        except StoreError as e:
            raise JobStateError(str(e)) from None
        if n:
            job = self.record()
            items = [it for it in self.items() if it.status == "pending"]
            try:
                self.client.redis.delete(self.client.keys.cancel(self.id))
                self.client.publish(self.id, [events.reset({it.idx: it.epoch for it in items})])
                self.client._enqueue(self.id, job.model, job.priority, job.kind)
            except (redis.RedisError, OSError, GencliError) as e:
                raise RedisUnavailable(
                    f"the retry of job {self.id} is recorded but Redis at {self.client.shown_redis_url} does not "
                    "answer "
                    f"({type(e).__name__}): a worker sends it when Redis is back") from None
        return n
