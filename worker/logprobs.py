"""Log-probabilities as the queue carries them: in a "tok" event's "lp" and in an item's record.

An entry is `[id, logprob, [[id, logprob], ...]]`: the id, its logprob (None for a prompt's first
id, which nothing predicts) and the likeliest ids' at that position, likeliest first (as many as
the item's sampling asked for). Floats travel as JSON numbers, which Python writes and reads back
exactly, so a stored logprob is the engine's bit for bit.

An item's record (the store's `items.logprobs`), when its sampling asked for any:
  {"prompt": [entry per prompt id] or absent, "tokens": [entry per generated id, a stop id included],
   "scored": [[start, end], ...] of the prompt's ids, for a scoring job's line (model/scoring.py)}
A tok event's "lp" is `[k, logprob, top]`: the entry of the item's k-th generated id (the event's id).
"""

from __future__ import annotations

from gencli.model.engine import Sequence
from gencli.model.sampler import TokenLogprob


def entry(token: int, lp: TokenLogprob | None) -> list:
    if lp is None:
        return [token, None, []]
    return [token, lp.logprob, [[i, v] for i, v in lp.top]]


def record_of(seq: Sequence | None, spans: list[list[int]] | None = None) -> dict | None:
    """What an item's sequence scored, as the store records it (None: nothing was asked); spans: a
    scoring job's line's ranges of prompt ids that count (model/scoring.py), kept as "scored"."""
    if seq is None or not seq.params.scores:
        return None
    out: dict = {} if spans is None else {"scored": spans}
    if seq.params.prompt_logprobs is not None:
        out["prompt"] = [entry(t, lp) for t, lp in zip(seq.prompt, seq.prompt_logprobs)]
    if seq.params.logprobs is not None:
        out["tokens"] = [entry(t, lp) for t, lp in zip(seq.prior + seq.out, seq.logprobs)]
    return out


def event_lp(seq: Sequence) -> list | None:
    """The "lp" of the tok event of the id a sequence just made, where it asked for logprobs."""
    if seq.params.logprobs is None or not seq.logprobs:
        return None
    lp = seq.logprobs[-1]
    return [len(seq.logprobs) - 1, lp.logprob, [[i, v] for i, v in lp.top]]
