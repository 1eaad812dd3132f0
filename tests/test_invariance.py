"""Batch invariance where it is hardest, against an oracle: every row run alone.

A greedy or seeded row must compute, bit for bit, what it computes alone, whatever shares its
steps; `gencli replay` and takeovers stand on it. Here that is tested on weights with near-ties
(GPT-2's own initialisation, not widened, and the same model trained a little, whose
distributions are peaked), at temperature 1 with and without top_k/top_p, greedy too, in float32
and int8, at 1, 2 and 4 threads (a worker runs at its machine's thread count; the CPU kernels split
their work by it), with rows joining and leaving at different steps, prompts that cross the key
buckets and the prefill chunk, and preemption by out-of-memory. The comparison is of the logits each
id is sampled from, with torch.equal, step by step, then of the ids.
"""

from __future__ import annotations

import random

import pytest
import torch

from gencli.model.config import GPTConfig
from gencli.model.engine import PREFILL_TOKENS, Engine, Sequence
from gencli.model.gpt import GPT
from gencli.model.kernels import int8_supported
from gencli.model.params import SamplingParams

VOCAB = 2048
# prompt lengths around the key buckets (64) and past the prefill chunk (512)
LENGTHS = (1, 2, 63, 64, 65, 127, 128, 129, 300, PREFILL_TOKENS + 90)


