"""Sampling parameters and prompt fitting: what a submit checks before any model is loaded.

Kept apart from engine.py so that the client and the CLI can check a job without importing torch.
This module is the one home of the sampling keys, their defaults and their rules: submit calls
`check_sampling` on a job's and each line's parameters, the worker builds what it runs with
`resolve_sampling` on top of the same check, so the worker never receives what submit refused.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, replace

from gencli.model.errors import ContextOverflowError, InvalidParameterError

SCORING_KEYS = ("logprobs", "prompt_logprobs")  # what a line asks to be scored (none by default)
# OpenAI's and vLLM's other sampling parameters, and structured output (model/structured.py): each
# neutral by default, and recorded (as_json) only where a line sets it.
EXTRA_KEYS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "min_p",
              "stop_token_ids", "ignore_eos", "structured")
SAMPLING_KEYS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop") + SCORING_KEYS + EXTRA_KEYS
# A job's defaults. max_tokens None: the model's default (default_max_tokens); top_k None: no
# top-k cut; seed None: a random seed; logprobs and prompt_logprobs None: none computed; the rest
# change nothing (penalties 0, repetition_penalty 1, no bias, min_tokens 0, min_p 0, no extra stop
# ids, the end-of-text id ends a reply, no structure).
DEFAULTS = {"max_tokens": None, "temperature": 0.8, "top_k": 200, "top_p": 1.0, "seed": None, "stop": [],
            "logprobs": None, "prompt_logprobs": None,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": {},
            "min_tokens": 0, "min_p": 0.0, "stop_token_ids": [], "ignore_eos": False, "structured": None}
OPTIONAL_KEYS = SCORING_KEYS + EXTRA_KEYS  # as_json leaves them out at their default
MAX_LOGIT_BIAS = 300  # ids a logit_bias may name, as OpenAI's API allows
MAX_STOP_IDS = 64
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")  # what --dtype takes (model/checkpoint.py)


def _bad(where: str, name: str, value, rule: str, use: str) -> InvalidParameterError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return InvalidParameterError(f"{where}{name} must be {rule}, got {shown}: use {use}", param=name)


def _whole(value, name: str, use: str, where: str = "", *, none: bool = False) -> int | None:
    """A positive int (not a bool, not a float such as 200.0); None where `none` allows it."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(where, name, value, "a whole number >= 1" + (" or null" if none else ""), use)
    return int(value)


