"""The generation engine: ids in, ids out, continuously batched in slots, seeded per row."""

from __future__ import annotations

import math

import pytest
import torch

from gencli.model.engine import Engine, Sequence, generate
from gencli.model.errors import ContextOverflowError, InvalidParameterError
from gencli.model.params import SamplingParams, fit_prompt

VOCAB = 512
PROMPTS = [[5, 9, 200], [1, 2, 3, 4, 5, 6, 7], [300, 17, 42, 8, 99, 100, 101, 102, 103, 104, 11, 12], [77]]


@pytest.fixture
def gpt(make_gpt):
    return make_gpt(VOCAB, seed=0, widen=False)  # near-ties: where company could flip a choice


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0)


def seeded(params, seeds):
    """One params per row: params with each seed."""
    return [params.seeded(s) for s in seeds]


def steps_of(gpt, prompts, params, **kw):
    """Run prompts on one engine; per step, each prompt's new id or None."""
    engine = Engine(gpt, len(prompts))
    seqs = [Sequence(list(p), params, index=i, **kw) for i, p in enumerate(prompts)]
    for s in seqs:
        engine.add(s)
    out = []
    while engine:
        step = [None] * len(seqs)
        for s, t in engine.step():
            step[s.index] = t
        out.append(step)
    return engine, seqs, out


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
    batched = generate(gpt, PROMPTS, seeded(params, seeds))
    alone = [generate(gpt, [p], seeded(params, [s]))[0] for p, s in zip(PROMPTS, seeds)]
    assert batched == alone
    reordered = generate(gpt, PROMPTS[::-1], seeded(params, seeds[::-1]))
    assert reordered == batched[::-1]
    # The same prompt and seed next to different company.
    mixed = generate(gpt, [PROMPTS[2], [9, 9, 9, 9, 9], PROMPTS[0]], seeded(params, [33, 5, 11]))
    assert mixed[0] == batched[2] and mixed[2] == batched[0]


def test_same_seed_same_output_different_seeds_differ(gpt):
    params = SamplingParams(max_tokens=24, temperature=1.0)
    a = generate(gpt, [PROMPTS[1]], seeded(params, [1234]))
    b = generate(gpt, [PROMPTS[1]], seeded(params, [1234]))
    c = generate(gpt, [PROMPTS[1]], seeded(params, [4321]))
    assert a == b
    assert a != c
    # Two rows of one batch with one prompt and different seeds differ too.
    x, y = generate(gpt, [PROMPTS[1], PROMPTS[1]], seeded(params, [1, 2]))
    assert x != y


def test_stop_id_ends_a_sequence_yielded_then_none(gpt):
    a, b = generate(gpt, [PROMPTS[0], PROMPTS[1]], greedy(20))
    stop = next((t for t in a[1:10] if t not in b), None)
    assert stop is not None, "test setup: need a token in a but not in b"
    cut = a.index(stop)
    _, _, steps = steps_of(gpt, [PROMPTS[0], PROMPTS[1]], greedy(20), stop_ids=frozenset({stop}))
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
    engine, _, steps = steps_of(gpt, [PROMPTS[2]], greedy(20), stop_ids=frozenset({stop}))
    assert len(steps) == a.index(stop) + 1
    assert not engine and engine.cache.free == engine.slots  # every slot given back


@pytest.mark.parametrize("n", [1, 2, 7])
def test_max_tokens_respected(gpt, n):
    _, _, steps = steps_of(gpt, PROMPTS, SamplingParams(max_tokens=n, temperature=0.8, seed=1))
    assert len(steps) == n
    assert all(t is not None for s in steps for t in s)
    assert all(len(o) == n for o in generate(gpt, PROMPTS, greedy(n)))


def test_finish_stops_one_row_early_others_continue(gpt):
    full = generate(gpt, PROMPTS[:3], greedy(15))
    engine = Engine(gpt, 3)
    seqs = [Sequence(list(p), greedy(15)) for p in PROMPTS[:3]]
    for s in seqs:
        engine.add(s)
    for k in range(15):
        engine.step()
        if k == 3:
            engine.finish(seqs[1])
    assert not engine
    assert seqs[1].out == full[1][:4] and seqs[1].finished
    assert seqs[0].out == full[0] and seqs[2].out == full[2]


