"""Exact and durable under real load: every line, sent by real clients at once through faults,
checked against an oracle (the same line run alone).

Run from the repository root:

    python -m bench.exact             # 500 jobs from 16 concurrent clients, PostgreSQL, with faults
    python -m bench.exact --sqlite    # the same on a SQLite store
    python -m bench.exact --quick     # CI's size (tests/test_exact.py): 64 jobs, faults included
    python -m bench.exact --json      # the same, with one JSON object as the last line of stdout
    python -m bench.exact --jobs N --clients C --seed S --no-faults

The deployment: a redis-server of its own (nothing on disk, so a restart is empty), a store (a
fresh PostgreSQL database on GENCLI_TEST_PG_URL's server, dropped at the end, or a SQLite file), a
real `gencli serve` and 2 `gencli worker`s of one model with 8 slots each, at the machine's own
torch thread count, GENCLI_LEASE_SECONDS=3. The model has GPT-2's initialisation, untrained
(cl100k_base, ChatML, a 1024-token context): its logits are all near 0, so at temperature 1 the
inverse-CDF draw lands near a boundary all the time and greedy picks are near-ties. It is where a
row that computes other last bits in company than alone shows up as another text.

The load: C client threads (16: enough company on the two workers' 16 slots that a row which
computes other bits in company than alone shows, as it did before gencli 0.2: 6 of 147 lines
differed in a 60-job run without faults, 1 of 141 in a --quick run with them; such a flip is a
matter of chance, which tests/test_invariance.py, comparing logits, does not leave to it) take jobs from a shuffled list (seeded: the same --seed, the same list),
each as a real client sends it:
- `completion`, `chat`: the `openai` client on /v1/completions and /v1/chat/completions, streamed
  or not, n of 1 to 3;
- `disconnect`: a streamed chat whose client hangs up after a few chunks (which cancels its job),
  half of them retried through POST /v1/jobs/{id}/retry;
- `jobs`: POST /v1/jobs with 2 to 4 prompts with their own overrides and a priority, followed over
  SSE (GET /v1/jobs/{id}/stream) as a browser would, through worker/fold.py;
- `client`: the Python client (`Client.submit`, what the CLI calls) with a priority, followed with
  `Job.stream()`, some cancelled after a few tokens and retried (`Job.retry()`);
- `cli`: `gencli submit --prompt_file F.jsonl` in a subprocess;
- `batch`: the Batch API (a file of 2 to 5 lines, its output file read back).
Prompts are 1 to 900 tokens (across the key buckets and the 512-token prefill chunk), max_tokens
1 to 48, temperature 0, 0.7 or 1, top_k off or 40, top_p 1 or 0.9, seeds given or drawn by the
worker (and recorded), stop strings now and then. A client that meets a Redis outage (503, or a
stream cut with an error) retries or re-reads as a user would; those are counted, not failures.
Faults (unless --no-faults), as bench.faults injects them, at shares of the jobs succeeded: Redis
killed and started again empty (15%, while the clients still submit: a backlog waits for the
workers when it returns), a worker SIGKILLed and started again (35%), one SIGSTOPped for twice its
lease (55%). A job still not ended at the deadline is described (the store's record, its "sent"
mark, its queue, whether a consumer holds its message, what the workers said of it) and the
workers' logs are kept in a file the report names.

The checks, once every job has ended (or the deadline passed):
- each line's stored ids and text equal the oracle's: the line run alone in this process (an
  engine of one slot) from what the store recorded of it (prompt, sampling, its seed, drawn or
  given), as far as it went if it was cancelled (worker/replay.py's plan);
- what each client saw equals the store: the openai responses and streams (a stream cut short, a
  prefix of it), the SSE and Job.stream() followers (folded), the Batch API's output files;
- every job ended exactly once: a tracked job not ended at the deadline is hung, one that failed
  or lost a line is lost; two "succeeded" ends (in its stream log or the workers' logs), a repeated
  sequence number or an extra item is duplicated;
- `gencli replay` of a sample of jobs says every line is equal.
It prints jobs, lines, differing lines, stream mismatches, lost, duplicated, hung and replay
differences; any of them non-zero, or a fault not injected, is exit status 1.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench._services import Proc, child_env, free_port, log
from bench.faults import Faults, Worker, check_log, deployment, log_notes, status_counts, stop_workers

MODEL = "exact"
SLOTS = 8
WORKERS = 2
PLAN = (("redis", 0.15), ("kill", 0.35), ("stop", 0.55))
KINDS = {"completion": 24, "chat": 24, "disconnect": 8, "jobs": 14, "client": 18, "cli": 4, "batch": 8}
LENGTHS = (1, 2, 5, 12, 40, 63, 64, 65, 127, 129, 300, 511, 512, 513, 700, 900)  # prompt tokens
CLIENT_PATIENCE = 90.0  # seconds a client keeps retrying through an outage


@dataclass(frozen=True)
class Config:
    jobs: int
    clients: int
    backend: str  # "postgresql" or "sqlite"
    faults: bool
    seed: int
    replays: int  # jobs `gencli replay` checks
    timeout_s: float  # from the first request until every job has ended


# --- the model and the load ----------------------------------------------------------------------

def make_model(path: Path, seed: int) -> Path:
    """GPT-2's initialisation, untrained, with a 1024-token context: near-ties everywhere."""
    import torch

    from gencli.model.chat import ChatFormat
    from gencli.model.checkpoint import save_model, vocab_for
    from gencli.model.config import GPTConfig
    from gencli.model.gpt import GPT
    from gencli.model.tokenizer import Tokenizer, load_encoding

    tok = Tokenizer(load_encoding("cl100k_base"), chatml=True)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_for(tok), n_layer=2, n_head=2, n_embd=64, block_size=1024))
    return save_model(model, path, tokenizer="cl100k_base", chat_format=ChatFormat.CHATML)


