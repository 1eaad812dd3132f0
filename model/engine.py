"""The generation engine: sequences of token ids in, one new id per sequence per step out.

Continuous (iteration-level) batching: sequences join the running batch between steps as slots
free up, and leave it as they finish, whoever they belong to. The pieces:
- `SlotCache` (cache.py): the preallocated KV cache, one slot per running sequence;
- `Scheduler` (scheduler.py): which waiting sequence takes the next slot;
- `Sampler` (sampler.py): per-row temperature, top_k, top_p and seeded generator;
- `Engine.step` (here): the step runner. It admits waiting sequences, runs one prefill pass over
  the sequences whose prompts are not cached yet (several together, up to a token budget, a long
  prompt in chunks over several steps so that decoding rows never wait for a whole long prefill),
  then one decode pass over every other running sequence, and samples.

A row computes what it computes alone: its positions count from its own first token, it attends
only to its own slot's keys, and it samples from its own generator, so greedy output is that of
the prompt alone and a seeded sequence's output does not depend on its company.

Admission reserves prompt + budget positions, within the cache's length, so no running sequence
ever waits for cache space. Out of memory in a pass preempts the newest sequences (their slots
freed, their ids kept; they are prefilled again when readmitted, as vLLM's recompute preemption
does) and lowers the number of rows run at once; after a quiet spell it is raised again. At one
row there is nothing left to shrink, and the error goes to the caller (the worker moves the
sequence to its CPU copy of the model). Every such rung is recorded in `Engine.rungs`.

The engine knows nothing of text, jobs or Redis (textgen.py adds text; the worker adds jobs).
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from gencli.model.cache import SlotBatch, SlotCache
from gencli.model.errors import InvalidParameterError
from gencli.model.gpt import GPT
from gencli.model.params import SamplingParams, fit_prompt
from gencli.model.sampler import Sampler, TokenLogprob, logprob_of, logprobs_of, seeded_generator
from gencli.model.scheduler import Scheduler
from gencli.model.structured import Constraint, Grammars

# Fault injection (documented in the README): GENCLI_INJECT_OOM=N makes every forward pass
# over N or more rows raise torch.OutOfMemoryError, as a GPU short of memory would.
INJECT_OOM_ENV = "GENCLI_INJECT_OOM"
# GENCLI_INJECT_STALL=PATH makes every forward pass wait while the file PATH exists: a decoding
# step stuck on its device, for the hard time limit's last resort (tests/faults/test_workers.py).
INJECT_STALL_ENV = "GENCLI_INJECT_STALL"
PREFILL_TOKENS = 512  # prompt tokens prefilled in one step, over all admitted sequences
GROW_AFTER = 64  # steps without running out of memory before the row limit is doubled again
# prompt positions whose logits are computed at once for prompt logprobs: a whole prefill chunk (the LM
# head's product runs 30% faster over 512 rows than over 64 on a 2-core CPU; 200 MB of float32 logits
# for a 100k vocabulary)
SCORE_POSITIONS = 512


def _inject_oom(value: str | None) -> int | None:
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise InvalidParameterError(f"{INJECT_OOM_ENV}={value!r}: use a number of rows >= 1, or unset it")
    return int(value)


class Status(enum.Enum):
    """Where a sequence is: queued in the scheduler, holding a cache slot, or ended (its last id
    made, finished by its owner, or taken out to another engine)."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sequence: its prompt, the ids it made before (`prior`: a resumed sequence's, fed again
    one a step as they were first made, not sampled again), the new ids it may still make (budget),
    how it samples. `group` and `priority` are the scheduler's (the worker: the job); `index` (the
    caller's number for it) and `stream` (textgen's text stream) are its owner's."""

    prompt: list[int]
    params: SamplingParams
    budget: int | None = None  # None: params.max_tokens
    skip_draws: int = 0  # draws its generator made before (a resumed sequence's sampled ids)
    stop_ids: frozenset[int] = frozenset()
    banned: frozenset[int] = frozenset()  # ids it never takes (ignore_eos: the tokenizer's end ids)
    group: Hashable = None
    priority: int = 0
    index: int = 0
    stream: object = None
    prior: list[int] = field(default_factory=list)
    # the engine's
    status: Status = Status.WAITING
    out: list[int] = field(default_factory=list)  # new ids, a stop id included
    slot: int | None = None  # while RUNNING
    cached: int = 0  # of prompt + prior + out, how many are in the cache
    arrival: int = 0
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per id of out, where params.logprobs is set
    # where params.prompt_logprobs is set: one per prompt id once prefilled, None for the first
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    constraint: Constraint | None = None  # where params.structured is set: its grammar's state

    def __post_init__(self):
        if self.budget is None:
            self.budget = self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def running(self) -> bool:
        return self.status is Status.RUNNING

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.prior) + len(self.out)

    def chunk(self, size: int) -> int:
        """Ids to feed in its next pass: the prompt in chunks that start at multiples of size (the
        same chunks whatever else runs), then one id a pass, as decoding makes them."""
        p = len(self.prompt)
        if self.cached < p:
            return min(size - self.cached % size, p - self.cached)
        return 1 if self.cached < self.length else 0

    def feed(self, n: int) -> list[int]:
        """The next n uncached ids."""
        p, c = len(self.prompt), self.cached
        if c + n <= p:
            return self.prompt[c : c + n]
        rest = self.prior + self.out
        return rest[c - p : c - p + n]


