"""What gencli takes as text: valid Unicode, and nothing else.

A Python str can hold what UTF-8 cannot encode: a lone surrogate (U+D800..U+DFFF). JSON's
`"\\ud83c"` escape decodes to one, and Python decodes a command-line argument that is not UTF-8
with surrogateescape, so the byte 0xff arrives as U+DCFF. Such text is refused, naming where it is
and the character's position (counted from 0); it is never replaced. So is a NUL (U+0000), which
is Unicode but which PostgreSQL's text cannot hold: a store of either kind takes the same texts.
Every input path checks its text here before anything is recorded: the CLI's arguments and prompt
files, the submit client, the HTTP API's bodies, queries and paths, and the Batch API's files.
Torch-free, so the client and the API load it alone.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

from gencli.model.errors import GencliError

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


class InvalidText(GencliError):
    """Text that gencli refuses (the HTTP API's 422; `param` names the field, as a JSON path)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def invalid_at(text: str) -> int | None:
    """The position of the first character of text that gencli refuses (a lone surrogate, which
    UTF-8 cannot encode, or a NUL), or None."""
    nul = text.find("\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start if nul < 0 else min(e.start, nul)
    return None if nul < 0 else nul


def what_is_wrong(text: str, at: int, *, from_bytes: bool = True) -> str:
    """Why text[at] is refused. from_bytes: the text may come from bytes that Python decoded with
    surrogateescape (argv, a str from os.fsdecode), so U+DC80..U+DCFF is shown as the byte it stands
    for; a JSON document's surrogates come from `\\u` escapes (from_bytes=False)."""
    c = ord(text[at])
    if c == 0:
        return f"a NUL character (U+0000) at character {at} is not taken: remove it"
    if from_bytes and 0xDC80 <= c <= 0xDCFF:
        return f"not valid UTF-8 (byte 0x{c - 0xDC00:02x} at character {at}): give UTF-8 text"
    return f"a lone surrogate (U+{c:04X}) at character {at} is not valid Unicode: send UTF-8 text"


def check_text(text: str, name: str, *, from_bytes: bool = True) -> str:
    """text, unless it holds a lone surrogate or a NUL: then InvalidText, "{name}: what is wrong"."""
    at = invalid_at(text)
    if at is not None:
        raise InvalidText(f"{name}: {what_is_wrong(text, at, from_bytes=from_bytes)}", param=name)
    return text


class Invalid(NamedTuple):
    """Where a JSON-like value first holds text that gencli refuses."""

    path: str  # the string's JSON path, such as `messages[0].content`; for a key, its dict's ("" at the top)
    text: str
    at: int  # the position in text of the lone surrogate or NUL
    key: bool = False  # the string is a key of the dict at path

    @property
    def name(self) -> str:
        """How a message names the place: the path, or "a key of <path>"."""
        if self.key:
            return f"a key of {self.path}" if self.path else "a key"
        return self.path


def find_invalid(value, path: str = "") -> Invalid | None:
    """The first string in a JSON-like value (dicts, lists, their keys too) that gencli refuses."""
    if isinstance(value, str):
        at = invalid_at(value)
        return None if at is None else Invalid(path, value, at)
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and (at := invalid_at(k)) is not None:
                return Invalid(path, k, at, key=True)
            if (found := find_invalid(v, _key_path(path, k))) is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if (found := find_invalid(v, f"{path}[{i}]")) is not None:
                return found
    return None


def _key_path(path: str, key) -> str:
    """path.key, or path["key"] for a key that is not a plain name (the path stays one line)."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(str(key))}]"


def check_json(value, path: str = "", *, where: str = "", from_bytes: bool = False) -> None:
    """InvalidText naming the first string of value that gencli refuses (see find_invalid),
    after `where` ("prompts.jsonl:3: "); its param is the string's JSON path (a key's: its dict's)."""
    found = find_invalid(value, path)
    if found is not None:
        why = what_is_wrong(found.text, found.at, from_bytes=from_bytes)
        raise InvalidText(f"{where}{found.name}: {why}" if found.name else f"{where}{why}", param=found.path or None)


def utf8_position(data: bytes, e: UnicodeDecodeError) -> tuple[int, int]:
    """Where data stops being UTF-8: (its line, from 1; the character in that line, from 0)."""
    start = data.rfind(b"\n", 0, e.start) + 1
    return data.count(b"\n", 0, e.start) + 1, len(data[start:e.start].decode("utf-8-sig"))
