"""The generation engine: ids in, ids out, batched with left padding, seeded per row."""

from __future__ import annotations

import math

import pytest
import torch

from gencli.model.engine import Generation, generate, generate_stream
from gencli.model.errors import ContextOverflowError, InvalidParameterError
from gencli.model.params import SamplingParams, fit_prompt

VOCAB = 512
PROMPTS = [[5, 9, 200], [1, 2, 3, 4, 5, 6, 7], [300, 17, 42, 8, 99, 100, 101, 102, 103, 104, 11, 12], [77]]


@pytest.fixture
def gpt(make_gpt):
    return make_gpt(VOCAB, seed=0)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0)


def test_batched_greedy_equals_each_prompt_alone(gpt):
    batched = generate(gpt, PROMPTS, greedy(20))
    alone = [generate(gpt, [p], greedy(20))[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(out) == 20 for out in batched)
    assert len({tuple(o) for o in batched}) > 1  # the prompts really lead to different outputs


def test_batched_greedy_same_lengths_and_reordered(gpt):
    same_len = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    alone = [generate(gpt, [p], greedy(12))[0] for p in same_len]
    assert generate(gpt, same_len, greedy(12)) == alone
    assert generate(gpt, same_len[::-1], greedy(12)) == alone[::-1]


def test_seeded_sampling_does_not_depend_on_batch(gpt):
    params = SamplingParams(max_tokens=16, temperature=1.0)
    seeds = [11, 22, 33, 44]
    batched = generate(gpt, PROMPTS, params, seeds=seeds)
    alone = [generate(gpt, [p], params, seeds=[s])[0] for p, s in zip(PROMPTS, seeds)]
    assert batched == alone
    reordered = generate(gpt, PROMPTS[::-1], params, seeds=seeds[::-1])
    assert reordered == batched[::-1]
    # The same prompt and seed next to different company.
    mixed = generate(gpt, [PROMPTS[2], [9, 9, 9, 9, 9], PROMPTS[0]], params, seeds=[33, 5, 11])
    assert mixed[0] == batched[2] and mixed[2] == batched[0]


def test_same_seed_same_output_different_seeds_differ(gpt):
    params = SamplingParams(max_tokens=24, temperature=1.0)
    a = generate(gpt, [PROMPTS[1]], params, seeds=[1234])
    b = generate(gpt, [PROMPTS[1]], params, seeds=[1234])
    c = generate(gpt, [PROMPTS[1]], params, seeds=[4321])
    assert a == b
    assert a != c
    # Two rows of one batch with one prompt and different seeds differ too.
    x, y = generate(gpt, [PROMPTS[1], PROMPTS[1]], params, seeds=[1, 2])
    assert x != y


def test_stop_id_ends_a_sequence_yielded_then_none(gpt):
    a, b = generate(gpt, [PROMPTS[0], PROMPTS[1]], greedy(20))
    stop = next((t for t in a[1:10] if t not in b), None)
    assert stop is not None, "test setup: need a token in a but not in b"
    cut = a.index(stop)
    steps = list(generate_stream(gpt, [PROMPTS[0], PROMPTS[1]], greedy(20), stop_ids=frozenset({stop})))
    assert len(steps) == 20  # the other sequence keeps going to max_tokens
    row0 = [s[0] for s in steps]
    assert row0[: cut + 1] == a[: cut + 1]
    assert row0[cut] == stop
    assert all(t is None for t in row0[cut + 1 :])
    assert [s[1] for s in steps] == b  # the other row is unaffected by the dropped one


def test_stream_ends_when_every_sequence_stopped(gpt):
    (a,) = generate(gpt, [PROMPTS[2]], greedy(20))
    stop = a[3]
    out = generate(gpt, [PROMPTS[2]], greedy(20), stop_ids=frozenset({stop}))
    assert out == [a[: a.index(stop) + 1]]
    steps = list(generate_stream(gpt, [PROMPTS[2]], greedy(20), stop_ids=frozenset({stop})))
    assert len(steps) == a.index(stop) + 1


@pytest.mark.parametrize("n", [1, 2, 7])
def test_max_tokens_respected(gpt, n):
    steps = list(generate_stream(gpt, PROMPTS, SamplingParams(max_tokens=n, temperature=0.8), seeds=[1, 2, 3, 4]))
    assert len(steps) == n
    assert all(t is not None for s in steps for t in s)
    assert all(len(o) == n for o in generate(gpt, PROMPTS, greedy(n)))


def test_finish_stops_one_row_early_others_continue(gpt):
    full = generate(gpt, PROMPTS[:3], greedy(15))
    gen = generate_stream(gpt, PROMPTS[:3], greedy(15))
    steps = []
    for k, step in enumerate(gen):
        steps.append(step)
        if k == 3:
            gen.finish(1)
    assert len(steps) == 15
    assert [s[1] for s in steps[:4]] == full[1][:4]
    assert all(s[1] is None for s in steps[4:])
    assert [s[0] for s in steps] == full[0]
    assert [s[2] for s in steps] == full[2]


def test_cancel_ends_the_stream(gpt):
    gen = generate_stream(gpt, PROMPTS, greedy(30))
    seen = 0
    for _ in gen:
        seen += 1
        if seen == 2:
            gen.cancel()
    assert seen == 2


def test_top_k_1_equals_greedy(gpt):
    g = generate(gpt, PROMPTS, greedy(16))
    k1 = generate(gpt, PROMPTS, SamplingParams(max_tokens=16, temperature=1.3, top_k=1), seeds=[1, 2, 3, 4])
    assert k1 == g


def test_tiny_top_p_equals_greedy(gpt):
    g = generate(gpt, PROMPTS, greedy(16))
    p = generate(gpt, PROMPTS, SamplingParams(max_tokens=16, temperature=1.0, top_p=1e-6), seeds=[5, 6, 7, 8])
    assert p == g


def test_top_k_limits_choices(gpt):
    """With top_k=3 every sampled id is one of the 3 likeliest at its step."""
    prompt = PROMPTS[1]
    (out,) = generate(gpt, [prompt], SamplingParams(max_tokens=12, temperature=2.0, top_k=3), seeds=[9])
    ctx = list(prompt)
    with torch.inference_mode():
        for t in out:
            logits, _ = gpt(torch.tensor([ctx]), last_only=True)
            assert t in torch.topk(logits[0, -1], 3).indices.tolist()
            ctx.append(t)


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_tokens=0),
        dict(max_tokens=-3),
        dict(temperature=-0.1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_p=-1),
        dict(top_k=0),
        dict(top_k=-2),
    ],
)
def test_invalid_params_raise(kw):
    with pytest.raises(InvalidParameterError):
        SamplingParams(**kw)


