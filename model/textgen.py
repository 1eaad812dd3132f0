"""Text in, text deltas out: the engine joined to a tokenizer and a chat format.

`TextGenerator.sequence(...)` makes an engine `Sequence` with a `TextStream` on it, and
`TextGenerator.step(engine)` runs one engine step and turns its ids into `Delta`s (one per
sequence that took a token, its text possibly empty), ending a sequence at a stop string. The
worker drives its long-lived engine this way; `TextGenerator.stream(...)` is the batch wrapper
that `gencli generate`, the tests and the benchmarks use: a fixed set of prompts on an engine of
`slots` slots, each prompt joining as another finishes. Each sequence's `TextStream` keeps its
full text, ids and finish reason, also after an interrupt.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import torch

from gencli.model.chat import ChatFormat, stop_strings
from gencli.model.checkpoint import LoadedModel
from gencli.model.engine import Engine, Sequence
from gencli.model.errors import InvalidParameterError
from gencli.model.params import SamplingParams, fit_prompt
from gencli.model.prompt import encode_line
from gencli.model.structured import Grammars
from gencli.model.textstream import TextStream

Prompt = str | list[dict] | dict  # text, chat messages [{"role", "content"}], {"token_ids": [...]} or {"score": spec}


@dataclass
class Delta:
    index: int  # which sequence (its Sequence.index)
    text: str  # new text, possibly empty when only finishing
    finish_reason: str | None = None  # set on the sequence's last delta
    token: int | None = None  # the id this step fed to the sequence (None: a cancel's flush)
    seq: Sequence | None = None


class TextBatch:
    """A fixed set of sequences decoded on their own engine: iterate for each step's deltas."""

    def __init__(self, gen: TextGenerator, engine: Engine, seqs: list[Sequence]):
        self._gen = gen
        self.engine = engine
        self.seqs = seqs
        self.streams: list[TextStream] = [s.stream for s in seqs]

    def __iter__(self) -> Iterator[list[Delta]]:
        while self.engine:
            deltas = self._gen.step(self.engine)
            if deltas:
                yield deltas

    def cancel(self, *, running_only: bool = False) -> list[Delta]:
        """Stop every unfinished sequence (with running_only, those decoding now, and the rest
        go on); return their last held-back text."""
        out = []
        for seq in self.seqs:
            if not seq.stream.finished and (seq.running or not running_only):
                self.engine.finish(seq)
                out.append(Delta(seq.index, seq.stream.finish("cancelled"), "cancelled", None, seq))
        return out


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
        self._grammars: Grammars | None = None

    @property
    def grammars(self) -> Grammars:
        """The tokenizer's grammar matchers (built at the first structured row: about 0.3 s)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer.encoding, self.model.config.vocab_size, self.tokenizer.stop_ids)
        return self._grammars

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def encode(self, prompt: Prompt, *, chat: bool) -> list[int]:
        """Prompt ids: messages, or text with chat, go through the chat template."""
        return self.encode_line(prompt, chat=chat)[0]

    def encode_line(self, prompt: Prompt, *, chat: bool) -> tuple[list[int], list[list[int]] | None]:
        """encode's ids, and for a scoring job's line ({"score": spec}) the ranges of them scored."""
        return encode_line(self.tokenizer, self.chat_format, prompt, chat=chat,
                           vocab_size=self.model.config.vocab_size)

    def fit(self, ids: list[int], max_tokens: int, *, truncate: bool) -> list[int]:
        return fit_prompt(ids, max_tokens, self.block_size, truncate=truncate)

    def engine(self, slots: int, *, max_len: int | None = None, max_per_group: int | None = None,
               prefill_tokens: int | None = None, invariant: bool = True) -> Engine:
        kw = {} if prefill_tokens is None else {"prefill_tokens": prefill_tokens}
        return Engine(self.model, slots, max_len=max_len, allowed_ids=self.allowed, max_per_group=max_per_group,
                      invariant=invariant, grammars=_Lazy(self), **kw)

    def stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The ids that end a sequence of these params: the tokenizer's end ids (unless ignore_eos) and
        its stop_token_ids."""
        own = frozenset(params.stop_token_ids)
        return own if params.ignore_eos else self.tokenizer.stop_ids | own

    def banned(self, params: SamplingParams) -> frozenset[int]:
        """The ids a sequence of these params never takes: under ignore_eos, the tokenizer's end ids."""
        return self.tokenizer.stop_ids - frozenset(params.stop_token_ids) if params.ignore_eos else frozenset()

    def sequence(self, prompt: list[int], params: SamplingParams, *, resume: TextStream | None = None,
                 index: int = 0, group: Hashable = None, priority: int = 0) -> Sequence:
        """A sequence for an engine; with resume, the continuation of that unfinished stream.

        A resumed sequence feeds its prompt, then the ids it already made, one a step as they were
        made (so its keys are the very ones an uninterrupted run computed), with the rest of its
        budget and its random generator advanced past the draws already made: it yields what an
        uninterrupted run would have (token for token when greedy).
        """
        stream = resume or self.new_stream(params)
        if stream.finished:
            raise InvalidParameterError("cannot resume a finished sequence")
        done = len(stream.ids)
        return Sequence(list(prompt), params, params.max_tokens - done, skip_draws=done,
                        stop_ids=self.stop_ids(params), banned=self.banned(params), group=group, priority=priority,
                        index=index, stream=stream, prior=list(stream.ids))

    def rescoring(self, prompt: list[int], params: SamplingParams, ids: list[int], stream: TextStream, *,
                  index: int = 0, group: Hashable = None, priority: int = 0) -> Sequence:
        """A sequence that makes nothing (no budget) and computes the logprobs of a finished stream's
        ids, fed one a step as they were made (so they are the first run's, bit for bit), and its
        prompt's where params asks: a finished item whose logprobs were not recorded (its worker died).
        ids: what the engine made, a stop id included."""
        return Sequence(list(prompt), params, 0, stop_ids=self.stop_ids(params), group=group, priority=priority,
                        index=index, stream=stream, prior=list(ids))

    def step(self, engine: Engine) -> list[Delta]:
        """One engine step as text: a delta per sequence that took a token."""
        deltas = []
        for seq, token in engine.step():
            s: TextStream = seq.stream
            if token is None:  # it only scored its ids (no budget): it ends here, its text as it was
                deltas.append(Delta(seq.index, s.finish("length"), s.finish_reason, None, seq))
                continue
            text = s.feed(token)
            if s.finished:  # a stop id or a stop string
                if not seq.finished:
                    engine.finish(seq)
            elif seq.finished:  # its budget
                text += s.finish("length")
            deltas.append(Delta(seq.index, text, s.finish_reason, token, seq))
        return deltas

    def stream(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        *,
        resume: list[TextStream] | None = None,
        slots: int | None = None,
        invariant: bool = True,
    ) -> TextBatch:
        """Decode prompts (each with its own params, seed and stop strings, where a list is given)
        on an engine of `slots` slots (default: one per prompt); with resume, continue unfinished
        streams. invariant: as the worker decodes (see Engine), a lone row too computes what it
        would in company."""
        if not prompts:
            raise InvalidParameterError("no prompts to generate from")
        n = len(prompts)
        per_row = params if isinstance(params, list) else [params] * n
        if len(per_row) != n:
            raise InvalidParameterError("one set of parameters per prompt")
        seqs = [self.sequence(p, sp, resume=resume[i] if resume else None, index=i)
                for i, (p, sp) in enumerate(zip(prompts, per_row, strict=True))]
        engine = self.engine(min(slots or n, n), max_len=max(len(s.prompt) + len(s.prior) + s.budget for s in seqs),
                             invariant=invariant)
        for s in seqs:
            engine.add(s)
        return TextBatch(self, engine, seqs)

    def new_stream(self, params: SamplingParams | None = None) -> TextStream:
        """A sequence's text: its stop strings and the chat format's, its end ids, min_tokens."""
        params = params or SamplingParams()
        return TextStream(self.tokenizer, stop=params.stop + stop_strings(self.chat_format),
                          stop_ids=self.stop_ids(params), min_tokens=params.min_tokens)

    def generate(self, prompts: list[list[int]], params: SamplingParams, **kw) -> list[TextStream]:
        """Batch wrapper: run to the end, return each sequence's finished stream."""
        tg = self.stream(prompts, params, **kw)
        for _ in tg:
            pass
        return tg.streams


class _Lazy:
    """A TextGenerator's grammars for its engines, built when a structured row first asks."""

    def __init__(self, gen: TextGenerator):
        self._gen = gen

    def constraint(self, key):
        return self._gen.grammars.constraint(key)


__all__ = ["ChatFormat", "Delta", "Prompt", "TextBatch", "TextGenerator"]
