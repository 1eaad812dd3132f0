"""`gencli replay`: run a job's lines again from their records and compare them byte for byte.

Each line is re-run with what the store recorded of it: its prompt, the job's chat and truncate
flags, the sampling it ran with (its seed included, a drawn one too), on the model at the recorded
path, which must still hash to the recorded sha256 (else the replay is refused, with both
hashes). A cancelled line is re-run for as many tokens as it made. In-process the lines decode
together on one engine, as a worker decodes them (every row computes what it computes alone);
with `queue`, the replay is a job on the model's workers, which refuse it when their model's hash
differs. On the CPU in float32 or int8 the promise is identical bytes (model/provenance.py); elsewhere
the summary says the promise does not hold.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gencli.model.errors import GencliError
from gencli.model.params import SAMPLING_KEYS, SamplingParams, resolve_sampling
from gencli.storage.status import JobStatus


class ReplayError(GencliError):
    """The job cannot be replayed as asked: a changed model, no record, no such device."""


@dataclass
class Line:
    """One line to replay, and what came of it."""

    idx: int
    line: int
    custom_id: str | None
    prompt: object
    params: SamplingParams  # its recorded seed and stop strings included
    ids: list[int]  # what the job recorded
    output: str
    finish_reason: str | None
    result: str = ""  # "equal" or "differs"
    at: int | None = None  # the first token (0-based) that differs
    replayed: str = ""
    replayed_ids: list[int] | None = None
    logprobs: dict | None = None  # what the job recorded of its logprobs (a scoring job's line: its scores)

    def compare(self, ids: list[int], text: str, finish_reason: str | None, logprobs: dict | None = None) -> None:
        """logprobs: the replay's record of them, compared float for float where the job kept any."""
        self.replayed_ids, self.replayed = list(ids), text
        same_logprobs = self.logprobs is None or self.finish_reason == "cancelled" or logprobs == self.logprobs
        if ids == self.ids and text == self.output and (self.finish_reason in ("cancelled", finish_reason)) \
                and same_logprobs:
            self.result = "equal"
            return
        self.result = "differs"
        pairs = zip(self.ids, ids, strict=False)
        self.at = next((k for k, (a, b) in enumerate(pairs) if a != b), min(len(self.ids), len(ids)))


@dataclass
class Plan:
    """The lines to replay, those left out (with why), and the record they are checked against."""

    lines: list[Line]
    skipped: list[tuple[object, str]]  # (item, why)
    model_path: str
    model_sha256: str
    tokenizer: dict
    chat_format: str
    device: str
    dtype: str
    software: dict  # the versions that made it (gencli, torch, Python)


def plan(job, *, line: int | None = None) -> Plan:
    """What replaying `job` (a client Job) means: its lines' records, checked for completeness."""
    record = job.record()
    if record.kind != "generate":
        raise ReplayError(f"job {job.id} is a {record.kind} job: only generation jobs are replayed")
    if not JobStatus(record.status).done:
        raise ReplayError(f"job {job.id} is {record.status}: replay it when it has ended (gencli tail {job.id})")
    items = job.items()
    if line is not None:
        items = [it for it in items if it.line == line]
        if not items:
            raise ReplayError(f"job {job.id} has no prompt at line {line}")
    made = job.provenance(items)
    attempts = made["attempts"]
    if not attempts:
        raise ReplayError(f"job {job.id} has no recorded attempt (it never ran, or ran before gencli recorded "
                          "provenance): nothing to replay against")
    lines, skipped, used = [], [], set()
    for it in items:
        p = made["items"][it.idx]
        if it.status not in ("succeeded", "cancelled") or it.ids is None or it.output is None:
            skipped.append((it, f"{it.status}: no output to compare"))
            continue
        if it.sampling:
            s = it.sampling
            params = SamplingParams(**{k: s[k] for k in SAMPLING_KEYS if k in s})  # (older records lack some)
        else:  # a line of an older gencli: its parameters as given, replayable when greedy or seeded
            params = resolve_sampling(record.params, it.params, 10**9)
            if params.temperature != 0 and params.seed is None:
                skipped.append((it, "sampled without a recorded seed"))
                continue
            if (it.params or {}).get("max_tokens", record.params.get("max_tokens")) is None:
                budget = len(it.ids) + (it.finish_reason == "stop")  # a stop id is made, not kept
                params = replace(params, max_tokens=max(budget, 1))
        if it.status == "cancelled":  # as far as it went
            if not it.ids:
                skipped.append((it, "cancelled before its first token"))
                continue
        lines.append(Line(it.idx, it.line, it.custom_id, it.prompt, params, list(it.ids), it.output,
                          it.finish_reason, logprobs=it.logprobs))
        used.add(p.get("attempt"))
    if not lines:
        why = "; ".join(f"line {it.line}: {w}" for it, w in skipped) or "no lines"
        raise ReplayError(f"job {job.id} has nothing to replay ({why})")
    by_number = {a["attempt"]: a for a in attempts}
    records = [by_number[n] for n in sorted(n for n in used if n in by_number)] or [attempts[-1]]
    shas = {a["model"]["sha256"] for a in records if "model" in a}
    if len(shas) > 1:
        raise ReplayError(f"job {job.id}'s lines were made by different models ({', '.join(sorted(shas))}): "
                          "replay them one line at a time with --line")
    first = records[0]
    if "model" not in first:
        raise ReplayError(f"job {job.id}'s attempt {first['attempt']} recorded no model")
    return Plan(lines, skipped, first["model"]["path"], first["model"]["sha256"], first["tokenizer"],
                first["chat_format"], first["device"], first["dtype"], first.get("software") or {})


