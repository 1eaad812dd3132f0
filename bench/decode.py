"""Decoding speed on the CPU: gencli's engine in float32 and int8 against Hugging Face transformers'
generate() and CTranslate2 (float32 and int8), with the machine's memory floor measured in the run.

Run from the repository root (needs the dev extra: transformers, ctranslate2):

    python -m bench.decode            # full run, about 5 minutes on 2 idle cores
    python -m bench.decode --quick    # smoke test: 16 new tokens, 2 timed runs
    python -m bench.decode --json     # the same, with one JSON object as the last line
    python -m bench.decode --batches 8 --engines gencli,ct2   # a subset (a rerun after a noisy spell)

Every engine decodes GPT-2 small (124M, GPTConfig defaults, random weights from a fixed seed): gencli
builds it in code; transformers' GPT2LMHeadModel gets a copy of the same weights (Conv1D keeps them
as (in, out), so c_attn/c_proj/c_fc go in transposed); CTranslate2 converts that model, written to a
temporary directory, with its own transformers converter and a one-token-per-id vocabulary ("<17>"
is id 17), so no tokenizer files are needed, and quantizes it to int8 itself at load
(compute_type int8). Prompts are 32 random GPT-2 ids, decoding is greedy for 128 new tokens at
batch 1 and 8, on 2 threads.

Each engine runs in a process of its own, and the processes take turns call by call (one warm-up
call each, then 5 timed calls, median), with a pause between calls for the OpenMP threads of the
last one to stop spinning: in one process CTranslate2's threads slowed gencli about fivefold, and
turns spread a slow spell of a shared machine over every engine alike. Tokens/s counts new tokens
of the whole batch over the whole call, prompt pass included. gencli's float32 tokens must equal
transformers' (exit status 1 if not); the others' agreement with it is printed (int8 is not
expected to agree on random weights, whose logits are near-ties: bench.quality measures int8 on a
trained model). Each process's peak RSS is its own: its model, KV cache and decoding.

The floor: a probe process reads a 512 MB buffer (the best of several sums) for the memory
bandwidth, and times a 2048^3 float32 matrix product for the GEMM peak. A decoding step must read
every weight once plus each row's keys and values so far, so the memory floor at batch b is
b / ((weight bytes + KV bytes) / bandwidth) tokens/s; the compute bound is b / (step FLOPs / peak).
With --profile (on by default in a full run) the gencli process profiles one batch-8 call and
prints where its time goes.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gencli.model.config import GPTConfig
from gencli.model.engine import generate
from gencli.model.gpt import GPT
from gencli.model.params import SamplingParams

THREADS = 2
PROMPT_LEN = 32
PROMPT_VOCAB = 50257  # GPT-2's real ids; the model's vocab is padded to 50304
BATCHES = (1, 8)
ENGINES = ("gencli", "gencli-int8", "transformers", "ct2", "ct2-int8")
MB = 1e6
RSS_MARGIN = 400 * MB  # the target: gencli's peak RSS <= 2 x fp32 weight bytes + 400 MB
PAUSE = 0.3  # s between calls: Intel OpenMP (CTranslate2's) spins 200 ms after a parallel region
TARGETS = {  # (engine, reference, batch sizes, ratio)
    "gencli vs transformers": ("gencli", "transformers", BATCHES, 1.2),
    "gencli vs ct2": ("gencli", "ct2", BATCHES, 1.1),
    "gencli-int8 vs ct2-int8": ("gencli-int8", "ct2-int8", BATCHES, 1.0),
    "gencli-int8 vs gencli": ("gencli-int8", "gencli", (1,), 1.5),
}
FLOOR_SHARE = 0.5  # gencli float32 at batch 8: at least this share of the memory floor, or a profile


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not getrusage: ru_maxrss survives exec, so a child started by
    a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def build_gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig())


def make_prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, PROMPT_VOCAB, (max(BATCHES), PROMPT_LEN), generator=g).tolist()


# --- the engines, each in its own process --------------------------------------------------------


def gencli_decoder(model: GPT, tokens: int):
    """prompts -> new ids, through the engine as `gencli generate --batch_size N` runs it: in its
    invariant mode for a batch, with the one-row kernel for one prompt (see model/engine.py)."""
    params = SamplingParams(max_tokens=tokens, temperature=0)
    return lambda prompts: generate(model, prompts, params, invariant=len(prompts) > 1)


def to_transformers(model: GPT):
    """A GPT2LMHeadModel holding a copy of `model`'s weights."""
    import transformers  # here, so that gencli's process does not load it
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
        bos_token_id=50256,
        eos_token_id=50256,
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


