"""The sampler gencli shipped before SAMPLER_VERSION 2 (model/sampler.py at commit 82fd64c), kept
as it was: the "before" that bench.concurrent's host-work report measures the sampler against, in
the same run. Per row: a Python round trip for its uniform (`.item()`), top_k by torch.topk, and
top_p by sorting (its top 256 ids first, the whole vocabulary when the nucleus is wider). Not used
by gencli itself.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

NUCLEUS_FIRST = 256  # candidates the nucleus is first looked for among


def sample(logits: torch.Tensor, params: list, generators: list[torch.Generator]) -> list[int]:
    """Next ids for rows with these SamplingParams and generators (no banned ids)."""
    logits = logits.float()
    picked = logits.argmax(dim=-1)
    sampled = [r for r, p in enumerate(params) if p.temperature != 0]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        picked[rows] = _draw(logits[rows], [params[r] for r in sampled], [generators[r] for r in sampled])
    return picked.tolist()

def _draw(logits: torch.Tensor, params: list, gens: list[torch.Generator]) -> torch.Tensor:
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