def test_finishing_a_waiting_sequence_drops_it(gpt):
    engine = Engine(gpt, 1)
    a, b = Sequence(list(PROMPTS[0]), greedy(5)), Sequence(list(PROMPTS[1]), greedy(5))
    engine.add(a)
    engine.add(b)
    engine.step()
    engine.finish(b)  # never admitted
    while engine:
        engine.step()
    assert len(a.out) == 5 and b.out == [] and b.finished


def test_fewer_slots_than_prompts_each_joins_as_another_finishes(gpt):
    """Continuous batching: 4 prompts of different budgets on 2 slots; a prompt takes the slot a
    finished one frees, between steps, and every output is that of the prompt alone."""
    budgets = [3, 17, 9, 12]
    alone = [generate(gpt, [p], greedy(n))[0] for p, n in zip(PROMPTS, budgets)]
    engine = Engine(gpt, 2, max_len=40)
    seqs = [Sequence(list(p), greedy(n)) for p, n in zip(PROMPTS, budgets)]
    for s in seqs:
        engine.add(s)
    busy = []
    while engine:
        engine.step()
        busy.append(len(engine.running))
    assert [s.out for s in seqs] == alone
    assert max(busy) == 2
    assert len(busy) < sum(budgets)  # rows really shared steps


def test_sequences_added_mid_decoding_and_mixed_parameters_equal_each_alone(gpt):
    """Rows with their own temperature, top_k, top_p, budget and seed share steps, and sequences
    join a running batch: each output is what it makes alone."""
    kinds = [SamplingParams(max_tokens=14, temperature=0), SamplingParams(max_tokens=9, temperature=1.0),
             SamplingParams(max_tokens=20, temperature=1.3, top_k=7), SamplingParams(max_tokens=11, top_p=0.8),
             SamplingParams(max_tokens=16, temperature=0.7, top_k=40, top_p=0.95)]
    rows = [(PROMPTS[i % 4], kinds[i % 5], 100 + i) for i in range(10)]
    alone = [generate(gpt, [p], sp.seeded(seed))[0] for p, sp, seed in rows]
    engine = Engine(gpt, 4)
    seqs = [Sequence(list(p), sp.seeded(seed)) for p, sp, seed in rows]
    for s in seqs[:3]:
        engine.add(s)
    later = iter(seqs[3:])
    while engine:
        engine.step()
        nxt = next(later, None)
        if nxt is not None:
            engine.add(nxt)
    assert [s.out for s in seqs] == alone


def test_long_prompts_prefill_in_chunks_while_others_decode(make_gpt):
    gpt = make_gpt(VOCAB, seed=1, block_size=128)
    long_prompt = [(11 * i + 5) % VOCAB for i in range(90)]
    prompts = [PROMPTS[0], long_prompt, PROMPTS[3]]
    alone = [generate(gpt, [p], greedy(12))[0] for p in prompts]
    engine = Engine(gpt, 3, prefill_tokens=16)
    seqs = [Sequence(list(p), greedy(12)) for p in prompts]
    for s in seqs:
        engine.add(s)
    first_token_step = {}
    k = 0
    while engine:
        for s, _ in engine.step():
            first_token_step.setdefault(id(s), k)
        k += 1
    assert [s.out for s in seqs] == alone
    assert first_token_step[id(seqs[0])] == 0  # the short prompt does not wait for the long one
    assert first_token_step[id(seqs[1])] >= 90 // 16  # the long one took several chunks


def test_priority_then_age_with_a_cap_per_group(gpt):
    """Admission: the higher priority first, then the older; a group holds at most its cap of slots,
    so a big group leaves room for a small one that arrives later."""
    engine = Engine(gpt, 3, max_per_group=2)
    big = [Sequence([1, 2, 3], greedy(30), group="big") for _ in range(6)]
    small = Sequence([4, 5], greedy(3), group="small")
    urgent = Sequence([6], greedy(3), group="urgent", priority=5)
    for s in big:
        engine.add(s)
    engine.add(small)
    engine.step()
    assert {s.group for s in engine.running} == {"big", "small"}
    assert sum(s.group == "big" for s in engine.running) == 2
    engine.add(urgent)
    while small.running:
        engine.step()
    engine.step()
    assert urgent in engine.running  # the freed slot went to the urgent one, not a third big one


