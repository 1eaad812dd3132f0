"""Conversations to token ids: exactly what `gencli.model.chat` renders, at tokenizer speed.

The reference, per conversation: `segments(fmt, messages, add_generation_prompt=False)`, each text
segment through `encode_ordinary`, each special segment as its id (`encode_segments`), then
`<|endoftext|>`; the loss mask is each segment's `target`. That is what inference feeds a model.

Doing it that way costs a Python call and a Segment per piece of every turn, several times the
tokenizer's own time. The fast path gets the same ids another way:
- `segments()` is run once per role on a placeholder content, giving a per-role template: the
  segments before the content's segment (the head: `<|im_start|>user\\n` in ChatML), the text around
  the content in its own segment (` ` and `\\n` in the legacy format), and the segments after it
  (the tail: `<|im_end|>\\n`). Head and tail are encoded once, by the reference encoder.
- Many conversations are rendered into one string: per message a head marker, the content's
  segment, a tail marker (left out when the tail has no ids); an end marker per conversation. A
  marker is a private special string whose id stands for the ids of its head or tail (or
  `<|endoftext|>`). tiktoken encodes the text between two special tokens on its own (its
  pre-tokenising regex never sees past one), so the text between a head marker and the next marker
  gets the ids of `encode_ordinary(content segment)`, as in the reference. The private encoding
  knows no other special string, so literal `<|im_end|>` in user text stays text.
- The string goes to tiktoken's `encode_to_numpy` on a worker thread (tiktoken releases the GIL),
  and numpy expands each marker into its ids and targets. Template text never reaches the
  tokenizer: a third fewer segments and a tenth fewer tokens to encode than the rendered text.
A check on probe conversations confirms that the fast path gives the reference's ids and mask
(else every conversation takes the reference path: slower, same ids). A piece whose text contains
the marker prefix itself (it starts with a NUL) takes the reference path too. Tests compare both
paths on real and adversarial text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import tiktoken

from gencli.model.chat import ChatFormat, encode_segments, segments
from gencli.model.tokenizer import ENDOFTEXT, IM_END, IM_START, Tokenizer
from gencli.prep.common import Message
from gencli.prep.spec import PrepError

MARK = "\x00gencli-prep:"  # every marker starts with it; cannot overlap itself
EOT = MARK + "eot\x00"
ROLES = ("system", "user", "assistant")
_PLACEHOLDER = "\x01gencli-prep-content\x01"
_PROBES = (
    [("system", "Be brief."), ("user", "Hi there"), ("assistant", " Hello!\n"), ("user", ""), ("assistant", "a  \n\n")],
    [("assistant", "<|im_end|> literal")],
    [("user", "x")],
)


@dataclass(frozen=True)
class Template:
    """One message of a role in the marked-up string: `open + content + close`."""

    open: str  # head marker, then the content segment's text before the content
    close: str  # the content segment's text after the content, then the tail marker if any
    marks: int  # markers in open + close


@dataclass(frozen=True)
class Marker:
    string: str
    ids: tuple[int, ...]  # what it stands for
    targets: tuple[bool, ...]  # one per id
    follow: bool  # the target of the text after it, up to the next marker


@dataclass
class Piece:
    """Conversations rendered for one encode call."""

    count: int  # conversations
    text: str | None  # the marked-up string; None: encode these on the reference path
    conversations: list[list[Message]] | None
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
        self.literal_strings = sorted(set(tok.encoding._special_tokens) | {ENDOFTEXT, IM_START, IM_END})
        self.templates: dict[str, Template] | None = None
        if fast:
            self._setup_fast()

    # -- rendering (Python, the caller's thread) --

    def render(self, conversations: list[list[Message]]) -> Piece:
        if self.templates is None:
            return self._reference_piece(conversations)
        opens = {role: t.open for role, t in self.templates.items()}
        closes = {role: t.close for role, t in self.templates.items()}
        parts: list[str] = []
        for messages in conversations:
            parts += [opens[role] + content + closes[role] for role, content in messages]
            parts.append(EOT)
        text = "".join(parts)
        if self.turn_marks is not None:
            marks = self.turn_marks * sum(map(len, conversations))
        else:
            marks = sum(self.templates[role].marks for messages in conversations for role, _ in messages)
        if text.count(MARK) != marks + len(conversations):  # some text holds the marker prefix
            return self._reference_piece(conversations)
        return Piece(len(conversations), text, None, self._literals(text))

    def _reference_piece(self, conversations: list[list[Message]]) -> Piece:
        text = MARK.join(content for messages in conversations for _, content in messages)
        return Piece(len(conversations), None, conversations, self._literals(text))

    def _literals(self, text: str) -> dict[str, int]:
        if "<|" not in text:
            return {}
        return {s: n for s in self.literal_strings if (n := text.count(s))}

    # -- encoding (tiktoken and numpy, any thread) --

    def encode(self, piece: Piece) -> Encoded:
        if piece.text is None:
            return self._encode_reference(piece)
        return self._encode_marked(piece, self.loss_mask)

    def _encode_marked(self, piece: Piece, want_mask: bool) -> Encoded:
        try:
            ids = self.private.encode_to_numpy(piece.text, allowed_special="all", disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: replaced as encode_ordinary replaces them
            text = piece.text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids = self.private.encode_to_numpy(text, allowed_special="all", disallowed_special=())
        at = np.flatnonzero(ids >= self.marker_base)  # every marker, in order
        kinds = (ids[at] - self.marker_base).astype(np.intp)
        counts = np.ones(len(ids), dtype=np.intp)
        counts[at] = self.marker_lengths[kinds]
        out = np.repeat(ids, counts)
        mask = None
        if want_mask:  # a text id takes the `follow` of the marker before it (there always is one)
            last = np.zeros(len(ids), dtype=np.intp)
            last[at] = at
            np.maximum.accumulate(last, out=last)
            mask = np.repeat(self.marker_follow[ids[last] - self.marker_base], counts)
        starts = (np.cumsum(counts) - counts)[at]  # where each marker's ids go in out
        for kind, marker in enumerate(self.markers):
            where = starts[kinds == kind]
            for j, (i, target) in enumerate(zip(marker.ids, marker.targets, strict=True)):
                out[where + j] = i
                if mask is not None:
                    mask[where + j] = target
        return self._encoded(piece, out, mask)

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

    # -- the fast path's templates and markers --

    def _setup_fast(self) -> None:
        markers = [Marker(EOT, (self.eot_id,), (False,), False)]
        templates = {}
        for role in ROLES:
            segs = segments(self.fmt, [{"role": role, "content": _PLACEHOLDER}], add_generation_prompt=False)
            at = [i for i, s in enumerate(segs) if s.text is not None and _PLACEHOLDER in s.text]
            if len(at) != 1 or segs[at[0]].text.count(_PLACEHOLDER) != 1:
                return  # the content is not one piece of one text segment: the reference path
            i = at[0]
            before, after = segs[i].text.split(_PLACEHOLDER)
            head = Marker(MARK + f"{role}-head\x00", *_ids(self.tok, segs[:i]), segs[i].target)
            tail = Marker(MARK + f"{role}-tail\x00", *_ids(self.tok, segs[i + 1 :]), False)
            markers.append(head)
            close = after
            if tail.ids:
                markers.append(tail)
                close += tail.string
            templates[role] = Template(head.string + before, close, 1 + bool(tail.ids))
        self.markers = markers
        self.marker_base = self.tok.encoding.max_token_value + 1  # beyond every real id
        self.marker_lengths = np.array([len(m.ids) for m in markers], dtype=np.intp)
        self.marker_follow = np.array([m.follow for m in markers], dtype=bool)
        self.private = _private_encoding(
            self.tok.encoding, {m.string: self.marker_base + k for k, m in enumerate(markers)}
        )
        self.templates = templates
        marks = {t.marks for t in templates.values()}
        self.turn_marks = marks.pop() if len(marks) == 1 else None
        for probe in _PROBES:  # the fast path must give the reference's ids and mask
            piece = self.render([probe])
            got = self._encode_marked(piece, True) if piece.text is not None else None
            if got is None or (got.ids.tolist(), got.mask.tolist()) != self.reference(probe):
                self.templates = None
                return

    @property
    def signature(self) -> str:
        """A hash of how this encoder renders: changes when the chat template or special ids do."""
        h = hashlib.sha256()
        for probe in _PROBES:
            h.update(repr(segments(self.fmt, _dicts(probe), add_generation_prompt=False)).encode())
        h.update(repr((self.eot_id, self.tok.im_start_id, self.tok.im_end_id)).encode())
        return h.hexdigest()


def _dicts(messages: list[Message]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in messages]


def _ids(tok: Tokenizer, segs) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    ids, targets = encode_segments(tok, segs)
    return tuple(ids), tuple(targets)


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
