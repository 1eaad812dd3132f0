"""Conversations to token ids: exactly what `gencli.model.chat` renders, at tokenizer speed.

The reference, per conversation: `segments(fmt, messages, add_generation_prompt=False)`, each text
segment through `encode_ordinary`, each special segment as its id (`encode_segments`), then
`<|endoftext|>`; the loss mask is each segment's `target`. That is what inference feeds a model.

Doing it that way costs a Python call and a Segment per piece of every turn, several times the
tokenizer's own time. The fast path gets the same ids another way:
- `segments()` is run once per role on a placeholder, giving a per-role template (text before and
  after the content, with markers where segments end); a check on probe conversations confirms that
  a conversation renders as its messages' templates in a row (else every conversation goes through
  `segments()`: slower, same ids).
- Many conversations are rendered into one string in which every segment boundary is a marker: a
  private special string that maps to the real `<|im_start|>`/`<|im_end|>`/`<|endoftext|>` id, or
  to a separator id that is dropped afterwards. tiktoken encodes the text between two special tokens
  on its own (its pre-tokenising regex never sees past one), so each segment's tokens are those of
  `encode_ordinary(segment)`. The private encoding knows no other special string, so literal
  `<|im_end|>` in user text stays text.
- The string goes to tiktoken's `encode_to_numpy` on a worker thread (tiktoken releases the GIL),
  and numpy drops the separators and spreads the segment targets over their tokens.
A text that contains the marker prefix itself (it starts with a NUL) sends its piece down the
reference path. Tests compare both paths on real and adversarial text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import tiktoken

from gencli.model.chat import ChatFormat, Segment, encode_segments, segments
from gencli.model.tokenizer import ENDOFTEXT, IM_END, IM_START, Tokenizer
from gencli.prep.common import Message
from gencli.prep.spec import PrepError

MARK = "\x00gencli-prep:"  # every marker starts with it; cannot overlap itself
SEP = MARK + "sep\x00"
EOT = MARK + "eot\x00"
SPECIAL_MARKS = {"im_start": MARK + "im_start\x00", "im_end": MARK + "im_end\x00"}
_PLACEHOLDER = "\x01gencli-prep-content\x01"
_PROBES = (
    [("system", "Be brief."), ("user", "Hi there"), ("assistant", " Hello!\n"), ("user", ""), ("assistant", "a  \n\n")],
    [("assistant", "<|im_end|> literal")],
    [("user", "x")],
)


@dataclass(frozen=True)
class Template:
    prefix: str  # rendered text before the content, markers included
    suffix: str  # after it
    targets: tuple[bool, ...]  # one per segment of the message
    marks: int  # markers in prefix + suffix


@dataclass
class Piece:
    """Conversations rendered for one encode call."""

    count: int  # conversations
    text: str | None  # the marked-up string; None: encode these on the reference path
    conversations: list[list[Message]] | None
    targets: np.ndarray | None  # bool per segment, when a loss mask is wanted
    literals: dict[str, int]  # literal special-token strings found in the text


@dataclass
class Encoded:
    ids: np.ndarray  # uint32, the conversations in order, each ending with <|endoftext|>
    mask: np.ndarray | None  # bool per id: part of an assistant reply
    lengths: np.ndarray  # tokens per conversation
    literals: dict[str, int]


class ConversationEncoder:
    """Renders conversations on the caller's thread (`render`), encodes them anywhere (`encode`)."""

    def __init__(self, tok: Tokenizer, fmt: ChatFormat, *, loss_mask: bool, fast: bool = True):
        if tok.eot_id is None:
            raise PrepError(f"tokenizer {tok.spec_name} has no {ENDOFTEXT} token to end conversations with")
        self.tok = tok
        self.fmt = fmt
        self.loss_mask = loss_mask
        self.eot_id = tok.eot_id
        self.sep_id = tok.encoding.max_token_value + 1  # beyond every real id; dropped after encoding
        marks = {EOT: tok.eot_id, SEP: self.sep_id}
        if fmt is ChatFormat.CHATML:
            marks[SPECIAL_MARKS["im_start"]] = tok.im_start_id
            marks[SPECIAL_MARKS["im_end"]] = tok.im_end_id
        self.terminator_ids = np.array(sorted(set(marks.values())), dtype=np.uint32)
        self.private = _private_encoding(tok.encoding, marks)
        self.literal_strings = sorted(set(tok.encoding._special_tokens) | {ENDOFTEXT, IM_START, IM_END})
        self.templates = self._templates() if fast else None

    # -- rendering (Python, the caller's thread) --

    def render(self, conversations: list[list[Message]]) -> Piece:
        if self.templates is None:
            return self._render_by_segments(conversations)
        return self._render_by_templates(conversations, self.templates, want_targets=self.loss_mask)

    def _render_by_templates(self, conversations, templates: dict[str, Template], *, want_targets: bool) -> Piece:
        parts: list[str] = []
        append = parts.append
        targets: list[bool] = []
        marks = 0
        for messages in conversations:
            for role, content in messages:
                t = templates[role]
                append(t.prefix)
                append(content)
                append(t.suffix)
                marks += t.marks
                if want_targets:
                    targets += t.targets
            append(EOT)
            targets.append(False)
        return self._piece(conversations, "".join(parts), targets, marks + len(conversations), want_targets)

    def _render_by_segments(self, conversations: list[list[Message]], *, want_targets: bool | None = None) -> Piece:
        parts: list[str] = []
        targets: list[bool] = []
        marks = 0
        for messages in conversations:
            segs = segments(self.fmt, _dicts(messages), add_generation_prompt=False)
            text, t = _mark_up(segs)
            parts += (text, EOT)
            targets += t + [False]
            marks += len(segs) + 1  # one marker ends each segment, one the conversation
        want = self.loss_mask if want_targets is None else want_targets
        return self._piece(conversations, "".join(parts), targets, marks, want)

    def _piece(self, conversations, text: str, targets: list[bool], marks: int, want_targets: bool) -> Piece:
        literals = self._literals(text)
        if text.count(MARK) != marks:  # some text holds the marker prefix: the reference path
            return Piece(len(conversations), None, conversations, None, literals)
        targets = np.array(targets, dtype=bool) if want_targets else None
        return Piece(len(conversations), text, None, targets, literals)

    def _literals(self, text: str) -> dict[str, int]:
        if "<|" not in text:
            return {}
        return {s: n for s in self.literal_strings if (n := text.count(s))}

    # -- encoding (tiktoken and numpy, any thread) --

    def encode(self, piece: Piece) -> Encoded:
        if piece.text is None:
            return self._encode_reference(piece)
        try:
            ids = self.private.encode_to_numpy(piece.text, allowed_special="all", disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: replaced as encode_ordinary replaces them
            text = piece.text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids = self.private.encode_to_numpy(text, allowed_special="all", disallowed_special=())
        sep = ids == self.sep_id
        mask = None
        if piece.targets is not None:
            ends = np.isin(ids, self.terminator_ids)  # the last id of each segment
            if int(ends.sum()) != len(piece.targets):
                raise RuntimeError("prep: segment count does not match the rendered conversations")
            segment = np.cumsum(ends) - ends
            mask = piece.targets[segment][~sep]
        ids = ids[~sep]
        return self._encoded(piece, ids, mask)

    def _encode_reference(self, piece: Piece) -> Encoded:
        ids: list[int] = []
        mask: list[bool] = []
        for messages in piece.conversations:
            i, m = self.reference(messages)
            ids += i
            mask += m
        return self._encoded(
            piece, np.array(ids, dtype=np.uint32), np.array(mask, dtype=bool) if self.loss_mask else None
        )

    def reference(self, messages: list[Message]) -> tuple[list[int], list[bool]]:
        """One conversation the slow, obvious way: gencli.model.chat's own encoding, then <|endoftext|>."""
        ids, mask = encode_segments(self.tok, segments(self.fmt, _dicts(messages), add_generation_prompt=False))
        return ids + [self.eot_id], mask + [False]

    def _encoded(self, piece: Piece, ids: np.ndarray, mask: np.ndarray | None) -> Encoded:
        ends = np.flatnonzero(ids == self.eot_id) + 1
        if len(ends) != piece.count:
            raise RuntimeError("prep: conversation count does not match the encoded ids")
        return Encoded(ids, mask, np.diff(ends, prepend=0), piece.literals)

    # -- templates --

    def _templates(self) -> dict[str, Template] | None:
        templates = {}
        for role in ("system", "user", "assistant"):
            segs = segments(self.fmt, [{"role": role, "content": _PLACEHOLDER}], add_generation_prompt=False)
            text, targets = _mark_up(segs)
            if text.count(_PLACEHOLDER) != 1:
                return None
            prefix, suffix = text.split(_PLACEHOLDER)
            templates[role] = Template(prefix, suffix, tuple(targets), prefix.count(MARK) + suffix.count(MARK))
        for probe in _PROBES:  # a conversation must render as its messages' templates in a row
            fast = self._render_by_templates([probe], templates, want_targets=True)
            slow = self._render_by_segments([probe], want_targets=True)
            if fast.text != slow.text or not np.array_equal(fast.targets, slow.targets):
                return None
        return templates

    @property
    def signature(self) -> str:
        """A hash of how this encoder renders: changes when the chat template or special ids do."""
        h = hashlib.sha256()
        for probe in _PROBES:
            text, targets = _mark_up(segments(self.fmt, _dicts(probe), add_generation_prompt=False))
            h.update(repr((text, targets)).encode())
        h.update(repr(sorted(self.private._special_tokens.items())).encode())
        return h.hexdigest()


def _dicts(messages: list[Message]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in messages]


def _mark_up(segs: list[Segment]) -> tuple[str, list[bool]]:
    """The marked-up string of segments, and each segment's target."""
    parts = []
    for seg in segs:
        parts.append(SPECIAL_MARKS[seg.special] if seg.special else seg.text + SEP)
    return "".join(parts), [seg.target for seg in segs]


_PRIVATE: dict[tuple, tuple[object, tiktoken.Encoding]] = {}


def _private_encoding(encoding: tiktoken.Encoding, marks: dict[str, int]) -> tiktoken.Encoding:
    """The encoding's ranks and regex, with the markers as its only special tokens (cached)."""
    ranks = encoding._mergeable_ranks
    key = (id(ranks), encoding._pat_str, tuple(sorted(marks.items())))
    hit = _PRIVATE.get(key)
    if hit is None or hit[0] is not ranks:
        private = tiktoken.Encoding(
            name=f"{encoding.name}-prep", pat_str=encoding._pat_str, mergeable_ranks=ranks, special_tokens=marks
        )
        hit = _PRIVATE[key] = (ranks, private)
    return hit[1]