def test_out_of_memory_preempts_the_newest_and_outputs_are_unchanged(gpt):
    """An out-of-memory pass (injected at 3 rows) halves the sequences run at once; the newest
    leave their slots and are prefilled again later from their ids so far."""
    alone = [generate(gpt, [p], greedy(10))[0] for p in PROMPTS]
    params = SamplingParams(max_tokens=10, temperature=1.0)
    each = [generate(gpt, [p], params.seeded(7 + i))[0] for i, p in enumerate(PROMPTS)]
    engine = Engine(gpt, 4)
    engine.inject_oom = 3
    seqs = [Sequence(list(p), greedy(10)) for p in PROMPTS]
    for s in seqs:
        engine.add(s)
    engine.step()  # the prefill pass, over 4 rows, runs out of memory: 2 rows now
    assert [(r.rows, r.limit, len(r.preempted)) for r in engine.rungs] == [(4, 2, 2)]
    assert engine.limit == 2 and len(engine.running) == 2
    while engine:
        engine.step()
    assert [s.out for s in seqs] == alone
    assert generate(gpt, PROMPTS, seeded(params, [7, 8, 9, 10])) == each


def test_out_of_memory_midway_resumes_preempted_rows_from_their_ids(gpt):
    alone = [generate(gpt, [p], greedy(12))[0] for p in PROMPTS[:2]]
    engine = Engine(gpt, 2)
    seqs = [Sequence(list(p), greedy(12)) for p in PROMPTS[:2]]
    for s in seqs:
        engine.add(s)
    for _ in range(5):
        engine.step()
    engine.inject_oom = 2
    engine.step()
    assert engine.rungs and engine.rungs[0].preempted == [seqs[1]] and not seqs[1].running
    assert len(seqs[1].out) == 5  # kept: it is prefilled again from prompt + these
    while engine:
        engine.step()
    assert [s.out for s in seqs] == alone


def test_out_of_memory_at_one_row_raises_and_the_sequence_can_go_on_elsewhere(gpt):
    (alone,) = generate(gpt, [PROMPTS[2]], greedy(10))
    engine = Engine(gpt, 1)
    seq = Sequence(list(PROMPTS[2]), greedy(10))
    engine.add(seq)
    for _ in range(4):
        engine.step()
    engine.inject_oom = 1
    with pytest.raises(torch.OutOfMemoryError):
        engine.step()
    engine.inject_oom = None
    moved = engine.take_out(seq)  # what the worker does to go on on its CPU copy
    assert not engine
    other = Engine(gpt, 1)
    other.add(moved)
    while other:
        other.step()
    assert seq.out + moved.out == alone


def test_top_k_1_equals_greedy(gpt):
    g = generate(gpt, PROMPTS, greedy(16))
    k1 = generate(gpt, PROMPTS, seeded(SamplingParams(max_tokens=16, temperature=1.3, top_k=1), [1, 2, 3, 4]))
    assert k1 == g


def test_tiny_top_p_equals_greedy(gpt):
    g = generate(gpt, PROMPTS, greedy(16))
    p = generate(gpt, PROMPTS, seeded(SamplingParams(max_tokens=16, temperature=1.0, top_p=1e-6), [5, 6, 7, 8]))
    assert p == g


def test_top_k_limits_choices(gpt):
    """With top_k=3 every sampled id is one of the 3 likeliest at its step."""
    prompt = PROMPTS[1]
    (out,) = generate(gpt, [prompt], seeded(SamplingParams(max_tokens=12, temperature=2.0, top_k=3), [9]))
    ctx = list(prompt)
    with torch.inference_mode():
        for t in out:
            logits, _ = gpt(torch.tensor([ctx]))
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


def test_valid_edge_params_accepted(gpt):
    p = SamplingParams(max_tokens=1, temperature=0, top_p=1.0, top_k=1)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k) == (1, 0, 1.0, 1)
    assert [len(o) for o in generate(gpt, PROMPTS, p)] == [1] * len(PROMPTS)  # and they run


def test_empty_prompt_and_params_count_refused(gpt):
    with pytest.raises(InvalidParameterError):
        generate(gpt, [], greedy(3))
    with pytest.raises(InvalidParameterError):
        generate(gpt, [[1, 2], []], greedy(3))
    with pytest.raises(InvalidParameterError):
        generate(gpt, [[1, 2], [3]], [greedy(3)])  # one params per prompt, or one for all
    with pytest.raises(InvalidParameterError):
        Engine(gpt, 2).add(Sequence([], greedy(3)))
    with pytest.raises(ContextOverflowError):
        Engine(gpt, 2, max_len=8).add(Sequence([1, 2, 3], greedy(6)))  # admission reserves prompt + budget


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
    unmasked = generate(gpt, [[1, 2, 3]], seeded(params, [0]))[0]
    assert any(t not in allowed_set for t in unmasked)
    out = generate(gpt, PROMPTS, seeded(params, [1, 2, 3, 4]), allowed_ids=allowed)
    seen = {t for o in out for t in o}
    assert seen <= allowed_set
    if params.temperature >= 1.5:
        assert len(seen) > 1  # it really samples among the allowed ids