def run_here(job, p: Plan, *, device: str | None = None, model_path: str | None = None, slots: int = 8,
             home=None) -> tuple[str, str]:
    """Replay the plan in this process; the device and dtype it ran on ("cpu", "float32")."""
    import torch

    from gencli.model.checkpoint import load_model
    from gencli.model.device import resolve_device
    from gencli.model.provenance import model_identity, tokenizer_record
    from gencli.model.textgen import TextGenerator
    from gencli.worker.logprobs import record_of

    path = model_path or p.model_path
    try:
        now = model_identity(path, home)["sha256"]
    except OSError as e:
        raise ReplayError(f"the recorded model {path} cannot be read ({e.strerror or e}): pass --model with a "
                          "copy of it") from None
    if now != p.model_sha256:
        raise ReplayError(f"the model at {path} changed since job {job.id} ran: recorded sha256 {p.model_sha256}, "
                          f"now {now}; replay needs the same weights (--model PATH to a copy of them)")
    if device is None and p.device.startswith("cuda") and not torch.cuda.is_available():
        raise ReplayError(f"job {job.id} ran on {p.device}, which this machine lacks: --device cpu replays it in "
                          "float32, where equality with a GPU's output is not promised")
    where = resolve_device(device) if device else torch.device(p.device)
    same_kind = where.type == torch.device(p.device).type  # the recorded dtype where it can run: int8 on a CPU
    loaded = load_model(path, tokenizer=p.tokenizer["name"], chat_format=p.chat_format, device=where,
                        dtype=p.dtype if same_kind else "auto")
    tok = tokenizer_record(loaded.tokenizer)
    if tok["ranks_sha256"] != p.tokenizer["ranks_sha256"]:
        raise ReplayError(f"tokenizer {tok['name']} is not the one job {job.id} ran with: recorded ranks sha256 "
                          f"{p.tokenizer['ranks_sha256']}, now {tok['ranks_sha256']}")
    gen = TextGenerator(loaded)
    record = job.record()
    chat, truncate = bool(record.params.get("chat")), bool(record.params.get("truncate"))
    prompts, params, spans = [], [], []
    for ln in p.lines:
        ids, scored = gen.encode_line(ln.prompt, chat=chat)
        prompts.append(gen.fit(ids, ln.params.max_tokens, truncate=truncate))
        params.append(as_far_as_it_went(ln))
        spans.append(scored)
    batch = gen.stream(prompts, params, slots=min(slots, len(p.lines)))
    for _ in batch:
        pass
    for ln, seq, scored in zip(p.lines, batch.seqs, spans, strict=True):
        ln.compare(seq.stream.ids, seq.stream.text, seq.stream.finish_reason, record_of(seq, scored))
    return str(loaded.device), loaded.dtype


def run_queued(job, p: Plan, *, timeout: float | None = None):
    """Replay the plan as a job on the model's workers; (the replay job, its device, its dtype)."""
    from gencli.worker.prompts import PromptItem

    record = job.record()
    items = []
    for ln in p.lines:
        items.append(PromptItem(ln.prompt, ln.line, ln.custom_id, as_far_as_it_went(ln).as_json()))
    replay = job.client.submit(items, model=record.model, chat=bool(record.params.get("chat")),
                               truncate=bool(record.params.get("truncate")),
                               meta={"replay": {"of": job.id, "model_sha256": p.model_sha256}})
    status = replay.wait(timeout)
    done = replay.record()
    if status.value != "succeeded":
        why = done.error_message or f"see gencli show {replay.id}"
        raise ReplayError(f"replay job {replay.id} {status.value}: {why}")
    for ln, it in zip(p.lines, replay.items(), strict=True):
        ln.compare(it.ids or [], it.output or "", it.finish_reason, it.logprobs)
    got = replay.items()[0]
    return replay, got.device or done.final_device or "-", got.dtype or "-"


def as_far_as_it_went(ln: Line) -> SamplingParams:
    """A cancelled line is re-run for the tokens it made; the others with their own budget."""
    if ln.finish_reason != "cancelled":
        return ln.params
    return replace(ln.params, max_tokens=len(ln.ids))
