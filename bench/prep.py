"""Throughput of `gencli prep` against tiktoken's own batch encoder, on the full Chit Chat dataset.

Run from the repository root:

    python -m bench.prep            # about 45 s on 2 cores
    python -m bench.prep --json     # the same, with one JSON object as the last line

prep: `prepare()` of the whole chitchat dataset (7,168 conversations, chatml, cl100k_base) into a
temp folder, forced, end to end: hashing and parsing the 40 MB dataset.json, rendering, encoding
(2 tokenizer threads), splitting and writing the token files and meta.json.

raw: `encoding.encode_ordinary_batch(texts, num_threads=2)` alone, where `texts` holds one string
per conversation, its turns' content joined by "\\n" (the same turn text prep reads, without the
chat template), already in memory.

rendered: the same call over each conversation rendered in ChatML by the chat template, special
tokens left out: what a prep that tokenizes the rendered text would encode. gencli's prep encodes
only the turns' content and splices the template's ids in (see prep/encode.py).

MB/s is of that source text (UTF-8 bytes of the turns' content), the same numerator for both, so the
MB/s ratio is the ratio of times; tokens/s counts each side's own tokens (prep's include the
template's). One warm-up run each, then 5 timed runs, alternating, and the median. Target: prep at
least 0.8 x raw.

Also printed, to read the figures on a shared machine: the CPU seconds of each (process time, all
threads), the ratio of the fastest runs (the least disturbed by other load), and `read`: parsing
dataset.json into turns alone, the part of prep that raw is spared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from gencli.model.chat import ChatFormat, segments
from gencli.model.tokenizer import load_encoding
from gencli.prep import chitchat
from gencli.prep.common import Problems
from gencli.prep.run import THREADS, prepare
from gencli.prep.spec import PrepSpec

TARGET_RATIO = 0.8
RUNS = 5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    ap.add_argument("--runs", type=int, default=RUNS)
    args = ap.parse_args()

    (inp,) = chitchat.inputs(())
    convs = [conv.messages for conv in chitchat.read(inp, Problems(skip_bad=False))]
    texts = ["\n".join(c for _, c in messages) for messages in convs]
    # each conversation rendered in ChatML, special tokens left out
    rendered = ["".join(seg.text for seg in segments(ChatFormat.CHATML, [{"role": r, "content": c} for r, c in m],
                                                      add_generation_prompt=False) if seg.text) for m in convs]
    source_mb = sum(len(t.encode()) for t in texts) / 1e6
    encoding = load_encoding("cl100k_base")
    log(f"chitchat: {len(texts)} conversations, {source_mb:.2f} MB of turn text; {THREADS} threads")

    with tempfile.TemporaryDirectory(prefix="gencli-bench-prep-") as tmp:
        spec = PrepSpec(source="chitchat", out=tmp, format="chatml", tokenizer="cl100k_base")

        def timed(fn) -> tuple[float, float, int]:
            t0, c0 = time.perf_counter(), time.process_time()
            n = fn()
            return time.perf_counter() - t0, time.process_time() - c0, n

        def run_prep() -> int:
            return prepare(spec, force=True).meta["total"]["tokens"]

        def run_raw() -> int:
            return sum(map(len, encoding.encode_ordinary_batch(texts, num_threads=THREADS)))

        def run_rendered() -> int:
            return sum(map(len, encoding.encode_ordinary_batch(rendered, num_threads=THREADS)))

        def run_read() -> int:
            return sum(len(c.messages) for c in chitchat.read(inp, Problems(skip_bad=False)))

        timed(run_prep), timed(run_raw), timed(run_rendered)  # warm-up: caches, the private encoding, page cache
        runs: dict[str, list] = {"prep": [], "raw": [], "rendered": [], "read": []}
        for i in range(args.runs):
            for name, fn in (("prep", run_prep), ("raw", run_raw), ("rendered", run_rendered), ("read", run_read)):
                runs[name].append(timed(fn))
            log(f"run {i + 1}: " + ", ".join(f"{k} {v[-1][0]:.2f} s (cpu {v[-1][1]:.2f} s)" for k, v in runs.items()))

    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
    (prep_s, prep_cpu), (raw_s, raw_cpu) = med["prep"], med["raw"]
    prep_tokens, raw_tokens = runs["prep"][0][2], runs["raw"][0][2]
    result = {
        "conversations": len(texts),
        "source_mb": round(source_mb, 3),
        "threads": THREADS,
        "prep": {"seconds": round(prep_s, 3), "cpu_seconds": round(prep_cpu, 3),
                 "mb_per_s": round(source_mb / prep_s, 2), "tokens": prep_tokens,
                 "tokens_per_s": round(prep_tokens / prep_s)},
        "raw": {"seconds": round(raw_s, 3), "cpu_seconds": round(raw_cpu, 3),
                "mb_per_s": round(source_mb / raw_s, 2), "tokens": raw_tokens,
                "tokens_per_s": round(raw_tokens / raw_s)},
        "rendered": {"seconds": round(med["rendered"][0], 3), "cpu_seconds": round(med["rendered"][1], 3),
                     "mb_per_s": round(source_mb / med["rendered"][0], 2), "tokens": runs["rendered"][0][2],
                     "tokens_per_s": round(runs["rendered"][0][2] / med["rendered"][0])},
        "rendered_ratio": round(med["rendered"][0] / prep_s, 3),
        "read": {"seconds": round(med["read"][0], 3), "cpu_seconds": round(med["read"][1], 3)},
        "ratio": round(raw_s / prep_s, 3),
        "best_ratio": round(min(r[0] for r in runs["raw"]) / min(r[0] for r in runs["prep"]), 3),
        "cpu_ratio": round(raw_cpu / prep_cpu, 3),
        "target_ratio": TARGET_RATIO,
    }
    print(f"{'':8} {'seconds':>8} {'cpu s':>7} {'MB/s':>7} {'tokens':>10} {'tokens/s':>10}")
    for name in ("prep", "raw", "rendered"):
        r = result[name]
        print(f"{name:8} {r['seconds']:8.2f} {r['cpu_seconds']:7.2f} {r['mb_per_s']:7.2f} {r['tokens']:10d} "
              f"{r['tokens_per_s']:10d}")
    print(f"{'read':8} {result['read']['seconds']:8.2f} {result['read']['cpu_seconds']:7.2f}   "
          "(parsing dataset.json into turns, part of prep)")
    verdict = "meets" if result["ratio"] >= TARGET_RATIO else "misses"
    print(f"prep / raw throughput: {result['ratio']:.2f}x ({verdict} the {TARGET_RATIO}x target); "
          f"fastest runs {result['best_ratio']:.2f}x; by CPU time {result['cpu_ratio']:.2f}x")
    print(f"prep / raw over the rendered text: {result['rendered_ratio']:.2f}x")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
