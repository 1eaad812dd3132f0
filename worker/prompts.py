"""Reading prompts from the command line and from prompt files.

A prompt file is UTF-8 text (`-` reads standard input):
- by default the whole file is one prompt;
- with `--each-line`, every non-blank line is a prompt;
- a `.jsonl` file holds one JSON object per non-blank line, `{"prompt": "..."}` or
  `{"messages": [{"role": ..., "content": ...}]}`, with an optional `"custom_id"`.
Every problem names the file and line, and is found before anything is generated. Text that is
not valid Unicode is refused, never replaced (worker/unicode.py): a byte that is not UTF-8, in a
file or in a --prompt, or a JSONL string whose `\\ud83c` escape leaves a lone surrogate (or whose
`\\u0000` leaves a NUL, which PostgreSQL's text cannot hold).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from gencli.model.chat import check_messages, require_text
from gencli.model.errors import GencliError
from gencli.worker.unicode import check_json, check_text, utf8_position


@dataclass
class PromptItem:
    prompt: str | list[dict]  # text, or chat messages
    line: int  # 1-based line in its file (1 for a whole-file or --prompt prompt)
    custom_id: str | None = None
    extra: dict | None = None  # other keys of a JSONL line (sampling overrides, for submit)
    where: str | None = None  # how errors name it (default "line N: "; the HTTP API's "prompts[0]: ")

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


def read_text(path: str) -> tuple[str, str]:
    """(display name, text) of a UTF-8 prompt file, or of stdin for `-`."""
    if path == "-":
        name, data = "<stdin>", sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    else:
        p = Path(path)
        name = str(path)
        if p.is_dir():
            raise GencliError(f"{name} is a directory: give a prompt file")
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise GencliError(f"{name}: no such prompt file") from None
        except OSError as e:
            raise GencliError(f"{name}: cannot read: {e.strerror}") from None
    if isinstance(data, str):  # a stdin without bytes (decoded already, perhaps with surrogateescape)
        return name, check_text(data, name)
    try:
        return name, data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, at = utf8_position(data, e)
        raise GencliError(f"{name}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at character {at}); save the "
                          "file as UTF-8") from None


def read_prompts(prompts: tuple[str, ...] | list[str], prompt_file: str | None, *,
                 each_line: bool) -> list[PromptItem]:
    """The prompts of `generate` and `submit` alike: the --prompt texts, or the prompt file's."""
    if prompt_file is not None:
        return read_prompt_file(prompt_file, each_line=each_line)
    for n, p in enumerate(prompts, start=1):
        if not p.strip():
            raise GencliError("empty --prompt: give some text")
        check_text(p, "--prompt" if len(prompts) == 1 else f"--prompt {n}")  # argv: a byte 0xff is U+DCFF here
    return [PromptItem(prompt=p, line=n) for n, p in enumerate(prompts, start=1)]


def read_prompt_file(path: str, *, each_line: bool) -> list[PromptItem]:
    name, text = read_text(path)
    if not text.strip():
        raise GencliError(f"{name} is empty: put at least one prompt in it")
    if path.endswith(".jsonl"):
        return parse_jsonl(name, text)
    if not each_line:
        return [PromptItem(prompt=text.rstrip("\n"), line=1)]
    return [
        PromptItem(prompt=line, line=n)
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


def parse_jsonl(name: str, text: str) -> list[PromptItem]:
    items = []
    first_line: dict[str, int] = {}  # custom_id -> the line that has it
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise GencliError(f"{name}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        check_json(obj, where=f"{name}:{n}: ")
        items.append(prompt_line(obj, n, f"{name}:{n}: ", first_line))
    if not items:
        raise GencliError(f"{name} holds no prompts")
    return items


def prompt_line(obj, n: int, where: str, first_line: dict[str, int]) -> PromptItem:
    """One prompt object (a .jsonl line, or an element of the HTTP API's `prompts`): "prompt" or
    "messages", an optional "custom_id" not used before (first_line: custom_id -> its line, updated),
    the other keys kept as its sampling overrides."""
    if not isinstance(obj, dict):
        raise GencliError(f'{where}each line must be a JSON object with "prompt" or "messages"')
    obj = dict(obj)
    if "messages" in obj:
        try:
            check_messages(obj["messages"])
        except GencliError as e:
            raise GencliError(f"{where}{e}") from None
        prompt = obj.pop("messages")
    elif isinstance(obj.get("prompt"), str):
        prompt = require_text(obj.pop("prompt"), where)
    else:
        raise GencliError(f'{where}needs a string "prompt" or a "messages" list')
    custom_id = obj.pop("custom_id", None)
    if custom_id is not None and (isinstance(custom_id, bool) or not isinstance(custom_id, str | int)):
        raise GencliError(f"{where}custom_id must be a string")
    custom_id = None if custom_id is None else str(custom_id)
    if custom_id is not None and custom_id in first_line:
        raise GencliError(f"{where}custom_id {custom_id!r} is used again (first on line "
                          f"{first_line[custom_id]}): give each line its own")
    if custom_id is not None:
        first_line[custom_id] = n
    return PromptItem(prompt, n, custom_id, obj or None)


def score_line(obj, n: int, where: str, first_line: dict[str, int]) -> PromptItem:
    """One line to score (a .jsonl line of `gencli score`, an element of POST /v1/scores' `lines`):
    {"text"}, {"prompt", "completion"} or {"messages"} (model/scoring.py), with an optional
    "custom_id" not used before (first_line: custom_id -> its line, updated)."""
    from gencli.model.scoring import kind_of

    if not isinstance(obj, dict):
        raise GencliError(f'{where}each line must be a JSON object: {{"text"}}, {{"prompt", "completion"}} or '
                          '{"messages"}')
    obj = dict(obj)
    custom_id = obj.pop("custom_id", None)
    if custom_id is not None and not isinstance(custom_id, str):
        raise GencliError(f"{where}custom_id must be a string")
    if custom_id in first_line:
        raise GencliError(f"{where}custom_id {custom_id!r} is used again (first on line {first_line[custom_id]}): "
                          "give each line its own")
    if custom_id is not None:
        first_line[custom_id] = n
    try:
        if kind_of(obj) == "token_ids":
            raise GencliError('a line to score is {"text"}, {"prompt", "completion"} or {"messages"}')
        if "messages" in obj:
            check_messages(obj["messages"])
    except GencliError as e:
        raise GencliError(f"{where}{e}") from None
    return PromptItem(obj, n, custom_id, where=where)