def _real(value) -> float | None:
    """A finite real number (an int or a float, not a bool or a string) as a float; else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return f if math.isfinite(f) else None


def _max_tokens(value, where: str = "", *, none: bool = True, scoring: bool = False) -> int | None:
    """max_tokens >= 1; 0 too where the prompt is scored (prompt_logprobs set): nothing is generated."""
    if scoring and value == 0 and type(value) is int:
        return 0
    use = "e.g. 64" + (", or null for the model's default" if none else "")
    return _whole(value, "max_tokens", use, where, none=none)


def _top_k(value, where: str = "") -> int | None:
    """top_k as the sampler takes it: 0 (as in transformers) and null both mean no top-k cut."""
    if value == 0 and type(value) is int:
        return None
    return _whole(value, "top_k", "e.g. 200, or 0 or null for no top-k cut", where, none=True)


def _number(value, where: str, name: str, within, rule: str, use: str) -> float:
    """A real number for which within(number) holds, as a float; else the one-line error naming
    `name` with its rule and an example."""
    v = _real(value)
    if v is None or not within(v):
        raise _bad(where, name, value, rule, use)
    return v


def _temperature(value, where: str = "") -> float:
    return _number(value, where, "temperature", lambda t: t >= 0, "a finite number >= 0", "e.g. 0.8 (0 is greedy)")


def _top_p(value, where: str = "") -> float:
    return _number(value, where, "top_p", lambda p: 0 < p <= 1, "in (0, 1]", "e.g. 0.9 (1 keeps every token)")


def _seed(value, where: str = "") -> int | None:
    lo, hi = SEED_RANGE
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value < hi:
        raise _bad(where, "seed", value, "a whole number from -2**63 to 2**64 - 1 or null", "e.g. 1234")
    return int(value)


def _stop(value, where: str = "") -> list[str]:
    stop = [value] if isinstance(value, str) else value
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise _bad(where, "stop", value, "a string or a list of strings, none empty", 'e.g. ["\\n\\n"]')
    return list(stop)


def _penalty(value, name: str, where: str = "") -> float:
    return _number(value, where, name, lambda v: -2 <= v <= 2, "a number from -2 to 2",
                   "e.g. 0.5 (0: none; as OpenAI's)")


def _repetition_penalty(value, where: str = "") -> float:
    return _number(value, where, "repetition_penalty", lambda v: 0 < v <= 10, "a number in (0, 10]",
                   "e.g. 1.1 (1: none; as vLLM's)")


def _token_id(value) -> int | None:
    """A token id: an int >= 0, or its decimal digits (a JSON object's key)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 12:
        return int(value)
    if type(value) is int and 0 <= value < 2**40:
        return value
    return None


def _logit_bias(value, where: str = "") -> dict[str, float]:
    """{token id: bias from -100 to 100} (ids as JSON keys: strings of digits), sorted by id."""
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise _bad(where, "logit_bias", value, f"an object of up to {MAX_LOGIT_BIAS} token ids to biases",
                   'e.g. {"1734": -100}')
    out = {}
    for k, v in value.items():
        tid, b = _token_id(k), _real(v)
        if tid is None:
            raise _bad(where, "logit_bias", value, "keyed by token ids (whole numbers >= 0)", 'e.g. {"1734": -100}')
        if b is None or not -100 <= b <= 100:
            raise _bad(where, "logit_bias", value, "biases from -100 to 100", "-100 to ban a token, 100 to force it")
        out[tid] = b
    return {str(k): out[k] for k in sorted(out)}


def _min_tokens(value, where: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(where, "min_tokens", value, "a whole number >= 0", "e.g. 8 (0: none)")
    return value


def _min_p(value, where: str = "") -> float:
    return _number(value, where, "min_p", lambda v: 0 <= v <= 1, "a number from 0 to 1", "e.g. 0.05 (0: none)")


def _stop_token_ids(value, where: str = "") -> list[int]:
    ids = value if isinstance(value, (list, tuple)) else None
    if ids is None or len(ids) > MAX_STOP_IDS or any(type(i) is not int or i < 0 for i in ids):
        raise _bad(where, "stop_token_ids", value, f"a list of up to {MAX_STOP_IDS} token ids (whole numbers >= 0)",
                   "e.g. [198]")
    return sorted(set(ids))


def _ignore_eos(value, where: str = "") -> bool:
    if not isinstance(value, bool):
        raise _bad(where, "ignore_eos", value, "true or false", "true to run to max_tokens past the end-of-text id")
    return value


def _structured(value, where: str = "") -> dict | None:
    from gencli.model.structured import check_structured  # (llguidance: imported where structure is asked for)

    return None if value is None else check_structured(value, where)


def _combination(p: dict, where: str = "") -> None:
    """What the keys cannot do together, refused by name."""
    if p["max_tokens"] is not None and p["min_tokens"] > p["max_tokens"]:
        raise InvalidParameterError(f"{where}min_tokens {p['min_tokens']} exceeds max_tokens {p['max_tokens']}: "
                                    "lower min_tokens", param="min_tokens")
    if p["structured"] is not None and (p["min_tokens"] or p["ignore_eos"]):
        which = "min_tokens" if p["min_tokens"] else "ignore_eos"
        raise InvalidParameterError(f"{where}{which} cannot be combined with structured output (the grammar decides "
                                    f"where the reply ends): leave {which} out", param=which)


DEFAULT_MAX_TOKENS = 256  # new tokens when none are asked for, within half the model's context
MAX_LOGPROBS = 20  # the most top logprobs a token may come with, as OpenAI's API allows


def _logprobs(value, where: str = "", *, name: str = "logprobs") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise _bad(where, name, value, f"a whole number from 0 to {MAX_LOGPROBS} or null",
                   "e.g. 5 (0: the token's own alone)")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled and where it ends, as vLLM's SamplingParams: the engine reads
    the sampling fields and the seed, the text layer (TextStream) the stop strings. Its defaults are
    DEFAULTS, the one home of them (the CLI's options, submit and the worker read them there too),
    except max_tokens: a job's None means the model's default, resolved here to a number
    (default_max_tokens), as an engine needs one."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULTS["temperature"]  # 0: greedy
    top_k: int | None = DEFAULTS["top_k"]  # None: no top-k cut
    top_p: float = DEFAULTS["top_p"]
    seed: int | None = DEFAULTS["seed"]  # None: a random seed
    stop: tuple[str, ...] = tuple(DEFAULTS["stop"])  # stop strings
    # None: no logprobs; N: each new id's logprob and the N likeliest ids' (model/sampler.py's
    # logprob_of says of which distribution).
    logprobs: int | None = DEFAULTS["logprobs"]
    # None: none; N: each prompt id's logprob given the ids before it (None for the first), and the N
    # likeliest ids' there (vLLM's prompt_logprobs): what echo and scoring read. With it, max_tokens
    # may be 0: the prompt is scored and nothing generated.
    prompt_logprobs: int | None = DEFAULTS["prompt_logprobs"]
    presence_penalty: float = DEFAULTS["presence_penalty"]  # minus this from an id's logit once it was made
    frequency_penalty: float = DEFAULTS["frequency_penalty"]  # minus this times the times it was made
    repetition_penalty: float = DEFAULTS["repetition_penalty"]  # an id in prompt or output: logit / it (x it if < 0)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (id, added to its logit), by id
    min_tokens: int = DEFAULTS["min_tokens"]  # its end ids and stop strings wait for this many new ids
    min_p: float = DEFAULTS["min_p"]  # ids less likely than min_p times the likeliest are cut
    stop_token_ids: tuple[int, ...] = ()  # more ids that end it (kept in its ids, not in its text)
    ignore_eos: bool = DEFAULTS["ignore_eos"]  # the model's end ids neither end it nor are picked
    structured: tuple[str, str] | None = None  # (kind, its spec as canonical JSON): model/structured.py

    def __post_init__(self):
        _max_tokens(self.max_tokens, none=False, scoring=self.prompt_logprobs is not None)
        _temperature(self.temperature)
        _whole(self.top_k, "top_k", "e.g. 200, or None for no top-k cut", none=True)  # 0 is the callers' to map
        _top_p(self.top_p)
        _seed(self.seed)
        _logprobs(self.logprobs)
        _logprobs(self.prompt_logprobs, name="prompt_logprobs")
        object.__setattr__(self, "stop", tuple(_stop(self.stop)))  # (a list or one string given: a tuple)
        _penalty(self.presence_penalty, "presence_penalty")
        _penalty(self.frequency_penalty, "frequency_penalty")
        _repetition_penalty(self.repetition_penalty)
        bias = self.logit_bias if isinstance(self.logit_bias, dict) else dict(self.logit_bias)
        object.__setattr__(self, "logit_bias", tuple((int(k), float(v)) for k, v in _logit_bias(bias).items()))
        if _min_tokens(self.min_tokens) > self.max_tokens:
            raise InvalidParameterError(f"min_tokens {self.min_tokens} exceeds max_tokens {self.max_tokens}: lower "
                                        "min_tokens")
        _min_p(self.min_p)
        object.__setattr__(self, "stop_token_ids", tuple(_stop_token_ids(list(self.stop_token_ids))))
        _ignore_eos(self.ignore_eos)
        if isinstance(self.structured, dict):  # as check_sampling gives it: checked there
            from gencli.model.structured import canonical

            object.__setattr__(self, "structured", canonical(self.structured))

    @property
    def penalized(self) -> bool:
        """Whether its logits depend on the ids before (penalties)."""
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1.0

    @property
    def scores(self) -> bool:
        """Whether logprobs of any ids are asked for."""
        return self.logprobs is not None or self.prompt_logprobs is not None

    def seeded(self, seed: int | None) -> SamplingParams:
        """The same parameters with another seed."""
        return replace(self, seed=seed)

    def as_json(self) -> dict:
        """Its SAMPLING_KEYS as JSON (stop as a list), as check_sampling gives them, the logprobs keys
        only where set: what the store records of a line, what a replay submits, what gencli generate
        saves."""
        out = {k: self._json(k) for k in SAMPLING_KEYS}
        return {k: v for k, v in out.items() if k not in OPTIONAL_KEYS or v != DEFAULTS[k]}

    def _json(self, key: str):
        v = getattr(self, key)
        if key == "logit_bias":
            return {str(i): b for i, b in v}
        if key == "structured":
            from gencli.model.structured import as_spec

            return None if v is None else as_spec(v)
        return list(v) if isinstance(v, tuple) else v


def check_sampling(p: dict, where: str = "", *, zero_budget: bool = False) -> dict:
    """Sampling parameters complete (DEFAULTS for the missing keys), checked and normalised.

    Raises InvalidParameterError naming the parameter, its bad value and what to use, after
    `where` ("line 3: "). What it returns is JSON and what resolve_sampling runs.
    """
    unknown = set(p) - set(SAMPLING_KEYS)
    if unknown:
        names = sorted(unknown)
        close = difflib.get_close_matches(names[0], SAMPLING_KEYS, n=1)
        hint = f"use {close[0]}" if close else "use one of the keys the README's \"Sampling parameters\" lists"
        raise InvalidParameterError(f"{where}unknown parameter(s) {', '.join(names)}: {hint}")
    full = {**DEFAULTS, **p}
    prompt_logprobs = _logprobs(full["prompt_logprobs"], where, name="prompt_logprobs")
    out = {
        "max_tokens": _max_tokens(full["max_tokens"], where, scoring=zero_budget or prompt_logprobs is not None),
        "temperature": _temperature(full["temperature"], where),
        "top_k": _top_k(full["top_k"], where),
        "top_p": _top_p(full["top_p"], where),
        "seed": _seed(full["seed"], where),
        "stop": _stop(full["stop"], where),
        "logprobs": _logprobs(full["logprobs"], where),
        "prompt_logprobs": prompt_logprobs,
        "presence_penalty": _penalty(full["presence_penalty"], "presence_penalty", where),
        "frequency_penalty": _penalty(full["frequency_penalty"], "frequency_penalty", where),
        "repetition_penalty": _repetition_penalty(full["repetition_penalty"], where),
        "logit_bias": _logit_bias(full["logit_bias"], where),
        "min_tokens": _min_tokens(full["min_tokens"], where),
        "min_p": _min_p(full["min_p"], where),
        "stop_token_ids": _stop_token_ids(full["stop_token_ids"], where),
        "ignore_eos": _ignore_eos(full["ignore_eos"], where),
        "structured": _structured(full["structured"], where),
    }
    _combination(out, where)
    return out


def check_overrides(p: dict, where: str = "") -> dict:
    """A prompt line's own sampling parameters, checked and normalised: only the keys it gives
    (max_tokens 0 is checked with the job's parameters: whether they score the prompt)."""
    return {k: v for k, v in check_sampling(p, where, zero_budget=True).items() if k in p}


def resolve_sampling(params: dict, override: dict | None, block_size: int, *, where: str = "",
                     vocab_size: int | None = None) -> SamplingParams:
    """One prompt's sampling parameters: the job's sampling keys, its line's overrides, and for
    max_tokens left unset the model's default; checked by check_sampling."""
    job = {k: v for k, v in params.items() if k in SAMPLING_KEYS}  # a job's params hold chat, truncate too
    p = check_sampling({**job, **(override or {})}, where)
    max_tokens = default_max_tokens(block_size) if p["max_tokens"] is None else p["max_tokens"]
    if vocab_size is not None:  # the ids a line names, in the model's vocabulary
        for key, ids in (("logit_bias", [int(k) for k in p["logit_bias"]]), ("stop_token_ids", p["stop_token_ids"])):
            if ids and max(ids) >= vocab_size:
                raise InvalidParameterError(f"{where}{key}: token id {max(ids)} is not in the model's vocabulary of "
                                            f"{vocab_size} ids: use ids below {vocab_size}", param=key)
    return SamplingParams(**{**p, "max_tokens": max_tokens})


def default_max_tokens(block_size: int) -> int:
    """New tokens when none are asked for: 256, or half the context of a smaller model."""
    return min(DEFAULT_MAX_TOKENS, block_size // 2)


def fit_prompt(ids: list[int], max_tokens: int, block_size: int, *, truncate: bool) -> list[int]:
    """The prompt if it fits with max_tokens new tokens; with truncate, its newest tokens."""
    if max_tokens >= block_size:
        raise ContextOverflowError(
            f"max_tokens {max_tokens} leaves no room for a prompt in the model's context of "
            f"{block_size} tokens: use max_tokens < {block_size}"
        )
    if len(ids) + max_tokens <= block_size:
        return ids
    if truncate:
        return ids[len(ids) + max_tokens - block_size :]
    raise ContextOverflowError(
        f"prompt of {len(ids)} tokens + max_tokens {max_tokens} = {len(ids) + max_tokens} exceeds "
        f"the model's context of {block_size} tokens: shorten the prompt, lower max_tokens, "
        "or pass --truncate to drop the oldest prompt tokens"
    )
