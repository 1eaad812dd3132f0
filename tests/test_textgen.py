"""TextGenerator: the engine joined to the tokenizer and chat format, text deltas out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gencli.model.chat import ChatFormat, render, stop_strings
from gencli.model.checkpoint import vocab_for
from gencli.model.engine import generate
from gencli.model.errors import ContextOverflowError, InvalidParameterError
from gencli.model.params import SamplingParams
from gencli.model.textgen import TextGenerator
from gencli.model.textstream import TextStream

GREEDY = SamplingParams(max_tokens=30, temperature=0)


def collect(tg):
    """Run a TextGeneration; per sequence, the list of (text, finish_reason) deltas."""
    per_seq: dict[int, list] = {i: [] for i in range(len(tg.streams))}
    for deltas in tg:
        for d in deltas:
            per_seq[d.index].append(d)
    return per_seq


@pytest.fixture(scope="module")
def textgen(chatml_loaded):
    return TextGenerator(chatml_loaded)


def prompts(textgen):
    return [
        textgen.encode("Tell me a story", chat=True),
        textgen.encode(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "日本語?"}], chat=True
        ),
        textgen.encode("plain text prompt", chat=False),
    ]


def test_streamed_text_is_the_decode_of_the_engines_ids(textgen, tok_chatml):
    """Each sequence's deltas add up to the tokenizer's decode of the ids the engine makes on its own
    (same prompts, seeds and id mask; the stop id left out), and after every step they show all of
    that decode except an unfinished UTF-8 character (ChatML has no stop strings to hold back)."""
    ps = prompts(textgen)
    params, seeds = SamplingParams(max_tokens=40, temperature=1.0), [1, 2, 3]
    params = [params.seeded(s) for s in seeds]
    engine = generate(textgen.model, ps, params, stop_ids=tok_chatml.stop_ids,
                      allowed_ids=textgen.allowed)
    tg = textgen.stream(ps, params)
    fed: list[list[int]] = [[], [], []]
    shown: list[list[str]] = [[], [], []]  # the text on screen after each delta
    finishes: list[list[str]] = [[], [], []]
    for deltas in tg:
        for d in deltas:
            fed[d.index].append(d.token)
            shown[d.index].append((shown[d.index][-1] if shown[d.index] else "") + d.text)
            if d.finish_reason:
                finishes[d.index].append(d.finish_reason)
    for i, ids in enumerate(engine):
        assert fed[i] == ids
        stopped = ids[-1] in tok_chatml.stop_ids
        text_ids = ids[:-1] if stopped else ids
        final = tok_chatml.decode(text_ids)
        assert shown[i][-1] == final
        assert finishes[i] == ["stop" if stopped else "length"]
        assert stopped or len(ids) == 40
        for k, on_screen in enumerate(shown[i]):
            so_far = tok_chatml.decode(text_ids[: k + 1])  # an unfinished character decodes to U+FFFD
            assert final.startswith(on_screen)
            assert so_far in (on_screen, on_screen + "\ufffd"), (k, so_far, on_screen)
        s = tg.streams[i]
        assert (s.text, s.ids, s.finish_reason) == (final, text_ids, finishes[i][0])


def test_each_sequence_finishes_once_with_length(textgen):
    ps = prompts(textgen)
    per_seq = collect(textgen.stream(ps, GREEDY))
    for i, deltas in per_seq.items():
        reasons = [d.finish_reason for d in deltas if d.finish_reason]
        assert reasons == ["length"]
        assert deltas[-1].finish_reason == "length"


def test_batched_text_equals_alone(textgen):
    ps = prompts(textgen)
    batch = textgen.generate(ps, GREEDY)
    for p, s in zip(ps, batch):
        (alone,) = textgen.generate([p], GREEDY)
        assert (alone.text, alone.ids) == (s.text, s.ids)


def test_stop_string_ends_one_sequence_others_continue(textgen):
    ps = prompts(textgen)
    free = textgen.generate(ps, GREEDY)
    t0 = free[0].text
    assert len(t0) > 6
    mid = len(t0) // 2
    stop = t0[mid : mid + 3]
    tg = textgen.stream(ps, replace(GREEDY, stop=(stop,)))
    per_seq = collect(tg)
    for i, s in enumerate(tg.streams):
        full = free[i].text
        text = "".join(d.text for d in per_seq[i])  # what a reader of the stream saw
        if stop in full:
            assert s.finish_reason == "stop"
            assert text == full[: full.index(stop)]
        else:
            assert s.finish_reason == "length"
            assert text == full
        assert s.text == text
    assert tg.streams[0].finish_reason == "stop"


def test_stop_id_finishes_with_stop(make_gpt, forced, loaded_for, tok_chatml, tok_legacy):
    cases = [
        (tok_chatml, ChatFormat.CHATML, tok_chatml.im_end_id),
        (tok_legacy, ChatFormat.LEGACY, tok_legacy.eot_id),
    ]
    for tok, fmt, stop_id in cases:
        model = forced(make_gpt(vocab_for(tok), block_size=64), {stop_id: 12.0})
        tg = TextGenerator(loaded_for(model, tok, fmt))
        (s,) = tg.generate([tok.encode("hello")], SamplingParams(max_tokens=10, temperature=0))
        assert s.finish_reason == "stop"
        assert s.text == "" and s.ids == []


def test_a_chatml_reply_ends_where_the_model_opens_the_next_turn(make_gpt, forced, loaded_for, tok_chatml):
    """A ChatML model that opens the next turn (<|im_start|>) without closing its own has ended its
    reply there: finish_reason stop, and no role name spelled out as text after it."""
    (well,) = tok_chatml.encode(" well")
    model = forced(make_gpt(vocab_for(tok_chatml), block_size=64), {well: 5.0, tok_chatml.im_start_id: 4.0})
    tg = TextGenerator(loaded_for(model, tok_chatml, ChatFormat.CHATML))
    prompt = tg.encode([{"role": "user", "content": "hi"}], chat=True)
    streams = tg.generate([prompt] * 8, [SamplingParams(max_tokens=40, temperature=1.0, top_k=2, seed=s) for s in range(8)])
    for s in streams:
        assert s.finish_reason == "stop"
        assert s.ids == [well] * len(s.ids) and s.text == " well" * len(s.ids)
    assert any(s.ids for s in streams)  # some replies say something before they end


@pytest.mark.parametrize("turn", ["Human", "Assistant"])
def test_a_legacy_reply_ends_where_the_model_starts_the_next_turn(tok_legacy, turn):
    stream = TextStream(tok_legacy, stop=stop_strings(ChatFormat.LEGACY), stop_ids=tok_legacy.stop_ids)
    shown = "".join(stream.feed(i) for i in tok_legacy.encode(f" sure thing\n{turn}: and more"))
    assert stream.finished and stream.finish_reason == "stop"
    assert shown == stream.text == " sure thing"


def test_cancel_returns_held_text(make_gpt, forced, loaded_for, tok_chatml):
    a = tok_chatml.encode("a")
    assert len(a) == 1
    model = forced(make_gpt(vocab_for(tok_chatml), block_size=64), {a[0]: 12.0})
    gen = TextGenerator(loaded_for(model, tok_chatml))
    params = SamplingParams(max_tokens=20, temperature=0)
    tg = gen.stream([tok_chatml.encode("x"), tok_chatml.encode("y")], replace(params, stop=("ab",)))
    it = iter(tg)
    shown = ["", ""]
    for step in it:  # step 1 holds "a" back (it may begin "ab"); step 2 shows the first "a"
        for d in step:
            assert d.finish_reason is None
            shown[d.index] += d.text
        if shown == ["a", "a"]:
            break
    assert [len(s.ids) for s in tg.streams] == [2, 2]
    last = tg.cancel()
    assert [(d.index, d.text, d.finish_reason) for d in last] == [(0, "a", "cancelled"), (1, "a", "cancelled")]
    assert list(it) == []  # the engine stopped
    for s in tg.streams:
        assert s.text == "aa" and s.finish_reason == "cancelled"
    assert tg.cancel() == []


def test_never_generates_an_undecodable_id(make_gpt, forced, loaded_for, tok_chatml):
    vocab = vocab_for(tok_chatml)
    decodable = set(tok_chatml.decodable_ids(vocab))
    bad = [i for i in range(vocab) if i not in decodable]
    # Padding ids, holes, FIM tokens, <|endofprompt|> (<|im_start|> ends a reply, as <|im_end|> does).
    assert {100258, 100259, 100260, 100276, vocab - 1} <= set(bad)
    assert {tok_chatml.im_start_id, tok_chatml.im_end_id} <= tok_chatml.stop_ids <= decodable
    # Make the undecodable ids the likeliest by far, a few ordinary ids next.
    ordinary = tok_chatml.encode(" the cat sat on a mat")
    model = forced(make_gpt(vocab, block_size=256), {**{i: 20.0 for i in bad}, **{i: 8.0 for i in ordinary}})
    params = SamplingParams(max_tokens=150, temperature=2.0)
    unmasked = generate(model, [[1, 2]], SamplingParams(max_tokens=20, temperature=2.0, seed=0))[0]
    assert set(unmasked) & set(bad)  # without the mask they do come out
    gen = TextGenerator(loaded_for(model, tok_chatml))
    streams = gen.generate([[1, 2], [3], tok_chatml.encode("hi")], [params.seeded(s) for s in (1, 2, 3)])
    for s in streams:
        assert s.finish_reason == "length"
        assert len(s.ids) == 150
        assert set(s.ids) <= decodable
        assert s.text == tok_chatml.decode(s.ids)


def test_encode_and_fit(textgen, tok_chatml):
    hi = [{"role": "user", "content": "hi"}]
    assert textgen.encode("hi", chat=True) == render(tok_chatml, ChatFormat.CHATML, hi)
    assert textgen.encode("hi", chat=False) == tok_chatml.encode("hi")
    with pytest.raises(InvalidParameterError):
        textgen.encode("   \n", chat=False)
    ids = list(range(200))
    assert textgen.fit(ids, 28, truncate=True) == ids[100:]
    with pytest.raises(ContextOverflowError):
        textgen.fit(ids, 28, truncate=False)


def test_streamed_fragments_of_multibyte_chars(make_gpt, forced, loaded_for, tok_chatml):
    """A model that mostly emits byte fragments of emoji/CJK: nothing shown early is ever wrong."""
    ids = tok_chatml.encode("héllo 🌍 日本語 テスト 👩‍👩‍👧")
    model = forced(make_gpt(vocab_for(tok_chatml), block_size=128), {i: 20.0 for i in ids})
    gen = TextGenerator(loaded_for(model, tok_chatml))
    tg = gen.stream([[1], [2], [3], [4]], [SamplingParams(max_tokens=60, temperature=1.0, seed=s) for s in (1, 2, 3, 4)])
    deltas: list[list[str]] = [[], [], [], []]
    for step in tg:
        for d in step:
            deltas[d.index].append(d.text)
    fragments = 0
    for i, s in enumerate(tg.streams):
        final = s.text
        assert final == tok_chatml.decode(s.ids) == "".join(deltas[i])
        assert set(s.ids) <= set(ids)
        for k in range(len(deltas[i])):
            assert final.startswith("".join(deltas[i][: k + 1]))
            if "\ufffd" in deltas[i][k]:
                assert "\ufffd" in final
        fragments += sum(1 for t in s.ids if t in (234, 235, 252, 228, 102, 239, 100))
    assert fragments > 20  # the test really streamed split characters
