"""Picking each row's next id from its logits, with that row's own parameters and generator.

Rows of one decoding step may belong to different jobs, so temperature, top_k and top_p are
per row, and each row draws from its own seeded generator: a seeded sequence samples the same
ids whoever shares its step. A row's path through here depends only on its own parameters (a
row with top_p 1 never goes through the nucleus sort because another row did), so its result is
the same bit for bit as when it runs alone.
"""

from __future__ import annotations

from collections.abc import Sequence as Rows
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from gencli.model.params import SamplingParams


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


class Sampler:
    """Next ids for a batch of rows: greedy where temperature is 0, else temperature, top_k, top_p
    and one uniform draw per row through the inverse CDF. `allowed` (V,) bool: the only ids any row
    may take (None: every id)."""

    def __init__(self, vocab_size: int, allowed: torch.Tensor | None, device):
        self.bias = None  # -inf on the ids generation must never yield, added to the logits
        if allowed is not None:
            self.bias = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            self.bias.masked_fill_(~allowed.to(device), float("-inf"))

    def sample(self, logits: torch.Tensor, params: Rows[SamplingParams], generators: Rows[torch.Generator]) -> list[int]:
        logits = logits.float()
        if self.bias is not None:
            logits = logits + self.bias
        picked = logits.argmax(dim=-1)
        sampled = [r for r, p in enumerate(params) if p.temperature != 0]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            picked[rows] = self._draw(logits[rows], [params[r] for r in sampled], [generators[r] for r in sampled])
        return picked.tolist()

    @staticmethod
    def _draw(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]) -> torch.Tensor:
        dev = logits.device
        # Shifted so each row's top logit is 0, and the temperature held to float32's range: no
        # finite temperature, however tiny or large, makes an inf or a NaN here.
        f = torch.finfo(logits.dtype)
        temps = torch.tensor([min(max(p.temperature, f.tiny), f.max) for p in params], device=dev).unsqueeze(1)
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / temps
        V = logits.size(-1)
        ks = [p.top_k if p.top_k is not None and p.top_k < V else None for p in params]
        cut = [r for r, k in enumerate(ks) if k is not None]
        if cut:
            kmax = max(ks[r] for r in cut)
            rows = torch.tensor(cut, device=dev)
            top = torch.topk(logits[rows], kmax, dim=-1).values
            kth = top.gather(1, torch.tensor([[ks[r] - 1] for r in cut], device=dev))
            logits[rows] = logits[rows].masked_fill(logits[rows] < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        nucleus = [r for r, p in enumerate(params) if p.top_p < 1.0]
        if nucleus:
            rows = torch.tensor(nucleus, device=dev)
            probs[rows] = _nucleus(probs[rows], torch.tensor([params[r].top_p for r in nucleus], device=dev))
        # One uniform draw per row from that sequence's own generator, then inverse CDF.
        u = torch.tensor([torch.rand((), generator=g).item() for g in gens])
        cdf = probs.cumsum(dim=-1)
        u = u.to(dev) * cdf[:, -1]
        picked = torch.searchsorted(cdf, u.unsqueeze(1), right=True).clamp(max=V - 1)
        # Rounding can land u on the flat tail of the CDF: fall back to the likeliest id there.
        dead = probs.gather(-1, picked).squeeze(1) <= 0
        picked = picked.squeeze(1)
        if dead.any():
            picked[dead] = probs[dead].argmax(dim=-1)
        return picked


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


NUCLEUS_FIRST = 256  # candidates the nucleus is first looked for among


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs (b, V) with every id outside each row's top_p nucleus zeroed: the likeliest ids whose
    probabilities before them sum to at most top_p. Rows whose nucleus ends within their top
    NUCLEUS_FIRST ids sort only those (the peaked distributions of trained models); the others
    sort their whole vocabulary. Either way each row keeps the ids a full sort would keep."""
    V = probs.size(-1)
    out = torch.zeros_like(probs)
    top_p = top_p.unsqueeze(1)
    k = min(NUCLEUS_FIRST, V)
    top, order = torch.topk(probs, k, dim=-1)  # sorted, descending
    cum = top.cumsum(-1)
    # every id past the top k has more than top_p before it: the top k hold the whole nucleus
    fits = (cum[:, -1:] > top_p).squeeze(1) if k < V else torch.ones(probs.size(0), dtype=torch.bool)
    if fits.any():
        kept = top[fits].masked_fill(cum[fits] - top[fits] > top_p[fits], 0.0)
        out[fits] = out[fits].scatter(-1, order[fits], kept)
    rest = ~fits
    if rest.any():
        sorted_p, order = torch.sort(probs[rest], dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        kept = sorted_p.masked_fill(cum - sorted_p > top_p[rest], 0.0)
        out[rest] = torch.zeros_like(sorted_p).scatter(-1, order, kept)
    return out
