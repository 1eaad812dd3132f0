"""TextStream: ids to text deltas, safe for streaming (split UTF-8, held-back stop strings)."""

from __future__ import annotations

import pytest

from gencli.model.textstream import TextStream

UNICODE = "héllo 🌍 日本語 テスト 👩‍👩‍👧 Ωμέγα 🇯🇵!"


def run(stream: TextStream, ids: list[int], reason: str = "length") -> list[str]:
    deltas = [stream.feed(i) for i in ids]
    deltas.append(stream.finish(reason))
    return deltas


def test_split_utf8_never_shows_a_replacement_char(tok_chatml):
    ids = tok_chatml.encode(UNICODE)
    # The text really is split inside characters: some tokens are not valid UTF-8 alone.
    partial = [i for i in ids if not _valid_utf8(tok_chatml.encoding.decode_single_token_bytes(i))]
    assert len(partial) >= 5
    s = TextStream(tok_chatml)
    deltas = run(s, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == s.text == UNICODE == tok_chatml.decode(ids)
    assert s.ids == ids
    assert s.finish_reason == "length"


def test_each_delta_is_held_until_the_character_is_complete(tok_chatml):
    ids = tok_chatml.encode(" 🌍")
    assert len(ids) > 1
    s = TextStream(tok_chatml)
    deltas = [s.feed(i) for i in ids]
    assert deltas[0] == " "  # the space goes out, the first bytes of the emoji wait
    assert "".join(deltas) == " 🌍"
    assert deltas[-1].endswith("🌍")


def test_replacement_char_only_when_the_final_text_has_it(tok_chatml):
    # An emoji cut off after its first bytes, then more text: the broken character is real.
    emoji = tok_chatml.encode(" 🌍")
    ids = emoji[:1] + tok_chatml.encode("ok")
    s = TextStream(tok_chatml)
    deltas = run(s, ids)
    final = tok_chatml.decode(ids)
    assert "\ufffd" in final
    assert "".join(deltas) == s.text == final
    # Ending inside a character: the flush at finish shows what decode shows.
    s = TextStream(tok_chatml)
    deltas = run(s, emoji[:1])
    assert "".join(deltas) == tok_chatml.decode(emoji[:1])
    assert "\ufffd" not in deltas[0]


def test_stop_string_across_tokens_is_held_back_and_cut(tok_chatml):
    text = "Sure thing, friend.\nHuman: and then"
    ids = tok_chatml.encode(text)
    s = TextStream(tok_chatml, stop=("\nHuman:",))
    deltas = []
    for i in ids:
        deltas.append(s.feed(i))
        assert "\n" not in "".join(deltas)  # the newline is never shown: it begins the stop
        if s.finished:
            break
    assert s.finish_reason == "stop"
    assert "".join(deltas) == s.text == "Sure thing, friend."
    assert s.feed(ids[-1]) == "" and s.finish("length") == ""  # nothing after the stop
    assert s.finish_reason == "stop"


def test_stop_string_inside_one_token_is_cut_at_the_match(tok_chatml):
    text = "alpha beta STOPgamma"
    ids = tok_chatml.encode(text)
    s = TextStream(tok_chatml, stop=("STOP",))
    deltas = [s.feed(i) for i in ids]
    assert s.finish_reason == "stop"
    assert "".join(deltas) == s.text == "alpha beta "


def test_earliest_of_several_stop_strings_wins(tok_chatml):
    ids = tok_chatml.encode("one two three four")
    s = TextStream(tok_chatml, stop=("four", "two"))
    deltas = [s.feed(i) for i in ids]
    assert "".join(deltas) == "one "
    assert s.finish_reason == "stop"


def test_partial_match_not_completed_is_emitted(tok_chatml):
    text = "a line\nHum drum and more"
    ids = tok_chatml.encode(text)
    s = TextStream(tok_chatml, stop=("\nHuman:",))
    deltas = [s.feed(i) for i in ids]
    assert not s.finished
    assert "".join(deltas) == s.text == text  # all of it, once " drum" showed it was no stop
    assert s.finish("length") == ""
    assert s.text == text and s.finish_reason == "length"


def test_partial_match_held_at_the_end_comes_out_at_finish(tok_chatml):
    text = "the end\nHum"
    ids = tok_chatml.encode(text)
    s = TextStream(tok_chatml, stop=("\nHuman:",))
    deltas = [s.feed(i) for i in ids]
    assert "".join(deltas) == "the end"
    assert s.finish("length") == "\nHum"
    assert s.text == text


def test_stop_id_finishes_with_held_text(tok_chatml):
    ids = tok_chatml.encode("hi\nHu")
    s = TextStream(tok_chatml, stop=("\nHuman:",), stop_ids=tok_chatml.stop_ids)
    deltas = [s.feed(i) for i in ids]
    deltas.append(s.feed(tok_chatml.im_end_id))
    assert s.finish_reason == "stop"
    assert "".join(deltas) == s.text == "hi\nHu"
    assert s.ids == ids  # the stop id is not part of the text's ids
    assert tok_chatml.im_end_id in tok_chatml.stop_ids and tok_chatml.eot_id in tok_chatml.stop_ids


@pytest.mark.parametrize("stop", [("🌍",), ("日本",), ("\u200d",)])
def test_stop_string_of_multibyte_text(tok_chatml, stop):
    ids = tok_chatml.encode(UNICODE)
    s = TextStream(tok_chatml, stop=stop)
    deltas = [s.feed(i) for i in ids]
    assert s.finish_reason == "stop"
    assert "".join(deltas) == s.text == UNICODE[: UNICODE.index(stop[0])]
    assert all("\ufffd" not in d for d in deltas)


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