def _untrained(seed: int = 0) -> GPT:
    """GPT-2's initialisation, as `gencli init-model` makes it: logits all near 0, so at temperature
    1 the inverse-CDF draw lands near a boundary all the time, and greedy picks are near-ties."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, block_size=1024))


def _trained() -> GPT:
    """The same shape, trained a little on a repetitive corpus: peaked, structured distributions."""
    model = _untrained(1)
    g = torch.Generator().manual_seed(0)
    corpus = torch.randint(0, 64, (40,), generator=g).repeat(40)  # a 40-token phrase, over and over
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        starts = torch.randint(0, len(corpus) - 129, (8,), generator=g)
        x = torch.stack([corpus[s : s + 128] for s in starts])
        y = torch.stack([corpus[s + 1 : s + 129] for s in starts])
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def models():
    """name -> a function that builds a fresh copy of that model (int8 preparation frees its floats)."""
    states = {"untrained": _untrained().state_dict(), "trained": _trained().state_dict()}

    def build(name: str) -> GPT:
        model = _untrained()
        model.load_state_dict(states[name])
        return model

    return build


@pytest.fixture(params=[1, 2, 4], ids=lambda n: f"{n}threads")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _rows(seed: int, count: int = 18) -> list[tuple[list[int], SamplingParams, int | None]]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        n = LENGTHS[i % len(LENGTHS)] if i < len(LENGTHS) else rng.randrange(1, 200)
        prompt = [rng.randrange(VOCAB) for _ in range(n)]
        t = rng.choice([1.0, 1.0, 0.0, 0.7])
        sp = SamplingParams(max_tokens=rng.randrange(4, 24), temperature=t, top_k=rng.choice([None, 40]),
                            top_p=rng.choice([1.0, 0.9]), logprobs=rng.choice([None, 0, 5, 20]),
                            prompt_logprobs=rng.choice([None, None, 0, 3]))
        rows.append((prompt, sp, 1000 + i if t else None))
    return rows


def _alone(model: GPT, rows) -> tuple[list[list[int]], list[list[torch.Tensor]], list[list]]:
    outs, logits, logprobs = [], [], []
    for prompt, sp, seed in rows:
        seen: list[torch.Tensor] = []
        engine = Engine(model, 1, max_len=1024, observe=lambda s, lg, seen=seen: seen.append(lg.clone()))
        seq = Sequence(list(prompt), sp.seeded(seed))
        engine.add(seq)
        while engine:
            engine.step()
        outs.append(seq.out)
        logits.append(seen)
        logprobs.append((seq.logprobs, seq.prompt_logprobs))
    return outs, logits, logprobs


def _in_company(model: GPT, rows, *, slots: int, seed: int) -> tuple[list[list[int]], list[list[torch.Tensor]], list[list]]:
    """The rows on one engine, joining a few at a time at random steps as others run and leave."""
    seen: list[list[torch.Tensor]] = [[] for _ in rows]
    engine = Engine(model, slots, max_len=1024, observe=lambda s, lg: seen[s.index].append(lg.clone()))
    seqs = [Sequence(list(p), sp.seeded(sd), index=i) for i, (p, sp, sd) in enumerate(rows)]
    rng = random.Random(seed)
    pending = seqs[::-1]
    while pending or engine:
        if pending and (not engine or rng.random() < 0.4):
            for _ in range(rng.randint(1, 3)):
                if pending:
                    engine.add(pending.pop())
        engine.step()
    return [s.out for s in seqs], seen, [(s.logprobs, s.prompt_logprobs) for s in seqs]


def _first_difference(alone: list[torch.Tensor], company: list[torch.Tensor]) -> str | None:
    if len(alone) != len(company):
        return f"{len(alone)} sampled steps alone, {len(company)} in company"
    for step, (a, c) in enumerate(zip(alone, company)):
        if not torch.equal(a, c):
            return f"logits differ at step {step} by up to {(a - c).abs().max().item():.3g}"
    return None


def _check(model: GPT, *, slots: int, seed: int, monkeypatch=None, oom: int | None = None, count: int = 18) -> None:
    rows = _rows(seed, count)
    alone_ids, alone_logits, alone_logprobs = _alone(model, rows)
    if oom is not None:
        monkeypatch.setenv("GENCLI_INJECT_OOM", str(oom))
    company_ids, company_logits, company_logprobs = _in_company(model, rows, slots=slots, seed=seed)
    diffs = [f"row {i} (prompt of {len(rows[i][0])}, {rows[i][1]}): {d}"
             for i in range(len(rows)) if (d := _first_difference(alone_logits[i], company_logits[i]))]
    assert not diffs, "\n".join(diffs)
    assert company_ids == alone_ids
    # each new id's logprobs and each prompt id's too, equal as floats (bit for bit), with their top
    # ids in the same order; prompts longer than a prefill chunk are scored chunk by chunk
    assert company_logprobs == alone_logprobs
    for (new, prompt), out, (p, sp, _) in zip(alone_logprobs, alone_ids, rows, strict=True):
        assert len(new) == (len(out) if sp.logprobs is not None else 0)
        assert len(prompt) == (len(p) if sp.prompt_logprobs is not None else 0)


@pytest.mark.parametrize("weights", ["untrained", "trained"])
def test_each_row_computes_bit_for_bit_what_it_computes_alone(models, weights, threads):
    _check(models(weights).prepare_for_inference(), slots=6, seed=threads)


def test_rows_preempted_by_out_of_memory_still_compute_what_they_compute_alone(models, threads, monkeypatch):
    """Every pass over 4 rows or more runs out of memory: the newest rows are preempted again and
    again and prefilled again from their ids when they come back."""
    _check(models("untrained").prepare_for_inference(), slots=8, seed=10 + threads, monkeypatch=monkeypatch, oom=4)


@pytest.mark.skipif(not int8_supported(), reason="this torch has no fbgemm (int8 needs x86-64)")
@pytest.mark.parametrize("weights", ["untrained", "trained"])
def test_int8_rows_compute_bit_for_bit_what_they_compute_alone(models, weights, threads):
    _check(models(weights).prepare_for_inference(int8=True), slots=5, seed=20 + threads)


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_sixty_four_rows_at_once_compute_their_logits_and_logprobs_alone(models, int8):
    """64 rows of mixed lengths (prefill chunks crossed), sampled, greedy and scored, on 64 slots."""
    if int8 and not int8_supported():
        pytest.skip("this torch has no fbgemm (int8 needs x86-64)")
    _check(models("untrained").prepare_for_inference(int8=int8), slots=64, seed=64 + int8, count=64)
