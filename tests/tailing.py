"""What the queue tests share: a background tailer, waiting on a condition, reference outputs."""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path

from gencli.model.checkpoint import load_model
from gencli.model.params import SamplingParams
from gencli.model.textgen import TextGenerator
from gencli.worker.fold import texts_of
from gencli.worker.logprobs import record_of


class Tailer(threading.Thread):
    """Follows a job's stream in the background, as `gencli tail` would (job.stream())."""

    def __init__(self, job):
        super().__init__(daemon=True)
        self.job = job
        self.deltas = []
        self.error: BaseException | None = None

    def run(self):
        try:
            for d in self.job.stream():
                self.deltas.append(d)
        except BaseException as e:  # noqa: BLE001 - handed to the test, which asserts on it
            self.error = e

    def texts(self, n: int) -> list[str]:
        """Each item's text as a reader shows it: a restart delta replaces what came before."""
        texts = texts_of(self.deltas)
        return [texts.get(i, "") for i in range(n)]

    def tokens(self) -> int:
        return sum(1 for d in self.deltas if not d.restart)


def sse_events(lines) -> list[dict]:
    """Parse SSE lines into events {id, event, data}."""
    out, cur = [], {}
    for line in lines:
        if not line:
            if cur:
                out.append(cur)
            cur = {}
        elif line.startswith("id: "):
            cur["id"] = int(line[4:])
        elif line.startswith("event: "):
            cur["event"] = line[7:]
        elif line.startswith("data: "):
            cur["data"] = line[6:]
    return out


def wait_for(cond, timeout: float, what: str, every: float = 0.05):
    deadline = time.time() + timeout
    while not (got := cond()):
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)
    return got


def reference(model_dir, prompts: list[str], max_tokens: int, *, temperature: float = 0.0, top_k: int | None = 200,
              seed: int | None = None) -> list[str]:
    """Each prompt's output run alone, in-process, without the queue (seeded: the same draws).

    Kept for the test process's life, keyed by the model directory's files (name, size, mtime): a
    module's tests ask for the same references again, and a model rewritten in place is run anew."""
    path = Path(model_dir)
    files = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                  for p in (sorted(path.iterdir()) if path.is_dir() else [path]))
    return list(_reference(str(model_dir), files, tuple(prompts), max_tokens, temperature, top_k, seed))


@functools.cache
def _reference(model_dir: str, files: tuple, prompts: tuple[str, ...], max_tokens: int, temperature: float,
               top_k: int | None, seed: int | None) -> tuple[str, ...]:
    tg = TextGenerator(load_model(model_dir))
    sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed)
    return tuple(tg.generate([tg.encode(p, chat=False)], sp)[0].text for p in prompts)


def scored_reference(model_dir, prompts: list[list[int]], params: SamplingParams) -> list[tuple[dict, str]]:
    """Each prompt's (logprobs record, text) run alone in-process, as the store records them
    (worker/logprobs.py): the oracle of the logprobs the queue gives."""
    return list(_scored(str(model_dir), tuple(tuple(p) for p in prompts), params))


@functools.cache
def _scored(model_dir: str, prompts: tuple[tuple[int, ...], ...], params: SamplingParams) -> tuple:
    tg = TextGenerator(load_model(model_dir))
    out = []
    for p in prompts:
        batch = tg.stream([list(p)], params)
        for _ in batch:
            pass
        out.append((record_of(batch.seqs[0]), batch.streams[0].text))
    return tuple(out)
