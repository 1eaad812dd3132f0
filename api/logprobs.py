"""Log-probabilities in OpenAI's shapes, from what the queue carries (worker/logprobs.py's entries).

- completions (the legacy object): {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, the
  prompt's first with `echo` (its first id's logprob and top are null);
- chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]},
  the reply's tokens (the id that ended it, `<|im_end|>` say, is not part of the reply's content).

A token whose bytes are not whole UTF-8 alone (a character split across tokens) is named as OpenAI
names it, "bytes:\\xe2\\x80", with its bytes in chat's `bytes`; text_offset counts the characters
of the text before the token, as the text decodes. A logprob too small for a float32 (-inf) is
given as -9999.0, as vLLM gives it: JSON has no infinity.
"""

from __future__ import annotations

import codecs
import math

from gencli.model.tokenizer import Tokenizer

FLOOR = -9999.0


def _lp(v: float | None) -> float | None:
    return None if v is None else (v if math.isfinite(v) else FLOOR)


def token_str(tok: Tokenizer, token: int) -> tuple[str, bytes]:
    """A token's string as OpenAI names it, and its bytes."""
    raw = tok.encoding.decode_single_token_bytes(token)
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


class Offsets:
    """text_offset of each token fed: the characters the tokens before it decode to."""

    def __init__(self, start: int = 0):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.at = start

    def feed(self, raw: bytes) -> int:
        before = self.at
        self.at += len(self._decoder.decode(raw))
        return before


class Legacy:
    """A completion choice's legacy logprobs object, built token by token (a stream's chunks each
    take the tokens they carry: `take()`)."""

    def __init__(self, tok: Tokenizer, start: int = 0):
        self.tok = tok
        self.offsets = Offsets(start)
        self._clear()

    def _clear(self) -> None:
        self.obj = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, entry: list) -> None:
        token, lp, top = entry
        s, raw = token_str(self.tok, token)
        self.obj["tokens"].append(s)
        self.obj["token_logprobs"].append(_lp(lp))
        if lp is None:
            self.obj["top_logprobs"].append(None)
        else:
            best = {token_str(self.tok, i)[0]: _lp(v) for i, v in top}
            self.obj["top_logprobs"].append(best)
        self.obj["text_offset"].append(self.offsets.feed(raw))

    def take(self) -> dict:
        out = self.obj
        self._clear()
        return out


def legacy(tok: Tokenizer, record: dict, *, echo: bool) -> dict:
    """A finished choice's logprobs object: its prompt's (with echo), then its tokens'."""
    obj = Legacy(tok)
    for entry in (record.get("prompt") or []) if echo else []:
        obj.add(entry)
    for entry in record.get("tokens") or []:
        obj.add(entry)
    return obj.take()


def chat_entry(tok: Tokenizer, entry: list) -> dict:
    token, lp, top = entry
    s, raw = token_str(tok, token)
    return {"token": s, "logprob": _lp(lp), "bytes": list(raw),
            "top_logprobs": [{"token": (t := token_str(tok, i))[0], "logprob": _lp(v), "bytes": list(t[1])}
                             for i, v in top]}


def chat(tok: Tokenizer, record: dict) -> dict:
    """A finished reply's logprobs: {"content": [...]}, its ending id left out."""
    return {"content": [chat_entry(tok, e) for e in record.get("tokens") or [] if e[0] not in tok.stop_ids]}
