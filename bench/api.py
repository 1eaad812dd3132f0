"""The HTTP API under load: concurrent streaming completions through `gencli serve`, against the queue alone.

Run from the repository root:

    python -m bench.api                  # 100 concurrent streaming clients, 2 alternating rounds
    python -m bench.api --clients 10     # fewer clients (a 2-core machine, while developing)
    python -m bench.api --json           # one JSON object on stdout instead of the table
    python -m bench.api --quick          # smoke run: 10 clients, one round

Everything runs in this one run, on services of its own: a private redis-server on a free
loopback port (never the one at 6379), a temporary GENCLI_HOME and SQLite store, the `small`
preset model (random weights, cl100k_base, ChatML) made in the temporary directory, two
`gencli worker` CPU processes serving it (--workers; --batch-size slots and as many jobs each,
--threads torch threads each) and one `gencli serve` on a free loopback port. Every process it
starts is stopped at the end, also on Ctrl-C, SIGTERM or a failure.

Measured side by side, on the same workers, in alternating rounds (--rounds; API first in odd
rounds, the queue first in even ones):

- API: --clients streaming clients at once (httpx, asyncio; a fresh connection each), each one
  POST /v1/completions {"stream": true, "max_tokens": --max-tokens, "temperature": 0} for a
  prompt of its own. Time to first token: from sending the request to the first chunk with
  non-empty text, client-measured. Every client must get its whole stream: status 200, an
  X-Gencli-Job header, no error event, a finish_reason, `data: [DONE]` last, and its text equal
  to the stored output (GET /v1/jobs/{id}/results, fetched after the round); else the benchmark
  exits 1.
- direct: the same prompts, as many at once, each from a thread of this process through
  `gencli.worker.client.Client` (one shared, as the API server shares one): `submit` then
  `job.stream()` to its end, as bench/queue.py does; time to first token: from the submit call to
  the first delta with non-empty text. Checked the same way (the job succeeded, a finish_reason,
  the streamed text equal to the stored output).
- requests/s (clients over the round's wall time: the first request sent to the last stream's
  end), completion tokens/s (the stored completion tokens over the same time), TTFT p50 and p99
  over every round's samples, and the API's overhead: TTFT p50 through the API minus TTFT p50
  direct (target <= 10 ms).
- for reference, the same difference at idle: --idle-samples single requests one at a time,
  API and direct alternating (a kept-alive connection for the API), the workers otherwise idle.
- to see where the time goes: "job queued" (API: the response's headers, which come once the job
  is recorded and queued; direct: submit() returns), CPU time per request of each process (from
  /proc: gencli serve, this process, the workers, redis-server) from the first request to the
  last stream's end, the Redis keys before each round and at the end, and what
  Client.served_models() costs then: every completion request calls it (check_served); it reads
  the set of worker names and their heartbeats, so it must not grow with the keys that jobs
  leave (each replay log is kept GENCLI_STREAM_TTL, a day).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import signal
import sys
import threading
import time

from bench._services import BenchEnv, Proc, log, median, percentile, prompts, small_model

MODEL = "bench-api"
TARGET_OVERHEAD_MS = 10.0
READY = re.compile(r"gencli API on http://127\.0\.0\.1:(\d+)")


# --- the API's side ---------------------------------------------------------------------------------

async def api_one(http, base: str, prompt: str, max_tokens: int) -> dict:
    """One streaming completion: its timings, text, finish reason and what was wrong with it."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    out = {"prompt": prompt, "job": None, "text": "", "finish": None, "done": False, "errors": [], "first": None}
    t0 = time.perf_counter()
    out["t0"] = t0
    try:
        async with http.stream("POST", base + "/v1/completions", json=body) as resp:
            out["submitted"] = time.perf_counter()  # the headers: the API has recorded and queued the job
            out["job"] = resp.headers.get("x-gencli-job")
            if resp.status_code != 200:
                out["errors"].append(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # the blank line between events
                data = line[5:].strip()
                if out["done"]:
                    out["errors"].append(f"data after [DONE]: {data[:200]}")
                    continue
                if data == "[DONE]":
                    out["done"] = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    out["errors"].append(f"error event: {chunk['error']}")
                    continue
                for ch in chunk["choices"]:
                    if ch.get("text"):
                        out["text"] += ch["text"]
                        if out["first"] is None:
                            out["first"] = time.perf_counter()
                    if ch.get("finish_reason"):
                        out["finish"] = ch["finish_reason"]
    except Exception as e:  # noqa: BLE001 - a client that got less, reported
        out["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        out["end"] = time.perf_counter()
    if out["job"] is None:
        out["errors"].append("no X-Gencli-Job header")
    if not out["done"]:
        out["errors"].append("the stream did not end with data: [DONE]")
    if out["finish"] is None:
        out["errors"].append("no chunk carried a finish_reason")
    if out["first"] is None:
        out["errors"].append("no chunk with text")
    return out


async def api_results(http, base: str, samples: list[dict]) -> None:
    """Each sample's stored output (GET /v1/jobs/{id}/results) against what its stream carried."""
    sem = asyncio.Semaphore(16)

    async def one(s):
        if s["job"] is None:
            return
        async with sem:
            try:
                r = await http.get(f"{base}/v1/jobs/{s['job']}/results")
                if r.status_code != 200:
                    s["errors"].append(f"results: HTTP {r.status_code}: {r.text[:200]}")
                    return
                rows = [json.loads(x) for x in r.text.splitlines() if x.strip()]
            except Exception as e:  # noqa: BLE001
                s["errors"].append(f"results: {type(e).__name__}: {e}")
                return
        if len(rows) != 1:
            s["errors"].append(f"results: {len(rows)} rows, not 1")
            return
        row = rows[0]
        s["tokens"] = (row.get("usage") or {}).get("completion_tokens") or 0
        s["stored"] = row.get("output")
        if row.get("status") != "succeeded":
            s["errors"].append(f"stored status {row.get('status')}: {row.get('error')}")
        if row.get("output") != s["text"]:
            s["errors"].append(f"streamed text != stored output ({len(s['text'])} vs {len(row.get('output') or '')} "
                               "chars)")
        if row.get("finish_reason") != s["finish"]:
            s["errors"].append(f"streamed finish_reason {s['finish']!r} != stored {row.get('finish_reason')!r}")

    await asyncio.gather(*(one(s) for s in samples))


def _http(n: int):
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=30.0),
                             limits=httpx.Limits(max_connections=n + 16, max_keepalive_connections=n + 16))