def word_pool() -> list[str]:
    """cl100k tokens that are one space and a lower-case word: a prompt of k of them is about k tokens."""
    from gencli.model.tokenizer import load_encoding

    enc = load_encoding("cl100k_base")
    words = []
    for i in range(enc.n_vocab):
        try:
            b = enc.decode_single_token_bytes(i)
        except KeyError:
            continue
        if re.fullmatch(rb" [a-z]{3,9}", b):
            words.append(b.decode())
    return words


@dataclass
class Task:
    """One job as one client sends it, and what the client saw of it."""

    n: int  # its number in the load
    kind: str
    prompts: list[dict]  # each {"text", and on `jobs`/`client`/`cli` lines their own overrides}
    sampling: dict  # max_tokens, temperature, top_k, top_p, seed (None: drawn), stop
    chat: bool = False
    samples: int = 1  # openai's n
    stream: bool = False
    priority: int = 0
    cancel_after: int | None = None  # deltas seen before the client cancels (or hangs up)
    retry: bool = False  # after the cancel, run the cancelled lines again
    # filled in as it runs
    job_id: str | None = None
    seen: dict[int, str] = field(default_factory=dict)  # item index -> the text the client saw
    complete: bool = True  # the client saw each item whole (else a prefix: a hang-up, a cut stream)
    client_retries: int = 0
    errors: list[str] = field(default_factory=list)
    trail: list[tuple[int, str]] = field(default_factory=list)  # (item, its delta briefly): said when a view is wrong


def make_tasks(cfg: Config, words: list[str]) -> list[Task]:
    rng = random.Random(cfg.seed)
    kinds = [k for k, w in KINDS.items() for _ in range(w)]  # weighted

    def text(tokens: int) -> str:
        return "".join(rng.choice(words) for _ in range(tokens)).lstrip() or "hello"

    def sampling() -> dict:
        t = rng.choice([0.0, 1.0, 1.0, 0.7])
        return {"max_tokens": rng.randint(1, 48), "temperature": t, "top_k": rng.choice([None, None, 40]),
                "top_p": rng.choice([1.0, 1.0, 0.9]), "seed": rng.choice([None, rng.randrange(2**31)]),
                "stop": rng.choice([None] * 6 + [[" the"], [" and", " of"]])}

    tasks = []
    for n in range(cfg.jobs):
        kind = list(KINDS)[n] if n < len(KINDS) else rng.choice(kinds)  # each kind once, then by weight
        s = sampling()
        lines = {"jobs": rng.randint(2, 4), "client": rng.randint(1, 4), "cli": rng.randint(2, 4),
                 "batch": rng.randint(2, 5)}.get(kind, 1)
        prompts = []
        for _ in range(lines):
            length = min(rng.choice(LENGTHS), 1000 - s["max_tokens"])
            p = {"text": text(length)}
            if kind in ("jobs", "client", "cli", "batch") and rng.random() < 0.5:
                p["overrides"] = {k: v for k, v in sampling().items() if k in ("max_tokens", "temperature", "seed")}
            prompts.append(p)
        t = Task(n, kind, prompts, s, chat=kind in ("chat", "disconnect") or (kind != "completion" and rng.random() < 0.3))
        if kind in ("completion", "chat"):
            t.samples, t.stream = rng.choice([1, 1, 2, 3]), rng.random() < 0.5
        if kind == "disconnect":
            t.stream, t.cancel_after, t.retry = True, rng.randint(1, 4), rng.random() < 0.5
            s["max_tokens"] = max(s["max_tokens"], 24)  # long enough to hang up on
        if kind in ("jobs", "client"):
            t.priority = rng.randint(0, 9)
        if kind == "client" and rng.random() < 0.3:
            t.cancel_after, t.retry = rng.randint(1, 6), rng.random() < 0.7
            s["max_tokens"] = max(s["max_tokens"], 24)
        tasks.append(t)
    rng.shuffle(tasks)
    return tasks


# --- the clients ---------------------------------------------------------------------------------

