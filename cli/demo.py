"""`gencli demo`: the whole pipeline on this machine, each step cached.

1. prep the chitchat dataset in ChatML (a no-op once done),
2. train the tiny model on it (once; an interrupted run resumes),
3. start Redis if none answers, and a worker for the model if none serves it,
4. submit the prompts as one job and tail its tokens live.
Everything lives under $GENCLI_HOME/demo; the worker this command started is stopped at the end
(--keep-worker leaves it serving).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from gencli.cli.queue import _client, _tail
from gencli.model.errors import GencliError
from gencli.storage.settings import get_settings
from gencli.worker.app import queue_for

if TYPE_CHECKING:
    from gencli.worker.client import Client

MODEL_NAME = "chitchat-tiny"
PROMPTS = [
    "Hi! How are you doing today?",
    "What do you like to do on the weekends?",
    "Do you have any pets?",
]


def prep_step(data: Path) -> None:
    from tqdm import tqdm

    from gencli.prep.run import prepare
    from gencli.prep.spec import PrepSpec

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, unit=" conversations", desc="prep chitchat", file=sys.stderr)
        bar.update(done - bar.n)

    try:
        res = prepare(PrepSpec(source="chitchat", out=str(data), format="chatml", loss_mask=True), progress=progress)
    finally:
        if bar is not None:
            bar.close()
    counts = res.meta["counts"]
    what = "up to date" if res.skipped else "written"
    click.echo(f"[1/4] dataset {data}: {what}; " + ", ".join(
        f"{split} {c['conversations']} conversations / {c['tokens']:,} tokens" for split, c in counts.items()), err=True)


def train_step(data: Path, model: Path, max_iters: int | None) -> None:
    from gencli.model.train import TrainConfig, read_state, reuse_freed_memory, train

    # The loss only on the assistant's tokens, as chat models are tuned: trained on every token, a
    # model this small learns that a turn marker follows a newline, and with <|im_start|> ending a
    # reply (as it must) most of its replies ended before their first token.
    cfg = TrainConfig(assistant_only=True)
    if max_iters:
        cfg.max_iters = max_iters
        cfg.eval_interval = min(cfg.eval_interval, max_iters)
    state = read_state(model) if (model / "train_state.pt").exists() else None
    if state is not None and not state["config"].get("assistant_only"):  # a demo model of gencli < 0.2.1
        click.echo(f"[2/4] model {model}: trained on every token by an older gencli; training it again", err=True)
        shutil.rmtree(model)
        state = None
    resume = state is not None
    if resume and state["iter_num"] >= cfg.max_iters:
        click.echo(f"[2/4] model {model}: trained already", err=True)
        return
    click.echo(f"[2/4] training the tiny model on it (a few minutes on 2 CPU cores){' (resuming)' if resume else ''}",
               err=True)
    reuse_freed_memory()
    result = train(data, model, cfg, resume=resume, progress=lambda event: click.echo(f"  {event}", err=True))
    click.echo(f"[2/4] model {model}: val loss {result.val_loss:.3f} vs unigram baseline {result.baseline:.3f}",
               err=True)


def worker_step(client: Client, model: Path, log: Path) -> subprocess.Popen | None:
    if client.live_workers(queue_for(MODEL_NAME)):
        click.echo(f"[3/4] a worker already serves {MODEL_NAME}", err=True)
        return None
    env = dict(os.environ, GENCLI_REDIS_URL=client.redis_url)
    proc = subprocess.Popen([sys.executable, "-m", "gencli.cli", "worker", "--model", str(model), "--device", "auto"],
                            env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not client.live_workers(queue_for(MODEL_NAME)):
        if proc.poll() is not None:
            raise GencliError(f"the worker exited with {proc.returncode}: see {log}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise GencliError(f"the worker did not come up in 120 s: see {log}")
        time.sleep(0.2)
    click.echo(f"[3/4] started a worker for {MODEL_NAME} (log: {log})", err=True)
    return proc


@click.command()
@click.option("--prompt_file", "--prompt-file", "prompt_file", default=None,
              help="Prompts, one per line (default: three built-in ones).")
@click.option("--max_tokens", "--max-tokens", "max_tokens", type=click.IntRange(min=1), default=60, show_default=True)
@click.option("--train-iters", "--train_iters", "train_iters", type=click.IntRange(min=1), default=None,
              help="Training iterations (default: the tiny preset's full run).")
@click.option("--keep-worker", is_flag=True, help="Leave the worker running afterwards.")
@click.pass_context
def demo(ctx, prompt_file, max_tokens, train_iters, keep_worker):
    """Prep chitchat, train a tiny model once, serve it, and stream replies to a few prompts."""
    from gencli.worker.prompts import PromptItem, read_prompt_file

    items = (read_prompt_file(prompt_file, each_line=True) if prompt_file
             else [PromptItem(p, n) for n, p in enumerate(PROMPTS, start=1)])
    base = get_settings().home / "demo"
    data, model = base / "data" / "chitchat-chatml", base / "models" / MODEL_NAME
    base.mkdir(parents=True, exist_ok=True)
    client = _client()
    _ = client.redis_url  # Redis first (started when none answers): a machine without one says so now, not after
    #                       training
    prep_step(data)
    train_step(data, model, train_iters)
    proc = worker_step(client, model, base / "worker.log")
    try:
        job = client.submit(items, model=MODEL_NAME, chat=True, max_tokens=max_tokens, temperature=0.8, top_k=50,
                            seed=0)
        click.echo(f"[4/4] job {job.id}: {len(items)} prompt(s); gencli tail {job.id} shows it again", err=True)
        code = _tail(client, job.id, line=None, after=0, cancel_on_interrupt=False)
    finally:
        if proc is not None and not keep_worker:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    ctx.exit(code)
