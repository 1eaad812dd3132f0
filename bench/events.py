"""What Celery's task events cost (they are what Flower shows): the same work with
GENCLI_TASK_EVENTS=1 (the default: task events from submitters and workers, workers' event
heartbeats) and =0, side by side in one run.

    python -m bench.events            # about a minute on 2 cores
    python -m bench.events --json     # the same, with one JSON object as the last line of stdout
    python -m bench.events --quick    # smoke run: one repetition, fewer jobs

Each repetition starts a `gencli worker` (the tiny preset model, CPU) with events on, then one
with them off (alternating, so drift hits both alike), and measures with a client of the same
setting:
- submits/s: --submits single-prompt jobs for a model no worker serves, recorded and enqueued
  (the submit side's cost: one more publish per job, its "task-sent" event);
- jobs/s end to end: --jobs single-prompt jobs of one new token each, submitted at once, until
  the store has them all succeeded (the worker's cost: received, started and succeeded events).
The figures are the medians over the repetitions, and the ratios off / on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from bench._services import BenchEnv, log, median

MODEL = "bench-events"


def measure(env: BenchEnv, model_dir, *, events: bool, submits: int, jobs: int, rep: int) -> dict:
    from gencli.storage.settings import get_settings
    from gencli.worker.client import Client

    flag = "1" if events else "0"
    name = f"ev{flag}-{rep}@bench"
    cmd = [sys.executable, "-m", "gencli.cli", "worker", "--model", str(model_dir), "--device", "cpu", "--name", name,
           "--model-name", MODEL, "--batch_size", "8", "--threads", "1"]
    p = env.start(cmd, f"worker-{name}", GENCLI_TASK_EVENTS=flag)
    p.wait_for(lambda: env.r.get(env.keys.worker(name)) is not None and "ready" in p.text(), 120, name)
    try:
        client = Client(dataclasses.replace(get_settings(), task_events=events))
        t0 = time.perf_counter()
        for i in range(submits):
            client.submit([f"unserved {i}"], model=f"{MODEL}-unserved", max_tokens=1)
        submit_rate = submits / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        ids = [client.submit([f"Prompt {i}"], model=MODEL, max_tokens=1, temperature=0).id for i in range(jobs)]
        while sum(client.job(j).status.done for j in ids) < len(ids):
            time.sleep(0.05)
        job_rate = jobs / (time.perf_counter() - t0)
        assert all(client.job(j).status.value == "succeeded" for j in ids)
        return {"submits_per_s": submit_rate, "jobs_per_s": job_rate}
    finally:
        p.stop()
        env.procs.remove(p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--submits", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=150)
    ap.add_argument("--db", type=int, default=13)
    ap.add_argument("--quick", action="store_true", help="smoke run: one repetition, fewer jobs")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.submits, args.jobs = 1, 50, 30
    env = BenchEnv(args.db, "gencli-bench-events-")
    try:
        from gencli.model.checkpoint import create_model

        model_dir = create_model(env.tmp / "tiny", preset="tiny", tokenizer="cl100k_base", chat_format="chatml",
                                 seed=0)
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for rep in range(args.reps):
            for events in (True, False):
                got = measure(env, model_dir, events=events, submits=args.submits, jobs=args.jobs, rep=rep)
                log(f"rep {rep} events {'on' if events else 'off'}: {got['submits_per_s']:.0f} submits/s, "
                    f"{got['jobs_per_s']:.1f} jobs/s")
                runs[events].append(got)
        res = {}
        for key in ("submits_per_s", "jobs_per_s"):
            on, off = median([r[key] for r in runs[True]]), median([r[key] for r in runs[False]])
            res[key] = {"events_on": round(on, 1), "events_off": round(off, 1), "off_over_on": round(off / on, 3)}
        res["reps"] = args.reps
        if args.json:
            print(json.dumps(res))
        else:
            print(f"{'':<16} {'events on':>10} {'events off':>11} {'off / on':>9}")
            for key in ("submits_per_s", "jobs_per_s"):
                r = res[key]
                print(f"{key:<16} {r['events_on']:>10.1f} {r['events_off']:>11.1f} {r['off_over_on']:>9.3f}")
        return 0
    finally:
        env.close()


if __name__ == "__main__":
    sys.exit(main())