class Clients:
    """The load's clients: C threads taking tasks from one list, each sending its task as that kind
    of client does, retrying through an outage as a user would."""

    def __init__(self, cfg: Config, tasks: list[Task], api_url: str, tmp: Path, env: dict):
        import httpx
        import openai

        self.cfg, self.tasks, self.api_url, self.tmp, self.env = cfg, tasks, api_url, tmp, env
        self.oai = openai.OpenAI(base_url=api_url + "/v1", api_key="exact", max_retries=0, timeout=300)
        self.http = httpx.Client(base_url=api_url, timeout=300)
        self.next = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"client-{i}") for i in range(cfg.clients)]
        self.failures: list[str] = []  # a client that could not send its task at all

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def _run(self) -> None:
        from gencli.storage.settings import get_settings
        from gencli.worker.client import Client

        py = Client(get_settings(), start_redis=False)
        while True:
            with self.lock:
                if self.next >= len(self.tasks):
                    return
                task = self.tasks[self.next]
                self.next += 1
            try:
                getattr(self, f"_{task.kind}")(task, py)
            except Exception as e:  # noqa: BLE001 - a task that could not be sent is reported, not raised
                task.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                if task.job_id is None:
                    self.failures.append(f"task {task.n} ({task.kind}): {type(e).__name__}: {str(e)[:200]}")

    def _patiently(self, task: Task, send):
        """send() until it is not refused for an outage (HTTP 503, a connection error)."""
        import httpx
        import openai

        from gencli.worker.client import RedisUnavailable

        deadline = time.monotonic() + CLIENT_PATIENCE
        while True:
            try:
                return send()
            except (openai.APIConnectionError, openai.InternalServerError, httpx.TransportError, RedisUnavailable,
                    ConnectionError) as e:
                status = getattr(e, "status_code", 503)
                if status not in (500, 502, 503, 504) or time.monotonic() > deadline:
                    raise
                task.client_retries += 1
                time.sleep(1.0)
            except (openai.APIStatusError, httpx.HTTPStatusError) as e:
                status = e.status_code if isinstance(e, openai.APIStatusError) else e.response.status_code
                if status != 503 or time.monotonic() > deadline:
                    raise
                task.client_retries += 1
                time.sleep(1.0)

    def _openai_kwargs(self, task: Task) -> dict:
        s = task.sampling
        kw = {"model": MODEL, "max_tokens": s["max_tokens"], "temperature": s["temperature"], "top_p": s["top_p"],
              "n": task.samples, "extra_body": {"top_k": s["top_k"] or 0}}
        if s["seed"] is not None:
            kw["seed"] = s["seed"]
        if s["stop"]:
            kw["stop"] = s["stop"]
        return kw

    def _disconnect(self, task: Task, py) -> None:
        self._chat(task, py)

    def _completion(self, task: Task, py) -> None:
        self._openai(task, self.oai.completions, {"prompt": task.prompts[0]["text"]})

    def _chat(self, task: Task, py) -> None:
        self._openai(task, self.oai.chat.completions, {"messages": [{"role": "user", "content": task.prompts[0]["text"]}]})

    def _openai(self, task: Task, route, body: dict) -> None:
        import openai

        kw = self._openai_kwargs(task) | body
        if not task.stream:
            raw = self._patiently(task, lambda: route.with_raw_response.create(**kw))
            task.job_id = raw.headers["x-gencli-job"]
            for c in raw.parse().choices:
                task.seen[c.index] = c.message.content if hasattr(c, "message") else c.text
            return
        # streamed: the job's id comes with the headers, before the first chunk
        def open_stream():
            opened = route.with_streaming_response.create(stream=True, **kw)
            return opened, opened.__enter__()  # the request is sent here

        opened, resp = self._patiently(task, open_stream)
        with ExitStack() as close:
            close.push(opened.__exit__)
            task.job_id = resp.headers["x-gencli-job"]
            chunks = 0
            try:
                for chunk in resp.parse():
                    for c in chunk.choices:
                        piece = c.delta.content if hasattr(c, "delta") else c.text
                        task.seen[c.index] = task.seen.get(c.index, "") + (piece or "")
                    chunks += 1
                    if task.cancel_after is not None and chunks >= task.cancel_after:
                        task.complete = False
                        break  # the client hangs up: its job is cancelled
            except openai.APIError as e:  # a stream cut by an outage: what came is a prefix
                task.complete = False
                task.errors.append(f"stream cut: {str(e)[:120]}")
        if task.cancel_after is not None:
            self._wait_ended(task)
            if task.retry:
                self._patiently(task, lambda: self.http.post(f"/v1/jobs/{task.job_id}/retry").raise_for_status())
                task.seen = {}  # a retry is a new run (a drawn seed is drawn again): read from the store

    def _wait_ended(self, task: Task) -> None:
        """Until the job has ended (a hang-up's cancel takes a moment to be recorded)."""
        deadline = time.monotonic() + CLIENT_PATIENCE
        while time.monotonic() < deadline:
            r = self.http.get(f"/v1/jobs/{task.job_id}")
            if r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "cancelled"):
                return
            time.sleep(0.2)

    def _line(self, task: Task, p: dict) -> dict:
        key = "messages" if task.chat else "prompt"
        value = [{"role": "user", "content": p["text"]}] if task.chat else p["text"]
        return {key: value, **(p.get("overrides") or {})}

    def _job_params(self, task: Task) -> dict:
        return {k: v for k, v in task.sampling.items() if v is not None}

    def _jobs(self, task: Task, py) -> None:
        from gencli.worker.fold import StreamFold

        body = {"model": MODEL, "prompts": [self._line(task, p) for p in task.prompts], "chat": task.chat,
                "priority": task.priority, **self._job_params(task)}
        key = f"exact-{uuid.uuid4().hex}"  # a POST retried through an outage makes one job
        r = self._patiently(task, lambda: self.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
                            .raise_for_status())
        task.job_id = r.json()["id"]
        fold, last, deadline = StreamFold(), 0, time.monotonic() + 600
        while time.monotonic() < deadline:  # follow over SSE, resuming after the last id seen
            try:
                with self.http.stream("GET", f"/v1/jobs/{task.job_id}/stream",
                                      headers={"Last-Event-ID": str(last)} if last else {}) as resp:
                    if resp.status_code == 503:
                        raise ConnectionError("503")
                    ended = False
                    for e in _sse_events(resp.iter_lines()):
                        last = e.get("seq", last)
                        for d in fold.feed(e):
                            task.seen[d.item] = d.text if d.restart else task.seen.get(d.item, "") + d.text
                        ended = ended or e["t"] == "end"
                    if ended:
                        task.complete = task.complete and not fold.gaps  # after a gap: a prefix at most
                        return
            except (ConnectionError, OSError, Exception) as e:  # noqa: BLE001 - an outage: resume
                task.client_retries += 1
                task.errors.append(f"sse: {type(e).__name__}")
            if self.http.get(f"/v1/jobs/{task.job_id}").json()["status"] in ("succeeded", "failed", "cancelled"):
                task.complete = False  # ended while we were away: what we saw may miss the tail
                return
            time.sleep(0.5)

    def _client(self, task: Task, py) -> None:
        from gencli.worker.prompts import PromptItem

        items = [PromptItem(([{"role": "user", "content": p["text"]}] if task.chat else p["text"]), line=i + 1,
                            extra=p.get("overrides")) for i, p in enumerate(task.prompts)]
        job = self._patiently(task, lambda: py.submit(items, model=MODEL, chat=task.chat, priority=task.priority,
                                                       **self._job_params(task)))
        task.job_id = job.id
        seen = 0
        try:
            for d in job.stream():
                task.seen[d.item] = d.text if d.restart else task.seen.get(d.item, "") + d.text
                task.trail.append((d.item, f"{d.seq}{' restart' if d.restart else ''}{' (' + d.note + ')' if d.note else ''}"
                                           f" {d.text[:12]!r}"))
                seen += 1
                if task.cancel_after is not None and seen == task.cancel_after:
                    job.cancel()
        except Exception as e:  # noqa: BLE001 - Redis away: the store has the job; read on below
            task.complete = False
            task.errors.append(f"follow: {type(e).__name__}")
        if task.cancel_after is not None:
            job.wait(CLIENT_PATIENCE)
            if task.retry and job.status.value == "cancelled":
                self._patiently(task, job.retry)
                task.seen = {}  # a retry is a new run (a drawn seed is drawn again): read from the store

    def _cli(self, task: Task, py) -> None:
        f = self.tmp / f"prompts-{task.n}.jsonl"
        f.write_text("".join(json.dumps(self._line(task, p)) + "\n" for p in task.prompts))
        flags = []
        for k, v in self._job_params(task).items():
            for one in (v if k == "stop" else [v]):
                flags += [f"--{k}", str(one)]
        cmd = [sys.executable, "-m", "gencli.cli", "submit", "--model", MODEL, "--prompt_file", str(f), *flags]
        if task.chat:
            cmd.append("--chat")

        def send():
            done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise ConnectionError(done.stderr.strip()[-300:]) if "Redis" in done.stderr else \
                    RuntimeError(done.stderr.strip()[-300:])
            return done.stdout.strip().splitlines()[-1]

        try:
            task.job_id = self._patiently(task, send)
        except ConnectionError as e:
            raise RuntimeError(str(e)) from None
        task.complete = False  # nothing followed: the store is all there is to compare

    def _batch(self, task: Task, py) -> None:
        endpoint = "/v1/chat/completions" if task.chat else "/v1/completions"
        lines = []
        for i, p in enumerate(task.prompts):
            body = {"model": MODEL, **{k: v for k, v in self._openai_kwargs(task).items() if k not in ("extra_body", "n")},
                    "top_k": task.sampling["top_k"] or 0}
            body |= {"messages": [{"role": "user", "content": p["text"]}]} if task.chat else {"prompt": p["text"]}
            lines.append({"custom_id": f"t{task.n}-{i}", "method": "POST", "url": endpoint, "body": body})
        f = self.tmp / f"batch-{task.n}.jsonl"
        f.write_text("".join(json.dumps(x) + "\n" for x in lines))
        up = self._patiently(task, lambda: self.oai.files.create(file=open(f, "rb"), purpose="batch"))
        batch = self._patiently(task, lambda: self.oai.batches.create(input_file_id=up.id, endpoint=endpoint,
                                                                      completion_window="24h"))
        task.job_id = batch.id.removeprefix("batch_")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            b = self._patiently(task, lambda: self.oai.batches.retrieve(batch.id))
            if b.status in ("completed", "cancelled", "failed", "expired"):
                break
            time.sleep(0.5)
        if b.output_file_id:
            out = self._patiently(task, lambda: self.oai.files.content(b.output_file_id).text)
            for i, row in enumerate(json.loads(x) for x in out.splitlines()):
                choice = row["response"]["body"]["choices"][0]
                task.seen[int(row["custom_id"].rsplit("-", 1)[1])] = \
                    choice["message"]["content"] if task.chat else choice["text"]


