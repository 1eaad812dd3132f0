"""Decoding speed of gencli's engine against Hugging Face transformers' generate(), on the CPU.

Run from the repository root (needs the dev extra, for `transformers`):

    python -m bench.decode            # full run, about 3 minutes on 2 idle cores
    python -m bench.decode --quick    # smoke test: 16 new tokens, 2 timed runs
    python -m bench.decode --json     # the same, with one JSON object as the last line
    python -m bench.decode --batches 8   # one batch size only (a rerun after a noisy spell)

It builds GPT-2 small (124M, GPTConfig defaults, random weights from a fixed seed), loads the
same weights into transformers' GPT2LMHeadModel (Conv1D keeps weights as (in, out), so the
c_attn/c_proj/c_fc matrices go in transposed), and decodes 32-token random prompts greedily for
128 new tokens at batch 1 and batch 8, on 2 threads: one warm-up run each, then 5 timed runs,
gencli and transformers alternating (so a slow spell of a shared machine hits both), and the
median. Tokens/s counts new tokens of the whole batch over the whole call, prompt pass
included. Both must produce the same greedy tokens; the exit status is 1 if they do not.

Peak RSS: this process holds both models, so gencli's own peak is measured apart, in a
subprocess that builds and runs only gencli (`python -m bench.decode --only gencli --json`,
one timed run per batch): its model, KV cache and decoding. `--only transformers` does the
same for transformers (its process also holds gencli's GPT while the weights are copied).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gencli.model.engine import generate
from gencli.model.gpt import GPT, GPTConfig
from gencli.model.params import SamplingParams

THREADS = 2
PROMPT_LEN = 32
PROMPT_VOCAB = 50257  # GPT-2's real ids; the model's vocab is padded to 50304
BATCHES = (1, 8)
MB = 1e6
RSS_MARGIN = 400 * MB  # the target: peak RSS <= 2 x fp32 weight bytes + 400 MB
TARGET_RATIO = 1.2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def build_gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig())


def weight_bytes(model: GPT) -> int:
    """fp32 bytes of the model's parameters (the tied embedding/head matrix counted once)."""
    return model.num_params() * 4


def make_prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, PROMPT_VOCAB, (max(BATCHES), PROMPT_LEN), generator=g).tolist()


def gencli_decoder(model: GPT, tokens: int):
    """prompts -> new ids, through the engine as `gencli generate --batch_size N` runs it: in its
    invariant mode for a batch, with the one-row kernel for one prompt (see model/engine.py)."""
    params = SamplingParams(max_tokens=tokens, temperature=0)
    return lambda prompts: generate(model, prompts, params, invariant=len(prompts) > 1)


def to_transformers(model: GPT):
    """A GPT2LMHeadModel holding a copy of `model`'s weights."""
    import transformers  # here, so that gencli's run alone does not load it
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    c = model.config
    config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu_new",  # tanh GELU, as gencli's
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    hf = GPT2LMHeadModel(config)
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to transformer.wte.weight in both models
        state[k] = v.t().contiguous() if k.endswith(conv1d) else v.clone()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise SystemExit(f"weights do not map onto GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf.eval()


def transformers_decoder(hf, tokens: int):
    """prompts (all PROMPT_LEN long) -> new ids, through generate(), never stopping early."""
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    def decode(prompts):
        idx = torch.tensor(prompts, dtype=torch.long)
        with torch.inference_mode():
            out = hf.generate(idx, attention_mask=torch.ones_like(idx), **kw)
        return out[:, PROMPT_LEN:].tolist()

    return decode


def measure(decoders: dict, prompts: list[list[int]], tokens: int, runs: int, batches) -> dict:
    """Per decoder and batch: median tok/s of `runs` calls after a warm-up call, and the tokens.

    The decoders take turns call by call, so a slow spell of the machine hits them alike.
    """
    res = {name: {"tok_s": {}, "best_tok_s": {}, "tokens": {}} for name in decoders}
    for b in batches:
        batch = prompts[:b]
        times = {name: [] for name in decoders}
        for name, fn in decoders.items():
            log(f"{name}: batch {b}, warm-up")
            res[name]["tokens"][str(b)] = fn(batch)
        for i in range(runs):
            for name, fn in decoders.items():
                t0 = time.perf_counter()
                out = fn(batch)
                times[name].append(time.perf_counter() - t0)
                if out != res[name]["tokens"][str(b)]:
                    raise SystemExit(f"{name}: greedy decoding gave different tokens on a repeated run")
                if any(len(t) != tokens for t in out):
                    raise SystemExit(f"{name}: stopped before {tokens} new tokens")
            log(f"batch {b}, run {i + 1}/{runs}: " + ", ".join(f"{n} {times[n][-1]:.1f} s" for n in decoders))
        for name in decoders:
            res[name]["tok_s"][str(b)] = b * tokens / statistics.median(times[name])
            res[name]["best_tok_s"][str(b)] = b * tokens / min(times[name])
    return res


def run_only(args) -> dict:
    """One side alone in this process: speed, tokens and this process's peak RSS."""
    gpt = build_gpt(args.seed)
    wbytes = weight_bytes(gpt)
    if args.only == "gencli":
        fn = gencli_decoder(gpt.prepare_for_inference(), args.tokens)  # what load_model does
    else:
        fn = transformers_decoder(to_transformers(gpt), args.tokens)
        del gpt
        gc.collect()
    res = measure({args.only: fn}, make_prompts(args.seed), args.tokens, args.runs, args.batches)[args.only]
    return {**res, "weight_bytes": wbytes, "peak_rss_bytes": peak_rss_bytes()}


def run_alone_subprocess(args, which: str) -> dict:
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "bench.decode", "--only", which, "--json", "--seed", str(args.seed)]
    cmd += ["--tokens", str(args.tokens), "--runs", "1", "--batches", ",".join(map(str, args.batches))]
    # (one timed run is enough for the peak)
    proc = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{which}'s run alone failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first_difference(a: list[list[int]], b: list[list[int]]) -> str | None:
    for r, (x, y) in enumerate(zip(a, b)):
        for i, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return f"row {r}, new token {i}: gencli {s}, transformers {t}"
    return None


