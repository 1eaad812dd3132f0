"""Queue commands: submit, tail, status, list, show, results, cancel, retry."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING

import click

from gencli.cli.display import OrderedPrinter
from gencli.cli.main import EXIT_INTERRUPTED
from gencli.cli.options import SINCE, extra_sampling, sampling_options, shaping_options
from gencli.model.errors import GencliError
from gencli.model.params import EXTRA_KEYS
from gencli.storage.status import JobStatus, iso
from gencli.worker.app import model_name_for, queue_for, queue_of
from gencli.worker.fold import StreamDelta

if TYPE_CHECKING:
    from gencli.worker.client import Client


def _client() -> Client:
    """The submit client, imported when a command runs (its store and Celery need not load for --help)."""
    from gencli.worker.client import Client

    return Client()

EXIT_FAILED, EXIT_CANCELLED = 1, 3


def _label(item) -> str:
    return label(item.custom_id, item.line)


def label(custom_id: str | None, line: int, sample: int | None = None) -> str:
    """How a prompt (and sample) is named in tail, show and results: its custom_id, else its line."""
    return (f"id {custom_id}" if custom_id else f"line {line}") + (f", sample {sample}" if sample else "")


@click.command()
@click.option("--model", "model", envvar="GENCLI_MODEL_NAME", required=True,
              help="The served model's name (a worker's --model-name; by default its checkpoint's dir name), or that path.")
@sampling_options
@shaping_options
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeatable).")
@click.option("--prompt_file", "--prompt-file", "prompt_file", help="UTF-8 prompt file, - for stdin, .jsonl lines.")
@click.option("--each-line", "--each_line", "each_line", is_flag=True, help="One prompt per line of the file.")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the model's chat format.")
@click.option("--num_samples", "--num-samples", "num_samples", type=click.IntRange(min=1), default=1,
              show_default=True, help="Samples per prompt (with a seed, sample k uses seed + k).")
@click.option("--priority", type=click.IntRange(0, 9), default=0, show_default=True, help="Higher runs first.")
@click.option("--idempotency-key", "--idempotency_key", "idempotency_key",
              help="Submitting the same request with the same key again returns the same job.")
@click.option("--follow", "-f", is_flag=True, help="Tail the job right away.")
@click.option("--wait-for-worker", "--wait_for_worker", "wait_for_worker", type=click.FloatRange(min=0),
              default=None, help="Fail, queueing nothing, unless a live worker serves the model within SECONDS.")
@click.pass_context
def submit(ctx, model, max_tokens, temperature, top_k, top_p, seed, stop, truncate, prompts, prompt_file, each_line,
           chat, num_samples, priority, idempotency_key, follow, wait_for_worker):
    """Queue a generation job; print its id at once."""
    from gencli.worker.prompts import read_prompts

    if bool(prompts) == (prompt_file is not None):
        raise click.UsageError("give --prompt or --prompt_file (one of them)")
    if each_line and prompt_file is None:
        raise click.UsageError("--each-line goes with --prompt_file")
    items = read_prompts(prompts, prompt_file, each_line=each_line)
    if num_samples > 1:
        items = samples_of(items, num_samples, seed)
    if os.sep in model:  # a checkpoint path: the name workers serve it under
        if not os.path.exists(model):
            raise GencliError(f"{model}: no such checkpoint (give a served model's name, or an existing path)")
        model = model_name_for(model)
    client = _client()
    if wait_for_worker is not None and not _wait_for_worker(client, queue_for(model), wait_for_worker):
        raise GencliError(f"no live worker serves model {model} after {wait_for_worker:g} s: nothing was submitted"
                          f"{_served_note(client)}")
    job = client.submit(items, model=model, chat=chat, truncate=truncate, priority=priority,
                        idempotency_key=idempotency_key, max_tokens=max_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop=list(stop), **extra_sampling(ctx),
                        meta={"num_samples": num_samples} if num_samples > 1 else None)
    click.echo(job.id)
    if wait_for_worker is None and not client.live_workers(queue_for(model)):
        click.secho(f"[no live worker serves model {model} yet: the job waits for one{_served_note(client)}]",
                    err=True, fg="yellow")
    if follow:
        ctx.exit(_tail(client, job.id, line=None, after=0, cancel_on_interrupt=False))


def samples_of(items: list, n: int, seed: int | None) -> list:
    """Each prompt n times in a row, as `generate --num_samples` runs them: with a seed (the line's
    own, else the job's), sample k uses seed + k."""
    from gencli.worker.prompts import PromptItem

    out = []
    for it in items:
        base = (it.extra or {}).get("seed", seed)
        for k in range(n):
            extra = dict(it.extra or {}) | ({"seed": base + k} if isinstance(base, int) else {})
            out.append(PromptItem(it.prompt, it.line, it.custom_id, extra or None))
    return out


@click.command()
@click.argument("job_id")
@click.option("--line", type=int, default=None, help="Show only this prompt line.")
@click.option("--from-seq", "after", type=click.IntRange(min=0), default=0, help="Resume after this event number.")
@click.option("--cancel-on-interrupt", is_flag=True, help="Ctrl-C cancels the job (default: detach).")
@click.pass_context
def tail(ctx, job_id, line, after, cancel_on_interrupt):
    """Follow a job's tokens live, from its first token, to its final status."""
    ctx.exit(_tail(_client(), job_id, line=line, after=after, cancel_on_interrupt=cancel_on_interrupt))


def _watched(job, after: int):
    """job.watch(), without the library's NoWorkerWarning (tail says it its own way, above)."""
    from gencli.worker.client import NoWorkerWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoWorkerWarning)
        return job.watch(after)