@dataclass
class OomRung:
    """One step down the out-of-memory ladder: a pass over `rows` rows ran out of memory; the engine
    now runs at most `limit` rows and put `preempted` back in the queue."""

    rows: int
    limit: int
    preempted: list[Sequence]
    running: list[Sequence]  # the sequences that held slots when it happened


Observer = Callable[[Sequence, torch.Tensor], None]  # (sequence, the logits (V,) it is about to sample from)


class Engine:
    def __init__(self, model: GPT, slots: int, *, max_len: int | None = None, allowed_ids: torch.Tensor | None = None,
                 prefill_tokens: int = PREFILL_TOKENS, max_per_group: int | None = None, invariant: bool = True,
                 observe: Observer | None = None, grammars: Grammars | None = None):
        """observe: called with each sequence and the raw logits each of its ids is sampled from, before
        sampling (the batch-invariance tests and bench.exact compare them bit for bit with a run alone)."""
        if slots < 1:
            raise InvalidParameterError("the engine needs at least one slot")
        self.model = model
        self.device = model.lm_head.weight.device
        self.cache = SlotCache.for_model(model, slots, max_len)  # the engine allocates it, as nano-vllm's runner does
        self.sampler = Sampler(model.config.vocab_size, allowed_ids, self.device)
        self.scheduler = Scheduler(max_per_group)
        self.prefill_tokens = prefill_tokens
        self.invariant = invariant
        self.min_rows = 2 if invariant and not model.quantized else 1  # see _at_least_min_rows
        self.observe = observe
        self.grammars = grammars  # the tokenizer's grammar matchers, for structured rows (textgen gives them)
        # fault injection, read once where the faults happen (the README's "Fault injection"; tests
        # set these attributes). Read here, not in storage/settings.py: the model layer imports nothing
        # of the queue's, and `gencli generate` honours them as a worker does.
        self.inject_oom: int | None = _inject_oom(os.environ.get(INJECT_OOM_ENV))
        self.inject_stall: str | None = os.environ.get(INJECT_STALL_ENV) or None
        self.limit = slots  # rows run at once: lowered by running out of memory
        self.running: list[Sequence] = []  # in admission order
        self.rungs: list[OomRung] = []
        self._steps_since_oom = 0

    @property
    def slots(self) -> int:
        return self.cache.slots

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def __bool__(self) -> bool:
        return bool(self.running) or len(self.scheduler) > 0

    def add(self, seq: Sequence) -> None:
        if not seq.prompt:
            raise InvalidParameterError("empty prompt: give at least one token")
        if seq.budget < (0 if seq.params.scores else 1):
            raise InvalidParameterError("a sequence needs a token budget of at least 1 (0 where it only scores its "
                                        "ids: prompt_logprobs or logprobs set)")
        fit_prompt(seq.prompt + seq.prior, seq.budget, self.max_len, truncate=False)
        if seq.generator is None:
            seq.generator = seeded_generator(seq.params.seed, seq.skip_draws)
        if seq.params.structured is not None and seq.constraint is None:
            if self.grammars is None:
                raise InvalidParameterError("structured output needs the tokenizer's grammars: run it through "
                                            "TextGenerator")
            seq.constraint = self.grammars.constraint(seq.params.structured)
        seq.status, seq.slot, seq.cached = Status.WAITING, None, 0
        self.scheduler.add(seq)

    def finish(self, seq: Sequence) -> None:
        """End a sequence now (a stop string was seen, it was cancelled), running or waiting."""
        match seq.status:
            case Status.RUNNING:
                self._release(seq)
            case Status.WAITING:
                self.scheduler.drop(seq)
        seq.status = Status.FINISHED

    def take_out(self, seq: Sequence) -> Sequence:
        """Remove an unfinished sequence to carry on elsewhere (another engine): the same sequence
        there, its ids so far fed again one a step (same generator, budget reduced)."""
        self.finish(seq)
        return Sequence(seq.prompt, seq.params, seq.budget - len(seq.out), stop_ids=seq.stop_ids, banned=seq.banned,
                        group=seq.group, priority=seq.priority, index=seq.index, stream=seq.stream,
                        prior=seq.prior + seq.out, generator=seq.generator, logprobs=seq.logprobs,
                        prompt_logprobs=seq.prompt_logprobs, constraint=seq.constraint)

    def _release(self, seq: Sequence) -> None:
        """Free a running sequence's slot; its caller says what it is now (finished, or waiting again)."""
        self.cache.give_back(seq.slot)
        seq.slot = None
        self.running.remove(seq)
        self.scheduler.released(seq)

    def step(self) -> list[tuple[Sequence, int | None]]:
        """Schedule, run, sample: admit waiting sequences, then one prefill pass and one decode pass.
        Returns (sequence, new id) for each sequence that made one, and (sequence, None) for one with
        no budget (it only scored its ids) whose ids are all fed now; a sequence that made its last id
        (a stop id, or its budget) is FINISHED and out of the cache."""
        self._admit()
        self._compact()
        new_ids: list[tuple[Sequence, int | None]] = []
        with torch.inference_mode():
            prefill = self._prefill_rows()
            if prefill and not self._pass(prefill, new_ids):
                return new_ids
            prefilled = {s for s, _ in prefill}
            decode = [s for s in self.running if s not in prefilled and s.cached >= len(s.prompt)]
            if decode:
                self._pass([(s, 1) for s in decode], new_ids)
        return new_ids

    def _admit(self) -> None:
        while self.cache.free and len(self.running) < self.limit:
            seq = self.scheduler.next()
            if seq is None:
                return
            seq.slot = self.cache.take()
            seq.status, seq.cached = Status.RUNNING, 0
            self.running.append(seq)

    def _compact(self) -> None:
        """Move the sequences in the highest slots down into free lower ones: the rows stay a
        contiguous range of slots, which attention reads as a view."""
        while self.running:
            low = self.cache.lowest_free()
            top = max(self.running, key=lambda s: s.slot)
            if low is None or low > top.slot:
                return
            self.cache.move(top.slot, low)
            top.slot = low

    def _prefill_rows(self) -> list[tuple[Sequence, int]]:
        """(sequence, ids to feed) for the sequences whose prompt is not all cached, in admission
        order, a chunk each within the step's prompt token budget (the first always gets one)."""
        rows, budget = [], self.prefill_tokens
        for s in self.running:
            if s.cached < len(s.prompt):
                n = s.chunk(self.prefill_tokens)
                if rows and n > budget:
                    break
                rows.append((s, n))
                budget -= n
        return rows

    def _pass(self, rows: list[tuple[Sequence, int]], new_ids: list) -> bool:
        """One forward pass; sample for each row whose ids are now all cached (end those with no
        budget left), and score what the rows want scored. False: it ran out of memory (the ladder
        took a rung; nothing was made)."""
        rows = sorted(rows, key=lambda r: r[0].slot)
        seqs = [s for s, _ in rows]
        counts = [n for _, n in rows]
        slots, starts = [s.slot for s in seqs], [s.cached for s in seqs]
        if counts == [1]:  # a lone one-id row: every product in the pass is over one row
            slots, starts, counts = (self._at_least_min_rows(x) for x in (slots, starts, counts))
        batch = SlotBatch(slots, starts, counts, self.device)
        idx = torch.zeros((len(slots), batch.T), dtype=torch.long)
        for b, (s, n) in enumerate(rows):
            idx[b, :n] = torch.tensor(s.feed(n), dtype=torch.long)
        if len(slots) > len(rows):
            idx[1:] = idx[0]
        ends = [b for b, s in enumerate(seqs) if s.cached + counts[b] == s.length]  # their last id fed
        ready = [b for b in ends if len(seqs[b].out) < seqs[b].budget]  # to sample from
        spent = [b for b in ends if len(seqs[b].out) >= seqs[b].budget]  # budget 0: scored, nothing to make
        known = {b: self._known_id(s, counts[b]) for b, s in enumerate(seqs) if b not in ends}
        relogit = [b for b, k in known.items() if k is not None]  # their next id is known: its logprob
        at = {b: j for j, b in enumerate(sorted(ready + relogit))}  # row -> its row of logits
        scored = [b for b, s in enumerate(seqs) if s.params.prompt_logprobs is not None and s.cached < len(s.prompt)]
        try:
            logits, hidden = self._forward(idx.to(self.device), batch, sorted(at), len(rows), hidden=bool(scored))
        except torch.OutOfMemoryError:
            self._shrink(len(rows))
            return False
        for b in scored:
            self._score_prompt(seqs[b], hidden[b, : counts[b]])
        for b in relogit:
            seqs[b].logprobs.append(logprob_of(logits[at[b]], known[b], seqs[b].params.logprobs))
        for s, n in rows:
            s.cached += n
            self.cache.lengths[s.slot] = s.cached
        for b in spent:
            self.finish(seqs[b])
            new_ids.append((seqs[b], None))
        if ready and self.observe is not None:
            for b in ready:
                self.observe(seqs[b], logits[at[b]])
        if ready:
            rl = logits if len(ready) == len(at) else logits[[at[b] for b in ready]]
            picked = self.sampler.sample(rl, [seqs[b] for b in ready])
            for b, token in zip(ready, picked):
                s = seqs[b]
                if s.params.logprobs is not None:
                    s.logprobs.append(logprob_of(logits[at[b]], token, s.params.logprobs))
                s.out.append(token)
                new_ids.append((s, token))
                if token in s.stop_ids or len(s.out) >= s.budget:
                    self.finish(s)
        self._steps_since_oom += 1
        if self._steps_since_oom >= GROW_AFTER and self.limit < self.slots:
            self.limit = min(self.slots, self.limit * 2)
            self._steps_since_oom = 0
        return True

    @staticmethod
    def _known_id(seq: Sequence, count: int) -> int | None:
        """Where a sequence wants logprobs and its pass of `count` ids ends with logits that predict
        an id it has already (a resumed sequence's prior ids, fed again), whose logprob it lacks:
        that id (its logprob is computed as it was when first made: the same pass shape, one id a
        step). Else None."""
        k = seq.cached + count - len(seq.prompt)  # the index in prior + out of the id predicted
        if seq.params.logprobs is None or k < 0 or k != len(seq.logprobs):
            return None
        rest = seq.prior + seq.out
        return rest[k] if k < len(rest) else None

    def _forward(self, idx: torch.Tensor, batch: SlotBatch, ready: list[int], rows: int, *,
                 hidden: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The logits of the ready rows' last ids (None when no row is ready), and with hidden every
        new id's hidden state (B, T, C); rows: sequences in the pass."""
        while self.inject_stall and os.path.exists(self.inject_stall):
            time.sleep(0.05)
        if self.inject_oom and rows >= self.inject_oom:
            raise torch.OutOfMemoryError(f"injected by {INJECT_OOM_ENV}={self.inject_oom}: forward pass over {rows} rows")
        x = self.model.hidden_cached(idx, self.cache, batch)
        if not ready:
            return None, x if hidden else None
        return self.model.last_logits(x, batch, self._at_least_min_rows(ready))[: len(ready)], x if hidden else None

    def _score_prompt(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Prompt logprobs from a prefill chunk's hidden states (n, C): position j's logits give the
        logprob of the prompt id after it. A row's own chunk, SCORE_POSITIONS positions at a time:
        the same products alone or in company (a re-prefilled row, after out of memory, is not
        scored twice)."""
        start, top = seq.cached, seq.params.prompt_logprobs
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)  # the first id has nothing before it
        for j0 in range(0, hidden.size(0), SCORE_POSITIONS):
            first = start + j0 + 1  # the prompt position the chunk's first logits predict
            rows = range(max(0, len(seq.prompt_logprobs) - first), min(SCORE_POSITIONS, hidden.size(0) - j0,
                                                                       len(seq.prompt) - first))
            if not rows:
                continue
            logits = self.model.logits_of(hidden[j0 : j0 + SCORE_POSITIONS])[rows.start : rows.stop]
            seq.prompt_logprobs += logprobs_of(logits, seq.prompt[first + rows.start : first + rows.stop], top)

    def _at_least_min_rows(self, rows: list) -> list:
        """rows, the first repeated up to min_rows: a float32 product over one row takes another kernel
        than over two or more, which rounds differently, so in its invariant mode the engine never runs
        one over a single row (int8's products are exact integers at any row count)."""
        return rows + rows[:1] * (self.min_rows - len(rows))

    def _shrink(self, rows: int) -> None:
        """Out of memory in a pass over `rows` rows: halve the sequences run at once, preempting
        the newest running ones beyond that; with one running, raise."""
        running = list(self.running)
        if len(running) <= 1:
            raise torch.OutOfMemoryError(f"out of memory at 1 row on {self.device}")
        limit = max(1, len(running) // 2)
        preempted = []
        while len(self.running) > limit:
            seq = self.running[-1]  # the newest
            self._release(seq)
            seq.status, seq.cached = Status.WAITING, 0
            self.scheduler.put_back(seq)
            preempted.append(seq)
        self.limit = limit
        self._steps_since_oom = 0
        self.rungs.append(OomRung(rows, limit, preempted, running))
        _free_memory()


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate(model: GPT, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], *,
             slots: int | None = None, budgets: list[int] | None = None, skip_draws: list[int] | None = None,
             stop_ids: frozenset[int] = frozenset(), allowed_ids: torch.Tensor | None = None, invariant: bool = True,
             observe: Observer | None = None) -> list[list[int]]:
    """Every prompt's new ids (a stop id included where one ended it), decoded together on an engine
    of `slots` slots (default: one per prompt), its cache as long as the longest prompt needs.
    params: one for all, or one per prompt (each row's seed is its params')."""
    if not prompts:
        raise InvalidParameterError("no prompts to generate from")
    n = len(prompts)
    per_row = params if isinstance(params, list) else [params] * n
    budgets = budgets if budgets is not None else [sp.max_tokens for sp in per_row]
    skips = skip_draws if skip_draws is not None else [0] * n
    if not len(per_row) == len(budgets) == len(skips) == n:
        raise InvalidParameterError("one set of parameters, budget and skip count per prompt")
    max_len = max(len(p) + b for p, b in zip(prompts, budgets))
    engine = Engine(model, slots or n, max_len=max_len, allowed_ids=allowed_ids, invariant=invariant, observe=observe)
    seqs = [Sequence(list(p), sp, b, skip_draws=k, stop_ids=stop_ids, index=i)
            for i, (p, sp, b, k) in enumerate(zip(prompts, per_row, budgets, skips))]
    for s in seqs:
        engine.add(s)
    while engine:
        engine.step()
    return [s.out for s in seqs]
