"""A job's stream events folded into each item's text, as a reader should show it.

The raw events are not the text: `gencli retry` starts items over (a "reset" event, and tokens of
a higher epoch), a worker that resumed from the store's checkpoint rebases items (a "resync"
event), and a log that lost events has gaps. `StreamFold` turns all of that into deltas whose
rule is simple: an item's text is the text of its last `restart` delta plus every delta after it.
After a gap an item's deltas are held back, and when the job ends each item whose folded text is
not the stored output is given the store's text as a final restart: a reader never shows a text
with a hole as complete.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass
class StreamDelta:
    seq: int
    item: int  # index of the prompt in the job
    text: str  # new text; with restart, the item's whole text so far
    finish_reason: str | None
    restart: bool = False  # the item's earlier text is void: this delta's text replaces it
    note: str | None = None  # why it restarted: "retried", "resumed from the store", ...
    lp: tuple[int, list] | None = None  # (token id, the tok event's "lp"), where the item asked for logprobs


class StreamFold:
    def __init__(self, *, from_start: bool = True):
        self.from_start = from_start  # fed from the job's first event (not resumed from a seq)
        self.texts: dict[int, str] = {}  # item -> text as folded so far
        self.finish: dict[int, str | None] = {}
        self.epochs: dict[int, int] = {}
        self.gaps = 0  # gaps seen: after one, every item's text may miss events...
        self.whole_again: set[int] = set()  # ...but these, which started over or were resynced since

    def feed(self, e: dict) -> list[StreamDelta]:
        """The deltas one event makes (none for events that carry no text)."""
        t = e["t"]
        if t == "tok":
            i, epoch = e["i"], e.get("e", 0)
            out = []
            if epoch < self.epochs.get(i, epoch):
                return []  # an older attempt's token
            if epoch > self.epochs.get(i, epoch):  # a retry's new epoch, its reset event lost
                out.append(self._restart(e["seq"], i, "", "retried"))
                self.whole_again.add(i)
            self.epochs[i] = epoch
            self.texts[i] = self.texts.get(i, "") + e["text"]
            self.finish[i] = e.get("finish")
            if not self._unsure(i):
                lp = (e["id"], e["lp"]) if "lp" in e else None
                out.append(StreamDelta(e["seq"], i, e["text"], e.get("finish"), lp=lp))
            return out
        if t == "reset":
            out = []
            for i in e["items"]:
                self.epochs[i] = self.epochs.get(i, 0) + 1 if "epochs" not in e else e["epochs"][str(i)]
                if self.texts.get(i) or self.finish.get(i):
                    out.append(self._restart(e["seq"], i, "", "retried"))
                self.texts[i], self.finish[i] = "", None
                self.whole_again.add(i)
            return out
        if t == "resync":
            out = []
            for it in e["items"]:
                i = it["i"]
                self.epochs[i] = it.get("e", self.epochs.get(i, 0))
                held = self._unsure(i)
                self.whole_again.add(i)
                if held or self.texts.get(i, "") != it["text"]:
                    out.append(self._restart(e["seq"], i, it["text"], "resumed from the store's checkpoint"))
            return out
        if t == "gap":
            self.gaps += 1
            self.whole_again.clear()  # any item may have lost tokens
        return []

    def settle(self, stored: list[tuple[int, str | None, str | None]], seq: int) -> Iterator[StreamDelta]:
        """At the job's end, with the store's (idx, output, finish reason) of each item: a restart
        with the stored text for every item whose text a gap may have cut, and (when fed from the
        start) for every item whose folded text is not the stored one."""
        for i, output, finish in stored:
            if output is None and i not in self.texts:
                continue
            held = self._unsure(i)
            if held or (self.from_start and self.texts.get(i, "") != (output or "")):
                note = "the stream lost events: from the store" if self.gaps else "from the store"
                self.texts[i], self.finish[i] = output or "", finish
                yield StreamDelta(seq, i, output or "", finish, restart=True, note=note)

    def _unsure(self, i: int) -> bool:
        return self.gaps > 0 and i not in self.whole_again

    def _restart(self, seq: int, i: int, text: str, note: str) -> StreamDelta:
        self.texts[i], self.finish[i] = text, None
        return StreamDelta(seq, i, text, None, restart=True, note=note)


def texts_of(deltas: Iterable[StreamDelta]) -> dict[int, str]:
    """Each item's text as the deltas show it: a restart replaces what came before."""
    out: dict[int, str] = {}
    for d in deltas:
        out[d.item] = d.text if d.restart else out.get(d.item, "") + d.text
    return out
