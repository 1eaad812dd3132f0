"""The generation engine: token ids in, token ids out, a step at a time.

It knows nothing about text or chat formats (see textgen.py for that). `generate_stream`
returns a `Generation`: iterate it to get, per decoding step, the new id of every sequence
(None for a sequence already finished); call `finish(i)` to end sequence i early (a stop
string was seen, the user cancelled). `generate` is the batch wrapper.

Prompts of different lengths share one batch by left padding: each row's positions start at
its first real token and pad keys are masked, so greedy output for a prompt is the same token
for token as running it alone. Each row need only fit the context alone: when rows finish, the
padding every remaining row starts with is dropped, so the batch is as wide as its longest row.
Each row samples from its own seeded generator, so a seeded prompt's output does not depend on
what else is in its batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.nn import functional as F

from gencli.model.errors import InvalidParameterError
from gencli.model.gpt import GPT
from gencli.model.params import SamplingParams, fit_prompt

# Fault injection (documented in the README): GENCLI_INJECT_OOM=N makes every forward pass
# over N or more rows raise torch.OutOfMemoryError, as a GPU short of memory would.
INJECT_OOM_ENV = "GENCLI_INJECT_OOM"


class Generation:
    """One batch being decoded. Iterate for steps; `finish(i)` ends sequence i."""

    def __init__(
        self,
        model: GPT,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        seeds: list[int | None] | None = None,
        stop_ids: frozenset[int] = frozenset(),
        allowed_ids: torch.Tensor | None = None,
        budgets: list[int] | None = None,
        skip_draws: list[int] | None = None,
    ):
        """budgets: new tokens per sequence (default params.max_tokens each). skip_draws: random
        draws each sequence's generator has already made, so a sequence resumed from its
        partial output (prompt + ids so far, budget reduced) samples what it would have."""
        if not prompts:
            raise InvalidParameterError("no prompts to generate from")
        block = model.config.block_size
        self.remaining = list(budgets) if budgets is not None else [params.max_tokens] * len(prompts)
        if len(self.remaining) != len(prompts) or min(self.remaining) < 1:
            raise InvalidParameterError("one positive token budget per prompt")
        for ids, budget in zip(prompts, self.remaining):
            if not ids:
                raise InvalidParameterError("empty prompt: give at least one token")
            fit_prompt(ids, budget, block, truncate=False)
        self.model = model
        self.prompts = prompts
        self.params = params
        self.stop_ids = stop_ids
        self.allowed = allowed_ids  # (V,) bool, or None for every id
        seeds = seeds if seeds is not None else [None] * len(prompts)
        if len(seeds) != len(prompts):
            raise InvalidParameterError("one seed per prompt")
        skips = skip_draws if skip_draws is not None else [0] * len(prompts)
        self._gens = [self._generator(s, k) for s, k in zip(seeds, skips)]
        self._finished = [False] * len(prompts)

    @staticmethod
    def _generator(seed: int | None, skip: int = 0) -> torch.Generator:
        g = torch.Generator()  # CPU: the same draws on every device
        g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        for _ in range(skip):
            torch.rand((), generator=g)
        return g

    def finish(self, i: int) -> None:
        self._finished[i] = True

    def cancel(self) -> None:
        self._finished = [True] * len(self._finished)

    def __iter__(self) -> Iterator[list[int | None]]:
        with torch.inference_mode():
            yield from self._decode()

    def _forward(self, idx, cache, pad):
        limit = os.environ.get(INJECT_OOM_ENV)
        if limit and idx.size(0) >= int(limit):
            raise torch.OutOfMemoryError(
                f"injected by {INJECT_OOM_ENV}={limit}: forward pass over {idx.size(0)} rows"
            )
        logits, _ = self.model(idx, cache=cache, pad=pad, last_only=True)
        return logits[:, -1, :]  # (B, V)

    def _decode(self) -> Iterator[list[int | None]]:
        device = self.model.lm_head.weight.device
        lens = [len(p) for p in self.prompts]
        T = max(lens)
        idx = torch.zeros((len(lens), T), dtype=torch.long)
        for r, ids in enumerate(self.prompts):
            idx[r, T - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        idx = idx.to(device)
        pads = [T - n for n in lens]  # one row has none: the batch is as wide as its longest row
        pad = torch.tensor(pads, dtype=torch.long, device=device) if any(pads) else None
        cache = self.model.make_cache(len(lens), T + max(self.remaining))
        logits = self._forward(idx, cache, pad)
        active = list(range(len(lens)))  # batch row -> sequence index
        # -inf on the ids generation must never yield, added to each step's logits
        bias = None
        if self.allowed is not None:
            bias = torch.zeros(self.allowed.shape, dtype=torch.float32, device=device)
            bias.masked_fill_(~self.allowed.to(device), float("-inf"))
        while True:
            next_ids = self._sample(logits, active, bias)  # (b,)
            ids = next_ids.tolist()
            out: list[int | None] = [None] * len(self.prompts)
            for r, i in enumerate(active):
                out[i] = ids[r]
                self.remaining[i] -= 1
                if ids[r] in self.stop_ids or self.remaining[i] == 0:
                    self._finished[i] = True
            yield out
            keep = [r for r, i in enumerate(active) if not self._finished[i]]
            if not keep:
                return
            if len(keep) < len(active):  # drop finished rows from the batch
                rows = torch.tensor(keep, device=device)
                pads = [pads[r] for r in keep]
                front = min(pads)  # padding every kept row starts with: dropped from the cache too
                pads = [n - front for n in pads]
                cache.keep_rows(rows, front)
                next_ids = next_ids[rows]
                pad = torch.tensor(pads, dtype=torch.long, device=device) if any(pads) else None
                active = [active[r] for r in keep]
            logits = self._forward(next_ids.view(-1, 1), cache, pad)

    def _sample(self, logits: torch.Tensor, active: list[int], bias: torch.Tensor | None) -> torch.Tensor:
        logits = logits.float()
        if bias is not None:
            logits = logits + bias
        p = self.params
        if p.temperature == 0:
            return logits.argmax(dim=-1)
        # Shifted so each row's top logit is 0, and the temperature held to float32's range: no
        # finite temperature, however tiny or large, makes an inf or a NaN here.
        f = torch.finfo(logits.dtype)
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / min(max(p.temperature, f.tiny), f.max)
        if p.top_k is not None and p.top_k < logits.size(-1):
            kth = torch.topk(logits, p.top_k, dim=-1).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            cum = sorted_p.cumsum(dim=-1)
            sorted_p = sorted_p.masked_fill(cum - sorted_p > p.top_p, 0.0)  # keep the nucleus
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        # One uniform draw per row from that sequence's own generator, then inverse CDF.
        u = torch.tensor([torch.rand((), generator=self._gens[i]).item() for i in active])
        cdf = probs.cumsum(dim=-1)
        u = u.to(cdf.device) * cdf[:, -1]
        picked = torch.searchsorted(cdf, u.unsqueeze(1), right=True).clamp(max=probs.size(-1) - 1)
        # Rounding can land u on the flat tail of the CDF: fall back to the likeliest id there.
        dead = probs.gather(-1, picked).squeeze(1) <= 0
        picked = picked.squeeze(1)
        if dead.any():
            picked[dead] = probs[dead].argmax(dim=-1)
        return picked


def generate_stream(model: GPT, prompts: list[list[int]], params: SamplingParams, **kw) -> Generation:
    return Generation(model, prompts, params, **kw)


def generate(model: GPT, prompts: list[list[int]], params: SamplingParams, **kw) -> list[list[int]]:
    """Batch wrapper: every sequence's new ids, stop id included when one ended it."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, params, **kw):
        for i, t in enumerate(step):
            if t is not None:
                out[i].append(t)
    return out