class _IdVocabulary:
    """What CTranslate2's converter asks of a tokenizer: one token per id, "<id>"."""

    def __init__(self, size: int, eos: int):
        self.size = size
        self.bos_token = self.eos_token = self.unk_token = f"<{eos}>"

    def get_vocab(self) -> dict[str, int]:
        return {f"<{i}>": i for i in range(self.size)}


def write_ct2_model(gpt: GPT, where: Path) -> Path:
    """Write `gpt` as a Hugging Face GPT-2 directory, convert it with CTranslate2's converter; its path."""
    from ctranslate2.converters import TransformersConverter

    hf_dir, out = where / "hf", where / "ct2"
    to_transformers(gpt).save_pretrained(hf_dir)

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return _IdVocabulary(gpt.config.vocab_size, eos=50256)

    Converter(str(hf_dir)).convert(str(out), quantization=None, force=True)  # float32; int8 at load
    shutil.rmtree(hf_dir)
    return out


def ct2_decoder(path: str, compute_type: str, tokens: int):
    import ctranslate2

    gen = ctranslate2.Generator(path, device="cpu", compute_type=compute_type, inter_threads=1,
                                intra_threads=THREADS)

    def decode(prompts):
        starts = [[f"<{i}>" for i in p] for p in prompts]
        res = gen.generate_batch(starts, max_length=tokens, min_length=tokens, sampling_topk=1, beam_size=1,
                                 include_prompt_in_result=False)
        return [r.sequences_ids[0] for r in res]

    return decode


def make_decoder(engine: str, args) -> callable:
    if engine in ("gencli", "gencli-int8"):
        return gencli_decoder(build_gpt(args.seed).prepare_for_inference(int8=engine == "gencli-int8"), args.tokens)
    if engine == "transformers":
        return transformers_decoder(to_transformers(build_gpt(args.seed)), args.tokens)
    return ct2_decoder(args.ct2_model, "int8" if engine == "ct2-int8" else "float32", args.tokens)


def profile_call(decode, prompts) -> dict:
    """Where one call's time goes, by operator (self time), and its share in the linear layers."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        decode(prompts)
        wall = time.perf_counter() - t0
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    return {"wall_s": wall, "ops": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count}
                                    for e in rows[:8]]}


def child(args) -> int:
    """One engine in this process: answer "run B", "profile B" and "rss" lines on stdin, one JSON line each."""
    torch.set_num_threads(THREADS)
    decode = make_decoder(args.child, args)
    prompts = make_prompts(args.seed)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "run":
            batch = prompts[: int(rest[0])]
            t0 = time.perf_counter()
            out = decode(batch)
            print(json.dumps({"secs": time.perf_counter() - t0, "tokens": out}), flush=True)
        elif cmd == "profile":
            print(json.dumps(profile_call(decode, prompts[: int(rest[0])])), flush=True)
        elif cmd == "rss":
            print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}), flush=True)
    return 0


class Engine:
    """An engine's process, driven line by line."""

    def __init__(self, name: str, args):
        self.name = name
        cmd = [sys.executable, "-m", "bench.decode", "--child", name, "--seed", str(args.seed),
               "--tokens", str(args.tokens)]
        if args.ct2_model:
            cmd += ["--ct2-model", args.ct2_model]
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()  # ready

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        got = self.proc.stdout.readline()
        if not got:
            raise SystemExit(f"{self.name}'s process ended (exit {self.proc.wait()})")
        return json.loads(got)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


# --- the floor ------------------------------------------------------------------------------------


def probe() -> dict:
    """Memory read bandwidth (bytes/s) and float32 GEMM peak (FLOP/s) on THREADS threads."""
    torch.set_num_threads(THREADS)
    buf = torch.ones(128 * 2**20)  # 512 MiB
    reads = []
    for _ in range(8):
        t0 = time.perf_counter()
        buf.sum()
        reads.append(time.perf_counter() - t0)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    gemm = []
    for _ in range(4):
        t0 = time.perf_counter()
        a @ b
        gemm.append(time.perf_counter() - t0)
    return {"bandwidth_bytes_s": buf.numel() * 4 / min(reads), "gemm_flop_s": 2 * 2048**3 / min(gemm)}


def step_cost(config: GPTConfig, batch: int, tokens: int, weight_bytes: float) -> tuple[float, float]:
    """(bytes, FLOPs) of one decoding step at `batch` rows, averaged over the decode: every weight
    once, plus each row's keys and values so far (float32), and 2 FLOPs per weight per row."""
    c = config
    avg_len = PROMPT_LEN + tokens / 2
    kv = 2 * c.n_layer * c.n_embd * 4 * avg_len * batch
    matmul_params = 12 * c.n_layer * c.n_embd**2 + c.vocab_size * c.n_embd
    flops = batch * (2 * matmul_params + 4 * c.n_layer * c.n_embd * avg_len)
    return weight_bytes + kv, flops