def _sse_events(lines) -> list[dict]:
    """Server-sent events as the job stream's dicts (seq from `id:`)."""
    cur: dict = {}
    for line in lines:
        if not line:
            if "data" in cur:
                e = json.loads(cur["data"])
                yield e | ({"seq": int(cur["id"])} if "id" in cur else {})
            cur = {}
        elif line.startswith("id:"):
            cur["id"] = line[3:].strip()
        elif line.startswith("data:"):
            cur["data"] = line[5:].strip()


# --- the deployment ------------------------------------------------------------------------------

def start_workers(model_dir: Path, env: dict, tmp: Path, keys, run_id: str) -> list[Worker]:
    """Workers as a user starts them: 8 slots, the machine's own thread count."""
    workers = []
    for n in range(1, WORKERS + 1):
        name = f"w{n}-{run_id}@exact"
        cmd = [sys.executable, "-m", "gencli.cli", "worker", "--model", str(model_dir), "--model-name", MODEL,
               "--device", "cpu", "--name", name, "--batch_size", str(SLOTS)]
        workers.append(Worker(name, cmd, env, tmp, keys.worker(name)))
    return workers


def start_api(env: dict, tmp: Path) -> tuple[Proc, str]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = Proc([sys.executable, "-m", "gencli.cli", "serve", "--port", str(port)], env, tmp / "api.log")

    def up() -> bool:
        try:
            return httpx.get(url + "/healthz", timeout=2).status_code in (200, 503)
        except httpx.TransportError:
            return False

    proc.wait_for(up, 60, "gencli serve")
    return proc, url


