"""`gencli score`: queue a scoring job (log-likelihood and perplexity of each line) on the workers."""

from __future__ import annotations

import json
import os

import click

from gencli.model.errors import GencliError


def read_lines(path: str) -> list:
    """The lines of a file to score (PromptItem each, its prompt a model/scoring.py spec): a .jsonl
    file's objects ({"text"}, {"prompt", "completion"} or {"messages"}, with an optional custom_id),
    else each non-blank line of the text a {"text"}."""
    from gencli.worker.prompts import PromptItem, read_text, score_line
    from gencli.worker.unicode import check_json

    name, text = read_text(path)
    items, seen = [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{n}: "
        if not path.endswith(".jsonl"):
            items.append(PromptItem({"text": line}, n, where=where))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise GencliError(f"{where}not valid JSON ({e.msg} at column {e.colno})") from None
        check_json(obj, where=where)
        items.append(score_line(obj, n, where, seen))
    if not items:
        raise GencliError(f"{name} holds no lines to score")
    return items


@click.command()
@click.argument("file", required=False)
@click.option("--model", "model", envvar="GENCLI_MODEL_NAME", required=True,
              help="The served model's name (a worker's --model-name), or its checkpoint's path.")
@click.option("--data", "data_dir", metavar="DIR", default=None,
              help="Score a `gencli prep` output's split instead of FILE, in windows of the model's context.")
@click.option("--split", default="val", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="With --data: which split.")
@click.option("--per-token", "--per_token", "per_token", is_flag=True,
              help="Give each scored token's logprob in the results too.")
@click.option("--top", type=click.IntRange(0, 20), default=0, show_default=True,
              help="Also record the N likeliest tokens' logprobs at each position (in the store's record).")
@click.option("--priority", type=click.IntRange(0, 9), default=0, show_default=True, help="Higher runs first.")
@click.option("--idempotency-key", "--idempotency_key", "idempotency_key",
              help="Submitting the same request with the same key again returns the same job.")
@click.option("--follow", "-f", is_flag=True, help="Show the job's progress, then its totals.")
@click.pass_context
def score(ctx, file, model, data_dir, split, per_token, top, priority, idempotency_key, follow):
    """Queue a scoring job: each line's log-likelihood and perplexity; print its id at once.

    FILE: one text per line, or .jsonl lines {"text"}, {"prompt", "completion"} (the completion
    scored given the prompt) or {"messages"} (the assistant turns scored, in the model's chat format).
    Results: gencli results JOB (one JSON line per line: tokens, logprob, mean_logprob, perplexity).
    """
    from gencli.cli.queue import _client, _served_note, _tail
    from gencli.worker.app import model_name_for, queue_for

    if (file is None) == (data_dir is None):
        raise click.UsageError("give FILE or --data DIR (one of them)")
    if os.sep in model:
        if not os.path.exists(model):
            raise GencliError(f"{model}: no such checkpoint (give a served model's name, or an existing path)")
        model = model_name_for(model)
    client = _client()
    if data_dir is not None:
        lines = client.data_windows(model, data_dir, split)
        source = {"data": os.path.abspath(data_dir), "split": split}
    else:
        lines = read_lines(file)
        source = {"file": file}
    job = client.submit_score(lines, model=model, top=top, per_token=per_token, priority=priority,
                              idempotency_key=idempotency_key, meta=source)
    click.echo(job.id)
    if not client.live_workers(queue_for(model)):
        click.secho(f"[no live worker serves model {model} yet: the job waits for one{_served_note(client)}]",
                    err=True, fg="yellow")
    if follow:
        ctx.exit(_tail(client, job.id, line=None, after=0, cancel_on_interrupt=False))