def _tail(client: Client, job_id: str, *, line: int | None, after: int, cancel_on_interrupt: bool) -> int:
    job = client.job(job_id)
    record = job.record()
    items = job.items()
    if line is not None:
        items = [it for it in items if it.line == line]
        if not items:
            raise GencliError(f"job {job.id} has no prompt at line {line}")
    pos = {it.idx: n for n, it in enumerate(items)}
    samples = job.samples
    if job.status is JobStatus.QUEUED and not client.live_workers(queue_of(record.kind, record.model)):
        what = "dataset prep" if record.kind == "prep" else f"model {record.model}"
        click.echo(f"[job {job.id} is queued for {what}; no live worker serves it yet]", err=True)
    labels = [label(it.custom_id, it.line, it.idx % samples + 1 if samples > 1 else None) for it in items]
    scoring = job.scoring is not None  # no text: a bar of the lines scored, then the totals
    printer = OrderedPrinter(labels if len(items) > 1 else None) if items and not scoring else None
    from tqdm import tqdm

    bar = tqdm(total=len(items), unit=" lines", file=sys.stderr, desc=f"score {record.model}",
               dynamic_ncols=True) if scoring else None
    scored: set[int] = set()
    status = None
    gaps = False
    try:
        for d in _watched(job, after):
            if isinstance(d, StreamDelta):
                if d.item not in pos:
                    continue
                if scoring:
                    if d.finish_reason and d.item not in scored:
                        scored.add(d.item)
                        bar.update(1)
                    continue
                if d.restart:
                    printer.restart(pos[d.item], d.text, d.finish_reason is not None, d.note)
                else:
                    printer.feed(pos[d.item], d.text, d.finish_reason is not None)
                continue
            kind = d["t"]
            if kind == "item" and d["i"] in pos:
                click.secho(f"[{_label(items[pos[d['i']]])}: {d['error']}]", err=True, fg="red")
                if printer is not None:
                    printer.feed(pos[d["i"]], "", True)
            elif kind == "from_store":
                click.secho(f"[{d['why']}]", err=True, fg="yellow")
            elif kind == "gap" and not gaps:
                gaps = True
                click.secho(f"\n[the stream of job {job.id} lost events in Redis (restarted, flushed or trimmed): "
                            "the lines it touched are shown from the store when the job ends]", err=True, fg="yellow")
            elif kind == "progress":
                bar = bar or tqdm(total=d["total"], unit=" " + d.get("unit", "items"), file=sys.stderr,
                                  desc=f"prep {record.model}", dynamic_ncols=True)
                bar.update(d["done"] - bar.n)
            elif kind == "end":
                status = d["status"]
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            status = job.cancel()
            if status in (JobStatus.RUNNING, JobStatus.CANCELLED):
                click.echo(f"\n[cancelled job {job.id}]", err=True)
            else:  # it ended before the interrupt reached the store
                click.echo(f"\n[job {job.id} had already ended: {status.value}]", err=True)
        else:
            click.echo(f"\n[detached; the job goes on: gencli tail {job.id}]", err=True)
        return EXIT_INTERRUPTED
    finally:
        if bar is not None:
            bar.close()
    record = job.record()
    status = record.status if record.status in ("succeeded", "failed", "cancelled") else status
    if record.kind == "prep" and record.result:
        click.echo(prep_summary(record.result))
    if scoring and status == "succeeded":
        click.echo(summary_line(job.score_summary()))
    msg = f"[job {job.id} {status}" + (f": {record.error_message}" if record.error_message else "") + "]"
    click.secho(msg, err=True, fg="green" if status == "succeeded" else "red")
    return {"succeeded": 0, "cancelled": EXIT_CANCELLED}.get(status, EXIT_FAILED)


