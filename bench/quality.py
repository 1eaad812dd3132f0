"""int8 against float32 on a trained model: validation loss, and greedy tokens over a fixed prompt set.

Run from the repository root, after `gencli demo` has trained its model (or give --model and --data):

    python -m bench.quality            # the demo's model and data under $GENCLI_HOME/demo
    python -m bench.quality --json     # the same, with one JSON object as the last line

Both are the same checkpoint, loaded twice (`load_model(dtype="float32")` and `dtype="int8"`):
- validation loss: mean cross-entropy per token, in nats, over 256 fixed windows spread evenly
  over val.bin, each the model's block size long (every token scored, no assistant mask), computed
  from each model's own logits. Target: int8 within 0.02 nats of float32.
- greedy agreement: 64 prompts, each 32 tokens of val.bin taken at fixed places, continued greedily
  for 64 new tokens by each model, all decoded together on the engine (each row computes what it
  would alone). Reported: the share of the 64 x 64 new tokens equal to float32's at the same
  place, the number of lines equal throughout, and the mean place of a line's first difference
  (64 where none). A single different token sends the rest of a line elsewhere, so the share
  counts the agreement of whole continuations, not of next-token choices alone.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.nn import functional as F

from gencli.model.checkpoint import load_model
from gencli.model.engine import generate
from gencli.model.errors import GencliError
from gencli.model.params import SamplingParams
from gencli.model.train import eval_starts, open_data, window
from gencli.storage.settings import get_settings

WINDOWS = 256
PROMPTS, PROMPT_LEN, NEW = 64, 32, 64
TARGET_NATS = 0.02


def val_loss(model, split, block_size: int) -> float:
    """Mean loss per token from the model's own logits. Not Trainer.evaluate: GPT.loss multiplies by
    the head's float32 weight directly, which would score an int8 model with a float32 head."""
    total, count = 0.0, 0
    starts = eval_starts(split, block_size, WINDOWS)
    with torch.inference_mode():
        for i in range(0, len(starts), 8):
            xs, ys = zip(*(window(split, s, block_size, False) for s in starts[i : i + 8]), strict=True)
            x, y = torch.stack(xs), torch.stack(ys)
            logits, _ = model(x)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += y.numel()
    return total / count


def prompts_from(split) -> list[list[int]]:
    return [split.ids[s : s + PROMPT_LEN].astype("int64").tolist() for s in eval_starts(split, PROMPT_LEN, PROMPTS)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    demo = get_settings().home / "demo"
    ap.add_argument("--model", default=str(demo / "models" / "chitchat-tiny"), help="checkpoint (default: the demo's)")
    ap.add_argument("--data", default=str(demo / "data" / "chitchat-chatml"), help="prep output with val.bin")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    try:
        data = open_data(args.data, masks=False)
        fp32, int8 = load_model(args.model, dtype="float32").model, load_model(args.model, dtype="int8").model
    except GencliError as e:
        sys.exit(f"bench.quality: {e} (run `gencli demo` first, or pass --model and --data)")
    block = min(fp32.config.block_size, len(data.val) - 2)
    loss = {"float32": val_loss(fp32, data.val, block), "int8": val_loss(int8, data.val, block)}
    prompts = prompts_from(data.val)
    greedy = SamplingParams(max_tokens=NEW, temperature=0)
    ref, got = generate(fp32, prompts, greedy, slots=16), generate(int8, prompts, greedy, slots=16)
    equal = sum(a == b for r, g in zip(ref, got, strict=True) for a, b in zip(r, g, strict=True))
    first = [next((k for k, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), NEW)
             for r, g in zip(ref, got, strict=True)]
    share = equal / (PROMPTS * NEW)
    delta = loss["int8"] - loss["float32"]
    print(f"model {args.model} ({fp32.num_params() / 1e6:.1f}M params), data {args.data}")
    print(f"validation loss over {WINDOWS} windows of {block} tokens: float32 {loss['float32']:.4f}, "
          f"int8 {loss['int8']:.4f} nats; int8 - float32 = {delta:+.4f} (target within {TARGET_NATS}: "
          f"{'met' if abs(delta) <= TARGET_NATS else 'NOT met'})")
    print(f"greedy, {PROMPTS} prompts of {PROMPT_LEN} val tokens, {NEW} new: {share:.1%} of int8's tokens equal "
          f"float32's; {first.count(NEW)}/{PROMPTS} lines equal throughout; first difference at token "
          f"{sum(first) / PROMPTS:.1f} on average")
    if args.json:
        print(json.dumps({"model": args.model, "val_loss": loss, "delta_nats": delta, "target_nats": TARGET_NATS,
                          "met": abs(delta) <= TARGET_NATS, "greedy_token_share": share,
                          "lines_equal": first.count(NEW), "prompts": PROMPTS, "new_tokens": NEW,
                          "mean_first_difference": sum(first) / PROMPTS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
