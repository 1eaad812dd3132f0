"""Source `chitchat`: the Chit Chat Challenge dataset (BYU PCC lab), 7,168 real conversations.

The data is the `dataset.json` that the `chitchat-dataset` package ships (found without importing
the package, whose classes load the whole file); `--path` reads a file of the same shape:

    {"<conversation id>": {"messages": [[{"sender": ..., "text": ..., ...}, ...], ...], ...}, ...}

Each message is a list of utterances by one sender. A turn is what one sender says before the other
answers: consecutive utterances (and messages) of a sender join into one turn, one utterance per
line ("\\n" between them, as they were sent as separate chat lines); blank utterances are dropped.
The conversation's first sender is the user, the other one the assistant, alternating. About 3,150
of the conversations never got an answer: they are one user turn, kept as they are (they add no
assistant tokens to a loss mask).

The file is parsed one conversation at a time (json's own scanner on each value), so encoding can
start before the 40 MB are parsed. A malformed conversation is named by file, line and id.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path

from gencli.prep.common import Conversation, InputFile, Problems, existing_file, read_text
from gencli.prep.spec import PrepError

ROLES = ("user", "assistant")  # first sender, second sender
_WS = re.compile(r"[ \t\n\r]*")


def default_path() -> Path:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.origin:
        raise PrepError("the chitchat-dataset package is not installed: pip install chitchat-dataset, or pass --path")
    path = Path(spec.origin).parent / "dataset.json"
    if not path.is_file():
        raise PrepError(f"{path} is missing from the chitchat-dataset package: reinstall it, or pass --path")
    return path


def inputs(paths: tuple[str, ...]) -> list[InputFile]:
    if not paths:
        return [InputFile(default_path())]
    return [InputFile(existing_file(p, "Chit Chat JSON")) for p in paths]


def read(inp: InputFile, problems: Problems) -> Iterator[Conversation]:
    text = read_text(inp.path)
    for pos, cid, value in _items(text, inp.path):
        try:
            messages = turns(value)
        except ValueError as e:
            line = text.count("\n", 0, pos) + 1
            problems.bad(f"{inp.path}:{line}: conversation {cid}", str(e))
            continue
        yield Conversation(messages, inp.split)


def turns(conv: object) -> list[tuple[str, str]]:
    """The (role, content) turns of one conversation; ValueError says what is wrong."""
    messages = conv.get("messages") if type(conv) is dict else None
    if type(messages) is not list:
        raise ValueError('expected an object with a "messages" list')
    out: list[tuple[str, str]] = []
    current: list[str] = []
    first = second = last = None
    for i, message in enumerate(messages, start=1):
        if type(message) is not list:
            raise ValueError(f"messages[{i}]: expected a list of utterances")
        for u in message:
            try:
                sender, text = u["sender"], u["text"]
            except (TypeError, KeyError):
                sender = text = None
            if type(text) is not str or type(sender) is not str:
                raise ValueError(f'messages[{i}]: each utterance needs a string "sender" and "text"')
            if not text or text.isspace():
                continue
            if sender != last:
                if first is None:
                    first = sender
                elif second is None and sender != first:
                    second = sender
                elif sender != first and sender != second:
                    raise ValueError(f"messages[{i}]: a third sender; a conversation has two")
                if current:
                    out.append((ROLES[last != first], "\n".join(current)))
                    current = []
                last = sender
            current.append(text)
    if current:
        out.append((ROLES[last != first], "\n".join(current)))
    if not out:
        raise ValueError("empty conversation")
    return out


def _items(text: str, path: Path) -> Iterator[tuple[int, str, object]]:
    """(offset, key, value) of each member of the top-level JSON object, parsed one at a time."""
    decoder = json.JSONDecoder()

    def fail(pos: int, msg: str):
        line = text.count("\n", 0, pos) + 1
        col = pos - text.rfind("\n", 0, pos)
        raise PrepError(f"{path}:{line}:{col}: invalid JSON: {msg}")

    pos = _WS.match(text, 0).end()
    if text[pos : pos + 1] != "{":
        fail(pos, "expected an object of conversations by id")
    pos = _WS.match(text, pos + 1).end()
    if text[pos : pos + 1] == "}":
        return
    while True:
        start = pos
        try:
            key, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(e.pos, e.msg)
        if not isinstance(key, str):
            fail(start, "expected a conversation id (a string)")
        pos = _WS.match(text, pos).end()
        if text[pos : pos + 1] != ":":
            fail(pos, "expected ':'")
        pos = _WS.match(text, pos + 1).end()
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(e.pos, e.msg)
        yield start, key, value
        pos = _WS.match(text, pos).end()
        sep = text[pos : pos + 1]
        if sep == "}":
            if text[_WS.match(text, pos + 1).end() :]:
                fail(_WS.match(text, pos + 1).end(), "extra data after the object")
            return
        if sep != ",":
            fail(pos, "expected ',' or '}'")
        pos = _WS.match(text, pos + 1).end()