def test_slot_rows_logits_match_each_prompt_alone(gpt):
    """The model under the engine: rows in scattered slots at different positions, prefilled in one
    ragged pass and then decoded, give each prompt's own logits (the whole-sequence pass)."""
    from gencli.model.cache import SlotBatch, SlotCache

    cache = SlotCache.for_model(gpt, 6, 32)

    slots = [4, 0, 2, 5]
    with torch.inference_mode():
        T = max(len(p) for p in PROMPTS)
        idx = torch.zeros((4, T), dtype=torch.long)
        for r, p in enumerate(PROMPTS):
            idx[r, : len(p)] = torch.tensor(p)
        at = SlotBatch(slots, [0] * 4, [len(p) for p in PROMPTS], "cpu")
        first = gpt.forward_cached(idx, cache, at)
        at = SlotBatch(slots, [len(p) for p in PROMPTS], [1] * 4, "cpu")
        second = gpt.forward_cached(torch.tensor([[7], [8], [9], [10]]), cache, at)
        for r, p in enumerate(PROMPTS):
            whole, _ = gpt(torch.tensor([p + [7 + r]]))
            torch.testing.assert_close(first[r], whole[0, -2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(second[r], whole[0, -1], rtol=1e-5, atol=1e-5)


def test_mixed_resumed_rows_fit_each_alone(make_gpt):
    """A long, mostly generated row next to a fresh short one: only each row must fit the context
    (its own slot, its own positions), each row's greedy output that of the row alone."""
    gpt = make_gpt(VOCAB, seed=2, block_size=256)
    long_row = [(7 * i + 3) % VOCAB for i in range(250)]  # prompt + ids made before an interrupt
    prompts, budgets = [long_row, [5, 9, 200, 17, 42]], [6, 200]
    alone = [generate(gpt, [p], greedy(n))[0] for p, n in zip(prompts, budgets)]
    assert generate(gpt, prompts, greedy(200), budgets=budgets) == alone
    assert generate(gpt, prompts[::-1], greedy(200), budgets=budgets[::-1]) == alone[::-1]
    assert [len(o) for o in alone] == budgets


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
    out = generate(gpt, PROMPTS, seeded(params, [1, 2, 3, 4]), allowed_ids=allowed)
    assert {t for o in out for t in o} <= allowed_set
    if temperature < 1e-30:
        assert out == generate(gpt, PROMPTS, greedy(20), allowed_ids=allowed)


def test_a_row_computes_bit_for_bit_what_it_computes_alone(make_gpt):
    """The model under the engine, in its invariant mode: a row's logits are exactly equal (not
    close) whether it runs alone or beside rows at other positions, with other prompt chunks and
    in other slots: attention groups rows by their own query count and key bucket, and a lone
    one-id row runs as two (a one-row product rounds apart from a product of two or more)."""
    from gencli.model.cache import SlotBatch, SlotCache

    gpt = make_gpt(VOCAB, seed=4, block_size=128, widen=False)
    prompt = [(5 * i + 3) % VOCAB for i in range(21)]
    others = [[(7 * i + 1) % VOCAB for i in range(n)] for n in (3, 40, 64)]

    def alone_logits():
        cache = SlotCache.for_model(gpt, 1, 80)
        at = SlotBatch([0], [0], [len(prompt)], "cpu")
        first = gpt.forward_cached(torch.tensor([prompt]), cache, at, [0, 0])  # the head over two rows
        at = SlotBatch([0, 0], [len(prompt)] * 2, [1, 1], "cpu")  # a lone one-id row, twice
        second = gpt.forward_cached(torch.tensor([[9], [9]]), cache, at, [0, 0])
        return first[0], second[0]

    def company_logits():
        cache = SlotCache.for_model(gpt, 6, 128)
        rows = [prompt, *others]
        T = max(len(r) for r in rows)
        idx = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            idx[b, : len(r)] = torch.tensor(r)
        slots = [3, 0, 5, 1]
        first = gpt.forward_cached(idx, cache, SlotBatch(slots, [0] * 4, [len(r) for r in rows], "cpu"))
        starts = [len(r) for r in rows]
        second = gpt.forward_cached(torch.tensor([[9], [8], [7], [6]]), cache, SlotBatch(slots, starts, [1] * 4, "cpu"))
        return first[0], second[0]

    with torch.inference_mode():
        a, b = alone_logits(), company_logits()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_greedy_and_seeded_outputs_do_not_depend_on_company(make_gpt):
    """Many prompts of mixed lengths and parameters joining an engine at different steps: each output
    is, id for id, its output alone (on a small model of GPT-2's init, whose near-ties a rounding
    difference would flip)."""
    gpt = make_gpt(VOCAB, seed=5, block_size=128, widen=False)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(24):
        n = int(torch.randint(1, 30, (), generator=g))
        p = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        sp = SamplingParams(max_tokens=5 + 3 * (i % 7), temperature=0 if i % 2 else 0.9, top_k=None if i % 3 else 20)
        rows.append((p, sp, 40 + i))
    alone = [generate(gpt, [p], sp.seeded(s))[0] for p, sp, s in rows]
    for slots, prefill in ((3, 512), (8, 16), (16, 7)):
        engine = Engine(gpt, slots, prefill_tokens=prefill)
        seqs = [Sequence(list(p), sp.seeded(s)) for p, sp, s in rows]
        pending = iter(seqs)
        for s in [next(pending) for _ in range(5)]:
            engine.add(s)
        while engine or (nxt := next(pending, None)) is not None:
            if not engine:
                engine.add(nxt)
            engine.step()
            more = next(pending, None)
            if more is not None:
                engine.add(more)
        assert [s.out for s in seqs] == alone, (slots, prefill)


def test_a_preempted_sequence_goes_back_first_and_its_group_keeps_its_cap():
    from gencli.model.scheduler import Scheduler

    class S:
        def __init__(self, group, priority=0):
            self.group, self.priority, self.arrival = group, priority, 0

    sched = Scheduler(max_per_group=2)
    a1, a2, a3 = S("a"), S("a"), S("a")
    for s in (a1, a2, a3):
        sched.add(s)
    assert [sched.next(), sched.next(), sched.next()] == [a1, a2, None]  # the cap
    sched.released(a2)  # preempted: out of its slot, back in the queue before a3
    sched.put_back(a2)
    assert sched.next() is a2 and sched.next() is None  # still at most 2 of group a running
    sched.released(a1)
    assert sched.next() is a3 and len(sched) == 0


def test_logprobs_are_the_models_own_distribution_whatever_samples(make_gpt):
    """Each new id's logprob is the log-softmax of the model's logits at its position (a whole
    forward pass over prompt and ids, without the cache, agrees to float32's rounding), before
    temperature, top_k and top_p; the top ids are the likeliest, likeliest first."""
    gpt = make_gpt(VOCAB, seed=0)  # (well-separated logits: the full pass ranks the top ids alike)
    prompt = PROMPTS[2]
    for sp in (SamplingParams(max_tokens=12, temperature=0, logprobs=3),
               SamplingParams(max_tokens=12, temperature=1.7, top_k=5, top_p=0.8, seed=3, logprobs=0)):
        engine = Engine(gpt, 2)
        seq = Sequence(list(prompt), sp)
        engine.add(seq)
        while engine:
            engine.step()
        assert len(seq.logprobs) == len(seq.out) == 12
        with torch.inference_mode():
            logits, _ = gpt(torch.tensor([prompt + seq.out[:-1]]))
        full = torch.log_softmax(logits[0, len(prompt) - 1 :].float(), dim=-1)
        for k, (token, lp) in enumerate(zip(seq.out, seq.logprobs, strict=True)):
            assert lp.logprob == pytest.approx(full[k, token].item(), abs=1e-4)
            assert len(lp.top) == sp.logprobs
            if sp.logprobs:
                ids = [i for i, _ in lp.top]
                assert ids == full[k].topk(sp.logprobs).indices.tolist()
                assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
            if sp.temperature == 0:  # greedy: the chosen id is the likeliest
                assert lp.logprob == lp.top[0][1] and token == lp.top[0][0]
    plain = Sequence(list(prompt), greedy(4))
    engine = Engine(gpt, 1)
    engine.add(plain)
    while engine:
        engine.step()
    assert plain.logprobs == []  # none asked for, none computed


def test_logprobs_are_over_the_whole_vocabulary_not_only_the_ids_generation_may_yield(gpt):
    """The mask of ids generation never yields picks the ids, not the distribution their logprobs
    are read from: as in training's loss, every id of the vocabulary has its share."""
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[[3, 5, 8]] = True
    sp = SamplingParams(max_tokens=4, temperature=1.0, seed=1, logprobs=20)
    masked, free = Sequence([1, 2, 3], sp), Sequence([1, 2, 3], sp)
    for seq, mask in ((masked, allowed), (free, None)):
        engine = Engine(gpt, 1, allowed_ids=mask)
        engine.add(seq)
        while engine:
            engine.step()
    assert all(token in (3, 5, 8) for token in masked.out)
    for token, lp in zip(masked.out, masked.logprobs, strict=True):
        assert len(lp.top) == 20 and any(i not in (3, 5, 8) for i, _ in lp.top)
        assert sum(math.exp(v) for _, v in lp.top) < 1.0  # (near-ties: 20 of 512 ids hold little)
    assert masked.logprobs[0].top == free.logprobs[0].top  # the same first position, masked or not


def test_prompt_logprobs_score_every_prompt_id_across_prefill_chunks(make_gpt):
    """Each prompt id's logprob given the ids before it (None for the first), as a whole forward
    pass computes it, whether the prompt is prefilled in one chunk or in several."""
    gpt = make_gpt(VOCAB, seed=0, block_size=128)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB, (70,), generator=g).tolist()
    with torch.inference_mode():
        logits, _ = gpt(torch.tensor([prompt]))
    full = torch.log_softmax(logits[0].float(), dim=-1)
    sp = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    for prefill in (512, 16, 7):  # one chunk, then chunks of 16 and of 7 ids
        engine = Engine(gpt, 2, prefill_tokens=prefill)
        seq = Sequence(list(prompt), sp)
        engine.add(seq)
        while engine:
            engine.step()
        assert len(seq.prompt_logprobs) == len(prompt) and seq.prompt_logprobs[0] is None
        for at in range(1, len(prompt)):
            lp = seq.prompt_logprobs[at]
            assert lp.logprob == pytest.approx(full[at - 1, prompt[at]].item(), abs=1e-4)
            assert [i for i, _ in lp.top] == full[at - 1].topk(2).indices.tolist()


def test_a_sequence_with_no_budget_scores_its_prompt_and_ends_without_an_id(gpt):
    """max_tokens 0 (with prompt_logprobs): the prompt is prefilled and scored, nothing is sampled,
    and the step says it ended with (sequence, None); its logprobs are those a generating run has."""
    scoring = SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=1)
    engine, seqs, steps = steps_of(gpt, PROMPTS, scoring)
    assert all(s.out == [] and s.finished for s in seqs)
    assert steps == [[None] * len(PROMPTS)]  # one step: every prompt prefilled and ended
    generating = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=1)
    _, gen_seqs, _ = steps_of(gpt, PROMPTS, generating)
    assert [s.prompt_logprobs for s in seqs] == [s.prompt_logprobs for s in gen_seqs]
    with pytest.raises(InvalidParameterError, match="max_tokens must be a whole number >= 1"):
        SamplingParams(max_tokens=0)  # nothing to score: nothing to do


