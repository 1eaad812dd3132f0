"""`gencli replay JOB`: re-run a job's lines from the store's records and compare byte for byte."""

from __future__ import annotations

import json

import click

from gencli.cli.queue import EXIT_FAILED, _client, label
from gencli.model.provenance import determinism, software
from gencli.worker.app import queue_for


@click.command()
@click.argument("job_id")
@click.option("--line", type=int, default=None, help="Replay only this prompt line.")
@click.option("--device", default=None,
              help="Run on this device (cpu, cuda:N) instead of the recorded one; equality is promised on "
                   "the CPU in float32 or int8.")
@click.option("--model", "model_path", default=None,
              help="A copy of the recorded model at another path (its sha256 must equal the record's).")
@click.option("--queue", "queued", is_flag=True, help="Run the replay as a job on the model's workers.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="With --queue: give up after SECONDS.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line compared, then the summary.")
def replay(job_id, line, device, model_path, queued, timeout, as_json):
    """Run a job's lines again from their records and compare each output byte for byte."""
    from gencli.worker.replay import ReplayError, plan, run_here, run_queued

    client = _client()
    job = client.job(job_id)
    p = plan(job, line=line)
    if queued:
        if device or model_path:
            raise click.UsageError("--device and --model are for an in-process replay: --queue runs on the workers")
        model = job.record().model
        if not client.live_workers(queue_for(model)):
            click.secho(f"[no live worker serves model {model} yet: the replay waits for one"
                        f"{'' if timeout is not None else ' (--timeout SECONDS gives up)'}]", err=True, fg="yellow")
        try:
            replay_job, ran_on, dtype = run_queued(job, p, timeout=timeout)
        except TimeoutError as e:
            raise ReplayError(f"replay {e}: it stays on the queue; gencli show that job when it has run") from None
        where = f"job {replay_job.id} on {ran_on} in {dtype}"
    else:
        ran_on, dtype = run_here(job, p, device=device, model_path=model_path, home=client.settings.home)
        where = f"{ran_on} in {dtype}"
    samples = job.samples
    equal = sum(ln.result == "equal" for ln in p.lines)
    for ln in p.lines:
        name = label(ln.custom_id, ln.line, ln.idx % samples + 1 if samples > 1 else None)
        if as_json:
            click.echo(json.dumps({"line": ln.line, "custom_id": ln.custom_id, "index": ln.idx, "result": ln.result,
                                   "at_token": ln.at, "tokens": len(ln.ids), "recorded": ln.output,
                                   "replayed": ln.replayed}, ensure_ascii=False))
        elif ln.result == "equal":
            part = " (as far as it went: it was cancelled)" if ln.finish_reason == "cancelled" else ""
            click.echo(f"{name}: equal, {len(ln.ids)} tokens{part}")
        else:
            k = ln.at
            rec, rep = _token(ln.ids, k), _token(ln.replayed_ids or [], k)
            click.secho(f"{name}: differs at token {k}: recorded {rec}, replayed {rep}", fg="red")
    for it, why in p.skipped:
        if not as_json:
            click.echo(f"{label(it.custom_id, it.line)}: skipped ({why})")
    promise = "" if determinism(ran_on, dtype)["batch_invariant"] else \
        f"; {dtype} on {ran_on}: byte equality is promised only on the CPU in float32 or int8"
    if p.device != ran_on or p.dtype != dtype:
        promise += f"; the job ran on {p.device} in {p.dtype}"
    now = software()
    made = p.software | ({"sampler": 1} if p.software and "sampler" not in p.software else {})  # (records before it)
    changed = [f"{k} {made[k]}" for k in ("gencli", "torch", "sampler") if made.get(k) not in (None, now[k])]
    if changed and equal != len(p.lines):  # other arithmetic: equality holds within one version of each
        promise += (f"; the job ran on {' and '.join(changed)}, this is gencli {now['gencli']}, torch {now['torch']}, "
                    f"sampler {now['sampler']}")
    summary = f"replayed {len(p.lines)} line(s) of job {job.id} on {where}: {equal} equal, " \
              f"{len(p.lines) - equal} differ{', ' + str(len(p.skipped)) + ' skipped' if p.skipped else ''}{promise}"
    if as_json:
        click.echo(json.dumps({"summary": summary, "equal": equal, "differ": len(p.lines) - equal,
                               "skipped": len(p.skipped)}))
    else:
        click.secho(summary, err=True, fg="green" if equal == len(p.lines) else "red")
    if equal != len(p.lines):
        raise SystemExit(EXIT_FAILED)


def _token(ids: list[int], k: int) -> str:
    """The id at k, or "(end)" past the last."""
    if k >= len(ids):
        return "(end)"
    return f"id {ids[k]}"
