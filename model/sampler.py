"""Picking each row's next id from its logits, with that row's own parameters and generator.

Rows of one decoding step may belong to different jobs, so every parameter is per row, and each
row draws from its own seeded generator: a seeded sequence samples the same ids whoever shares its
step. A row's path through here depends only on its own parameters and state (a row goes through
the penalties or the nucleus's rejection because it asks for them, never because another row did),
and every reduction runs along one row, so its result is the same bit for bit as when it runs
alone. No step sorts the vocabulary: top_p is sampled by rejection (see _draw).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence as Rows
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.nn import functional as F

from gencli.model.params import SamplingParams
from gencli.model.structured import Constraint, allowed_of


def seeded_generator(seed: int | None, skip: int = 0) -> torch.Generator:
    """A CPU generator (the same draws on every device) seeded with seed (None: a random seed),
    advanced past `skip` draws: a sequence resumed after `skip` sampled ids draws what it would have."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    for _ in range(skip):
        torch.rand((), generator=g)
    return g


@dataclass(frozen=True)
class TokenLogprob:
    """A new id's log-probability and the `top` likeliest ids' (id, logprob), likeliest first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Row(Protocol):
    """What the sampler reads of a row (the engine's Sequence): its parameters and generator, the ids
    before it (prompt; prior and out: the ids it made), its end ids, and its grammar state."""

    params: SamplingParams
    generator: torch.Generator
    prompt: list[int]
    prior: list[int]
    out: list[int]
    stop_ids: frozenset[int]
    banned: frozenset[int]
    constraint: Constraint | None


class Sampler:
    """Next ids for a batch of rows, each from its own logits, parameters and generator.

    Per row, in this order (vLLM's): ids generation never yields (`allowed` (V,) bool: the only ids
    any row may take; None: every id) and the row's grammar mask cut; repetition, frequency and
    presence penalties and logit_bias applied to its logits; its end ids cut while it has made fewer
    than min_tokens (and always under ignore_eos). Then greedy rows take the argmax; the others
    temperature, top_k, min_p, then one uniform draw through the inverse CDF, top_p by rejection.

    Rows with nothing but greedy picking take the argmax of their raw logits (one pass, no copy);
    the rest are processed together, their cuts and penalties written in place into one copy."""

    def __init__(self, vocab_size: int, allowed: torch.Tensor | None, device):
        self.vocab_size = vocab_size
        self.never = None  # ids generation must never yield
        if allowed is not None and not bool(allowed.all()):
            self.never = torch.nonzero(~allowed.to(device)).flatten()
        self._never_set = frozenset(self.never.tolist()) if self.never is not None else frozenset()
        self._x: torch.Tensor | None = None  # CHUNK rows of logits, copied (see _rows)
        self._p: torch.Tensor | None = None  # their probabilities, padded to whole blocks
        self._s: torch.Tensor | None = None

    def sample(self, logits: torch.Tensor, rows: Rows[Row]) -> list[int]:
        picked = [0] * len(rows)
        plain = [r for r, row in enumerate(rows) if row.params.temperature == 0 and not _shaped(row)]
        if len(plain) == len(rows):
            picked = argmax(logits).tolist()
        else:  # the plain rows a few at a time, copied into a buffer the cache holds
            for k in range(0, len(plain), CHUNK):
                part = plain[k : k + CHUNK]
                for r, token in zip(part, argmax(self._rows(logits, part)).tolist()):
                    picked[r] = token
        never = self._never_set
        # a raw argmax on an id never to yield (rare): that row goes the long way, with the cut
        plain_ok = {r for r in plain if picked[r] not in never}
        rest = [r for r in range(len(rows)) if r not in plain_ok]
        for k in range(0, len(rest), CHUNK):
            part = rest[k : k + CHUNK]
            x = self._rows(logits, part)
            if self.never is not None:
                x[:, self.never] = float("-inf")
            shaped = [rows[r] for r in part]
            self._shape(x, shaped)
            greedy = [j for j, row in enumerate(shaped) if row.params.temperature == 0]
            drawn = [j for j, row in enumerate(shaped) if row.params.temperature != 0]
            if greedy:
                for j, token in zip(greedy, argmax(x[greedy]).tolist()):
                    picked[part[j]] = token
            if drawn:
                xs = x if len(drawn) == len(shaped) else x[drawn]
                for j, token in zip(drawn, self._draw(xs, [shaped[j] for j in drawn]).tolist()):
                    picked[part[j]] = token
        return picked

    def _rows(self, logits: torch.Tensor, part: list[int]) -> torch.Tensor:
        """A float32 copy of the rows `part` (at most CHUNK) of logits, in a buffer reused step after
        step (a fresh one would cost its pages' faults every time)."""
        V = logits.size(-1)
        if self._x is None or self._x.size(1) != V or self._x.device != logits.device:
            self._x = torch.empty((CHUNK, V), dtype=torch.float32, device=logits.device)
            self._p = torch.zeros((CHUNK, -(-V // BLOCK) * BLOCK), dtype=torch.float32, device=logits.device)
            self._s = torch.empty_like(self._p[:1])  # a top_p row's probabilities above its draw
        out = self._x[: len(part)]
        if logits.dtype == torch.float32:
            torch.index_select(logits, 0, torch.tensor(part, device=logits.device), out=out)
        else:
            out.copy_(logits[part])
        return out

    def _draw(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """One id per row of logits (n, V), which it overwrites: temperature, top_k, min_p, then one
        uniform draw from the row's generator through the inverse CDF of exp(logit - max), and for
        top_p < 1 rows rejection: a draw outside the nucleus (the ids with more than top_p of the
        probability above them) cuts every id no likelier than it, and the row draws again over what
        is left, from uniforms derived from its one draw. So a step takes one draw of a row's
        generator whatever happens (a resumed row skips one per id made), and nothing sorts the
        vocabulary. Each row's values come from its own logits: every sum runs over fixed blocks of
        one row."""
        dev = logits.device
        params = [row.params for row in rows]
        n, V = logits.shape
        body, tail = _split(logits)
        best = body.amax(-1) if tail is None else torch.cat([body.amax(-1), tail.amax(-1, keepdim=True)], 1)
        # Shifted so each row's top logit is 0, and the temperature held to float32's range: no
        # finite temperature, however tiny or large, makes an inf or a NaN here.
        f = torch.finfo(logits.dtype)
        inv = torch.tensor([1.0 / min(max(p.temperature, f.tiny), f.max) for p in params], device=dev).unsqueeze(1)
        top, inv = best.amax(-1, keepdim=True), inv.clamp(max=f.max)
        logits.sub_(top).mul_(inv)  # logit / T, its top 0
        best.sub_(top).mul_(inv)  # (the same values, where they are in the row)
        for r, p in enumerate(params):
            if p.top_k is not None and p.top_k < V:
                logits[r].masked_fill_(logits[r] < _kth(logits[r], best[r], p.top_k), float("-inf"))
            if p.min_p > 0:  # p < min_p * p_max: a logit below log(min_p), now that the top one is 0
                logits[r].masked_fill_(logits[r] < math.log(p.min_p), float("-inf"))
        probs = self._p[:n]  # padded with zeros to whole blocks
        # exp(l) as 2 ** (l * log2(e)): torch's exp2 runs 3.5x faster than its exp on this CPU
        torch.exp2(logits.mul_(LOG2E), out=probs[:, :V])
        u = torch.stack([torch.rand((), generator=row.generator) for row in rows]).to(dev)
        picked, total = _inverse_cdf(probs, u)
        for r, p in enumerate(params):
            if p.top_p < 1.0:
                picked[r] = self._nucleus(probs[r : r + 1], picked[r], total[r], p.top_p, float(u[r]), self._s)
        return picked

    @staticmethod
    def _nucleus(probs: torch.Tensor, picked: torch.Tensor, total: torch.Tensor, top_p: float, u: float,
                 scratch: torch.Tensor) -> torch.Tensor:
        """A top_p row's id by rejection: probs (1, padded V), its first draw `picked` and its total.
        Each round cuts at least the id drawn, and the likeliest id is always kept: it ends."""
        for round_ in range(1, 2**16):
            q = probs[0, picked]
            above = _sums(torch.mul(probs, probs > q, out=scratch))
            if float(above[0]) <= top_p * float(total):
                return picked
            probs.masked_fill_(probs <= q, 0.0)
            # (the nucleus is the whole distribution's: its total stays the one to compare with)
            picked = _inverse_cdf(probs, torch.tensor([_derived(u, round_)], device=probs.device))[0][0]
        raise RuntimeError("top_p rejection did not end")

    def _shape(self, x: torch.Tensor, rows: list[Row]) -> None:
        """The row-specific cuts, penalties and biases, in place on x (n, V): each row's from its own state."""
        V = x.size(-1)
        cons = [j for j, row in enumerate(rows) if row.constraint is not None]
        if cons:
            words = rows[cons[0]].constraint.words
            bitmask = torch.zeros((len(cons), words), dtype=torch.int32)
            for k, j in enumerate(cons):
                row = rows[j]
                row.constraint.catch_up(row.prior + row.out)
                row.constraint.fill(bitmask[k])
            barred = allowed_of(~bitmask, V).to(x.device)  # (the complement's bits: the ids not allowed)
            if len(cons) == x.size(0):
                x.masked_fill_(barred, float("-inf"))
            else:  # in place, row by row: no gather and scatter of the constrained rows
                for k, j in enumerate(cons):
                    x[j].masked_fill_(barred[k], float("-inf"))
        cells: dict[str, list] = {"row": [], "id": [], "count": [], "prompt": []}
        for j, row in enumerate(rows):
            p = row.params
            if p.penalized:
                made = torch.tensor(row.prior + row.out, dtype=torch.long)
                ids, counts = torch.unique(made, return_counts=True) if len(made) else (made, made)
                seen = ids
                if p.repetition_penalty != 1.0 and row.prompt:
                    seen = torch.unique(torch.cat([ids, torch.tensor(row.prompt, dtype=torch.long)]))
                    in_out = torch.zeros(V, dtype=torch.long)
                    in_out[ids] = counts
                    counts = in_out[seen]
                cells["row"].append(torch.full_like(seen, j))
                cells["id"].append(seen)
                cells["count"].append(counts)
        if cells["row"]:
            r, i, c = (torch.cat(cells[k]).to(x.device) for k in ("row", "id", "count"))
            pp = torch.tensor([rows[j].params.presence_penalty for j in range(len(rows))], device=x.device)
            fp = torch.tensor([rows[j].params.frequency_penalty for j in range(len(rows))], device=x.device)
            rp = torch.tensor([rows[j].params.repetition_penalty for j in range(len(rows))], device=x.device)
            v = x[r, i]
            v = torch.where(v > 0, v / rp[r], v * rp[r])  # HF's and vLLM's: prompt and output ids alike
            v = v - fp[r] * c - pp[r] * (c > 0)  # OpenAI's: output ids only
            x[r, i] = v
        biased = [(j, t, b) for j, row in enumerate(rows) for t, b in row.params.logit_bias if t < V]
        if biased:
            r, i, b = zip(*biased)
            r, i = torch.tensor(r, device=x.device), torch.tensor(i, device=x.device)
            x[r, i] = x[r, i] + torch.tensor(b, device=x.device)
        for j, row in enumerate(rows):
            ends = [e for e in _ends_cut(row) if e < V]
            if ends:
                x[j, torch.tensor(sorted(ends), dtype=torch.long, device=x.device)] = float("-inf")


def _ends_cut(row: Row) -> frozenset[int]:
    """The ids the row may not take now: those it never takes (`banned`: under ignore_eos, the
    tokenizer's end ids), and its end ids while it has made fewer than min_tokens."""
    p = row.params
    if p.min_tokens and len(row.prior) + len(row.out) < p.min_tokens:
        return row.banned | row.stop_ids
    return row.banned


def _shaped(row: Row) -> bool:
    """Whether anything but the global cut changes the row's logits."""
    p = row.params
    return (row.constraint is not None or p.penalized or bool(p.logit_bias) or bool(row.banned)
            or (p.min_tokens > 0 and len(row.prior) + len(row.out) < p.min_tokens))


CHUNK = 4  # rows sampled together: 1.6 MB of float32 logits at 100k ids, held in the cache across passes
# What a seeded row draws, given its logits: 2 since the inverse CDF runs over block sums of exp2 and top_p
# samples by rejection (1, before: a softmax's cumsum and a sorted nucleus; the same distribution, and
# mostly the same ids, but a replay across the change may differ where rounding or the nucleus decides).
SAMPLER_VERSION = 2
LOG2E = 1.4426950408889634
BLOCK = 1024  # ids summed together: the inverse CDF finds a row's block by the block sums, then its id


def _kth(row: torch.Tensor, best: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a row (V,), given its blocks' maxima: where k blocks or fewer, every
    value at least the k-th largest block maximum is a candidate (k values reach it, so the row's k-th
    largest does too), and only those are ranked; else the whole row is."""
    if k > best.numel():
        return torch.topk(row, k).values[-1]
    floor = torch.topk(best, k).values[-1]
    return torch.topk(row[row >= floor], k).values[-1]


def argmax(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """torch.argmax(x[rows], -1) (the first of equal maxima; rows None: all): each block's maximum
    (a vectorized reduction, several times faster here than argmax's), then argmax within the first
    block that holds the row's maximum."""
    x = x if rows is None else x.index_select(0, rows)
    V = x.size(-1)
    body, tail = _split(x)
    best = body.amax(-1)  # (n, blocks)
    if tail is not None:
        best = torch.cat([best, tail.amax(-1, keepdim=True)], dim=1)
    first = (best == best.amax(-1, keepdim=True)).to(torch.uint8).argmax(-1, keepdim=True)  # (n, 1)
    ids = (first * BLOCK + torch.arange(BLOCK, device=x.device)).clamp(max=V - 1)
    return ids.gather(1, x.gather(1, ids).argmax(-1, keepdim=True)).squeeze(1)


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows of x (n, V) as whole blocks (n, V // BLOCK, BLOCK), a view, and the ids past the
    last whole block (n, V % BLOCK) or None."""
    V = x.size(-1)
    whole = V // BLOCK
    body = x.as_strided((x.size(0), whole, BLOCK), (x.stride(0), BLOCK, 1), x.storage_offset())
    return body, (x[:, whole * BLOCK :] if V % BLOCK else None)


def _sums(probs: torch.Tensor) -> torch.Tensor:
    """Each row's sum (n, blocks * BLOCK) -> (n,), block by block then along the blocks: the same
    order whatever the number of rows."""
    return _block_sums(probs).cumsum(-1)[:, -1]


def _block_sums(probs: torch.Tensor) -> torch.Tensor:
    return probs.view(probs.size(0), -1, BLOCK).sum(-1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the id at u (n,) of each row's cumulative probabilities, each row's total): the block that
    holds u * total by the cumulative block sums, then the id within it by that block's own."""
    cum = _block_sums(probs).cumsum(-1)
    total = cum[:, -1]
    target = (u * total).unsqueeze(1)
    block = torch.searchsorted(cum, target, right=True).clamp(max=cum.size(1) - 1)  # (n, 1)
    before = torch.where(block > 0, cum.gather(1, (block - 1).clamp(min=0)), 0.0)
    ids = block * BLOCK + torch.arange(BLOCK, device=probs.device)
    within = probs.gather(1, ids).cumsum(-1) + before
    at = torch.searchsorted(within, target, right=True).clamp(max=BLOCK - 1)
    picked = ids.gather(1, at).squeeze(1)
    # Rounding can land u past the last id with any probability: fall back to the likeliest id there.
    dead = probs.gather(1, picked.unsqueeze(1)).squeeze(1) <= 0
    if dead.any():
        picked[dead] = probs[dead].argmax(dim=-1)
    return picked, total


def _derived(u: float, round_: int) -> float:
    """A uniform for a rejected draw's next round, from the row's draw of this step and the round."""
    g = torch.Generator()
    g.manual_seed((struct.unpack("<I", struct.pack("<f", u))[0] * 0x9E3779B97F4A7C15 + round_) % 2**63)
    return float(torch.rand((), generator=g))


def logprob_of(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Of one position's logits (V,): token's log-probability and the `top` likeliest ids'.

    The model's own distribution: the log-softmax of its logits over its whole vocabulary, as
    training's loss and transformers compute it, before temperature, top_k, top_p and the mask of
    ids generation never yields (so a prompt's special ids, scored, are finite); vLLM's default
    (its raw_logprobs mode). The same whichever way the id was picked. One position at a time:
    nothing of another row's length or company enters its reductions."""
    return logprobs_of(logits.unsqueeze(0), [token], top)[0]


def logprobs_of(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """logprob_of for each of n positions at once (logits (n, V), tokens one per position): the
    log-softmax of each row over the whole vocabulary, in one pass over the n rows (a prompt's
    positions, scored a chunk at a time; a new id's alone). Each row's values come from that row alone; the engine
    always hands a position in the same chunk, so they do not depend on a sequence's company."""
    lp = F.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(1, torch.tensor(tokens, device=lp.device).unsqueeze(1))[:, 0].tolist()
    if not top:
        return [TokenLogprob(v) for v in picked]
    best = torch.topk(lp, min(top, lp.size(-1)), dim=-1)
    ids, values = best.indices.tolist(), best.values.tolist()
    return [TokenLogprob(v, tuple(zip(i, b, strict=True))) for v, i, b in zip(picked, ids, values, strict=True)]