@pytest.mark.parametrize("temperature", [math.nan, math.inf])
def test_non_finite_temperature_is_rejected(temperature):
    """NaN slips past `temperature < 0`; NaN/inf logits then pick masked ids (see report)."""
    with pytest.raises(InvalidParameterError):
        SamplingParams(temperature=temperature)


def test_valid_edge_params_accepted():
    SamplingParams(max_tokens=1, temperature=0, top_p=1.0, top_k=1)


def test_empty_prompt_and_seed_count_refused(gpt):
    with pytest.raises(InvalidParameterError):
        Generation(gpt, [], greedy(3))
    with pytest.raises(InvalidParameterError):
        Generation(gpt, [[1, 2], []], greedy(3))
    with pytest.raises(InvalidParameterError):
        Generation(gpt, [[1, 2], [3]], greedy(3), seeds=[1])


def test_context_overflow_names_the_numbers(gpt):
    block = gpt.config.block_size  # 64
    with pytest.raises(ContextOverflowError) as e:
        generate(gpt, [list(range(60))], greedy(10))
    msg = str(e.value)
    for n in ("60", "10", "70", str(block)):
        assert n in msg
    with pytest.raises(ContextOverflowError) as e:
        fit_prompt([1, 2, 3], block, block, truncate=True)
    assert str(block) in str(e.value)
    # Exactly full is fine.
    assert len(generate(gpt, [list(range(54))], greedy(10))[0]) == 10


def test_fit_prompt_truncate_keeps_newest_tokens():
    ids = list(range(100))
    assert fit_prompt(ids, 14, 64, truncate=True) == list(range(50, 100))
    assert fit_prompt(ids[:10], 14, 64, truncate=True) == ids[:10]
    assert fit_prompt(ids[:50], 14, 64, truncate=False) == ids[:50]
    with pytest.raises(ContextOverflowError):
        fit_prompt(ids, 14, 64, truncate=False)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=40, temperature=0),
        SamplingParams(max_tokens=40, temperature=2.0),
        SamplingParams(max_tokens=40, temperature=1.5, top_k=50),
        SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9),
    ],
)
def test_allowed_mask_is_never_violated(make_gpt, forced, params):
    gpt = make_gpt(VOCAB, seed=3)
    # The masked ids are the likeliest by far: without the mask they would be picked every time.
    forced(gpt, {i: 12.0 for i in range(0, VOCAB, 2)})
    allowed_set = {3, 17, 41, 99, 255}
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[list(allowed_set)] = True
    unmasked = generate(gpt, [[1, 2, 3]], params, seeds=[0])[0]
    assert any(t not in allowed_set for t in unmasked)
    out = generate(gpt, PROMPTS, params, seeds=[1, 2, 3, 4], allowed_ids=allowed)
    seen = {t for o in out for t in o}
    assert seen <= allowed_set
    if params.temperature >= 1.5:
        assert len(seen) > 1  # it really samples among the allowed ids


