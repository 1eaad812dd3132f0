"""Micro-batching on one CPU worker: 64 prompts as one job against 64 single-prompt jobs.

Run from the repository root:

    python -m bench.batch                    # one worker at --batch_size 32; about 3-4 minutes on 2 cores
    python -m bench.batch --quick            # smoke test: 16 prompts x 16 new tokens
    python -m bench.batch --sweep 8,16,32,64 # the one-job way at each worker --batch_size (a worker each)
    python -m bench.batch --json             # the same, with one JSON object as the last line of stdout

Target (spec): 64 prompts x 64 new tokens as one micro-batched job vs 64 single-prompt jobs on
one CPU worker: throughput ratio >= 2x.

One `gencli worker` subprocess serves the `small` preset model (random weights, cl100k_base,
ChatML), greedy decoding, on a Redis database of the benchmark's own (15 by default, flushed at
start and end), a temporary GENCLI_HOME and SQLite store. Each way is timed from the first
`Client.submit` call until every job is done: the one job's stream, or the last single job's
stream (one worker takes its queue in order) followed by a check that all 64 ended; tokens are
the completion tokens of the results. The ways alternate over the repetitions (median). For
reference it also times the engine in this process, the same two ways (`TextGenerator.generate`
at the worker's batch size over all prompts, and one prompt at a time over the first 16), with
the worker's torch thread count (1 by default: see --threads).

The worker's --batch_size defaults to 32 here: a sweep (--sweep 4,8,16,32,64) on a 2-core machine
gave about 170, 270, 380, 960 and 900 tokens/s for the one job (the LM head over a 100k vocabulary
is most of the model and is read once per step whatever the batch, so wider steps amortise it;
at 64 the per-step (batch, vocab) logits work catches up). Any of them meets the 2x target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from bench._services import BenchEnv, log, median, prompts, small_model, worker_threads

MODEL = "bench-batch"
TARGET_RATIO = 2.0


def run_batched(client, texts: list[str], max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    job = client.submit(texts, model=MODEL, max_tokens=max_tokens, temperature=0)
    for _ in job.events():
        pass
    dt = time.perf_counter() - t0
    if job.status.value != "succeeded":
        raise RuntimeError(f"the batched job ended {job.status.value}")
    return dt, sum(r["usage"]["completion_tokens"] or 0 for r in job.result())


def run_singles(client, texts: list[str], max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    jobs = [client.submit([p], model=MODEL, max_tokens=max_tokens, temperature=0) for p in texts]
    for _ in jobs[-1].events():
        pass
    for j in jobs:  # normally all done already: one worker runs its queue in order
        j.wait(timeout=120, poll=0.02)
    dt = time.perf_counter() - t0
    bad = [j.id for j in jobs if j.status.value != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} single jobs did not succeed, e.g. {bad[0]}")
    return dt, sum(j.result()[0]["usage"]["completion_tokens"] or 0 for j in jobs)


def inproc(gen, texts: list[str], sp, batch_size: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    ids = [gen.fit(gen.encode(p, chat=False), sp.max_tokens, truncate=False) for p in texts]
    n = 0
    for k in range(0, len(ids), batch_size):
        n += sum(len(s.ids) for s in gen.generate(ids[k:k + batch_size], sp))
    return time.perf_counter() - t0, n


def warm_up(client, max_tokens: int) -> None:
    client.submit(["warm up"], model=MODEL, max_tokens=4, temperature=0).wait(60, poll=0.02)
    client.submit(prompts(4), model=MODEL, max_tokens=4, temperature=0).wait(60, poll=0.02)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="end with one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="smoke test: 16 prompts x 16 new tokens, one repetition")
    ap.add_argument("--db", type=int, default=15, help="Redis database number of the benchmark's own")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32,
                    help="the worker's --batch_size (32: the best of 4..64 in a sweep here; gencli's default is 8)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the worker (OMP_NUM_THREADS) and in-process; 0: the worker's own default "
                         "(all cores). Default 1: on a 2-core machine the tailer and the worker run at once, and 2 "
                         "intra-op threads stall each other whenever anything else runs")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions of each way")
    ap.add_argument("--no-inproc", action="store_true", help="skip the in-process reference")
    ap.add_argument("--sweep", default="", help="comma-separated worker batch sizes to time the one-job way at")
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.max_tokens, a.reps = 16, 16, 1
    sweep = [int(x) for x in a.sweep.split(",") if x.strip()]

    t_all = time.perf_counter()
    env = BenchEnv(a.db, "gencli-bench-batch-")
    result: dict = {"bench": "batch", "redis": env.url, "loadavg_start": os.getloadavg()[0]}
    try:
        from gencli.model.checkpoint import load_model
        from gencli.model.params import SamplingParams
        from gencli.model.textgen import TextGenerator
        from gencli.storage.settings import get_settings
        from gencli.worker.client import Client

        log(f"redis {env.url}, tmp {env.tmp}")
        model_dir = small_model(env.tmp, "small")
        client = Client(get_settings(), start_redis=False)
        texts = prompts(a.prompts)
        total = a.prompts * a.max_tokens

        log(f"worker --batch_size {a.batch_size}: {a.prompts} prompts x {a.max_tokens} tokens, {a.reps} reps ...")
        w = env.start_worker(model_dir, "w1@bench", model_name=MODEL, batch_size=a.batch_size, threads=a.threads or None)
        threads = a.threads or worker_threads(w) or torch.get_num_threads()
        warm_up(client, a.max_tokens)
        b_t, s_t, b_n, s_n = [], [], [], []
        for rep in range(a.reps):
            order = ("batched", "singles") if rep % 2 == 0 else ("singles", "batched")
            for way in order:
                if way == "batched":
                    dt, n = run_batched(client, texts, a.max_tokens)
                    b_t.append(dt)
                    b_n.append(n)
                else:
                    dt, n = run_singles(client, texts, a.max_tokens)
                    s_t.append(dt)
                    s_n.append(n)
                log(f"  {way}: {n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s)")
                time.sleep(0.2)
        b_rate = median([n / t for n, t in zip(b_n, b_t)])
        s_rate = median([n / t for n, t in zip(s_n, s_t)])
        w.stop()

        sweep_rows = []
        for bs in sweep:
            log(f"sweep: worker --batch_size {bs} ...")
            ws = env.start_worker(model_dir, f"sweep{bs}@bench", model_name=MODEL, batch_size=bs, threads=a.threads or None)
            try:
                warm_up(client, a.max_tokens)
                ts, ns = [], []
                for _ in range(a.reps):
                    dt, n = run_batched(client, texts, a.max_tokens)
                    ts.append(dt)
                    ns.append(n)
                rate = median([n / t for n, t in zip(ns, ts)])
                sweep_rows.append({"batch_size": bs, "seconds": median(ts), "tokens_per_s": rate,
                                   "ratio_vs_singles": rate / s_rate})
                log(f"  batch_size {bs}: {rate:.1f} tokens/s")
            finally:
                ws.stop()

        ref = None
        if not a.no_inproc:
            log("in-process reference ...")
            torch.set_num_threads(threads)
            gen = TextGenerator(load_model(model_dir))
            sp = SamplingParams(max_tokens=a.max_tokens, temperature=0)
            inproc(gen, texts[:4], sp, 4)  # warm-up
            tb, nb = inproc(gen, texts, sp, a.batch_size)
            ts1, ns1 = inproc(gen, texts[:16], sp, 1)  # a quarter: its tokens/s is what counts
            ref = {"batched_tokens_per_s": nb / tb, "singles_tokens_per_s": ns1 / ts1,
                   "ratio": (nb / tb) / (ns1 / ts1), "batched_s": tb, "singles_s": ts1}

        result.update({
            "config": {"model": "small preset (4 layers, 128 wide, vocab 100288), random weights, cl100k_base",
                       "prompts": a.prompts, "max_tokens": a.max_tokens, "batch_size": a.batch_size,
                       "threads": threads, "reps": a.reps, "quick": a.quick},
            "figures": {
                "batched_tokens_per_s": b_rate, "singles_tokens_per_s": s_rate, "ratio": b_rate / s_rate,
                "batched_seconds": median(b_t), "singles_seconds": median(s_t),
                "batched_seconds_all": b_t, "singles_seconds_all": s_t,
                "tokens_expected": total, "batched_tokens": b_n, "singles_tokens": s_n,
                "singles_seconds_per_job": median(s_t) / a.prompts,
            },
            "inproc_reference": ref,
            "sweep": sweep_rows,
            "target": {"value": b_rate / s_rate, "op": ">=", "target": TARGET_RATIO, "pass": b_rate / s_rate >= TARGET_RATIO},
        })
    finally:
        env.close()
    result["elapsed_s"] = time.perf_counter() - t_all
    result["loadavg_end"] = os.getloadavg()[0]
    report(result)
    if a.json:
        print(json.dumps(result))
    return 0


def report(res: dict) -> None:
    c, f, t, ref = res["config"], res["figures"], res["target"], res["inproc_reference"]
    print(f"gencli micro-batching benchmark ({res['redis']}, one CPU worker, {c['threads']} torch thread(s),"
          f" {res['elapsed_s']:.0f} s; load average {res['loadavg_start']:.1f} at start, {res['loadavg_end']:.1f} at end)")
    print(f"model: {c['model']}")
    print(f"{c['prompts']} prompts x {c['max_tokens']} new tokens, greedy; submit -> all done; median of {c['reps']}")
    print()
    print(f"  one job, worker --batch_size {c['batch_size']:<3} {f['batched_tokens_per_s']:8.1f} tokens/s"
          f"  ({f['batched_seconds']:.2f} s)")
    print(f"  {c['prompts']} single-prompt jobs           {f['singles_tokens_per_s']:8.1f} tokens/s"
          f"  ({f['singles_seconds']:.2f} s, {f['singles_seconds_per_job'] * 1e3:.0f} ms/job)")
    print(f"  throughput ratio                {t['value']:8.2f}x        target >= {t['target']:g}x  "
          f"{'PASS' if t['pass'] else 'FAIL'}")
    if ref:
        print(f"  in-process engine, same two ways: {ref['batched_tokens_per_s']:.1f} vs {ref['singles_tokens_per_s']:.1f}"
              f" tokens/s, ratio {ref['ratio']:.2f}x")
    if res["sweep"]:
        print()
        print("  one job at other worker batch sizes (ratio vs the singles above):")
        for row in res["sweep"]:
            print(f"    --batch_size {row['batch_size']:<3} {row['tokens_per_s']:8.1f} tokens/s  ({row['seconds']:.2f} s)"
                  f"  {row['ratio_vs_singles']:.2f}x")
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
