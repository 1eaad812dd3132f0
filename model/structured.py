"""Structured output: a reply held to a JSON schema, a regular expression, a choice of strings or a
Lark grammar, by a mask of the ids each row may take next (llguidance).

A line asks for it with the sampling key `structured`, one of
    {"json": SCHEMA}  (a JSON schema object; {} or {"type": "object"}: any JSON (object))
    {"regex": "[a-z]+@[a-z]+\\.com"}   {"choice": ["yes", "no"]}   {"grammar": LARK}
checked at submit (`check_structured`): a schema, regex or grammar that llguidance cannot enforce
is refused with its reason ("Unimplemented keys: [\"uniqueItems\"]"), never ignored.

Why llguidance and not xgrammar (bench/grammars.py measures both on cl100k_base, 100k ids): given
`uniqueItems`, `not`, `if`/`then`, `dependentRequired` or a look-around pattern, llguidance names the
key it does not implement, where xgrammar 0.2.9 compiled each and dropped the rule, so its output
could break the schema it was given; llguidance has no dependencies (xgrammar brings triton, 1 GB,
and transformers); it compiles a schema in about 0.8 ms against xgrammar's 2 to 15 ms; its masks
took a median of 9.7 us a token against xgrammar's 6.1 us, both nothing beside a decode step.

A row's grammar state (`Constraint`) lives on its engine sequence: it starts at the reply's first
id (a chat template's ids are the prompt's, never constrained), consumes every id the row makes or
is fed again (a resumed sequence's prior ids), and gives the row's mask before each sampling. When
the grammar is complete it allows only the tokenizer's end ids, so a reply that ends with `stop`
is whole; one cut by max_tokens ends with `length`, as OpenAI's does.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache

import numpy as np
import torch

from gencli.model.errors import InvalidParameterError

KINDS = ("json", "regex", "choice", "grammar")
MAX_SPEC_BYTES = 64 * 1024  # a spec's JSON: room for large schemas, not for a whole file by mistake
USE = 'e.g. {"json": SCHEMA}, {"regex": "[0-9]+"}, {"choice": ["a", "b"]} or {"grammar": LARK}'


def canonical(spec: dict) -> tuple[str, str]:
    """(kind, spec as compact JSON): the hashable form SamplingParams holds. A schema's keys keep
    their order: its properties are generated in the order it declares them (as OpenAI and vLLM
    do: "reasoning" before "answer" is a schema's way of asking for it)."""
    (kind, value), = spec.items()
    return kind, json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def as_spec(key: tuple[str, str]) -> dict:
    kind, text = key
    return {kind: json.loads(text)}


def check_structured(value, where: str = "", *, field: str = "structured", name: str | None = None) -> dict:
    """A line's `structured` value checked: one kind, a spec of its type that llguidance can enforce
    whole. Raises InvalidParameterError naming what to fix: `field` as the request calls the value
    (the API's structured_outputs), `name` as it calls the spec (response_format.json_schema.schema;
    default: field.kind)."""
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in KINDS:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise InvalidParameterError(f"{where}{field} must be an object with one of {', '.join(KINDS)}, got "
                                    f"{shown}: use {USE}", param=field)
    (kind, spec), = value.items()
    name = name or f"{field}.{kind}"
    ok = {"json": isinstance(spec, dict) or spec is True, "regex": isinstance(spec, str) and spec != "",
          "choice": isinstance(spec, list) and bool(spec) and all(isinstance(c, str) and c for c in spec),
          "grammar": isinstance(spec, str) and spec.strip() != ""}[kind]
    if not ok:
        want = {"json": "a JSON schema object", "regex": "a non-empty regular expression",
                "choice": "a list of non-empty strings", "grammar": "a Lark grammar's text"}[kind]
        raise InvalidParameterError(f"{where}{name} must be {want}: use {USE}", param=field)
    key = canonical({kind: {} if spec is True else spec})
    if len(key[1].encode()) > MAX_SPEC_BYTES:
        raise InvalidParameterError(f"{where}{name} is over {MAX_SPEC_BYTES // 1024} KiB: use a smaller spec",
                                    param=field)
    error = _problem(key)
    if error:
        raise InvalidParameterError(f"{where}{name} cannot be enforced: {error}: fix it, or use a spec without "
                                    "that part", param=field)
    return as_spec(key)


@lru_cache(maxsize=256)
def grammar_of(key: tuple[str, str]) -> str:
    """llguidance's grammar for a spec (cached per spec)."""
    import llguidance

    kind, text = key
    if kind == "json":
        # compact JSON (no free whitespace between tokens: a random model would fill the budget with it)
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
    spec = json.loads(text)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(spec))
    return llguidance.LLMatcher.grammar_from_lark(spec)


@lru_cache(maxsize=256)
def _problem(key: tuple[str, str]) -> str:
    """Why llguidance cannot enforce a spec ("" when it can), on one line."""
    import llguidance

    try:
        error = llguidance.LLMatcher.validate_grammar(grammar_of(key))
    except ValueError as e:
        error = str(e)
    error = " ".join(error.split())
    return error if len(error) <= 110 else error[:110].rsplit(" ", 1)[0] + " ..."  # (cut between words)


class Grammars:
    """A tokenizer's grammar matchers: the llguidance tokenizer is built once (about 0.3 s for 100k
    ids), each spec's matcher compiled once and copied for every row that asks for it."""

    def __init__(self, encoding, vocab_size: int, end_ids: frozenset[int]):
        import llguidance.tiktoken

        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.tokenizer = llguidance.tiktoken.lltokenizer_from_encoding(encoding, n_vocab=vocab_size,
                                                                       eos_token=sorted(end_ids))
        self._fresh: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()

    def constraint(self, key: tuple[str, str]) -> Constraint:
        import llguidance

        with self._lock:
            fresh = self._fresh.get(key)
            if fresh is None:
                fresh = llguidance.LLMatcher(self.tokenizer, grammar_of(key), log_level=0)
                if fresh.is_error():
                    raise InvalidParameterError(f"structured.{key[0]} cannot be enforced: {fresh.get_error()}")
                self._fresh[key] = fresh
        return Constraint(fresh.deep_copy(), self.words)


class Constraint:
    """One row's grammar state: the ids it has consumed, and the mask of those that may come next."""

    def __init__(self, matcher, words: int):
        self.matcher = matcher
        self.words = words
        self.fed = 0  # of the row's made ids, how many the matcher has consumed

    def catch_up(self, made: list[int]) -> None:
        """Consume the row's ids made since the last call (sampled, or fed again on a resume)."""
        if self.fed < len(made):
            new = made[self.fed:]
            if not self.matcher.consume_tokens(new):
                raise RuntimeError(f"the grammar refused ids it allowed: {self.matcher.get_error()}")
            self.fed = len(made)

    def fill(self, out: torch.Tensor) -> None:
        """Write the allowed ids as a bitmask (words,) int32 into `out` (a contiguous CPU row)."""
        self.matcher.unsafe_compute_mask_ptr(out.data_ptr(), self.words * 4)


def allowed_of(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(n, words) int32 bitmasks (CPU) -> (n, vocab) bool: id i allowed where bit i % 32 of word
    i // 32 is set. The words are little-endian, so id i is bit i % 8 of byte i // 8: numpy's
    unpackbits reads them in one pass (7x faster here than shifting every word 32 ways)."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(bits[:, :vocab].view(np.bool_))
