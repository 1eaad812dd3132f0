"""What every source shares: its input files, the conversations it yields, how it reports bad ones.

A source module (`chat`, `chitchat`, `dailydialog`) has two functions:
- `inputs(paths) -> list[InputFile]`: the files a run reads (checked to exist), so they can be hashed
  for the fingerprint before anything is parsed;
- `read(inp, problems) -> Iterator[Conversation]`: the conversations of one file, in file order.
  A malformed conversation goes to `problems.bad(where, reason)`, which raises `PrepError` unless
  the run skips bad input.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gencli.prep.spec import PrepError

Message = tuple[str, str]  # (role, content); role is one of gencli.model.chat.ROLES


@dataclass(frozen=True)
class InputFile:
    path: Path
    split: str | None = None  # a split given by the dataset itself ("train", "val", "test"), else None


@dataclass
class Conversation:
    messages: list[Message]
    split: str | None = None  # from the InputFile


@dataclass
class Problems:
    """Malformed conversations: fatal, or (skip_bad) counted with the first few named."""

    skip_bad: bool
    count: int = 0
    first: list[str] = field(default_factory=list)
    keep: int = 10

    def bad(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if not self.skip_bad:
            raise PrepError(message + " (--skip-bad skips malformed conversations)")
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append(message)


def existing_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise PrepError(f"{p} is a folder: give the {what} file")
    if not p.is_file():
        raise PrepError(f"{p} does not exist")
    return p.resolve()


def read_text(path: Path) -> str:
    """The whole file as text; undecodable bytes name their line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PrepError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None


def lines(path: Path, problems: Problems) -> Iterator[tuple[int, str]]:
    """(line number, text without its line end) of each non-blank line; a line that is not
    UTF-8 is reported bad (and skipped when the run skips bad input)."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        items: list = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        items = data.split(b"\n")  # decoded line by line below, so the bad ones are named
    for n, line in enumerate(items, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.bad(f"{path}:{n}", f"not UTF-8 text (byte {e.start + 1} of the line)")
                continue
        line = line.rstrip("\r")
        if line.strip():
            yield n, line


def read_lines(inp: InputFile, problems: Problems, parse_line) -> Iterator[Conversation]:
    """The conversations of a one-per-line file; parse_line(text) -> messages, or ValueError."""
    for n, line in lines(inp.path, problems):
        try:
            messages = parse_line(line)
        except ValueError as e:
            problems.bad(f"{inp.path}:{n}", str(e))
            continue
        yield Conversation(messages, inp.split)