def test_a_resumed_sequence_has_the_logprobs_of_an_uninterrupted_run_bit_for_bit(gpt):
    """A sequence resumed from its ids so far (a worker's takeover) computes the logprobs of those
    ids as it feeds them again, with the very products of the first run; a finished one resumed
    with no budget (its last id made, not yet recorded) has them all. Seeded, temperature 1."""
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_k=None, seed=5, logprobs=4)
    _, whole, _ = steps_of(gpt, PROMPTS, sp)
    for cut in (0, 1, 4):
        engine = Engine(gpt, len(PROMPTS))
        resumed = [Sequence(list(p), sp, sp.max_tokens - cut, skip_draws=cut, prior=w.out[:cut], index=i)
                   for i, (p, w) in enumerate(zip(PROMPTS, whole))]
        for s in resumed:
            engine.add(s)
        while engine:
            engine.step()
        for w, r in zip(whole, resumed):
            assert r.prior + r.out == w.out
            assert r.logprobs == w.logprobs  # floats compared exactly
    engine = Engine(gpt, len(PROMPTS))
    done = [Sequence(list(p), sp, 0, prior=list(w.out), index=i) for i, (p, w) in enumerate(zip(PROMPTS, whole))]
    for s in done:
        engine.add(s)
    ended = []
    while engine:
        ended += engine.step()
    assert sorted(s.index for s, t in ended if t is None) == list(range(len(PROMPTS)))
    assert [s.logprobs for s in done] == [w.logprobs for w in whole]
