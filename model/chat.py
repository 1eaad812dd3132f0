"""Chat formats: how a conversation becomes token ids, and where a reply ends.

- `chatml`: `<|im_start|>role\\ncontent<|im_end|>\\n` with real special ids; a reply ends at
  `<|im_end|>`, or at `<|im_start|>` when the model opens the next turn without closing its own.
- `legacy`: `Human: ...\\nAssistant: ...\\n`, plain text; a reply ends where the model starts the
  next turn, `Human:` or `Assistant:`, on a line of its own.
Content always goes through `Tokenizer.encode` (encode_ordinary): only this template inserts
special ids, so user text can never switch roles.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gencli.model.errors import GencliError, InvalidParameterError
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


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation: ordinary text, or one special token."""

    text: str | None = None  # encoded with encode_ordinary
    special: str | None = None  # "im_start" or "im_end"
    target: bool = False  # part of an assistant reply: what assistant-only training learns


def segments(fmt: ChatFormat, messages: list[dict], *, add_generation_prompt: bool = True) -> list[Segment]:
    """The pieces of a conversation in this format, in order.

    Inference (render) and dataset prep (prep/) both build on this, so a model is prompted
    exactly as it was trained. Reply targets: the content and `<|im_end|>` in ChatML; in the
    legacy format the content and the newline that ends it.
    """
    check_messages(messages)
    out: list[Segment] = []
    if fmt is ChatFormat.CHATML:
        for m in messages:
            reply = m["role"] == "assistant"
            out += [Segment(special="im_start"), Segment(text=f"{m['role']}\n"),
                    Segment(text=m["content"], target=reply), Segment(special="im_end", target=reply),
                    Segment(text="\n")]
        if add_generation_prompt:
            out += [Segment(special="im_start"), Segment(text="assistant\n")]
        return out
    for m in messages:
        if m["role"] == "system":
            out.append(Segment(text=f"{m['content']}\n"))
        else:
            out += [Segment(text=f"{LEGACY_NAMES[m['role']]}:"),
                    Segment(text=f" {m['content']}\n", target=m["role"] == "assistant")]
    if add_generation_prompt:
        out.append(Segment(text="Assistant:"))
    return out


def special_id(tok: Tokenizer, name: str) -> int:
    return tok.im_start_id if name == "im_start" else tok.im_end_id


def encode_segments(tok: Tokenizer, segs: list[Segment]) -> tuple[list[int], list[bool]]:
    """(ids, target mask) of rendered segments."""
    ids: list[int] = []
    mask: list[bool] = []
    for seg in segs:
        piece = [special_id(tok, seg.special)] if seg.special else tok.encode(seg.text)
        ids += piece
        mask += [seg.target] * len(piece)
    return ids, mask


def render(
    tok: Tokenizer, fmt: ChatFormat, messages: list[dict], *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a conversation; with add_generation_prompt, ending with the assistant header."""
    return encode_segments(tok, segments(fmt, messages, add_generation_prompt=add_generation_prompt))[0]


def require_text(prompt: str, where: str = "") -> str:
    """A text prompt that holds more than whitespace; where: the line or field to name in the error."""
    if not prompt.strip():
        raise InvalidParameterError(f"{where}empty prompt: give some text")
    return prompt


def stop_strings(fmt: ChatFormat) -> tuple[str, ...]:
    """Text that ends a reply in this format: the start of a next turn (ChatML ends on special ids
    instead, Tokenizer.stop_ids)."""
    if fmt is ChatFormat.LEGACY:
        return tuple(f"\n{name}:" for name in LEGACY_NAMES.values())
    return ()