async def api_round(base: str, texts: list[str], max_tokens: int, streamed=None) -> dict:
    """Every prompt at once, one streaming client each; then (after calling streamed()) every stored output."""
    async with _http(len(texts)) as http:
        go = asyncio.Event()

        async def client(p):
            await go.wait()
            return await api_one(http, base, p, max_tokens)

        tasks = [asyncio.create_task(client(p)) for p in texts]
        await asyncio.sleep(0.05)  # every task waiting at the gate
        go.set()
        samples = await asyncio.gather(*tasks)
        if streamed is not None:
            streamed()
        await api_results(http, base, samples)
    return summarize(samples)


# --- the queue alone --------------------------------------------------------------------------------

def direct_one(client, prompt: str, max_tokens: int, go: threading.Event | None = None) -> dict:
    """One job through the Python client: submit, then follow its stream to the end."""
    if go is not None:
        go.wait()
    out = {"prompt": prompt, "job": None, "text": "", "finish": None, "done": False, "errors": [], "first": None}
    t0 = time.perf_counter()
    out["t0"] = t0
    try:
        job = client.submit([prompt], model=MODEL, max_tokens=max_tokens, temperature=0)
        out["submitted"] = time.perf_counter()
        out["job"] = job.id
        for d in job.stream():
            out["text"] = d.text if d.restart else out["text"] + d.text
            if d.text and out["first"] is None:
                out["first"] = time.perf_counter()
            if d.finish_reason:
                out["finish"] = d.finish_reason
        out["done"] = True
    except Exception as e:  # noqa: BLE001
        out["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        out["end"] = time.perf_counter()
    if out["finish"] is None:
        out["errors"].append("no delta carried a finish_reason")
    if out["first"] is None:
        out["errors"].append("no delta with text")
    return out


def direct_results(client, samples: list[dict]) -> None:
    for s in samples:
        if s["job"] is None:
            continue
        try:
            rows = client.job(s["job"]).result(timeout=60)
        except Exception as e:  # noqa: BLE001
            s["errors"].append(f"results: {type(e).__name__}: {e}")
            continue
        row = rows[0]
        s["tokens"] = row["usage"]["completion_tokens"] or 0
        s["stored"] = row["output"]
        if row["status"] != "succeeded":
            s["errors"].append(f"stored status {row['status']}: {row['error']}")
        if row["output"] != s["text"]:
            s["errors"].append("streamed text != stored output")
        if row["finish_reason"] != s["finish"]:
            s["errors"].append(f"streamed finish_reason {s['finish']!r} != stored {row['finish_reason']!r}")


def direct_round(client, texts: list[str], max_tokens: int, streamed=None) -> dict:
    """Every prompt at once, one thread each (daemon threads: a Ctrl-C does not wait for them)."""
    go = threading.Event()
    samples: list[dict | None] = [None] * len(texts)

    def run(k, p):
        samples[k] = direct_one(client, p, max_tokens, go)

    threads = [threading.Thread(target=run, args=(k, p), daemon=True) for k, p in enumerate(texts)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    go.set()
    for t in threads:
        t.join(600)
    if streamed is not None:
        streamed()
    done = [s if s is not None else {"prompt": texts[k], "job": None, "text": "", "finish": None, "first": None,
                                     "errors": ["the thread did not finish in 600 s"], "t0": None, "end": None}
            for k, s in enumerate(samples)]
    direct_results(client, done)
    return summarize(done)


# --- figures ----------------------------------------------------------------------------------------

def summarize(samples: list[dict]) -> dict:
    t0s = [s["t0"] for s in samples if s.get("t0") is not None]
    ends = [s["end"] for s in samples if s.get("end") is not None]
    wall = max(ends) - min(t0s)
    ttft = [s["first"] - s["t0"] for s in samples if s["first"] is not None]
    latency = [s["end"] - s["t0"] for s in samples if s.get("end") is not None]
    submit = [s["submitted"] - s["t0"] for s in samples if s.get("submitted") is not None]
    tokens = sum(s.get("tokens", 0) for s in samples)
    bad = [s for s in samples if s["errors"]]
    return {"clients": len(samples), "complete": len(samples) - len(bad), "wall_s": wall,
            "requests_per_s": len(samples) / wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_s": ttft, "latency_s": latency, "submit_s": submit,
            "texts": {s["prompt"]: s.get("stored") for s in samples},
            "failures": [{"prompt": s["prompt"], "job": s["job"], "errors": s["errors"]} for s in bad]}


def pooled(rounds: list[dict]) -> dict:
    ttft = [x for r in rounds for x in r["ttft_s"]]
    lat = [x for r in rounds for x in r["latency_s"]]
    sub = [x for r in rounds for x in r["submit_s"]]
    return {
        "requests_per_s": median([r["requests_per_s"] for r in rounds]),
        "tokens_per_s": median([r["tokens_per_s"] for r in rounds]),
        "ttft_p50_ms": percentile(ttft, 50) * 1e3 if ttft else None,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3 if ttft else None,
        "ttft_max_ms": max(ttft) * 1e3 if ttft else None,
        "latency_p50_ms": percentile(lat, 50) * 1e3 if lat else None,
        "latency_p99_ms": percentile(lat, 99) * 1e3 if lat else None,
        "submitted_p50_ms": percentile(sub, 50) * 1e3 if sub else None,
        "submitted_p99_ms": percentile(sub, 99) * 1e3 if sub else None,
        "clients": sum(r["clients"] for r in rounds),
        "complete": sum(r["complete"] for r in rounds),
        "rounds": [{k: v for k, v in r.items() if k not in ("ttft_s", "latency_s", "submit_s", "texts", "failures")}
                   | {"ttft_p50_ms": percentile(r["ttft_s"], 50) * 1e3 if r["ttft_s"] else None}
                   for r in rounds],
        "failures": [f for r in rounds for f in r["failures"]],
        "cpu_ms_per_request": {k: median(xs) if (xs := [r["cpu_s"][k] / r["clients"] * 1e3 for r in rounds
                                                         if r.get("cpu_s", {}).get(k) is not None]) else None
                               for k in ("api_server", "workers", "redis", "bench")},
    }


async def idle_phase(client, base: str, texts: list[str], max_tokens: int, n: int) -> dict:
    """n single requests one at a time, API and direct alternating, the workers otherwise idle."""
    api, direct, bad, queued = [], [], [], {"api": [], "direct": []}
    async with _http(1) as http:
        for k in range(n):
            p = texts[k % len(texts)]
            a = await api_one(http, base, p, max_tokens)
            await asyncio.sleep(0.1)
            d = await asyncio.to_thread(direct_one, client, p, max_tokens)
            await asyncio.sleep(0.1)
            for s, into, way in ((a, api, "api"), (d, direct, "direct")):
                if s["first"] is not None:
                    into.append(s["first"] - s["t0"])
                if s.get("submitted") is not None:
                    queued[way].append(s["submitted"] - s["t0"])
                bad += [s["errors"]] if s["errors"] else []
    a50, d50 = percentile(api, 50) * 1e3, percentile(direct, 50) * 1e3
    return {"samples": n, "api_ttft_p50_ms": a50, "direct_ttft_p50_ms": d50, "overhead_p50_ms": a50 - d50,
            "api_ttft_p99_ms": percentile(api, 99) * 1e3, "direct_ttft_p99_ms": percentile(direct, 99) * 1e3,
            "api_queued_p50_ms": percentile(queued["api"], 50) * 1e3 if queued["api"] else None,
            "direct_queued_p50_ms": percentile(queued["direct"], 50) * 1e3 if queued["direct"] else None,
            "failures": bad}


# --- the run ----------------------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a process has used, from /proc (None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


class CPUMeter:
    """CPU seconds per process group over a stretch: the API server, the workers, Redis, this process."""

    def __init__(self, pids: dict[str, list[int]]):
        self.pids = pids

    def read(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, pids in self.pids.items():
            xs = [cpu_s(p) for p in pids]
            out[name] = None if any(x is None for x in xs) else sum(xs)
        t = os.times()
        out["bench"] = t.user + t.system
        return out

    @staticmethod
    def spent(before: dict, after: dict) -> dict[str, float | None]:
        return {k: None if before[k] is None or after[k] is None else after[k] - before[k] for k in before}


def start_api(env: BenchEnv, log_level: str) -> tuple[Proc, str]:
    """`gencli serve` on a port the kernel picks (--port 0: no race for a free one); its base URL."""
    import httpx

    p = env.start([sys.executable, "-m", "gencli.cli", "serve", "--port", "0", "--log-level", log_level], "api")
    port: list[str] = []

    def ready():
        if not port:
            m = READY.search(p.text())
            if not m:
                return False
            port.append(m.group(1))
        try:
            r = httpx.get(f"http://127.0.0.1:{port[0]}/healthz", timeout=2)
        except httpx.TransportError:
            return False
        return r.status_code == 200

    p.wait_for(ready, 60, "gencli serve")
    return p, f"http://127.0.0.1:{port[0]}"


def close(env: BenchEnv) -> None:
    """Stop every process the benchmark started; a second Ctrl-C or SIGTERM does not cut this short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        env.close()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object with every figure instead of the table")
    ap.add_argument("--clients", type=int, default=100, help="concurrent streaming clients (and direct jobs) a round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each way, alternating which goes first")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="gencli worker processes serving the model")
    ap.add_argument("--batch-size", type=int, default=64,
                    help="each worker's --batch_size and --max-jobs (slots, and jobs held at once)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (default 1: two workers on two cores)")
    ap.add_argument("--idle-samples", type=int, default=20,
                    help="single requests one at a time, each way, for the overhead at idle (0: none)")
    ap.add_argument("--api-log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="gencli serve --log-level (info: uvicorn's access log on, as a user runs it)")
    ap.add_argument("--db", type=int, default=0, help="Redis database number on the private redis-server")
    ap.add_argument("--quick", action="store_true", help="smoke run: 10 clients, 1 round, 5 idle samples")
    a = ap.parse_args()
    if a.quick:
        a.clients, a.rounds, a.idle_samples = 10, 1, 5
    if a.clients < 1 or a.rounds < 1 or a.workers < 1:
        ap.error("--clients, --rounds and --workers must be at least 1")

    def on_term(signum, frame):  # SIGTERM: the same clean-up as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    for k in [k for k in os.environ if k.startswith("GENCLI_")]:  # nothing of the shell's deployment
        del os.environ[k]

    t_all = time.perf_counter()
    env = BenchEnv(a.db, "gencli-bench-api-", private=True)
    result: dict = {"bench": "api", "redis": env.url, "loadavg_start": os.getloadavg()[0], "cpus": os.cpu_count()}
    try:
        from gencli.storage.settings import get_settings
        from gencli.worker.client import Client

        log(f"redis {env.url}, tmp {env.tmp}")
        model_dir = small_model(env.tmp, "small")
        log(f"starting {a.workers} gencli workers ...")
        workers = [env.start([sys.executable, "-m", "gencli.cli", "worker", "--model", str(model_dir), "--device",
                              "cpu", "--name", f"w{k}@bench", "--model-name", MODEL, "--batch_size",
                              str(a.batch_size), "--max-jobs", str(a.batch_size), "--threads", str(a.threads)],
                             f"worker-w{k}") for k in range(a.workers)]  # all start at once, then wait
        for k, w in enumerate(workers):
            w.wait_for(lambda k=k, w=w: env.r.get(env.keys.worker(f"w{k}@bench")) is not None and "ready" in w.text(),
                       180, f"worker w{k}")
        log("starting gencli serve ...")
        api_proc, base = start_api(env, a.api_log_level)
        meter = CPUMeter({"api_server": [api_proc.proc.pid], "workers": [w.proc.pid for w in workers],
                          "redis": [env.redis_proc.pid]})
        client = Client(get_settings(), start_redis=False)
        served = client.served_models().get(MODEL)
        if served != a.workers:
            raise RuntimeError(f"{served} live workers serve {MODEL}, not {a.workers}")

        texts = prompts(a.clients)
        warm = prompts(max(4, 2 * a.workers))
        log(f"warm-up: {len(warm)} requests each way ...")
        asyncio.run(api_round(base, warm, a.max_tokens))
        direct_round(client, warm, a.max_tokens)

        rounds: dict[str, list[dict]] = {"api": [], "direct": []}
        for r in range(a.rounds):
            order = ("api", "direct") if r % 2 == 0 else ("direct", "api")
            for way in order:
                time.sleep(1.0)  # the workers idle again, the last round's followers gone
                log(f"round {r + 1}/{a.rounds}, {way}: {a.clients} streaming clients at once ...")
                keys_before = env.r.dbsize()
                c0, c1 = meter.read(), {}
                streamed = functools.partial(lambda into: into.update(meter.read()), c1)
                res = (asyncio.run(api_round(base, texts, a.max_tokens, streamed)) if way == "api"
                       else direct_round(client, texts, a.max_tokens, streamed))
                res["cpu_s"] = CPUMeter.spent(c0, c1)  # up to the last stream's end (not the results' checks)
                res["redis_keys_before"] = keys_before
                rounds[way].append(res)
                log(f"   {res['complete']}/{res['clients']} complete in {res['wall_s']:.2f} s, "
                    f"TTFT p50 {percentile(res['ttft_s'], 50) * 1e3 if res['ttft_s'] else float('nan'):.1f} ms")

        idle = None
        if a.idle_samples:
            log(f"idle: {a.idle_samples} single requests one at a time, each way ...")
            time.sleep(1.0)
            idle = asyncio.run(idle_phase(client, base, texts, a.max_tokens, a.idle_samples))

        # what every completion request pays before its job is queued: check_served -> live_workers
        # (the workers' set and their heartbeats); timed here, in this process, with the keys the run left
        client.served_models()
        t = time.perf_counter()
        for _ in range(10):
            client.served_models()
        served_ms = (time.perf_counter() - t) / 10 * 1e3
        keys_end = env.r.dbsize()
        fa, fd = pooled(rounds["api"]), pooled(rounds["direct"])
        same = sum(all(r["texts"][p] == d["texts"][p] for r in rounds["api"] for d in rounds["direct"])
                   for p in texts)
        overhead = (fa["ttft_p50_ms"] - fd["ttft_p50_ms"]) if fa["ttft_p50_ms"] is not None and \
            fd["ttft_p50_ms"] is not None else None
        result.update({
            "config": {"model": "small preset (4 layers, 128 wide, vocab 100288), random weights, cl100k_base",
                       "clients": a.clients, "rounds": a.rounds, "max_tokens": a.max_tokens, "temperature": 0,
                       "workers": a.workers, "batch_size": a.batch_size, "max_jobs": a.batch_size,
                       "threads_per_worker": a.threads, "api_log_level": a.api_log_level,
                       "idle_samples": a.idle_samples},
            "api": fa,
            "direct": fd,
            "api_overhead_p50_ms": overhead,
            "api_overhead_p50_ms_per_round": [
                (x["ttft_p50_ms"] - y["ttft_p50_ms"]) if x["ttft_p50_ms"] is not None and y["ttft_p50_ms"] is not None
                else None for x, y in zip(fa["rounds"], fd["rounds"], strict=True)],
            "idle": idle,
            "same_text_both_ways": same,
            "redis_keys_at_end": keys_end,
            "served_models_ms_at_end": served_ms,
            "target": {"name": "api_overhead_p50_ms", "op": "<=", "target": TARGET_OVERHEAD_MS,
                       "pass": overhead is not None and overhead <= TARGET_OVERHEAD_MS},
        })
        complete = fa["complete"] == fa["clients"] and fd["complete"] == fd["clients"] and \
            not (idle and idle["failures"])
        result["all_complete"] = complete
    except KeyboardInterrupt:
        log("interrupted: stopping every process this benchmark started ...")
        close(env)
        return 130
    except BaseException:
        close(env)
        raise
    close(env)
    result["elapsed_s"] = time.perf_counter() - t_all
    result["loadavg_end"] = os.getloadavg()[0]
    if a.json:
        print(json.dumps(result))
    else:
        report(result)
    if not complete:
        for f in (fa["failures"] + fd["failures"])[:10]:
            log(f"incomplete: job {f['job']} ({f['prompt']!r}): {'; '.join(f['errors'])}")
        if idle and idle["failures"]:
            log(f"incomplete at idle: {idle['failures'][:5]}")
        return 1
    return 0


def report(res: dict) -> None:
    c, fa, fd, t, idle = res["config"], res["api"], res["direct"], res["target"], res["idle"]

    def ms(x):
        return f"{x:9.1f} ms" if x is not None else "      n/a   "

    print(f"gencli HTTP API benchmark ({c['workers']} CPU workers x --batch_size {c['batch_size']} --max-jobs "
          f"{c['batch_size']}, {c['threads_per_worker']} torch thread(s) each, one gencli serve; {res['cpus']} CPUs, "
          f"{res['elapsed_s']:.0f} s; load average {res['loadavg_start']:.1f} at start, "
          f"{res['loadavg_end']:.1f} at end)")
    print(f"model: {c['model']}")
    print(f"{c['clients']} concurrent streaming requests x {c['max_tokens']} new tokens, temperature 0, "
          f"{c['rounds']} alternating round(s) each way")
    print()
    print(f"                            {'API (HTTP, SSE)':>16}  {'queue alone':>14}")
    print(f"  complete streams          {fa['complete']:>10}/{fa['clients']:<5}  "
          f"{fd['complete']:>8}/{fd['clients']:<5}")
    print(f"  requests/s                {fa['requests_per_s']:13.1f}     {fd['requests_per_s']:11.1f}")
    print(f"  completion tokens/s       {fa['tokens_per_s']:13.1f}     {fd['tokens_per_s']:11.1f}")
    print(f"  TTFT p50                  {ms(fa['ttft_p50_ms'])}    {ms(fd['ttft_p50_ms'])}")
    print(f"  TTFT p99                  {ms(fa['ttft_p99_ms'])}    {ms(fd['ttft_p99_ms'])}")
    print(f"  request to stream end p50 {ms(fa['latency_p50_ms'])}    {ms(fd['latency_p50_ms'])}")
    print(f"  job queued p50            {ms(fa['submitted_p50_ms'])}    {ms(fd['submitted_p50_ms'])}"
          "   (API: the response's headers; direct: submit() returns)")
    print(f"  job queued p99            {ms(fa['submitted_p99_ms'])}    {ms(fd['submitted_p99_ms'])}")
    ca, cd = fa["cpu_ms_per_request"], fd["cpu_ms_per_request"]
    print("  CPU ms per request (median over rounds; the first request to the last stream's end):")
    for k, what in (("api_server", "gencli serve"), ("bench", "this process (clients)"), ("workers", "the workers"),
                    ("redis", "redis-server")):
        print(f"    {what:<24}{ms(ca[k])}    {ms(cd[k])}")
    print()
    ov = res["api_overhead_p50_ms"]
    per_round = ", ".join(f"{x:.1f} ({r['redis_keys_before']} keys)" for x, r in
                          zip(res["api_overhead_p50_ms_per_round"], fa["rounds"], strict=True) if x is not None)
    print(f"  API overhead p50 {ov:8.1f} ms   target <= {t['target']:g} ms  {'PASS' if t['pass'] else 'FAIL'}"
          f"   (TTFT p50 API minus direct)\n    per round, ms (Redis keys before the API's round): {per_round}"
          if ov is not None else
          "  API overhead p50      n/a")
    if idle:
        print(f"  at idle, one request at a time ({idle['samples']} each way): "
              f"TTFT p50 API {idle['api_ttft_p50_ms']:.1f} ms,"
              f" direct {idle['direct_ttft_p50_ms']:.1f} ms: overhead {idle['overhead_p50_ms']:.1f} ms")
        if idle["api_queued_p50_ms"] is not None and idle["direct_queued_p50_ms"] is not None:
            print(f"    job queued p50: API {idle['api_queued_p50_ms']:.1f} ms (response headers), direct "
                  f"{idle['direct_queued_p50_ms']:.1f} ms (submit() returns)")
    print(f"  same stored text both ways: {res['same_text_both_ways']}/{c['clients']} prompts")
    print(f"  Redis keys at the end {res['redis_keys_at_end']}; Client.served_models() (each completion request's "
          f"check_served) {res['served_models_ms_at_end']:.1f} ms")
    print(f"  every client got its whole stream: {res['all_complete']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