def prep_summary(result: dict) -> str:
    """A prep job's result as `gencli prep` prints it: where, and how much of each split."""
    from gencli.cli.prep import summary

    if result.get("skipped"):
        return f"{result['out']}: up to date (inputs and flags unchanged; --force rewrites)"
    try:
        return summary(result, result["out"])
    except KeyError:  # a result of an older gencli: its counts as they are
        return f"{result['out']}: {json.dumps(result.get('counts', {}))}"


def summary_line(s: dict) -> str:
    """A scoring job's totals on one line."""
    if not s["tokens"]:
        return f"{s['lines']} lines scored, no tokens"
    return (f"{s['lines']} lines, {s['tokens']} tokens: logprob {s['logprob']:.4f}, mean {s['mean_logprob']:.4f} "
            f"nats/token, perplexity {s['perplexity']:.4f}" + (f" ({s['failed']} failed)" if s.get("failed") else ""))


def _wait_for_worker(client: Client, queue: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    said = False
    while not client.live_workers(queue):
        if time.monotonic() >= deadline:
            return False
        if not said:
            click.secho(f"[no live worker serves {queue} yet: waiting up to {seconds:g} s for one]", err=True,
                        fg="yellow")
            said = True
        time.sleep(0.2)
    return True


def _served_note(client: Client) -> str:
    served = sorted({w["model"] for w in client.live_workers() if w.get("model")})
    return f"; models served now: {', '.join(served)}" if served else "; no model is served now"


@click.command()
def status():
    """Live workers (device, model, running jobs), queue depths, and queues nobody serves."""
    client = _client()
    r = client.redis
    workers = client.live_workers()
    served = {q for w in workers for q in w["queues"]}
    click.echo(f"workers ({len(workers)}):")
    for w in sorted(workers, key=lambda w: w["name"]):
        job = ", ".join(w.get("jobs") or []) or "idle"
        where = f"{w['device']} {w['dtype']}" if w.get("dtype") else w["device"]
        click.echo(f"  {w['name']:<24} {where:<16} model {w['model'] or '-':<20} {job}")
    waiting: dict[str, int] = {}
    for (kind, model), n in client.store.queued_counts().items():
        q = queue_of(kind, model)
        waiting[q] = waiting.get(q, 0) + n
    click.echo("queues:")
    for q in sorted(served | set(waiting)):
        depth = sum(r.llen(k) for k in client.keys.queue_lists(q))
        note = "" if q in served else "  <- no live worker serves this queue"
        click.echo(f"  {q:<28} {depth} message(s), {waiting.get(q, 0)} queued job(s){note}")


@click.command("list")
@click.option("--status", "status_", type=click.Choice([s.value for s in JobStatus]), default=None)
@click.option("--model", default=None)
@click.option("--kind", type=click.Choice(["generate", "prep"]), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("-q", "--query", default=None, metavar="TEXT",
              help="Only jobs with a prompt or output holding every word of TEXT (whole words, any case).")
@click.option("--since", type=SINCE, default=None, help=f"Only jobs created since then: {SINCE.forms}.")
@click.option("--after", default=None, metavar="ID", help="The page after this job (the last id of the page before).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job (with -q, its matching lines whole).")
def list_jobs(status_, model, kind, limit, query, since, after, as_json):
    """Recent jobs with status, model, worker/device, tokens and tokens/s."""
    client = _client()
    jobs = client.list_jobs(status=status_, model=model, kind=kind, limit=limit, after=after, query=query,
                            since=since)
    matches = client.matching_items([j.id for j in jobs], query) if query is not None else {}
    running = [j for j in jobs if j.status == JobStatus.RUNNING.value and j.kind == "generate"]
    live = client.store.live_progress([j.id for j in running])  # running jobs: their progress so far
    now = client.store_time() if running else None
    if not as_json:
        click.echo(f"{'job':<32}  {'status':<9} {'model':<16} {'worker/device':<28} {'items':>9} {'tokens':>7} "
                   f"{'tok/s':>7}")
    for j in jobs:
        tokens, tps, items = j.completion_tokens, j.tokens_per_s, str(j.n_items)
        if j.id in live:
            tokens, ended = live[j.id]
            items = f"{ended}/{j.n_items}"  # lines ended so far
            elapsed = (now - j.started_at).total_seconds() if j.started_at else 0
            tps = tokens / elapsed if elapsed > 0 else None
        elif j.kind == "prep" and j.result and not j.result.get("skipped"):
            tokens = sum(c.get("tokens", 0) for c in j.result.get("counts", {}).values())
        if as_json:
            click.echo(json.dumps(_job_line(j, tokens, tps, matches.get(j.id))
                                  | ({"items_done": live[j.id][1]} if j.id in live else {}), ensure_ascii=False))
            continue
        where = f"{j.worker or '-'}/{j.final_device or j.device or '-'}"
        shown = f"{tps:.1f}" if tps else "-"
        click.echo(f"{j.id:<32}  {j.status:<9} {j.model:<16} {where:<28} {items:>9} {tokens:>7} {shown:>7}")
        if matches.get(j.id):
            it = matches[j.id][0]
            click.echo(f"  {_label(it)}: {_snippet(it.prompt_text, 45)} -> {_snippet(it.output, 45)}")


def _job_line(j, tokens: int, tps: float | None, matches: list | None) -> dict:
    """A job as `list --json` prints it (with -q, its matching items whole)."""
    out = {"id": j.id, "kind": j.kind, "model": j.model, "status": j.status, "created_at": iso(j.created_at),
           "finished_at": iso(j.finished_at), "n_items": j.n_items, "completion_tokens": tokens,
           "tokens_per_s": tps, "worker": j.worker, "device": j.final_device or j.device}
    if matches is not None:
        out["matches"] = [{"line": it.line, "custom_id": it.custom_id, "prompt": it.prompt, "output": it.output}
                          for it in matches]
    return out



def _snippet(text: str | None, width: int) -> str:
    """The start of a text on one line (runs of whitespace, newlines too, as one space)."""
    if text is None:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


@click.command()
@click.argument("job_id")
@click.option("--provenance", is_flag=True,
              help="Also what made each output: model and tokenizer hashes, dtype, device, software, seed.")
def show(job_id, provenance):
    """A job's parameters, each prompt and output, and its error."""
    client = _client()
    job = client.job(job_id)
    j = job.record()
    made = job.provenance() if provenance else None
    click.echo(f"job {j.id}  {j.kind}  {j.status}  model {j.model}  priority {j.priority}")
    click.echo(f"created {_utc(j.created_at)}  started {_utc(j.started_at)}  finished {_utc(j.finished_at)}")
    click.echo(f"worker {j.worker or '-'}  device {j.device or '-'}  attempts {j.attempts}")
    click.echo(f"out-of-memory retries {j.oom_retries}  final batch size {j.final_batch_size or '-'}  "
               f"final device {j.final_device or '-'}")
    click.echo(f"tokens {j.completion_tokens}  tokens/s {f'{j.tokens_per_s:.1f}' if j.tokens_per_s else '-'}")
    click.echo(f"params {json.dumps(j.params)}")
    if j.kind == "prep" and j.result:
        click.echo(prep_summary(j.result))
    if job.scoring is not None and j.status == "succeeded":
        click.echo(f"scores {summary_line(job.score_summary())}")
    if j.error_class:
        click.secho(f"error {j.error_class}: {j.error_message}", fg="red")
        if j.error_where:
            click.echo(f"  at {j.error_where}")
    if made is not None:
        _show_attempts(made["attempts"], j)
    for it in job.items():
        click.secho(f"--- {_label(it)} [{it.status}{', ' + it.finish_reason if it.finish_reason else ''}]", bold=True)
        click.echo(f"prompt: {json.dumps(it.prompt, ensure_ascii=False)}")
        if it.error:
            click.secho(f"error: {it.error}", fg="red")
        if it.output is not None:
            click.echo(f"output: {it.output}")
        if made is not None and j.kind != "prep":
            _show_line_provenance(made["items"][it.idx])


def _show_attempts(attempts: list[dict], j) -> None:
    if not attempts:
        click.echo("provenance: no attempt recorded (the job never ran, or ran before gencli recorded it)")
    for a in attempts:
        click.echo(f"attempt {a['attempt']}: {a.get('worker') or '-'}, started {a['started_at']}")
        sw = a.get("software") or {}
        versions = "  ".join(f"{k} {v}" for k, v in sw.items())
        if "model" in a:
            m = a["model"]
            click.echo(f"  model {m['name']} ({m['kind']}) at {m['path']}")
            click.echo(f"    sha256 {m['sha256']}")
            t = a["tokenizer"]
            click.echo(f"  tokenizer {t['name']}  ranks sha256 {t['ranks_sha256']}  chat format {a['chat_format']}")
            gpu = f" ({a['gpu']})" if a.get("gpu") else ""
            click.echo(f"  {a['dtype']} on {a['device']}{gpu}; batch invariant: "
                       f"{'yes' if a['batch_invariant'] else 'no'} ({a['note']})")
        for key in ("inputs", "outputs"):  # a prep job's
            for f in (a.get(key) or []):
                click.echo(f"  {key[:-1]} {f.get('path') or f.get('name')}  sha256 {f['sha256']}")
        click.echo(f"  {versions}")


def _show_line_provenance(p: dict) -> None:
    sampling = p.get("sampling")
    if sampling:
        seed = f"{sampling['seed']}{' (drawn)' if sampling.get('seed_drawn') else ''}"
        top_k = sampling["top_k"] if sampling["top_k"] is not None else "none"
        click.echo(f"sampling: temperature {sampling['temperature']:g}  top_k {top_k}  top_p {sampling['top_p']:g}  "
                   f"max_tokens {sampling['max_tokens']}  stop {json.dumps(sampling['stop'])}  seed {seed}")
        for key in EXTRA_KEYS:  # recorded only where the line set them (SamplingParams.as_json)
            if key in sampling:
                click.echo(f"  {key} {json.dumps(sampling[key], ensure_ascii=False)}")
    else:
        click.echo("sampling: not recorded (the line has not started, or ran before gencli recorded it)")
    if "attempt" in p:
        invariant = "yes" if p.get("batch_invariant") else "no"
        click.echo(f"made by attempt {p['attempt']} on {p.get('device')} in {p.get('dtype')}; "
                   f"batch invariant: {invariant}")


@click.command()
@click.argument("job_id")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "text"]), default="jsonl", show_default=True)
@click.option("--no-provenance", "--no_provenance", "no_provenance", is_flag=True,
              help="Leave out each jsonl line's provenance object.")