def report(args, res: dict, alone: dict, wbytes: int, attn: str) -> dict:
    g, h = res["gencli"], res["transformers"]
    target_rss = 2 * wbytes + RSS_MARGIN
    agree = {}
    for b in args.batches:
        k = str(b)
        diff = first_difference(g["tokens"][k], h["tokens"][k])
        agree[k] = diff is None
        if diff:
            log(f"greedy tokens DIFFER at batch {b}: {diff}")
        if alone["tokens"][k] != g["tokens"][k]:
            log(f"gencli alone gave other tokens than gencli here at batch {b}")
            agree[k] = False
    ratio = {str(b): g["tok_s"][str(b)] / h["tok_s"][str(b)] for b in args.batches}
    rss_alone, rss_here = alone["peak_rss_bytes"], peak_rss_bytes()

    print()
    print(f"GPT-2 small, {wbytes / 4 / 1e6:.1f}M params ({wbytes / MB:.0f} MB fp32), CPU, {THREADS} threads, "
          f"torch {torch.__version__}, transformers attention {attn}")
    print(f"prompt {PROMPT_LEN} tokens, {args.tokens} new, greedy; median of {args.runs} alternating runs "
          "after a warm-up")
    print()
    print(f"{'':5}  {'new tokens/s, median (best)':^35}")
    print(f"{'batch':>5}  {'gencli':>15}  {'transformers':>17}  {'ratio':>6}  {'target':>6}  tokens agree")
    for b in args.batches:
        k = str(b)
        ok = "yes" if agree[k] else "NO"
        gs = f"{g['tok_s'][k]:.1f} ({g['best_tok_s'][k]:.1f})"
        hs = f"{h['tok_s'][k]:.1f} ({h['best_tok_s'][k]:.1f})"
        print(f"{b:>5}  {gs:>15}  {hs:>17}  {ratio[k]:>5.2f}x  {TARGET_RATIO:>5.1f}x  {ok}")
    print("ratio: of the medians. On a shared machine the best run shows speed with the least interference.")
    print()
    print(f"peak RSS, gencli alone (subprocess: its model, KV cache, decoding): {rss_alone / MB:6.0f} MB, "
          f"target <= 2 x {wbytes / MB:.0f} + {RSS_MARGIN / MB:.0f} = {target_rss / MB:.0f} MB "
          f"({'met' if rss_alone <= target_rss else 'NOT met'})")
    print(f"peak RSS, this process (gencli and transformers models, both decoding): {rss_here / MB:6.0f} MB")
    return {
        "threads": THREADS,
        "prompt_tokens": PROMPT_LEN,
        "new_tokens": args.tokens,
        "runs": args.runs,
        "batches": args.batches,
        "gencli_tok_s": g["tok_s"],
        "transformers_tok_s": h["tok_s"],
        "gencli_best_tok_s": g["best_tok_s"],
        "transformers_best_tok_s": h["best_tok_s"],
        "ratio": ratio,
        "tokens_agree": agree,
        "weight_bytes": wbytes,
        "gencli_alone_tok_s": alone["tok_s"],  # one run, in the subprocess
        "gencli_alone_peak_rss_bytes": rss_alone,
        "both_models_peak_rss_bytes": rss_here,
        "gencli_rss_target_bytes": target_rss,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--quick", action="store_true", help="smoke test: 16 new tokens, 2 timed runs")
    ap.add_argument("--only", choices=("gencli", "transformers"), help="run one side alone in this process")
    ap.add_argument("--tokens", type=int, help="new tokens per sequence (default 128, 16 with --quick)")
    ap.add_argument("--runs", type=int, help="timed runs after the warm-up (default 5, 2 with --quick)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes (default 1,8)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    args.tokens = args.tokens or (16 if args.quick else 128)
    args.runs = args.runs or (2 if args.quick else 5)
    args.batches = [int(b) for b in args.batches.split(",")]
    if not all(1 <= b <= max(BATCHES) for b in args.batches):
        ap.error(f"batch sizes go from 1 to {max(BATCHES)}")
    torch.set_num_threads(THREADS)

    if args.only:
        res = run_only(args)
        for b in args.batches:
            log(f"{args.only} alone: batch {b}: {res['tok_s'][str(b)]:.1f} tok/s")
        log(f"{args.only} alone: peak RSS {res['peak_rss_bytes'] / MB:.0f} MB")
        if args.json:
            print(json.dumps(res))
        return 0

    alone = run_alone_subprocess(args, "gencli")
    gpt = build_gpt(args.seed)
    wbytes = weight_bytes(gpt)
    hf = to_transformers(gpt)
    decoders = {
        "gencli": gencli_decoder(gpt.prepare_for_inference(), args.tokens),
        "transformers": transformers_decoder(hf, args.tokens),
    }
    res = measure(decoders, make_prompts(args.seed), args.tokens, args.runs, args.batches)
    summary = report(args, res, alone, wbytes, hf.config._attn_implementation)
    if args.json:
        print(json.dumps(summary))
    return 0 if all(summary["tokens_agree"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
