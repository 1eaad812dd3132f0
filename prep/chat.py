"""Source `chat`: JSONL, one conversation per line.

Two shapes are read:
- `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}` (OpenAI style);
- `{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}` (ShareGPT).
Other keys on the line are ignored. Blank lines are skipped. A line that is not JSON, has neither
key, holds no messages, or a role the shape does not know is malformed and named `file:line`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from gencli.model.chat import ROLES
from gencli.prep.common import Conversation, InputFile, Problems, existing_file, read_lines
from gencli.prep.spec import PrepError

SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
SHAPES = {  # key of the list: (role key, content key, role map)
    "messages": ("role", "content", {r: r for r in ROLES}),
    "conversations": ("from", "value", SHAREGPT_ROLES),
}


def inputs(paths: tuple[str, ...]) -> list[InputFile]:
    if not paths:
        raise PrepError("the chat source needs --path: one or more JSONL files")
    return [InputFile(existing_file(p, "JSONL")) for p in paths]


def read(inp: InputFile, problems: Problems) -> Iterator[Conversation]:
    return read_lines(inp, problems, parse_line)


def parse_line(line: str) -> list[tuple[str, str]]:
    """The (role, content) messages of one JSONL line; ValueError says what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    shape = next((key for key in SHAPES if key in obj), None)
    if shape is None:
        raise ValueError('expected a "messages" (or ShareGPT "conversations") list')
    role_key, content_key, role_map = SHAPES[shape]
    items = obj[shape]
    if not isinstance(items, list):
        raise ValueError(f'"{shape}" must be a list')
    if not items:
        raise ValueError("empty conversation")
    out = []
    for i, m in enumerate(items, start=1):
        if not isinstance(m, dict):
            raise ValueError(f"{shape}[{i}]: expected an object with {role_key!r} and {content_key!r}")
        role = role_map.get(m.get(role_key)) if isinstance(m.get(role_key), str) else None
        if role is None:
            raise ValueError(
                f"{shape}[{i}]: unknown {role_key} {m.get(role_key)!r}: use one of {', '.join(role_map)}"
            )
        content = m.get(content_key)
        if not isinstance(content, str):
            raise ValueError(f"{shape}[{i}]: {content_key!r} must be a string")
        out.append((role, content))
    return out
