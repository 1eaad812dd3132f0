"""`gencli worker` (one pinned worker process) and `gencli workers` (one per GPU or CPU slot)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import click

from gencli.cli.options import dtype_option
from gencli.model.device import inventory
from gencli.model.errors import GencliError
from gencli.storage.settings import get_settings

_model = click.option("--model", "model_path", envvar="GENCLI_MODEL", required=True,
                      help="Checkpoint to serve (gencli dir, nanoGPT ckpt.pt, Hugging Face GPT-2 dir).")
_model_optional = click.option("--model", "model_path", envvar="GENCLI_MODEL", default=None,
                               help="Checkpoint to serve (gencli dir, nanoGPT ckpt.pt, Hugging Face GPT-2 dir).")
_name = click.option("--model-name", "--model_name", "model_name", default=None,
                     help="Name jobs use for this model (default: the checkpoint's file or dir name).")
_batch = click.option("--batch_size", "--batch-size", "batch_size", type=click.IntRange(min=1), default=8,
                      show_default=True, help="Sequences decoded together, over all jobs (the engine's slots).")
_max_jobs = click.option("--max-jobs", "--max_jobs", "max_jobs", type=click.IntRange(min=1), default=None,
                         help="Jobs held at once, decoded in one batch [default: --batch_size; 1 for --prep alone].")
_per_job = click.option("--max-slots-per-job", "--max_slots_per_job", "max_slots_per_job",
                        type=click.IntRange(min=1), default=None,
                        help="Slots one job may hold, so others find room [default: 3/4 of --batch_size "
                             "from 4 slots up, else all].")
_tok = click.option("--tokenizer", default=None, help="Override the model's tokenizer.")
_fmt = click.option("--chat-format", "--chat_format", "chat_format", type=click.Choice(["chatml", "legacy"]),
                    default=None)


@click.command()
@_model_optional
@_name
@click.option("--prep", is_flag=True, help="Also serve dataset-prep jobs (alone, without --model: only those).")
@click.option("--device", envvar="GENCLI_DEVICE", default="auto", show_default=True,
              help="auto, cpu, cuda, cuda:N or mps.")
@dtype_option
@click.option("--queues", default="", help="Extra queues to serve, comma-separated (the model's own is always served).")
@click.option("--name", default=None,
              help="Worker name, unique among live workers (default: device.pid@host, e.g. gpu0.4242@host).")
@_batch
@_max_jobs
@_per_job
@_tok
@_fmt
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's, usually one per core).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(model_path, model_name, prep, device, dtype, queues, name, batch_size, max_jobs, max_slots_per_job,
           tokenizer, chat_format, threads, loglevel):
    """Serve one model's jobs on one device, and/or dataset prep, until stopped (SIGTERM finishes the running jobs)."""
    from gencli.worker.serve import serve

    if threads:
        import torch

        torch.set_num_threads(threads)
    extra = tuple(q for q in (x.strip() for x in queues.split(",")) if q)
    code = serve(get_settings(), model_path=model_path, model_name=model_name, device=device, dtype=dtype, name=name,
                 batch_size=batch_size, max_jobs=max_jobs, max_slots_per_job=max_slots_per_job, tokenizer=tokenizer,
                 chat_format=chat_format, prep=prep, extra_queues=extra, loglevel=loglevel)
    if code:  # Celery said why in the log above ("Unrecoverable error: ..."); a supervisor restarts it
        raise SystemExit(code)


@click.command()
@_model
@_name
@click.option("--gpus", default=None, help="all, or GPU indices like 0,1: one worker per GPU.")
@click.option("--cpus", type=click.IntRange(min=1), default=None, help="N CPU workers.")
@dtype_option
@_batch
@_max_jobs
@_per_job
@_tok
@_fmt
def workers(model_path, model_name, gpus, cpus, dtype, batch_size, max_jobs, max_slots_per_job, tokenizer, chat_format):
    """Start one pinned worker per GPU (or N CPU workers) and restart any that dies."""
    if (gpus is None) == (cpus is None):
        raise click.UsageError("give --gpus or --cpus")
    devices = _gpu_devices(gpus) if gpus is not None else ["cpu"] * cpus
    host = os.uname().nodename
    tag = os.getpid()  # names unique per supervisor: two on one host never collide
    base = [sys.executable, "-m", "gencli.cli", "worker", "--model", model_path, "--batch_size", str(batch_size)]
    for flag, value in (("--model-name", model_name), ("--dtype", dtype), ("--tokenizer", tokenizer),
                        ("--chat-format", chat_format), ("--max-jobs", max_jobs),
                        ("--max-slots-per-job", max_slots_per_job)):
        if value:
            base += [flag, str(value)]
    specs = []
    for n, dev in enumerate(devices):
        label = f"cpu{n}" if dev == "cpu" else dev.replace("cuda:", "gpu")
        env = dict(os.environ)
        if dev != "cpu":  # pin the GPU: the worker sees only its own
            env["CUDA_VISIBLE_DEVICES"] = dev.split(":")[1]
            dev = "cuda:0"
        cmd = base + ["--device", dev, "--name", f"{label}.{tag}@{host}"]
        if dev == "cpu":  # share the cores out
            cmd += ["--threads", str(max(1, (os.cpu_count() or 1) // len(devices)))]
        specs.append((f"{label}.{tag}@{host}", cmd, env))
    supervise(specs)


def _gpu_devices(gpus: str) -> list[str]:
    n = len(inventory().cuda_free)
    if gpus == "all":
        if n == 0:
            raise GencliError("--gpus all: no CUDA GPU is visible; use --cpus N")
        return [f"cuda:{i}" for i in range(n)]
    try:
        ids = [int(x) for x in gpus.split(",") if x.strip()]
    except ValueError:
        raise GencliError(f"--gpus takes all or indices like 0,1, not {gpus!r}") from None
    bad = [i for i in ids if not 0 <= i < n]
    if not ids or bad:
        raise GencliError(f"--gpus {gpus}: this machine has {n} CUDA GPU(s)")
    return [f"cuda:{i}" for i in ids]


def supervise(specs: list[tuple[str, list[str], dict]]) -> None:
    """Run the worker processes (name, command, env); restart one that dies; pass SIGINT/SIGTERM on."""
    procs = [subprocess.Popen(cmd, env=env) for _, cmd, env in specs]
    stopping = False

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    click.echo(f"started {len(procs)} worker(s): " + ", ".join(name for name, _, _ in specs), err=True)
    while not stopping:
        for n, p in enumerate(procs):
            if p.poll() is not None and not stopping:
                name, cmd, env = specs[n]
                click.echo(f"worker {name} exited with {p.returncode}; restarting", err=True)
                time.sleep(1)
                procs[n] = subprocess.Popen(cmd, env=env)
        time.sleep(0.5)
    for p in procs:
        p.wait()