def wait_ended(store, ids: list[str], deadline: float) -> list[str]:
    """Until every tracked job has ended or the deadline passed; the ones still not ended (hung)."""
    from gencli.storage.db import JobStatus

    last = 0.0
    while True:
        pending = [i for i in ids if not JobStatus(store.get_job(i).status).done]
        if not pending or time.monotonic() > deadline:
            return pending
        if time.monotonic() - last > 10:
            last = time.monotonic()
            log(f"  {len(ids) - len(pending)}/{len(ids)} jobs ended; {status_counts(store)}")
        time.sleep(0.5)


# --- the checks ----------------------------------------------------------------------------------

def oracle(client, model_dir: Path, tasks: list[Task]) -> dict:
    """Every recorded line run alone in this process, compared with the store (worker/replay.py's
    plan: each line's prompt, sampling and seed as recorded; a cancelled one as far as it went).
    Also each line's whole text alone ("texts", by job and item), what a cut view must lead into."""
    from gencli.model.checkpoint import load_model
    from gencli.model.textgen import TextGenerator
    from gencli.worker.replay import ReplayError, as_far_as_it_went, plan

    tg = TextGenerator(load_model(model_dir))
    lines = differ = skipped = 0
    first: list[str] = []
    texts: dict[tuple[str, int], str] = {}
    for t in tasks:
        if t.job_id is None:
            continue
        job = client.job(t.job_id)
        try:
            p = plan(job)
        except ReplayError as e:  # e.g. cancelled before its first token: nothing to compare
            skipped += len(job.items())
            if "nothing to replay" not in str(e):
                first.append(f"job {t.job_id}: {e}")
            continue
        skipped += len(p.skipped)
        chat, truncate = bool(job.record().params.get("chat")), bool(job.record().params.get("truncate"))
        for ln in p.lines:
            ids = tg.fit(tg.encode(ln.prompt, chat=chat), ln.params.max_tokens, truncate=truncate)
            (s,) = tg.generate([ids], ln.params, slots=1)
            texts[(t.job_id, ln.idx)] = s.text
            if ln.finish_reason == "cancelled":  # as far as it went, as gencli replay runs it
                (s,) = tg.generate([ids], as_far_as_it_went(ln), slots=1)
            ln.compare(s.ids, s.text, s.finish_reason)
            lines += 1
            if ln.result != "equal":
                differ += 1
                if len(first) < 10:
                    first.append(f"job {t.job_id} ({t.kind}) line {ln.line}: differs at token {ln.at} "
                                 f"({ln.params})")
    return {"lines": lines, "differ": differ, "skipped": skipped, "first": first, "texts": texts}


