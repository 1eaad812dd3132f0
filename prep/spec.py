"""What a prep run is asked to do (`PrepSpec`), what it reports (`PrepResult`), and its error.

A spec is plain data: the CLI builds one from flags, the queue stores `to_dict()` and rebuilds it
with `from_dict()`. Both constructors validate, so a bad spec fails at submit time, not in a worker.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from gencli.model.errors import GencliError

SOURCES = ("chat", "chitchat", "dailydialog")
FORMATS = ("chatml", "legacy")


class PrepError(GencliError):
    """The input or the request is unusable; one line, naming `file:line` where it applies."""


@dataclass(frozen=True)
class PrepSpec:
    source: str  # "chat" | "chitchat" | "dailydialog"
    out: str  # output dir
    paths: tuple[str, ...] = ()  # files/dirs; empty = the source's default (chitchat: the package's dataset.json)
    format: str = "chatml"  # "chatml" | "legacy"
    tokenizer: str = "cl100k_base"  # encoding name or .tiktoken ranks file
    seed: int = 1337  # of the train/val split by conversation
    val_fraction: float = 0.05  # of conversations, in (0, 1); at least one when there are two or more
    loss_mask: bool = False  # also write <split>.mask.bin: 1 on assistant tokens
    skip_bad: bool = False  # skip and count malformed conversations instead of failing

    def __post_init__(self) -> None:
        if isinstance(self.paths, str) or not all(isinstance(p, str) and p for p in self.paths):
            raise PrepError("paths must be a list of non-empty file or folder names")
        object.__setattr__(self, "paths", tuple(self.paths))
        if self.source not in SOURCES:
            raise PrepError(f"unknown prep source {self.source!r}: use one of {', '.join(SOURCES)}")
        if self.format not in FORMATS:
            raise PrepError(f"unknown chat format {self.format!r}: use chatml or legacy")
        if not isinstance(self.out, str) or not self.out:
            raise PrepError("an output folder is needed (--out)")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise PrepError("empty tokenizer name: pass an encoding name such as cl100k_base")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PrepError(f"seed must be an integer, not {self.seed!r}")
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not (0 < vf < 1) or math.isnan(vf):
            raise PrepError(f"val_fraction must be between 0 and 1 (exclusive), not {vf!r}")
        for name in ("loss_mask", "skip_bad"):
            if not isinstance(getattr(self, name), bool):
                raise PrepError(f"{name} must be true or false, not {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["paths"] = list(self.paths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PrepSpec:
        if not isinstance(d, dict):
            raise PrepError("a prep spec is a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PrepError(f"unknown prep spec field(s): {', '.join(unknown)}")
        for name in ("source", "out"):
            if name not in d:
                raise PrepError(f"a prep spec needs {name!r}")
        d = dict(d)
        if "paths" in d:
            if not isinstance(d["paths"], (list, tuple)):
                raise PrepError("paths must be a list of file or folder names")
            d["paths"] = tuple(d["paths"])
        return cls(**d)


@dataclass
class PrepResult:
    meta: dict  # what meta.json holds
    skipped: bool  # True: inputs and flags unchanged since the last run (same fingerprint), nothing rewritten
