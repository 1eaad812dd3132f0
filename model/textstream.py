"""One sequence's token ids turned into text deltas, safely for streaming.

A multi-byte UTF-8 character split across tokens is held back until complete, and text that
could be the start of a stop string is held back until it is known not to be one. The
concatenation of every delta is the final text, exactly.
"""

from __future__ import annotations

import codecs

from gencli.model.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tok: Tokenizer, *, stop: tuple[str, ...] = (), stop_ids: frozenset[int] = frozenset(),
                 min_tokens: int = 0):
        """min_tokens: stop strings are looked for once this many ids are made (vLLM's min_tokens; the
        sampler keeps the end ids from being picked before)."""
        self._tok = tok
        self._min_tokens = min_tokens
        self._stop = tuple(s for s in stop if s)
        self._stop_ids = stop_ids
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not yet emitted: it may begin a stop string
        self.text = ""  # everything emitted so far
        self.ids: list[int] = []  # generated ids, stop id excluded
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, token_id: int) -> str:
        """Take one generated id; return the text that is now safe to show."""
        if self.finished:
            return ""
        if token_id in self._stop_ids:
            return self.finish("stop")
        self.ids.append(token_id)
        self._held += self._decoder.decode(self._tok.encoding.decode_single_token_bytes(token_id))
        if len(self.ids) < self._min_tokens:  # no stop string yet: all of it is safe to show
            out, self._held = self._held, ""
            self.text += out
            return out
        cut = self._stop_at()
        if cut is not None:
            out, self._held = self._held[:cut], ""
            self.text += out
            self.finish_reason = "stop"
            return out
        keep = self._partial_stop_len()
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        self.text += out
        return out

    def finish(self, reason: str) -> str:
        """End the sequence (stop, length, cancelled); return what was still held back."""
        if self.finished:
            return ""
        self.finish_reason = reason
        out = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        self.text += out
        return out

    def _stop_at(self) -> int | None:
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the held text that starts some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._held)), best, -1):
                if self._held.endswith(s[:n]):
                    best = n
                    break
        return best