def results(job_id, fmt, no_provenance):
    """A job's outputs: jsonl lines {custom_id, prompt, output, finish_reason, usage, provenance}, or text."""
    job = _client().job(job_id)
    if not job.status.done:
        raise GencliError(f"job {job.id} is {job.status.value}: its results come when it ends (gencli tail {job.id})")
    record = job.record()
    if record.kind == "prep":  # a dataset: its counts (the token files are in result.out)
        if record.result:
            click.echo(json.dumps(record.result, ensure_ascii=False) if fmt == "jsonl" else prep_summary(record.result))
        return
    if job.scoring is not None:  # one line of scores per line, then (as text) the totals
        rows = job.scores()
        for r in rows:
            if fmt == "jsonl":
                click.echo(json.dumps(r, ensure_ascii=False))
            elif "tokens" in r:
                click.echo(f"{label(r['custom_id'], r['line'])}: {r['tokens']} tokens, logprob {r['logprob']:.4f}, "
                           f"perplexity {r['perplexity']:.4f}" if r["tokens"] else
                           f"{label(r['custom_id'], r['line'])}: no tokens scored")
            else:
                click.echo(f"{label(r['custom_id'], r['line'])}: {r['status']}" + (f": {r['error']}" if r["error"]
                                                                                    else ""))
        if fmt == "text":
            click.echo(summary_line(job.score_summary(rows)))
        return
    rows = job.result(provenance=fmt == "jsonl" and not no_provenance)
    for r in rows:
        if fmt == "jsonl":
            click.echo(json.dumps({k: r[k] for k in ("custom_id", "sample", "prompt", "output", "finish_reason",
                                                     "usage", "provenance") if k in r},
                                  ensure_ascii=False))
        else:  # each output whole, under its label when there are several (as tail shows them)
            if len(rows) > 1:
                click.secho(f"=== {label(r['custom_id'], r['line'], r.get('sample'))} ===", bold=True)
            click.echo(r["output"] or "")


def _utc(t) -> str:
    """A stored time (naive UTC) as shown: to the second, zone named."""
    return f"{t:%Y-%m-%d %H:%M:%S} UTC" if t else "-"


@click.command()
@click.argument("job_id")
def cancel(job_id):
    """Cancel a job: a queued one never runs, a running one stops within a few tokens."""
    job = _client().job(job_id)
    status = job.cancel()
    if status is JobStatus.RUNNING:
        click.echo(f"job {job.id}: asked to stop; it keeps its partial output")
    else:
        click.echo(f"job {job.id}: {status.value}")


@click.command()
@click.argument("job_id")
def retry(job_id):
    """Run a finished job's failed or cancelled lines again."""
    job = _client().job(job_id)
    n = job.retry()
    click.echo(f"job {job.id}: {n} line(s) queued again" if n else f"job {job.id}: nothing to retry")
