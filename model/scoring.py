"""What a scoring job scores: each line's ids, and the spans of them whose log-likelihood counts.

A line (an item's prompt `{"score": spec}`) is one of:
- `{"text": T}`: every token of T, given the start of a document: the ids are `<|endoftext|>` and
  T's, so T's first token is scored too (lm-evaluation-harness's rolling log-likelihood does the
  same); a tokenizer without that token leaves T's first token unscored;
- `{"prompt": P, "completion": C}`: C's tokens given P's (each tokenized on its own, as
  lm-evaluation-harness tokenizes a context and its continuation);
- `{"messages": [...]}`: a conversation in the model's chat format, its assistant turns scored (the
  tokens a chat fine-tune learns: each reply's text and the token or newline that ends it);
- `{"token_ids": [...], "from": k}`: a window of a tokenized dataset, its ids from k on.
Nothing here is special-token text: `<|endoftext|>` inside T is text, as everywhere in gencli.

A line's scores come from its prompt logprobs (the model's raw distribution, model/sampler.py's
logprob_of): tokens scored, their summed logprob, the mean, the perplexity exp(-mean).
"""

from __future__ import annotations

import math

from gencli.model.chat import ChatFormat, encode_segments, segments
from gencli.model.errors import InvalidParameterError
from gencli.model.tokenizer import Tokenizer


def kind_of(spec) -> str:
    """Which kind of line spec is; InvalidParameterError (saying what a line may be) if none."""
    if isinstance(spec, dict):
        keys = set(spec)
        if keys == {"text"} and isinstance(spec["text"], str):
            return "text"
        if keys == {"prompt", "completion"} and all(isinstance(spec[k], str) for k in keys):
            return "prompt/completion"
        if keys == {"messages"} and isinstance(spec["messages"], list):
            return "messages"
        if keys == {"token_ids", "from"} and isinstance(spec["token_ids"], list) and type(spec["from"]) is int:
            return "token_ids"
    raise InvalidParameterError('a line to score is {"text"}, {"prompt", "completion"} (the completion scored) or '
                                '{"messages"} (the assistant turns scored)')


def score_ids(tok: Tokenizer, fmt: ChatFormat, spec: dict) -> tuple[list[int], list[list[int]]]:
    """(ids, spans): the ids the model reads, and the [start, end) ranges of them scored."""
    kind = kind_of(spec)
    if kind == "text":
        if not spec["text"]:
            raise InvalidParameterError("an empty text has nothing to score")
        start = [tok.eot_id] if tok.eot_id is not None else []
        ids = start + tok.encode(spec["text"])
        return ids, [[1, len(ids)]] if len(ids) > 1 else []
    if kind == "prompt/completion":
        if not spec["completion"]:
            raise InvalidParameterError("an empty completion has nothing to score")
        if not spec["prompt"]:
            return score_ids(tok, fmt, {"text": spec["completion"]})
        context, completion = tok.encode(spec["prompt"]), tok.encode(spec["completion"])
        return context + completion, [[len(context), len(context) + len(completion)]]
    if kind == "messages":
        ids, mask = encode_segments(tok, segments(fmt, spec["messages"], add_generation_prompt=False))
        spans: list[list[int]] = []
        for i, target in enumerate(mask):
            if target and i > 0:
                if spans and spans[-1][1] == i:
                    spans[-1][1] = i + 1
                else:
                    spans.append([i, i + 1])
        if not spans:
            raise InvalidParameterError("a conversation to score needs an assistant message: its replies are what "
                                        "is scored")
        return ids, spans
    ids, first = list(spec["token_ids"]), spec["from"]  # (checked against the vocabulary by encode_line)
    if not ids or not 1 <= first <= len(ids):
        raise InvalidParameterError("a window of ids scores from a position in 1..its length")
    return ids, [[first, len(ids)]]


def is_scored(prompt) -> bool:
    """Whether an item's prompt is a scoring job's line ({"score": spec})."""
    return isinstance(prompt, dict) and "score" in prompt


def windows(ids, size: int) -> list[dict]:
    """A tokenized split (a sequence of ids) as lines of at most `size` ids, each scored from its
    second: consecutive windows share one id, so every id but the split's first is scored once,
    given up to size - 1 ids before it."""
    if size < 2:
        raise InvalidParameterError("windows need a context of at least 2 ids")
    step, n = size - 1, len(ids)
    return [{"token_ids": [int(i) for i in ids[s : s + size]], "from": 1} for s in range(0, max(n - 1, 1), step)]


def scores(record: dict, spans: list[list[int]], *, per_token: bool = False) -> dict:
    """A line's scores from its logprobs record (worker/logprobs.py): its prompt entries in spans."""
    entries = [e for a, b in spans for e in record["prompt"][a:b]]
    total = math.fsum(e[1] for e in entries)
    n = len(entries)
    out = {"tokens": n, "logprob": total, "mean_logprob": total / n if n else None,
           "perplexity": math.exp(-total / n) if n else None}
    if per_token:
        out["token_logprobs"] = [[e[0], e[1]] for e in entries]
    return out


def summary(lines: list[dict]) -> dict:
    """The totals of scored lines: tokens, summed logprob, mean per token, perplexity."""
    n = sum(s["tokens"] for s in lines)
    total = math.fsum(s["logprob"] for s in lines)
    return {"lines": len(lines), "tokens": n, "logprob": total, "mean_logprob": total / n if n else None,
            "perplexity": math.exp(-total / n) if n else None}
