"""A prompt of any kind as the ids a model reads: text, chat messages, token ids, a line to score."""

from __future__ import annotations

from gencli.model.chat import ChatFormat, render, require_text
from gencli.model.errors import InvalidParameterError
from gencli.model.scoring import is_scored, score_ids
from gencli.model.tokenizer import Tokenizer


def encode_prompt(tok: Tokenizer, fmt: ChatFormat, prompt: str | list[dict] | dict, *, chat: bool,
                  vocab_size: int | None = None) -> list[int]:
    """A prompt's ids: messages, or text with chat, through the template; plain text as text; a
    prompt given as ids ({"token_ids": [...]}, the HTTP API's) as they are, once checked against the
    tokenizer and the model's vocab_size (where known); a line of a scoring job ({"score": spec}) as
    model/scoring.py reads it."""
    if is_scored(prompt):
        ids = score_ids(tok, fmt, prompt["score"])[0]
        tok.check_ids(ids, vocab_size if vocab_size is not None else 2**63)
        return ids
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
