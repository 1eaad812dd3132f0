"""A real CUDA out-of-memory, where a GPU is present (skipped elsewhere, with the reason)."""

from __future__ import annotations

import dataclasses

import pytest
import redis
import torch

from gencli.model.checkpoint import create_model, load_model
from gencli.storage.db import JobStatus
from gencli.storage.settings import get_settings
from gencli.storage.store import Store
from gencli.worker.client import Client
from gencli.worker.context import WorkerContext
from gencli.worker.runner import run_generation_job

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("queue_env"),
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA GPU here: the real out-of-memory ladder is tested only on a GPU"),
]


def test_real_cuda_out_of_memory_goes_down_the_ladder(env, tmp_path):
    path = create_model(tmp_path / "m", preset="small", tokenizer="cl100k_base", chat_format="chatml")
    loaded = load_model(path, device="cuda:0")
    # no lease thread runs in this process to renew the claim: a lease longer than the run, so that
    # the worker's lease clock (worker/running.py LeaseClock) does not hold its events back
    settings = dataclasses.replace(get_settings(), lease_seconds=600.0)
    client = Client(settings)
    job = client.submit(["word " * 300] * 32, model="gpu-oom", max_tokens=150, temperature=0)
    ctx = WorkerContext(settings=settings, store=Store(settings.db_url), redis=redis.Redis.from_url(client.redis_url),
                        keys=client.keys, model_name="gpu-oom", loaded=loaded, worker_name="gpu-test", slots=32)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info(0)
    # Cap this process a little above what the model and its 32-slot KV cache take: 32 rows'
    # prefill activations and logits do not fit, a single row's do.
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(0) + 8 * 2**20) / total, 0)
    try:
        assert run_generation_job(ctx, job.id) == "succeeded"
        rec = job.record()
        assert job.status is JobStatus.SUCCEEDED
        assert rec.oom_retries >= 1 and rec.final_batch_size < 32
        assert all(r["usage"]["completion_tokens"] for r in job.result())
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