def test_injected_oom_on_batch_of_two(gpt, monkeypatch):
    monkeypatch.setenv("GENCLI_INJECT_OOM", "2")
    with pytest.raises(torch.OutOfMemoryError):
        generate(gpt, PROMPTS[:2], greedy(4))
    alone = generate(gpt, [PROMPTS[0]], greedy(4))
    monkeypatch.delenv("GENCLI_INJECT_OOM")
    assert alone == generate(gpt, [PROMPTS[0]], greedy(4))


def test_left_padded_logits_match_each_prompt_alone(gpt):
    """The model under the engine: a padded row's logits, prompt and decode steps, equal its own."""
    T = max(len(p) for p in PROMPTS)
    idx = torch.zeros((len(PROMPTS), T), dtype=torch.long)
    for r, p in enumerate(PROMPTS):
        idx[r, T - len(p) :] = torch.tensor(p)
    pad = torch.tensor([T - len(p) for p in PROMPTS])
    nxt = torch.tensor([[7], [8], [9], [10]])
    with torch.inference_mode():
        cache = gpt.make_cache(len(PROMPTS), T + 1)
        first, _ = gpt(idx, cache=cache, pad=pad, last_only=True)
        second, _ = gpt(nxt, cache=cache, pad=pad, last_only=True)
        for r, p in enumerate(PROMPTS):
            c = gpt.make_cache(1, len(p) + 1)
            a, _ = gpt(torch.tensor([p]), cache=c, last_only=True)
            b, _ = gpt(nxt[r : r + 1], cache=c, last_only=True)
            torch.testing.assert_close(first[r], a[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(second[r], b[0], rtol=1e-5, atol=1e-5)


def test_mixed_resumed_rows_fit_each_alone(make_gpt):
    """A long, mostly generated row next to a fresh short one: only each row must fit the context.

    Left-padded, the short row would run to 250 + 200 positions, past block_size 256; its own
    positions stop at 204, so the batch runs, each row's greedy output that of the row alone.
    """
    gpt = make_gpt(VOCAB, seed=2, block_size=256)
    long_row = [(7 * i + 3) % VOCAB for i in range(250)]  # prompt + ids made before an interrupt
    prompts, budgets = [long_row, [5, 9, 200, 17, 42]], [6, 200]
    alone = [generate(gpt, [p], greedy(n))[0] for p, n in zip(prompts, budgets)]
    assert generate(gpt, prompts, greedy(200), budgets=budgets) == alone
    assert generate(gpt, prompts[::-1], greedy(200), budgets=budgets[::-1]) == alone[::-1]
    assert [len(o) for o in alone] == budgets


def test_padded_forward_past_block_size_matches_each_row_alone(make_gpt):
    """The model under the engine: a padded batch wider than block_size, each row fitting alone."""
    gpt = make_gpt(VOCAB, seed=2, block_size=16)
    rows = [list(range(1, 15)), [40, 41]]  # 14 and 2 tokens, row 1 left-padded by 12
    pad = torch.tensor([0, 12])
    steps = torch.tensor([[7, 8, 9], [10, 11, 12]])  # (B, 3) ids fed one step at a time
    with torch.inference_mode():
        cache = gpt.make_cache(2, 17)
        gpt(torch.tensor([rows[0], [0] * 12 + rows[1]]), cache=cache, pad=pad)
        gpt(steps[:, :1], cache=cache, pad=pad)
        gpt(steps[:, 1:2], cache=cache, pad=pad)  # 16 wide: row 0 fills the context
        cache.keep_rows(torch.tensor([1]))
        last, _ = gpt(steps[1:, 2:], cache=cache, pad=pad[1:], last_only=True)  # 17 wide, row 1 at 5
        c = gpt.make_cache(1, 5)
        alone, _ = gpt(torch.tensor([rows[1] + steps[1].tolist()]), cache=c, last_only=True)
        torch.testing.assert_close(last[0], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-40, 1e300, 1.7e308])
def test_extreme_temperatures_sample_allowed_ids(make_gpt, forced, temperature):
    """Any finite temperature params accept: tiny ones act greedy, huge ones uniform, none
    turns the logits into inf - inf = NaN and so picks a masked id."""
    gpt = make_gpt(VOCAB, seed=3)
    forced(gpt, {i: 12.0 for i in range(0, VOCAB, 2)})  # the masked ids are the likeliest
    allowed_set = {3, 17, 41, 99, 255}
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[list(allowed_set)] = True
    params = SamplingParams(max_tokens=20, temperature=temperature)
    out = generate(gpt, PROMPTS, params, seeds=[1, 2, 3, 4], allowed_ids=allowed)
    assert {t for o in out for t in o} <= allowed_set
    if temperature < 1e-30:
        assert out == generate(gpt, PROMPTS, greedy(20), allowed_ids=allowed)
