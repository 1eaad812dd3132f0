"""Scoring speed on the CPU: gencli's engine against transformers' forward, and the queue's scoring job.

Run from the repository root (needs the dev extra: transformers):

    python -m bench.score            # full run: GPT-2-small-sized model, 8 windows of 512 ids
    python -m bench.score --quick    # smoke test: the small preset, 4 windows of 128 ids
    python -m bench.score --json     # the same, with one JSON object as the last line of stdout

The model has GPT-2 small's shape (12 layers, 768 wide, 12 heads, 1024 positions; random weights
from a fixed seed) over the cl100k_base tokenizer, as bench.concurrent's (163M parameters: its LM
head is twice GPT-2's). The windows are random ordinary ids, each scored from its second id (as
`gencli score --data` scores a split): every scored position's log-softmax over the whole vocabulary,
the window's id picked out. Measured side by side in this one run, on --threads threads, the ways
taking turns over --reps repetitions (median):

1. gencli's engine in this process, as a worker runs it (the windows prefilled together, their
   prompt logprobs computed) against transformers' GPT2LMHeadModel holding a copy of the same
   weights, its forward over the same windows in one batch, then log_softmax and gather
   (target: gencli >= 1.2x transformers' scored tokens/s);
2. the same windows as a scoring job through a real `gencli worker` (Redis, SQLite store), from
   submit to the job's end, against gencli in-process (target: >= 0.9x);
3. exactness: the job's stored logprobs equal the engine's in this process bit for bit, and
   transformers' within 1e-4 nats per token (the largest difference is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from bench._services import BenchEnv, log, median

MODEL = "bench-score"
TARGET_VS_TRANSFORMERS = 1.2
TARGET_QUEUE = 0.9


def windows_of(n: int, size: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100_000, (n, size), generator=g).tolist()  # ordinary cl100k ids


def gencli_scores(gen, windows) -> tuple[float, list[list[float]]]:
    """Seconds, and each window's logprobs from its second id on, on the engine as a worker runs it."""
    from gencli.model.params import SamplingParams

    t0 = time.perf_counter()
    batch = gen.stream(windows, SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=0))
    for _ in batch:
        pass
    dt = time.perf_counter() - t0
    return dt, [[lp.logprob for lp in s.prompt_logprobs[1:]] for s in batch.seqs]


def transformers_scores(hf, windows) -> tuple[float, torch.Tensor]:
    """Seconds, and each window's logprobs from its second id on (B, T-1), by transformers' forward."""
    ids = torch.tensor(windows)
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = hf(ids).logits
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return time.perf_counter() - t0, lp


def queued_scores(client, windows) -> tuple[float, list[list[float]]]:
    from gencli.worker.prompts import PromptItem

    lines = [PromptItem({"token_ids": w, "from": 1}, n + 1) for n, w in enumerate(windows)]
    t0 = time.perf_counter()
    job = client.submit_score(lines, model=MODEL)
    status = job.wait(1800, poll=0.02)
    dt = time.perf_counter() - t0
    if status.value != "succeeded":
        raise SystemExit(f"the scoring job {job.id} {status.value}: {job.record().error_message}")
    return dt, [[e[1] for e in it.logprobs["prompt"][1:]] for it in job.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="end with one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="smoke test: the small preset, 4 windows of 128 ids")
    ap.add_argument("--db", type=int, default=12, help="Redis database number of the benchmark's own")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--size", type=int, default=512, help="ids per window")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    preset = "gpt2"
    if a.quick:
        preset, a.windows, a.size, a.reps = "small", 4, 128, 1
    torch.set_num_threads(a.threads)

    from bench.decode import to_transformers
    from gencli.model.checkpoint import create_model, load_model
    from gencli.model.textgen import TextGenerator
    from gencli.storage.settings import get_settings
    from gencli.worker.client import Client

    env = BenchEnv(a.db, "gencli-bench-score-")
    result: dict = {"bench": "score", "preset": preset, "windows": a.windows, "size": a.size, "threads": a.threads,
                    "loadavg_start": os.getloadavg()[0]}
    try:
        model_dir = create_model(env.tmp / preset, preset=preset, tokenizer="cl100k_base", chat_format="chatml",
                                 seed=0)
        loaded = load_model(model_dir)
        gen = TextGenerator(loaded)
        hf = to_transformers(load_model(model_dir).model.train())  # the plain weights, copied
        windows = windows_of(a.windows, a.size, seed=1)
        scored = a.windows * (a.size - 1)
        log(f"{preset}: {a.windows} windows of {a.size} ids, {scored} scored positions, {a.threads} threads")
        gencli_scores(gen, windows[:1])  # warm-ups
        transformers_scores(hf, windows[:1])
        times = {"gencli": [], "transformers": [], "queue": []}
        client = Client(get_settings(), start_redis=False)
        env.start_worker(model_dir, "scorer@bench", model_name=MODEL, batch_size=a.windows,
                         threads=a.threads)
        queued_scores(client, windows[:1])
        for rep in range(a.reps):
            for way in ("gencli", "transformers", "queue") if rep % 2 == 0 else ("queue", "transformers", "gencli"):
                if way == "gencli":
                    dt, ours = gencli_scores(gen, windows)
                elif way == "transformers":
                    dt, theirs = transformers_scores(hf, windows)
                else:
                    dt, queued = queued_scores(client, windows)
                times[way].append(dt)
                log(f"   {way:<13} {dt:6.2f} s  {scored / dt:8.1f} scored tokens/s")
        rate = {k: scored / median(v) for k, v in times.items()}
        diff = (torch.tensor(ours) - theirs).abs().max().item()
        result |= {
            "scored_tokens_per_s": rate,
            "vs_transformers": rate["gencli"] / rate["transformers"],
            "queue_vs_in_process": rate["queue"] / rate["gencli"],
            "queue_equals_in_process": queued == ours,
            "max_abs_diff_vs_transformers": diff,
            "loadavg_end": os.getloadavg()[0],
        }
    finally:
        env.close()
    ok = {"vs_transformers": result["vs_transformers"] >= TARGET_VS_TRANSFORMERS,
          "queue": result["queue_vs_in_process"] >= TARGET_QUEUE,
          "exact": result["queue_equals_in_process"] and result["max_abs_diff_vs_transformers"] <= 1e-4}
    result["pass"] = ok
    r = result["scored_tokens_per_s"]
    print(f"scoring, {preset}, {a.windows} x {a.size} ids, {a.threads} threads (scored tokens/s, median of {a.reps}):")
    print(f"  gencli engine  {r['gencli']:8.1f}")
    print(f"  transformers   {r['transformers']:8.1f}   gencli {result['vs_transformers']:.2f}x "
          f"(target >= {TARGET_VS_TRANSFORMERS}x) {'PASS' if ok['vs_transformers'] else 'MISS'}")
    print(f"  queue job      {r['queue']:8.1f}   {result['queue_vs_in_process']:.2f}x in-process "
          f"(target >= {TARGET_QUEUE}x) {'PASS' if ok['queue'] else 'MISS'}")
    print(f"  queue logprobs equal in-process bit for bit: {result['queue_equals_in_process']}; largest difference "
          f"from transformers {result['max_abs_diff_vs_transformers']:.2e} nats {'PASS' if ok['exact'] else 'FAIL'}")
    if a.json:
        print(json.dumps(result))
    return 0 if ok["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
