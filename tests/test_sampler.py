"""The sampler against oracles: torch's argmax and topk, the nucleus computed by a full sort, the
penalties' formulas by hand; each row's pick depends on its own logits, params and generator only."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from gencli.model.chat import ChatFormat
from gencli.model.engine import Sequence
from gencli.model.params import SamplingParams
from gencli.model.sampler import BLOCK, Sampler, _kth, argmax, seeded_generator
from gencli.model.textgen import TextGenerator
from tests.conftest import vocab_for


def Row(params: SamplingParams, *, prompt=(), **kw) -> Sequence:  # noqa: N802 - a row, as the engine hands it
    """A fresh engine sequence, its generator seeded from its params: what the sampler reads."""
    return Sequence(list(prompt), params, generator=seeded_generator(params.seed), **kw)


@pytest.mark.parametrize("V", [7, BLOCK, 3 * BLOCK + 5, 100352])
def test_argmax_is_torchs_first_maximum(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randint(-3, 3, (9, V), generator=g).float()  # many ties
    x[2] = float("-inf")
    x[3, V - 1] = 50.0  # the maximum in the last (partial) block
    assert torch.equal(argmax(x), x.argmax(-1))
    rows = torch.tensor([8, 3, 0])
    assert torch.equal(argmax(x, rows), x[rows].argmax(-1))


@pytest.mark.parametrize("k", [1, 5, 50, 97, 98, 99, 200, 4000])
def test_kth_largest_is_topks(k):
    x = torch.randn(100352, generator=torch.Generator().manual_seed(k))
    x[::7] = x[0]  # ties
    best = x.view(-1, BLOCK).amax(-1)
    assert _kth(x, best, k) == torch.topk(x, k).values[-1]


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The oracle: a full sort; id i is kept where the probability of the ids likelier than it is <= top_p."""
    above = torch.tensor([float(probs[probs > p].sum()) for p in probs])
    return above <= top_p


def test_top_p_draws_only_from_the_nucleus_with_its_probabilities():
    V = 3000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1)) * 2.5
    probs = torch.softmax(logits, -1)
    keep = _nucleus(probs, 0.5)
    assert 5 < int(keep.sum()) < V // 2
    sampler, n = Sampler(V, None, "cpu"), 4000
    rows = [Row(SamplingParams(temperature=1.0, top_k=None, top_p=0.5, seed=s)) for s in range(n)]
    picks = sampler.sample(logits.expand(n, V).contiguous(), rows)
    assert all(keep[i] for i in picks)
    expected = probs * keep / float((probs * keep).sum())
    seen = Counter(picks)
    likeliest = torch.topk(expected, 5).indices.tolist()
    for i in likeliest:  # within 5 standard deviations of a binomial count
        mean = n * float(expected[i])
        assert abs(seen[i] - mean) < 5 * (mean * (1 - float(expected[i]))) ** 0.5, (i, seen[i], mean)


def test_each_row_picks_alone_what_it_picks_in_company():
    V = 5000
    logits = torch.randn(12, V, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, seed=r, presence_penalty=pp,
                             logit_bias={str(r * 11): 3.0} if r % 5 == 0 else {})
              for r, (t, k, p, m, pp) in enumerate([(0.0, None, 1.0, 0.0, 0.0), (1.0, None, 0.9, 0.0, 0.0),
                                                    (0.7, 40, 1.0, 0.0, 0.0), (1.3, None, 1.0, 0.05, 0.0),
                                                    (1.0, 3000, 0.3, 0.0, 1.0), (0.0, None, 1.0, 0.0, 2.0)] * 2)]
    made = [[r, r + 1, r + 1] for r in range(12)]
    company = Sampler(V, None, "cpu").sample(logits, [Row(p, prior=m) for p, m in zip(params, made)])
    alone = [Sampler(V, None, "cpu").sample(logits[r : r + 1], [Row(params[r], prior=made[r])])[0] for r in range(12)]
    assert company == alone


def test_penalties_bias_and_cuts_change_the_logits_as_their_formulas_say():
    V = 10
    logits = torch.tensor([[2.0, 1.95, 1.8, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]])

    def pick(prompt=(), **kw):
        return Sampler(V, None, "cpu").sample(logits, [Row(SamplingParams(temperature=0.0, **kw), prompt=list(prompt),
                                                           prior=[0, 0, 1])])[0]

    assert pick() == 0
    assert pick(presence_penalty=0.25) == 2  # 0 and 1 made: 1.75, 1.70 < 1.8
    assert pick(frequency_penalty=0.08) == 1  # 0 made twice: 1.84; 1 once: 1.87 > 1.8
    assert pick(repetition_penalty=1.2) == 2  # 2.0/1.2, 1.95/1.2 < 1.8
    assert pick(prompt=[2], repetition_penalty=1.2) == 0  # a prompt id too: 1.8/1.2 = 1.5 < 2.0/1.2
    # 2.0, 1.95, 1.8 halved; -1.0 (a prompt id, below 0) doubled; 0.5 + 0.8 = 1.3 wins
    assert pick(prompt=[2, 3], repetition_penalty=2.0, logit_bias={"4": 0.8}) == 4  # 1.3 > 1.0, 0.975, 0.9
    assert pick(logit_bias={"3": 3.5}) == 3 and pick(logit_bias={"0": -100, "1": -100}) == 2
    sampler = Sampler(V, None, "cpu")
    ends = Row(SamplingParams(temperature=0.0, min_tokens=4), prior=[5, 5, 5], stop_ids=frozenset({0}))
    assert sampler.sample(logits, [ends]) == [1]  # 3 made < 4: the end id 0 waits
    ends.out.append(6)
    assert sampler.sample(logits, [ends]) == [0]
    assert sampler.sample(logits, [Row(SamplingParams(temperature=0.0), banned=frozenset({0, 1}))]) == [2]
    # min_p 0.5 keeps the ids at least half as likely as the likeliest: 0, 1, 2 (e^-0.2 > 0.5 > e^-1.5)
    rows = [Row(SamplingParams(temperature=1.0, top_k=None, min_p=0.5, seed=s)) for s in range(300)]
    assert set(Sampler(V, None, "cpu").sample(logits.expand(300, V).contiguous(), rows)) == {0, 1, 2}


def test_ignore_eos_stop_token_ids_and_min_tokens_through_text(make_gpt, forced, loaded_for, tok_chatml):
    eot = tok_chatml.encoding.eot_token
    model = forced(make_gpt(vocab_for(tok_chatml), block_size=64), {eot: 9.0, 9906: 8.0, 0: 7.0})  # "Hello", "!"
    tg = TextGenerator(loaded_for(model, tok_chatml, ChatFormat.LEGACY))
    ids = tg.encode("Hi", chat=False)
    plain, ignore, stop_id, least = tg.generate(
        [ids] * 4, [SamplingParams(max_tokens=6, temperature=0.0), SamplingParams(max_tokens=6, temperature=0.0,
                                                                                 ignore_eos=True),
                    SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, stop_token_ids=[9906]),
                    SamplingParams(max_tokens=6, temperature=0.0, min_tokens=3, logit_bias={"9906": -100})])
    assert plain.finish_reason == "stop" and plain.text == ""
    assert ignore.finish_reason == "length" and ignore.ids == [9906] * 6 and eot not in ignore.ids
    assert stop_id.finish_reason == "stop" and stop_id.ids == []  # 9906 ended it, kept out of the text
    assert least.ids == [0, 0, 0] and least.finish_reason == "stop"  # the end id waited for 3 ids
