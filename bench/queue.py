"""The queue's overhead: gencli's whole path against its engine in-process, and against a Celery floor.

Run from the repository root:

    python -m bench.queue            # full run, about 2-3 minutes on 2 cores
    python -m bench.queue --quick    # smoke test: fewer repetitions and submissions
    python -m bench.queue --json     # the same, with one JSON object as the last line of stdout

Everything runs in this one run, on a Redis database of its own (14 by default, flushed at
start and end; a private redis-server when nothing answers at 127.0.0.1:6379), a temporary
GENCLI_HOME and SQLite store, one `gencli worker` subprocess serving the `small` preset model
(random weights, cl100k_base, ChatML) and, for the floor, one Celery worker running no-op tasks
(bench/_noop_app.py, gencli's broker settings). Every process it starts is stopped at the end.

Figures (targets from the spec):
- tokens/s ratio, queued / in-process (>= 0.9): the same prompts (8 x 64 new tokens, greedy)
  through submit -> worker -> pub/sub -> tailer (`Client.submit`, then `job.stream()` to the
  end; timed from the submit call), and through `TextGenerator.generate` in this process with
  the worker's micro-batch size (--batch-size, 8: gencli's default) and torch thread count
  (--threads, 1 by default: see its help) (encoding included, as the worker does);
  repetitions alternate, and the figure is the median over the pairs of (queued tokens/s) /
  (in-process tokens/s of the run just before); tokens are the completion tokens of the results.
- added time to first token, p50 (<= 15 ms) and p99: single-prompt jobs submitted one at a time
  to an idle worker, submit call -> first delta of `job.events()` (what `job.stream()` filters),
  minus the in-process time to the first delta of the same prompt (encode, prefill, first step);
  in-process and queued samples alternate.
- a 1,000-line prompt file accepted and recorded (<= 2 s): `read_prompt_file(each_line=True)` +
  `Client.submit` for a model no worker serves, until submit returns; the store must hold 1,000
  items. Measured with the model's description in Redis (the context check that a served
  model gets: every line tokenized) and without it (no check).
- 1,000 single-prompt submissions through the Python API (>= 300 jobs/s), the same two ways.
- the floor: a Celery no-op round trip (send_task + result backend) p50/p99, no-op tasks/s
  through one solo worker (a backlog queued while the worker is held busy, then drained),
  send_task enqueues/s from one client, Redis pub/sub one-way latency (subscriber thread,
  perf_counter timestamps in the messages), single PUBLISH/s; and, for reference, gencli's own
  per-step publish (XADD + PUBLISH + EXPIRE in MULTI/EXEC, one event) per second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import redis
import torch

from bench._services import BenchEnv, log, median, percentile, prompts, small_model, worker_threads

MODEL = "bench-small"  # what the worker serves
UNSERVED = "bench-unserved"  # a model no worker serves: submissions stay queued
UNSERVED_CHECKED = "bench-unserved-checked"  # no worker either, but described in Redis as MODEL is

TARGETS = {  # name: (comparison, target)
    "tokens_per_s_ratio": (">=", 0.9),
    "added_ttft_p50_ms": ("<=", 15.0),
    "prompt_file_1000_s": ("<=", 2.0),
    "single_submits_per_s": (">=", 300.0),
}
FLOOR_REFERENCE = {  # the spec's floor, measured elsewhere on loopback Redis
    "celery_round_trip_p50_ms": 3.9, "celery_round_trip_p99_ms": 7.0, "celery_noop_tasks_per_s": 360.0,
    "celery_enqueues_per_s": 860.0, "pubsub_one_way_p50_ms": 0.2, "publishes_per_s": 6800.0,
}


# --- the floor ------------------------------------------------------------------------------------

def measure_floor(env: BenchEnv, *, round_trips: int, backlog: int, pubsub_msgs: int, publishes: int) -> dict:
    from bench import _noop_app as noop

    w = env.start([sys.executable, "-m", "celery", "-A", "bench._noop_app", "worker", "--pool=solo", "-Q", noop.QUEUE,
                   "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=INFO",
                   "--hostname", "noop@bench"], "celery-noop", BENCH_NOOP_REDIS_URL=env.url)
    out: dict = {}
    try:
        w.wait_for(lambda: "ready" in w.text(), 60, "celery no-op worker")
        app = noop.app
        for _ in range(20):  # warm-up: connections, the result consumer
            app.send_task("bench.noop", queue=noop.QUEUE).get(timeout=10)
        rtt = []
        for _ in range(round_trips):
            t0 = time.perf_counter()
            app.send_task("bench.noop", queue=noop.QUEUE).get(timeout=10)
            rtt.append(time.perf_counter() - t0)
        out["celery_round_trip_p50_ms"] = percentile(rtt, 50) * 1e3
        out["celery_round_trip_p99_ms"] = percentile(rtt, 99) * 1e3

        # Throughput: hold the worker busy, queue mark + backlog no-ops + mark, let it drain.
        env.r.delete(noop.MARKS, noop.SLEPT)
        hold_s = max(3.0, backlog / 250)
        app.send_task("bench.hold", args=[hold_s], queue=noop.QUEUE)
        deadline = time.monotonic() + 10
        while env.r.llen(noop.QUEUE) and time.monotonic() < deadline:  # the worker has taken it
            time.sleep(0.005)
        t0 = time.perf_counter()
        app.send_task("bench.mark", queue=noop.QUEUE)
        for _ in range(backlog):
            app.send_task("bench.noop_fire", queue=noop.QUEUE)
        app.send_task("bench.mark", queue=noop.QUEUE)
        enq_s = time.perf_counter() - t0
        enq_end = time.time()
        out["celery_enqueues_per_s"] = (backlog + 2) / enq_s
        slept = env.r.blpop(noop.SLEPT, timeout=hold_s + 30)
        m1 = env.r.blpop(noop.MARKS, timeout=60)
        m2 = env.r.blpop(noop.MARKS, timeout=120)
        if not (slept and m1 and m2):
            raise RuntimeError(f"the no-op worker did not drain its backlog: {w.text()[-1500:]}")
        out["celery_noop_tasks_per_s"] = (backlog + 1) / (float(m2[1]) - float(m1[1]))
        out["celery_backlog_queued_before_drain"] = float(slept[1]) > enq_end  # else enqueue overlapped the drain
    finally:
        w.stop()

    # Pub/sub one-way latency: one message in flight at a time, a subscriber thread.
    sub = redis.Redis.from_url(env.url)
    ps = sub.pubsub(ignore_subscribe_messages=True)
    ps.subscribe("bench:ps")
    lat: list[float] = []
    got = threading.Event()
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            msg = ps.get_message(timeout=0.5)
            if msg is not None:
                lat.append(time.perf_counter_ns() - int(msg["data"]))
                got.set()

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    pub = redis.Redis.from_url(env.url)
    time.sleep(0.1)
    for i in range(pubsub_msgs + 50):
        got.clear()
        pub.publish("bench:ps", str(time.perf_counter_ns()))
        got.wait(2)
    stop.set()
    t.join(2)
    ps.close()
    sub.close()
    lat_ms = [x / 1e6 for x in lat[50:]]  # the first 50 warm up
    out["pubsub_one_way_p50_ms"] = percentile(lat_ms, 50)
    out["pubsub_one_way_p99_ms"] = percentile(lat_ms, 99)

    payload = json.dumps({"seq": 1, "t": "tok", "i": 0, "id": 1234, "text": " word", "finish": None})
    t0 = time.perf_counter()
    for _ in range(publishes):
        pub.publish("bench:ps:nobody", payload)
    out["publishes_per_s"] = publishes / (time.perf_counter() - t0)

    from gencli.worker.stream import Publisher

    p = Publisher(pub, env.keys, "bench-publisher", owner="bench", ttl=600)
    p.claim({"t": "start", "worker": "bench", "device": "cpu", "attempt": 1}, attempt=1)
    n = publishes // 2
    t0 = time.perf_counter()
    for _ in range(n):  # guarded: the owner and next-seq check in Redis, as a worker publishes
        p.publish([{"t": "tok", "i": 0, "e": 0, "id": 1234, "text": " word", "finish": None}])
    out["gencli_step_publishes_per_s"] = n / (time.perf_counter() - t0)
    pub.delete(env.keys.log("bench-publisher"), env.keys.owner("bench-publisher"))
    pub.close()
    return out


# --- gencli ---------------------------------------------------------------------------------------

def inproc_run(gen, texts: list[str], sp, batch_size: int) -> tuple[float, int, list[str]]:
    t0 = time.perf_counter()
    ids = [gen.fit(gen.encode(p, chat=False), sp.max_tokens, truncate=False) for p in texts]
    streams = []
    for k in range(0, len(ids), batch_size):
        streams += gen.generate(ids[k:k + batch_size], sp)
    dt = time.perf_counter() - t0
    return dt, sum(len(s.ids) for s in streams), [s.text for s in streams]


def queued_run(client, texts: list[str], max_tokens: int) -> tuple[float, int, list[str], str, float | None]:
    t0 = time.perf_counter()
    job = client.submit(texts, model=MODEL, max_tokens=max_tokens, temperature=0)
    for _ in job.stream():
        pass
    dt = time.perf_counter() - t0
    res = job.result(timeout=30)
    rec = job.record()  # the worker's own figure: tokens over its decode loop (publishing and saves included)
    return (dt, sum(r["usage"]["completion_tokens"] or 0 for r in res), [r["output"] for r in res], rec.status,
            rec.tokens_per_s)


def inproc_ttft(gen, text: str, sp) -> float:
    t0 = time.perf_counter()
    ids = gen.fit(gen.encode(text, chat=False), sp.max_tokens, truncate=False)
    it = iter(gen.stream([ids], sp))
    next(it)
    dt = time.perf_counter() - t0
    for _ in it:
        pass
    return dt


def queued_ttft(client, text: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    job = client.submit([text], model=MODEL, max_tokens=max_tokens, temperature=0)
    t_sub = time.perf_counter()
    t_start = t_first = None
    for e in job.events():
        if e["t"] == "start" and t_start is None:
            t_start = time.perf_counter()
        elif e["t"] == "tok" and t_first is None:
            t_first = time.perf_counter()
    if t_first is None:
        raise RuntimeError(f"job {job.id} streamed no token ({job.status.value})")
    return {"ttft": t_first - t0, "submit": t_sub - t0, "to_start": (t_start or t_first) - t0,
            "start_to_tok": t_first - (t_start or t_first)}


def measure_submits(env: BenchEnv, client, *, file_lines: int, file_reps: int, singles: int) -> dict:
    from gencli.worker.prompts import read_prompt_file

    info = env.r.get(env.keys.model_info(MODEL))
    if info is None:
        raise RuntimeError("the worker has not described its model in Redis")
    env.r.set(env.keys.model_info(UNSERVED_CHECKED), info)  # context check as for MODEL; nobody serves it
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "small", "birds", "sing", "in", "the", "old", "tree"]
    path = env.tmp / "prompts-1000.txt"
    path.write_text("".join(f"Line {n}: " + " ".join(words[(n + k) % len(words)] for k in range(12)) + "\n"
                            for n in range(file_lines)))
    for name in (UNSERVED, UNSERVED_CHECKED):  # warm-up: the tokenizer, the broker connection
        client.submit(["warm up"], model=name, max_tokens=8).cancel()
    out: dict = {}
    for name, key in ((UNSERVED_CHECKED, "checked"), (UNSERVED, "unchecked")):
        times = []
        for _ in range(file_reps):
            t0 = time.perf_counter()
            job = client.submit(read_prompt_file(str(path), each_line=True), model=name, max_tokens=64)
            times.append(time.perf_counter() - t0)
            n_items = len(client.store.items(job.id))
            rec = job.record()
            if n_items != file_lines or rec.n_items != file_lines:
                raise RuntimeError(f"the prompt file job {job.id} holds {n_items} items, not {file_lines}")
            job.cancel()
        out[f"prompt_file_s_{key}"] = median(times)
        out[f"prompt_file_s_{key}_all"] = times
        out[f"prompt_file_items_{key}"] = file_lines
    for name, key in ((UNSERVED_CHECKED, "checked"), (UNSERVED, "unchecked")):
        ids = []
        t0 = time.perf_counter()
        for n in range(singles):
            ids.append(client.submit([f"single prompt number {n}"], model=name, max_tokens=16).id)
        dt = time.perf_counter() - t0
        out[f"single_submits_per_s_{key}"] = singles / dt
        depth = sum(env.r.llen(k) for k in env.r.scan_iter(f"gen.{name}*"))
        out[f"single_submits_enqueued_{key}"] = depth
        for k in list(env.r.scan_iter(f"gen.{name}*")):  # clean: nothing will ever run them
            env.r.delete(k)
        for job_id in ids:
            client.store.request_cancel(job_id)
    return out


def verdict(name: str, value: float) -> bool:
    op, target = TARGETS[name]
    return value >= target if op == ">=" else value <= target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="end with one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="smoke test: fewer repetitions and submissions")
    ap.add_argument("--db", type=int, default=14, help="Redis database number of the benchmark's own")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="the worker's --batch_size, and in-process")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the worker (OMP_NUM_THREADS) and in-process; 0: the worker's own default "
                         "(all cores). Default 1: on a 2-core machine the tailer and the worker run at once, and 2 "
                         "intra-op threads stall each other whenever anything else runs")
    ap.add_argument("--reps", type=int, default=9, help="timed repetitions of each way for tokens/s")
    ap.add_argument("--ttft-jobs", type=int, default=40)
    ap.add_argument("--ttft-tokens", type=int, default=8)
    ap.add_argument("--submits", type=int, default=1000)
    ap.add_argument("--file-lines", type=int, default=1000)
    ap.add_argument("--file-reps", type=int, default=3)
    a = ap.parse_args()
    if a.quick:
        a.reps, a.ttft_jobs, a.submits, a.file_reps = 2, 10, 200, 1
    round_trips, backlog, pubsub_msgs, publishes = (300, 1000, 1000, 5000) if not a.quick else (50, 200, 200, 1000)

    t_all = time.perf_counter()
    env = BenchEnv(a.db, "gencli-bench-queue-")
    result: dict = {"bench": "queue", "redis": env.url, "loadavg_start": os.getloadavg()[0]}
    try:
        log(f"redis {env.url}, tmp {env.tmp}")
        log("floor: Celery no-op worker, pub/sub ...")
        floor = measure_floor(env, round_trips=round_trips, backlog=backlog, pubsub_msgs=pubsub_msgs,
                              publishes=publishes)

        from gencli.model.checkpoint import load_model
        from gencli.model.params import SamplingParams
        from gencli.model.textgen import TextGenerator
        from gencli.storage.settings import get_settings
        from gencli.worker.client import Client

        model_dir = small_model(env.tmp, "small")
        log("starting gencli worker ...")
        worker = env.start_worker(model_dir, "w1@bench", model_name=MODEL, batch_size=a.batch_size, threads=a.threads or None)
        threads = a.threads or worker_threads(worker) or torch.get_num_threads()
        torch.set_num_threads(threads)
        gen = TextGenerator(load_model(model_dir))
        client = Client(get_settings(), start_redis=False)
        texts = prompts(a.prompts)
        sp = SamplingParams(max_tokens=a.max_tokens, temperature=0)

        log(f"tokens/s: {a.prompts} prompts x {a.max_tokens} tokens, batch {a.batch_size}, {threads} threads, "
            f"{a.reps} reps ...")
        inproc_run(gen, texts, sp, a.batch_size)  # warm-up, both ways
        queued_run(client, texts, a.max_tokens)
        ip_t, q_t, ip_tok, q_tok, loop_rate = [], [], [], [], []
        same_text = True
        for _ in range(a.reps):
            dt, n, out_ip = inproc_run(gen, texts, sp, a.batch_size)
            ip_t.append(dt)
            ip_tok.append(n)
            time.sleep(0.1)
            dt, n, out_q, status, worker_rate = queued_run(client, texts, a.max_tokens)
            if status != "succeeded":
                raise RuntimeError(f"a queued run ended {status}")
            q_t.append(dt)
            q_tok.append(n)
            loop_rate.append((worker_rate or 0.0) / (ip_tok[-1] / ip_t[-1]))
            same_text &= out_q == out_ip
            time.sleep(0.1)
        ip_rate = median([n / t for n, t in zip(ip_tok, ip_t)])
        q_rate = median([n / t for n, t in zip(q_tok, q_t)])
        # each queued run against the in-process run just before it: a shared machine's slow spells
        # move both, so the median of these pairs is steadier than the ratio of the two medians
        pair_ratios = [(qn / qt) / (ipn / ipt) for ipn, ipt, qn, qt in zip(ip_tok, ip_t, q_tok, q_t)]

        log(f"time to first token: {a.ttft_jobs} single-prompt jobs ...")
        tt_prompts = prompts(5)
        for p in tt_prompts:  # warm-up
            inproc_ttft(gen, p, SamplingParams(max_tokens=a.ttft_tokens, temperature=0))
            queued_ttft(client, p, a.ttft_tokens)
        sp_tt = SamplingParams(max_tokens=a.ttft_tokens, temperature=0)
        ip_ttft: dict[str, list[float]] = {p: [] for p in tt_prompts}
        q_samples = []
        for i in range(a.ttft_jobs):
            p = tt_prompts[i % len(tt_prompts)]
            ip_ttft[p].append(inproc_ttft(gen, p, sp_tt))
            time.sleep(0.1)  # the worker idle, this process's threads asleep
            s = queued_ttft(client, p, a.ttft_tokens)
            s["prompt"] = p
            q_samples.append(s)
            time.sleep(0.1)
        ip_med = {p: median(v) for p, v in ip_ttft.items()}
        added = [(s["ttft"] - ip_med[s["prompt"]]) * 1e3 for s in q_samples]

        log(f"submissions: a {a.file_lines}-line prompt file, {a.submits} single-prompt jobs ...")
        subs = measure_submits(env, client, file_lines=a.file_lines, file_reps=a.file_reps, singles=a.submits)

        figures = {
            "tokens_per_s_inproc": ip_rate,
            "tokens_per_s_queued": q_rate,
            "tokens_per_s_ratio": median(pair_ratios),
            "tokens_per_s_ratio_of_medians": q_rate / ip_rate,
            "tokens_per_s_ratio_pairs": pair_ratios,
            "worker_decode_loop_ratio": median(loop_rate),
            "tokens_per_run": median(q_tok),
            "seconds_per_run_inproc": median(ip_t),
            "seconds_per_run_queued": median(q_t),
            "queued_output_equals_inproc": same_text,
            "ttft_inproc_p50_ms": median([x for v in ip_ttft.values() for x in v]) * 1e3,
            "ttft_queued_p50_ms": percentile([s["ttft"] for s in q_samples], 50) * 1e3,
            "added_ttft_p50_ms": percentile(added, 50),
            "added_ttft_p99_ms": percentile(added, 99),
            "ttft_submit_call_p50_ms": percentile([s["submit"] for s in q_samples], 50) * 1e3,
            "ttft_submit_to_start_event_p50_ms": percentile([s["to_start"] for s in q_samples], 50) * 1e3,
            "ttft_start_event_to_first_token_p50_ms": percentile([s["start_to_tok"] for s in q_samples], 50) * 1e3,
            "added_ttft_ms_all": added,
            "ttft_queued_samples_ms": [{k: round(v * 1e3, 3) for k, v in s.items() if k != "prompt"} for s in q_samples],
            "seconds_per_run_inproc_all": ip_t,
            "seconds_per_run_queued_all": q_t,
            "prompt_file_1000_s": subs["prompt_file_s_checked"],
            "single_submits_per_s": subs["single_submits_per_s_checked"],
            **subs,
        }
        result.update({
            "config": {"model": "small preset (4 layers, 128 wide, vocab 100288), random weights, cl100k_base",
                       "prompts": a.prompts, "max_tokens": a.max_tokens, "batch_size": a.batch_size,
                       "threads": threads, "reps": a.reps, "ttft_jobs": a.ttft_jobs, "ttft_tokens": a.ttft_tokens,
                       "file_lines": a.file_lines, "submits": a.submits, "quick": a.quick},
            "figures": figures,
            "floor": floor,
            "floor_reference": FLOOR_REFERENCE,
            "targets": {k: {"value": figures[k], "op": op, "target": t, "pass": verdict(k, figures[k])}
                        for k, (op, t) in TARGETS.items()},
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
    f, fl, ref, tg, c = res["figures"], res["floor"], res["floor_reference"], res["targets"], res["config"]

    def mark(k):
        t = tg[k]
        return f"target {t['op']} {t['target']:g}  {'PASS' if t['pass'] else 'FAIL'}"

    print(f"gencli queue benchmark ({res['redis']}, {c['threads']} torch thread(s), worker --batch_size {c['batch_size']},"
          f" {res['elapsed_s']:.0f} s; load average {res['loadavg_start']:.1f} at start, {res['loadavg_end']:.1f} at end)")
    print(f"model: {c['model']}")
    print()
    print(f"whole path vs in-process: {c['prompts']} prompts x {c['max_tokens']} new tokens, greedy, "
          f"median of {c['reps']} alternating runs")
    print(f"  in-process      {f['tokens_per_s_inproc']:8.1f} tokens/s  ({f['seconds_per_run_inproc'] * 1e3:.0f} ms/run)")
    print(f"  queued          {f['tokens_per_s_queued']:8.1f} tokens/s  ({f['seconds_per_run_queued'] * 1e3:.0f} ms/run,"
          f" submit -> last delta)")
    print(f"  ratio           {f['tokens_per_s_ratio']:8.3f}            {mark('tokens_per_s_ratio')}"
          f"  (median of {len(f['tokens_per_s_ratio_pairs'])} adjacent pairs; ratio of the medians"
          f" {f['tokens_per_s_ratio_of_medians']:.3f})")
    print(f"  the worker's decode loop alone (its recorded tokens/s) vs in-process: {f['worker_decode_loop_ratio']:.3f}")
    print(f"  same text both ways: {f['queued_output_equals_inproc']}")
    print()
    print(f"time to first token: {c['ttft_jobs']} single-prompt jobs to an idle worker, max_tokens {c['ttft_tokens']}")
    print(f"  in-process p50  {f['ttft_inproc_p50_ms']:8.2f} ms   (encode + prefill + first step)")
    print(f"  queued p50      {f['ttft_queued_p50_ms']:8.2f} ms   (submit call -> first delta)")
    print(f"    submit() returns           p50 {f['ttft_submit_call_p50_ms']:7.2f} ms")
    print(f"    submit -> 'start' event    p50 {f['ttft_submit_to_start_event_p50_ms']:7.2f} ms")
    print(f"    'start' -> first token     p50 {f['ttft_start_event_to_first_token_p50_ms']:7.2f} ms")
    print(f"  added p50       {f['added_ttft_p50_ms']:8.2f} ms   {mark('added_ttft_p50_ms')}")
    print(f"  added p99       {f['added_ttft_p99_ms']:8.2f} ms   (floor: Celery round trip p99 {fl['celery_round_trip_p99_ms']:.2f} ms)")
    worst = max(f["ttft_queued_samples_ms"], key=lambda x: x["ttft"])
    print(f"    slowest job: {worst['ttft']:.1f} ms = submit() {worst['submit']:.1f}, to 'start' {worst['to_start']:.1f},"
          f" 'start' -> token {worst['start_to_tok']:.1f}")
    print()
    print("submissions (model no worker serves; 'checked': its description in Redis, every prompt tokenized)")
    print(f"  {c['file_lines']}-line prompt file, checked    {f['prompt_file_s_checked']:7.3f} s   {mark('prompt_file_1000_s')}"
          f"  ({f['prompt_file_items_checked']} items recorded)")
    print(f"  {c['file_lines']}-line prompt file, unchecked  {f['prompt_file_s_unchecked']:7.3f} s")
    print(f"  {c['submits']} single submits, checked     {f['single_submits_per_s_checked']:7.0f} jobs/s   {mark('single_submits_per_s')}")
    print(f"  {c['submits']} single submits, unchecked   {f['single_submits_per_s_unchecked']:7.0f} jobs/s")
    print()
    print("floor, this run                          (spec's reference)")
    print(f"  Celery no-op round trip p50  {fl['celery_round_trip_p50_ms']:8.2f} ms     ({ref['celery_round_trip_p50_ms']} ms)")
    print(f"  Celery no-op round trip p99  {fl['celery_round_trip_p99_ms']:8.2f} ms     ({ref['celery_round_trip_p99_ms']} ms)")
    print(f"  no-op tasks/s, one worker    {fl['celery_noop_tasks_per_s']:8.0f}        ({ref['celery_noop_tasks_per_s']:.0f})"
          + ("" if fl["celery_backlog_queued_before_drain"] else "   [enqueue overlapped the drain]"))
    print(f"  send_task enqueues/s         {fl['celery_enqueues_per_s']:8.0f}        ({ref['celery_enqueues_per_s']:.0f})")
    print(f"  pub/sub one-way p50          {fl['pubsub_one_way_p50_ms']:8.3f} ms     ({ref['pubsub_one_way_p50_ms']} ms)"
          f"   p99 {fl['pubsub_one_way_p99_ms']:.3f} ms")
    print(f"  single PUBLISH/s             {fl['publishes_per_s']:8.0f}        ({ref['publishes_per_s']:.0f})")
    print(f"  gencli step publish/s        {fl['gencli_step_publishes_per_s']:8.0f}        (XADD+PUBLISH+EXPIRE, MULTI/EXEC)")
    print()
    print("targets: " + ", ".join(f"{k} {'PASS' if v['pass'] else 'FAIL'}" for k, v in tg.items()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
