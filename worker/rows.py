"""One of a generation job's items while it decodes: `ItemRun`, shared by the job's thread (which
builds it and owns `published`) and the batcher (which owns `seq` and `engine`, and feeds `stream`
until the item ends)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gencli.model.engine import Engine, Sequence
    from gencli.model.params import SamplingParams
    from gencli.model.textstream import TextStream


@dataclass(eq=False)
class ItemRun:
    idx: int
    epoch: int
    prompt_ids: list[int]
    stream: TextStream
    params: SamplingParams  # its seed drawn, where the job left it to chance
    seq: Sequence | None = None  # the batcher's, once it took the item
    engine: Engine | None = None  # which engine holds seq
    published: list[int] = field(default_factory=list)  # its ids in the log: the job's thread's, from Published
    # a finished item resumed only to compute its logprobs: the ids its engine made (a stop id included)
    rescore: list[int] | None = None
    spans: list[list[int]] | None = None  # a scoring job's line: the [start, end) of its ids scored
