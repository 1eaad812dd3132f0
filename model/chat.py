"""Chat formats: how a conversation becomes token ids, and where a reply ends.

- `chatml`: `<|im_start|>role\\ncontent<|im_end|>\\n` with real special ids; a reply ends at
  `<|im_end|>`.
- `legacy`: `Human: ...\\nAssistant: ...\\n`, plain text; a reply ends where the model starts the
  next `Human:` turn.
Content always goes through `Tokenizer.encode` (encode_ordinary): only this template inserts
special ids, so user text can never switch roles.
"""

from __future__ import annotations

from enum import Enum

from gencli.model.errors import GencliError
from gencli.model.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


class ChatFormat(str, Enum):
    CHATML = "chatml"
    LEGACY = "legacy"

    @classmethod
    def parse(cls, value: str) -> ChatFormat:
        try:
            return cls(value)
        except ValueError:
            raise GencliError(f"unknown chat format {value!r}: use chatml or legacy") from None


LEGACY_NAMES = {"user": "Human", "assistant": "Assistant"}


def check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise GencliError("a conversation needs at least one message")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise GencliError('each message needs "role" and a string "content"')
        if m.get("role") not in ROLES:
            raise GencliError(f"unknown role {m.get('role')!r}: use one of {', '.join(ROLES)}")


def render(
    tok: Tokenizer, fmt: ChatFormat, messages: list[dict], *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a conversation; with add_generation_prompt, ending with the assistant header."""
    check_messages(messages)
    ids: list[int] = []
    if fmt is ChatFormat.CHATML:
        for m in messages:
            ids += [tok.im_start_id, *tok.encode(f"{m['role']}\n{m['content']}"), tok.im_end_id]
            ids += tok.encode("\n")
        if add_generation_prompt:
            ids += [tok.im_start_id, *tok.encode("assistant\n")]
        return ids
    text = ""
    for m in messages:
        if m["role"] == "system":
            text += f"{m['content']}\n"
        else:
            text += f"{LEGACY_NAMES[m['role']]}: {m['content']}\n"
    if add_generation_prompt:
        text += "Assistant:"
    return tok.encode(text)


def stop_strings(fmt: ChatFormat) -> tuple[str, ...]:
    """Text that ends a reply in this format (ChatML ends on a special id instead)."""
    return ("\nHuman:",) if fmt is ChatFormat.LEGACY else ()