def client_views(client, tasks: list[Task], texts: dict[tuple[str, int], str]) -> dict:
    """What each client saw against the store: equal to the stored output when the client saw an
    item whole; when its view was cut (a hang-up, a cut stream), a prefix of the item's whole text
    alone (`texts`, from the oracle). The two differ only where a worker died between two
    checkpoints with the log lost and the job was cancelled before the next worker made those
    tokens again: the client saw tokens the record never got, the very ones the line makes."""
    mismatched, first = 0, []
    for t in tasks:
        if t.job_id is None or not t.seen:
            continue
        job = client.job(t.job_id)
        items = {it.idx: it for it in job.items()}
        for i, text in t.seen.items():
            stored = items[i].output or "" if i in items else ""
            whole = texts.get((t.job_id, i), stored)
            ok = stored == text if t.complete else whole.startswith(text)
            if not ok:
                mismatched += 1
                if len(first) < 10:
                    rec, it = job.record(), items.get(i)
                    first.append(f"job {t.job_id} ({t.kind}, {rec.status}, {rec.attempts} attempt(s)) item {i} "
                                 f"({it.status if it else '-'}, {it.finish_reason if it else '-'}): saw {text[:60]!r}, "
                                 f"stored {stored[:60]!r}, alone {whole[:60]!r}"
                                 + (f"; its deltas: {', '.join(x for item, x in t.trail if item == i)[-1500:]}"
                                    if t.trail else ""))
    return {"mismatched": mismatched, "first": first}