def int8_weight_bytes(config: GPTConfig) -> float:
    """What gencli's int8 step reads: int8 matrices (two span columns each) and a scale per row."""
    c = config
    per_layer = sum(o * (i + 2) + 8 * o for o, i in ((3 * c.n_embd, c.n_embd), (c.n_embd, c.n_embd),
                                                    (4 * c.n_embd, c.n_embd), (c.n_embd, 4 * c.n_embd)))
    return c.n_layer * per_layer + c.vocab_size * (c.n_embd + 2 + 8)


# --- the run ---------------------------------------------------------------------------------------


def measure(engines: dict[str, Engine], batches, runs: int) -> dict:
    res = {name: {"tok_s": {}, "best_tok_s": {}, "tokens": {}} for name in engines}
    for b in batches:
        times = {name: [] for name in engines}
        for name, e in engines.items():
            log(f"{name}: batch {b}, warm-up")
            res[name]["tokens"][str(b)] = e.ask(f"run {b}")["tokens"]
            time.sleep(PAUSE)
        for i in range(runs):
            for name, e in engines.items():
                got = e.ask(f"run {b}")
                time.sleep(PAUSE)
                if got["tokens"] != res[name]["tokens"][str(b)]:
                    raise SystemExit(f"{name}: greedy decoding gave different tokens on a repeated run")
                tokens = len(got["tokens"][0])
                if any(len(t) != tokens for t in got["tokens"]):
                    raise SystemExit(f"{name}: rows of unequal length")
                times[name].append(got["secs"])
            log(f"batch {b}, run {i + 1}/{runs}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in engines))
        for name in engines:
            n_new = b * len(res[name]["tokens"][str(b)][0])
            res[name]["tok_s"][str(b)] = n_new / statistics.median(times[name])
            res[name]["best_tok_s"][str(b)] = n_new / min(times[name])
    return res


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two engines' greedy tokens are equal."""
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--quick", action="store_true", help="smoke test: 16 new tokens, 2 timed runs, no profile")
    ap.add_argument("--tokens", type=int, help="new tokens per sequence (default 128, 16 with --quick)")
    ap.add_argument("--runs", type=int, help="timed runs after the warm-up (default 5, 2 with --quick)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes (default 1,8)")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                    help="profile one gencli batch-8 call (default: on, off with --quick)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--ct2-model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.tokens = args.tokens or (16 if args.quick else 128)
    if args.child:
        return child(args)
    args.runs = args.runs or (2 if args.quick else 5)
    args.profile = (not args.quick) if args.profile is None else args.profile
    args.batches = [int(b) for b in args.batches.split(",")]
    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not all(1 <= b <= max(BATCHES) for b in args.batches):
        ap.error(f"batch sizes go from 1 to {max(BATCHES)}")
    if not names or any(e not in ENGINES for e in names):
        ap.error(f"engines are some of {', '.join(ENGINES)}")
    torch.set_num_threads(THREADS)

    log("probe: memory bandwidth and GEMM peak")
    floor = probe()  # (its buffer is freed on return: the engines' processes start after it)
    config = GPTConfig()
    gpt = build_gpt(args.seed)
    fp32_bytes = gpt.num_params() * 4
    tmp = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    try:
        if any(n.startswith("ct2") for n in names):
            log("CTranslate2: converting the same weights")
            args.ct2_model = str(write_ct2_model(gpt, tmp))
        del gpt
        engines = {}
        try:
            for n in names:
                log(f"{n}: starting its process")
                engines[n] = Engine(n, args)
            res = measure(engines, args.batches, args.runs)
            rss = {n: e.ask("rss")["peak_rss_bytes"] for n, e in engines.items()}  # before the profiler's own
            prof = engines["gencli"].ask(f"profile {max(args.batches)}") if args.profile and "gencli" in engines \
                else None
        finally:
            for e in engines.values():
                e.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = report(args, names, res, rss, floor, config, fp32_bytes, prof)
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["gencli_equals_transformers"] is not False else 1


def report(args, names, res, rss, floor, config, fp32_bytes, prof) -> dict:
    bw, peak = floor["bandwidth_bytes_s"], floor["gemm_flop_s"]
    tokens = args.tokens
    floors = {}
    for b in args.batches:
        k = str(b)
        nbytes, flops = step_cost(config, b, tokens, fp32_bytes)
        nbytes8, _ = step_cost(config, b, tokens, int8_weight_bytes(config))
        floors[k] = {"memory_tok_s": b * bw / nbytes, "compute_tok_s": b * peak / flops,
                     "int8_memory_tok_s": b * bw / nbytes8}
    print()
    print(f"GPT-2 small, {fp32_bytes / 4 / 1e6:.1f}M params ({fp32_bytes / MB:.0f} MB fp32), CPU, {THREADS} "
          f"threads, torch {torch.__version__}; prompt {PROMPT_LEN} tokens, {tokens} new, greedy; median of "
          f"{args.runs} turns after a warm-up, each engine in its own process")
    print(f"probe: memory read {bw / 1e9:.1f} GB/s, float32 GEMM {peak / 1e9:.0f} GFLOP/s")
    print()
    print(f"{'batch':>5}  " + "  ".join(f"{n:>17}" for n in names) + "  floor (memory / compute)")
    for b in args.batches:
        k = str(b)
        cells = [f"{res[n]['tok_s'][k]:.1f} ({res[n]['best_tok_s'][k]:.1f})" for n in names]
        f = floors[k]
        print(f"{b:>5}  " + "  ".join(f"{c:>17}" for c in cells) +
              f"  {f['memory_tok_s']:.0f} / {f['compute_tok_s']:.0f} fp32, {f['int8_memory_tok_s']:.0f} int8")
    print("tok/s: median (best); the best run shows speed with the least interference on a shared machine")
    print()

    ratios = {}
    for label, (eng, ref, batches, target) in TARGETS.items():
        if eng not in res or ref not in res:
            continue
        got = {str(b): res[eng]["tok_s"][str(b)] / res[ref]["tok_s"][str(b)] for b in batches if b in args.batches}
        if got:
            ratios[label] = {"ratio": got, "target": target, "met": all(v >= target for v in got.values())}
            print(f"{label:>24}: " + ", ".join(f"batch {k} {v:.2f}x" for k, v in got.items()) +
                  f"  (target >= {target}x: {'met' if ratios[label]['met'] else 'NOT met'})")
    share = {}
    for n in ("gencli", "gencli-int8"):
        if n in res:
            key = "memory_tok_s" if n == "gencli" else "int8_memory_tok_s"
            share[n] = {k: res[n]["tok_s"][k] / floors[k][key] for k in res[n]["tok_s"]}
            print(f"{n + ' / memory floor':>24}: " + ", ".join(f"batch {k} {v:.2f}" for k, v in share[n].items()))
    if "gencli" in share and "8" in share["gencli"]:
        print(f"{'':>24}  (target at batch 8: >= {FLOOR_SHARE} of the floor, or a profile that names what holds "
              f"it back)")
    print()
    agree = {}
    if "gencli" in res:
        for n in names:
            if n != "gencli":
                agree[n] = {k: agreement(res["gencli"]["tokens"][k], res[n]["tokens"][k]) for k in res[n]["tokens"]}
        if agree:
            print("greedy tokens equal to gencli float32's: " + "; ".join(
                f"{n} " + ", ".join(f"batch {k} {v:.0%}" for k, v in a.items()) for n, a in agree.items()))
    equal_hf = all(v == 1.0 for v in agree["transformers"].values()) if "transformers" in agree else None
    if equal_hf is False:
        log("gencli's float32 greedy tokens DIFFER from transformers'")
    if prof:
        print(f"profile of one gencli call at batch {max(args.batches)} ({prof['wall_s']:.2f} s), self time: " +
              ", ".join(f"{o['op']} {o['share']:.0%}" for o in prof["ops"][:5]))
    target_rss = 2 * fp32_bytes + RSS_MARGIN
    print("peak RSS per process: " + ", ".join(f"{n} {v / MB:.0f} MB" for n, v in rss.items()) +
          (f"; gencli's target <= 2 x {fp32_bytes / MB:.0f} + {RSS_MARGIN / MB:.0f} = {target_rss / MB:.0f} MB "
           f"({'met' if rss['gencli'] <= target_rss else 'NOT met'})" if "gencli" in rss else ""))
    return {
        "threads": THREADS, "prompt_tokens": PROMPT_LEN, "new_tokens": tokens, "runs": args.runs,
        "batches": args.batches, "engines": names,
        "tok_s": {n: res[n]["tok_s"] for n in names}, "best_tok_s": {n: res[n]["best_tok_s"] for n in names},
        "ratios": ratios, "probe": floor, "floor_tok_s": floors, "share_of_memory_floor": share,
        "agreement_with_gencli": agree, "gencli_equals_transformers": equal_hf,
        "profile": prof, "peak_rss_bytes": rss, "weight_bytes": fp32_bytes, "gencli_rss_target_bytes": target_rss,
    }


if __name__ == "__main__":
    sys.exit(main())
