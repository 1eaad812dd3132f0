"""Text in, text deltas out: the engine joined to a tokenizer and a chat format.

This is the one loop that both consumers share: `gencli generate` prints the deltas, the
worker publishes them. `TextGenerator.stream(...)` returns a `TextGeneration`; iterate it for
lists of `Delta` (one per sequence that took a token in that step, its text possibly empty); each
sequence's `TextStream` keeps its full text, ids and finish reason, also after an interrupt.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gencli.model.chat import ChatFormat, encode_prompt, stop_strings
from gencli.model.checkpoint import LoadedModel
from gencli.model.engine import Generation
from gencli.model.errors import InvalidParameterError
from gencli.model.params import SamplingParams, fit_prompt
from gencli.model.textstream import TextStream

Prompt = str | list[dict]  # plain text, or chat messages [{"role", "content"}]


@dataclass
class Delta:
    index: int  # which sequence
    text: str  # new text, possibly empty when only finishing
    finish_reason: str | None = None  # set on the sequence's last delta
    token: int | None = None  # the id this step fed to the sequence (None: a cancel's flush)


class TextGeneration:
    def __init__(self, gen: Generation, streams: list[TextStream]):
        self._gen = gen
        self.streams = streams

    def __iter__(self) -> Iterator[list[Delta]]:
        for step in self._gen:
            deltas = []
            for i, token in enumerate(step):
                if token is None:
                    continue
                s = self.streams[i]
                text = s.feed(token)
                if s.finished:
                    self._gen.finish(i)
                elif self._gen.remaining[i] == 0:
                    text += s.finish("length")
                deltas.append(Delta(i, text, s.finish_reason, token))
            if deltas:
                yield deltas

    def cancel(self) -> list[Delta]:
        """Stop every unfinished sequence; return their last held-back text."""
        self._gen.cancel()
        return [Delta(i, s.finish("cancelled"), "cancelled") for i, s in enumerate(self.streams) if not s.finished]


class TextGenerator:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.chat_format = loaded.chat_format
        vocab = self.model.config.vocab_size
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[self.tokenizer.decodable_ids(vocab)] = True
        self.allowed = allowed.to(loaded.device)

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def encode(self, prompt: Prompt, *, chat: bool) -> list[int]:
        """Prompt ids: messages, or text with chat, go through the chat template."""
        return encode_prompt(self.tokenizer, self.chat_format, prompt, chat=chat)

    def fit(self, ids: list[int], max_tokens: int, *, truncate: bool) -> list[int]:
        return fit_prompt(ids, max_tokens, self.block_size, truncate=truncate)

    def stream(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        seeds: list[int | None] | None = None,
        stop: tuple[str, ...] = (),
        resume: list[TextStream] | None = None,
    ) -> TextGeneration:
        """Start decoding prompts; with resume, continue unfinished streams from where they are.

        A resumed sequence decodes from its prompt plus the ids it already made, with the rest
        of its budget and its random generator advanced past the draws already made, so it
        yields what an uninterrupted run would have (token for token when greedy).
        """
        streams = resume or [self.new_stream(stop) for _ in prompts]
        if any(s.finished for s in streams):
            raise InvalidParameterError("cannot resume a finished sequence")
        done = [len(s.ids) for s in streams]
        gen = Generation(
            self.model,
            [p + s.ids for p, s in zip(prompts, streams)],
            params,
            seeds=seeds,
            stop_ids=self.tokenizer.stop_ids,
            allowed_ids=self.allowed,
            budgets=[params.max_tokens - n for n in done],
            skip_draws=done,
        )
        return TextGeneration(gen, streams)

    def new_stream(self, stop: tuple[str, ...] = ()) -> TextStream:
        return TextStream(
            self.tokenizer, stop=tuple(stop) + stop_strings(self.chat_format), stop_ids=self.tokenizer.stop_ids
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams, **kw) -> list[TextStream]:
        """Batch wrapper: run to the end, return each sequence's finished stream."""
        tg = self.stream(prompts, params, **kw)
        for _ in tg:
            pass
        return tg.streams


__all__ = ["ChatFormat", "Delta", "Prompt", "TextGeneration", "TextGenerator"]