def keep(text: str, prefix: str, suffix: str) -> str:
    """text in a new file that outlives the run's directory: its path."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix)
    with open(fd, "w") as f:
        f.write(text)
    return path


def keep_stream_logs(r: redis.Redis, keys, lines: list[str]) -> str:
    """Every event of the jobs these report lines name (their stream logs, while Redis still has
    them), one JSON object a line, kept in a file: its path."""
    from gencli.worker.stream import read_log

    ids = sorted(set(re.findall(r"job ([0-9a-f]{32})", " ".join(lines))))
    return keep("".join(json.dumps({"job": job_id, **e}) + "\n" for job_id in ids for e in read_log(r, keys, job_id)),
                "gencli-exact-streams-", ".jsonl")


def hung_details(client, r: redis.Redis, hung: list[str], worker_logs: str) -> list[str]:
    """What the store, Redis and the workers' logs say of each hung job (at most 5): enough to tell
    a message lost from one held somewhere, or a job stuck running."""
    from gencli.worker.app import queue_of
    from gencli.worker.broker import held_messages

    out = []
    for job_id in hung[:5]:
        rec = client.store.get_job(job_id)
        try:
            sent = r.ttl(client.keys.sent(job_id))
            queued = sum(r.llen(k) for k in client.keys.queue_lists(queue_of(rec.kind, rec.model)))
            unacked = int(job_id in held_messages(r, client.keys))
        except redis.RedisError as e:
            sent = queued = unacked = f"Redis: {e}"
        said = [ln.strip()[-160:] for ln in worker_logs.splitlines() if job_id in ln][-4:]
        out.append(f"job {job_id}: {rec.status}, {rec.attempts} attempt(s), queued_at {rec.queued_at}, started_at "
                   f"{rec.started_at}, worker {rec.worker}; sent mark ttl {sent}; {queued} message(s) on its queue, "
                   f"in unacked {unacked}; the workers said: {said}")
    return out


def ended_once(client, r: redis.Redis, tasks: list[Task], hung: list[str], worker_logs: str) -> dict:
    """Lost (failed, or an item missing), duplicated (ended twice, a seq twice, an extra item)."""
    from gencli.worker.stream import read_log

    succeeded_lines = Counter(re.findall(r"job ([0-9a-f]{32}) succeeded:", worker_logs))
    lost, duplicated, logs_read = [], [], 0
    for t in tasks:
        if t.job_id is None or t.job_id in hung:
            continue
        job = client.job(t.job_id)
        rec, items = job.record(), job.items()
        expected = len(t.prompts) * t.samples
        if rec.status == "failed" or len(items) < expected or any(it.status == "failed" for it in items):
            lost.append(t.job_id)
        events = read_log(r, client.keys, t.job_id)
        logs_read += bool(events)
        info = check_log(events, items[0]) if items else {"succeeded_ends": 0, "repeated_seq": False}
        if (len(items) > expected or info["succeeded_ends"] > 1 or info["repeated_seq"]
                or succeeded_lines[t.job_id] > 1):
            duplicated.append(t.job_id)
    return {"lost": lost, "duplicated": duplicated, "logs_read": logs_read}


def replays(env: dict, tasks: list[Task], k: int, seed: int) -> dict:
    """`gencli replay JOB --json` of k jobs (sampled ones with drawn seeds and cancelled ones first)."""
    rng = random.Random(seed)
    pool = [t for t in tasks if t.job_id is not None]
    rng.shuffle(pool)
    pool.sort(key=lambda t: not (t.sampling["seed"] is None and t.sampling["temperature"] or t.cancel_after))
    checked = equal = differ = 0
    first = []
    for t in pool[:k]:
        done = subprocess.run([sys.executable, "-m", "gencli.cli", "replay", t.job_id, "--json"], env=env,
                              capture_output=True, text=True, timeout=300)
        rows = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
        if not rows or "summary" not in rows[-1]:
            if "nothing to replay" not in done.stderr:
                first.append(f"replay {t.job_id}: {done.stderr.strip()[-200:]}")
                differ += 1
            continue
        checked += 1
        equal += rows[-1]["equal"]
        differ += rows[-1]["differ"]
        if rows[-1]["differ"]:
            first.append(f"replay {t.job_id}: {rows[-1]['summary']}")
    return {"jobs": checked, "equal": equal, "differ": differ, "first": first}


# --- the run -------------------------------------------------------------------------------------

def run(cfg: Config, result: dict) -> None:
    from gencli.storage.settings import get_settings
    from gencli.worker.client import Client

    run_id = uuid.uuid4().hex[:8]
    with ExitStack() as stack:
        tmp, server, gencli_vars = deployment(stack, cfg.backend, "exact", f"exact{run_id}")
        env = child_env(gencli_vars)
        model_dir = make_model(tmp / MODEL, cfg.seed)
        client = Client(get_settings(), start_redis=False)
        stack.callback(client.store.engine.dispose)
        r = redis.Redis.from_url(server.url, socket_connect_timeout=2, socket_timeout=10)

        log(f"{WORKERS} workers x {SLOTS} slots and gencli serve on {cfg.backend} ({tmp}) ...")
        started = time.monotonic()
        workers = start_workers(model_dir, env, tmp, client.keys, run_id)
        stack.callback(stop_workers, workers)
        api, api_url = start_api(env, tmp)
        stack.callback(api.stop)
        for w in workers:
            w.wait_ready(r)
        log(f"  ready in {time.monotonic() - started:.1f} s")

        tasks = make_tasks(cfg, word_pool())
        faults = None
        if cfg.faults:
            always = threading.Event()
            always.set()  # clients retry through a Redis outage: it may come while they still send
            faults = Faults(store=client.store, redis_server=server, r=r, workers=workers, total=cfg.jobs,
                            submitted=always, plan=PLAN)
            faults.start()
            stack.callback(faults.finish, 0)
        log(f"{cfg.jobs} jobs from {cfg.clients} clients ({dict(Counter(t.kind for t in tasks))}) ...")
        t0 = time.monotonic()
        clients = Clients(cfg, tasks, api_url, tmp, env)
        clients.start()
        deadline = t0 + cfg.timeout_s
        if not clients.join(cfg.timeout_s):
            log("  some clients were still waiting at the deadline")
        ids = [t.job_id for t in tasks if t.job_id is not None]
        hung = wait_ended(client.store, ids, deadline)
        run_s = time.monotonic() - t0
        if faults is not None:
            faults.finish(grace=60)
        injected = faults.injected() if faults else []
        missing = faults.missing() if faults else []
        hung_first = hung_details(client, r, hung, "".join(w.log_text() for w in workers))  # before they stop
        api.stop()
        stop_workers(workers)
        worker_logs = "".join(w.log_text() for w in workers)

        log(f"all ended in {run_s:.1f} s; the oracle, each line alone in this process ...")
        once = ended_once(client, redis.Redis.from_url(server.url), tasks, hung, worker_logs)
        t1 = time.monotonic()
        alone = oracle(client, model_dir, tasks)
        views = client_views(client, tasks, alone["texts"])
        if alone["first"] or views["first"]:  # what the streams held, for whoever looks into it
            result["stream_logs_kept"] = keep_stream_logs(r, client.keys, alone["first"] + views["first"])
        log(f"  {alone['lines']} lines in {time.monotonic() - t1:.1f} s; gencli replay of {cfg.replays} jobs ...")
        replayed = replays(env, tasks, cfg.replays, cfg.seed)
        result.update({
            "run_s": run_s, "jobs": len(ids), "unsent": len(clients.failures), "unsent_first": clients.failures[:5],
            "kinds": dict(Counter(t.kind for t in tasks if t.job_id)),
            "lines": alone["lines"], "lines_skipped": alone["skipped"], "differing": alone["differ"],
            "differing_first": alone["first"],
            "stream_mismatches": views["mismatched"], "stream_first": views["first"],
            "lost": len(once["lost"]), "lost_ids": once["lost"][:10],
            "duplicated": len(once["duplicated"]), "duplicated_ids": once["duplicated"][:10],
            "hung": len(hung), "hung_ids": hung[:10], "hung_first": hung_first,
            "replayed_jobs": replayed["jobs"], "replay_equal": replayed["equal"], "replay_differ": replayed["differ"],
            "replay_first": replayed["first"],
            "client_retries": sum(t.client_retries for t in tasks), "cut_streams": sum(not t.complete for t in tasks),
            "cancelled_by_clients": sum(t.cancel_after is not None for t in tasks),
            "faults": [f.line() for f in injected], "faults_missing": missing,
            "worker_logs": log_notes(worker_logs), "status_counts": status_counts(client.store),
        })
        problems = [f"faults not injected: {', '.join(missing)}"] if missing else []
        problems += [f"fault injection: {e}" for e in (faults.errors if faults else [])]
        problems += [f"{len(clients.failures)} task(s) could not be sent"] if clients.failures else []
        if problems:
            result["error"] = "; ".join(problems)
        if problems or any(result[k] for k in COUNTS):
            result["worker_logs_kept"] = keep(worker_logs, "gencli-exact-worker-logs-", ".txt")


COUNTS = ("differing", "stream_mismatches", "lost", "duplicated", "hung", "replay_differ")


def report(res: dict) -> None:
    c = res["config"]
    out = sys.stderr
    print(f"gencli exactness benchmark: {c['jobs']} jobs from {c['clients']} clients, {WORKERS} workers x {SLOTS} "
          f"slots, {c['backend']}, faults {'on' if c['faults'] else 'off'}, seed {c['seed']};"
          f" {res['elapsed_s']:.0f} s", file=out)
    if "lines" in res:
        print(f"  jobs {res['jobs']} ({', '.join(f'{k} {v}' for k, v in sorted(res['kinds'].items()))}),"
              f" lines {res['lines']} compared ({res['lines_skipped']} with nothing to compare), in {res['run_s']:.0f} s",
              file=out)
        print(f"  differing lines {res['differing']}   stream mismatches {res['stream_mismatches']}   lost {res['lost']}"
              f"   duplicated {res['duplicated']}   hung {res['hung']}   replay: {res['replay_equal']} equal,"
              f" {res['replay_differ']} differ in {res['replayed_jobs']} jobs", file=out)
        print(f"  clients: {res['client_retries']} retries through outages, {res['cut_streams']} views cut short"
              f" (hang-ups, cut streams, not followed), {res['cancelled_by_clients']} cancels", file=out)
        for f in res["faults"]:
            print(f"  fault: {f}", file=out)
        for key in ("differing_first", "stream_first", "replay_first", "unsent_first", "hung_first"):
            for line in res.get(key, []):
                print(f"    {line}", file=out)
        wl = res["worker_logs"]
        if res.get("stream_logs_kept"):
            print(f"  the stream logs of the jobs named above are kept in {res['stream_logs_kept']}", file=out)
        if res.get("worker_logs_kept"):
            print(f"  the workers' logs are kept in {res['worker_logs_kept']}", file=out)
        print(f"  worker logs: {wl['requeued']} requeued, {wl['sent_again']} sent again, {wl['lease_lost']} lease lost,"
              f" {wl['warnings']} warnings, {wl['errors']} errors", file=out)
    if res.get("error"):
        print(f"  ERROR: {res['error']}", file=out)
    print(f"  {'PASS' if res['pass'] else 'FAIL'}", file=out, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI's size: 64 jobs from 16 clients, faults included")
    ap.add_argument("--sqlite", action="store_true", help="a SQLite store (default: PostgreSQL)")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-faults", action="store_true", help="no worker killed or stopped, no Redis restart")
    ap.add_argument("--json", action="store_true", help="end with one JSON object on stdout")
    a = ap.parse_args()
    jobs = a.jobs or (64 if a.quick else 500)
    cfg = Config(jobs=jobs, clients=a.clients or 16, backend="sqlite" if a.sqlite else "postgresql",
                 faults=not a.no_faults, seed=a.seed, replays=3 if a.quick else 12,
                 timeout_s=300 if a.quick else 1800)
    t0 = time.perf_counter()
    result: dict = {"bench": "exact", "config": vars(cfg)}
    try:
        run(cfg, result)
    except Exception as e:  # noqa: BLE001 - any failure is reported, with exit status 1
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
    result["elapsed_s"] = time.perf_counter() - t0
    result["pass"] = "error" not in result and all(result.get(k) == 0 for k in COUNTS)
    report(result)
    if a.json:
        print(json.dumps(result, default=str))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
