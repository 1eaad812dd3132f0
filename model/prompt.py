"""A prompt of any kind as the ids a model reads: text, chat messages, token ids, a line to score."""

from __future__ import annotations

from gencli.model.chat import ChatFormat, render, require_text
from gencli.model.errors import InvalidParameterError
from gencli.model.scoring import is_scored, score_ids
from gencli.model.tokenizer import Tokenizer


def encode_prompt(tok: Tokenizer, fmt: ChatFormat, prompt: str | list[dict] | dict, *, chat: bool,
                  vocab_size: int | None = None) -> list[int]:
    """A prompt's ids (encode_line's, without the spans)."""
    return encode_line(tok, fmt, prompt, chat=chat, vocab_size=vocab_size)[0]


def encode_line(tok: Tokenizer, fmt: ChatFormat, prompt: str | list[dict] | dict, *, chat: bool,
                vocab_size: int | None = None) -> tuple[list[int], list[list[int]] | None]:
    """A prompt's ids, and for a line of a scoring job ({"score": spec}, as model/scoring.py reads
    it) the ranges of them scored (None for any other prompt). Messages, or text with chat, go
    through the template; plain text is text; ids ({"token_ids": [...]}, the HTTP API's, or a
    scoring window's) are checked against the tokenizer and the model's vocab_size (where known)."""
    if is_scored(prompt):
        ids, spans = score_ids(tok, fmt, prompt["score"])
        tok.check_ids(ids, vocab_size if vocab_size is not None else 2**63)
        return ids, spans
    return _encode(tok, fmt, prompt, chat=chat, vocab_size=vocab_size), None


def _encode(tok: Tokenizer, fmt: ChatFormat, prompt, *, chat: bool, vocab_size: int | None) -> list[int]:
    if isinstance(prompt, dict):
        ids = prompt.get("token_ids")
        if not isinstance(ids, list) or not ids or not all(type(i) is int for i in ids):
            raise InvalidParameterError("a prompt given as token ids needs at least one id, each a whole number")
        tok.check_ids(ids, vocab_size if vocab_size is not None else 2**63)
        return list(ids)
    if isinstance(prompt, list):
        return render(tok, fmt, prompt)
    require_text(prompt)
    if chat:
        return render(tok, fmt, [{"role": "user", "content": prompt}])
    return tok.encode(prompt)
