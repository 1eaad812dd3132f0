"""Source `dailydialog`: the DailyDialog release files (Li et al., 2017).

Its format: one dialogue per line, each utterance followed by `__eou__`:

    Say , Jim , how about going for a few beers after dinner ? __eou__ You know that is tempting ... __eou__

Utterances are kept as given (the release's tokenised spacing included), stripped of surrounding
spaces; the speakers alternate, the first one is the user.

`--path` is the release folder or a file. In a folder, the release's own split is used when it is
there: `train/dialogues_train.txt` -> train.bin, `validation/dialogues_validation.txt` -> val.bin and
`test/dialogues_test.txt` -> test.bin (train and validation needed, test optional). Otherwise the
folder's `dialogues_text.txt` (every dialogue) is split by seed like any other source; so is a file.
A non-blank line without `__eou__`, with text after its last `__eou__`, or with an empty utterance
is malformed and named `file:line`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from gencli.prep.common import Conversation, InputFile, Problems, existing_file, read_lines
from gencli.prep.spec import PrepError

EOU = "__eou__"
ROLES = ("user", "assistant")
GIVEN = (("train", "train"), ("validation", "val"), ("test", "test"))  # release folder, our split


def inputs(paths: tuple[str, ...]) -> list[InputFile]:
    if not paths:
        raise PrepError(
            "the dailydialog source needs --path: the DailyDialog release folder or its dialogues_text.txt"
        )
    found: list[InputFile] = []
    for p in paths:
        path = Path(p).expanduser()
        found += _release(path) if path.is_dir() else [InputFile(existing_file(path, "DailyDialog"))]
    if len({f.split is None for f in found}) > 1:
        raise PrepError("a release folder with its own train/validation/test split can't be mixed with plain files")
    return found


def _release(folder: Path) -> list[InputFile]:
    folder = folder.resolve()
    given = {ours: folder / name / f"dialogues_{name}.txt" for name, ours in GIVEN}
    present = {ours: f for ours, f in given.items() if f.is_file()}
    if present:
        missing = [str(given[s].relative_to(folder)) for s in ("train", "val") if s not in present]
        if missing:
            raise PrepError(f"{folder}: the release split lacks {' and '.join(missing)}")
        return [InputFile(f, split) for split, f in present.items()]
    whole = folder / "dialogues_text.txt"
    if not whole.is_file():
        raise PrepError(
            f"{folder} holds neither dialogues_text.txt nor the release's train/validation/test folders"
        )
    return [InputFile(whole)]


def read(inp: InputFile, problems: Problems) -> Iterator[Conversation]:
    return read_lines(inp, problems, parse_line)


def parse_line(line: str) -> list[tuple[str, str]]:
    """The (role, content) turns of one dialogue line; ValueError says what is wrong."""
    if EOU not in line:
        raise ValueError(f"no {EOU}: each utterance ends with ' {EOU}'")
    *utterances, rest = line.split(EOU)
    if rest.strip():
        raise ValueError(f"text after the last {EOU}: {rest.strip()[:40]!r}")
    out = []
    for i, u in enumerate(utterances):
        u = u.strip()
        if not u:
            raise ValueError(f"utterance {i + 1} is empty")
        out.append((ROLES[i % 2], u))
    return out
