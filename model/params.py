"""Sampling parameters and prompt fitting: what a submit checks before any model is loaded.

Kept apart from engine.py so that the client and the CLI can check a job without importing torch.
This module is the one home of the sampling keys, their defaults and their rules: submit calls
`check_sampling` on a job's and each line's parameters, the worker builds what it runs with
`resolve_sampling` on top of the same check, so the worker never receives what submit refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from gencli.model.errors import ContextOverflowError, InvalidParameterError

SCORING_KEYS = ("logprobs", "prompt_logprobs")  # what a line asks to be scored (none by default)
SAMPLING_KEYS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop") + SCORING_KEYS
# A job's defaults. max_tokens None: the model's default (default_max_tokens); top_k None: no
# top-k cut; seed None: a random seed; logprobs and prompt_logprobs None: none computed.
DEFAULTS = {"max_tokens": None, "temperature": 0.8, "top_k": 200, "top_p": 1.0, "seed": None, "stop": [],
            "logprobs": None, "prompt_logprobs": None}
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")  # what --dtype takes (model/checkpoint.py)


def _bad(where: str, name: str, value, rule: str, use: str) -> InvalidParameterError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return InvalidParameterError(f"{where}{name} must be {rule}, got {shown}: use {use}")


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


def _temperature(value, where: str = "") -> float:
    t = _real(value)
    if t is None or t < 0:
        raise _bad(where, "temperature", value, "a finite number >= 0", "e.g. 0.8 (0 is greedy)")
    return t


def _top_p(value, where: str = "") -> float:
    p = _real(value)
    if p is None or not 0 < p <= 1:
        raise _bad(where, "top_p", value, "in (0, 1]", "e.g. 0.9 (1 keeps every token)")
    return p


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

    def __post_init__(self):
        _max_tokens(self.max_tokens, none=False, scoring=self.prompt_logprobs is not None)
        _temperature(self.temperature)
        _whole(self.top_k, "top_k", "e.g. 200, or None for no top-k cut", none=True)  # 0 is the callers' to map
        _top_p(self.top_p)
        _seed(self.seed)
        _logprobs(self.logprobs)
        _logprobs(self.prompt_logprobs, name="prompt_logprobs")
        object.__setattr__(self, "stop", tuple(_stop(self.stop)))  # (a list or one string given: a tuple)

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
        return {k: list(self.stop) if k == "stop" else getattr(self, k) for k in SAMPLING_KEYS
                if k not in SCORING_KEYS or getattr(self, k) is not None}


def check_sampling(p: dict, where: str = "", *, zero_budget: bool = False) -> dict:
    """Sampling parameters complete (DEFAULTS for the missing keys), checked and normalised.

    Raises InvalidParameterError naming the parameter, its bad value and what to use, after
    `where` ("line 3: "). What it returns is JSON and what resolve_sampling runs.
    """
    unknown = set(p) - set(SAMPLING_KEYS)
    if unknown:
        raise InvalidParameterError(
            f"{where}unknown parameter(s) {', '.join(sorted(unknown))}: use {', '.join(SAMPLING_KEYS)}"
        )
    full = {**DEFAULTS, **p}
    prompt_logprobs = _logprobs(full["prompt_logprobs"], where, name="prompt_logprobs")
    return {
        "max_tokens": _max_tokens(full["max_tokens"], where, scoring=zero_budget or prompt_logprobs is not None),
        "temperature": _temperature(full["temperature"], where),
        "top_k": _top_k(full["top_k"], where),
        "top_p": _top_p(full["top_p"], where),
        "seed": _seed(full["seed"], where),
        "stop": _stop(full["stop"], where),
        "logprobs": _logprobs(full["logprobs"], where),
        "prompt_logprobs": prompt_logprobs,
    }


def check_overrides(p: dict, where: str = "") -> dict:
    """A prompt line's own sampling parameters, checked and normalised: only the keys it gives
    (max_tokens 0 is checked with the job's parameters: whether they score the prompt)."""
    return {k: v for k, v in check_sampling(p, where, zero_budget=True).items() if k in p}


def resolve_sampling(params: dict, override: dict | None, block_size: int, *, where: str = "") -> SamplingParams:
    """One prompt's sampling parameters: the job's sampling keys, its line's overrides, and for
    max_tokens left unset the model's default; checked by check_sampling."""
    job = {k: v for k, v in params.items() if k in SAMPLING_KEYS}  # a job's params hold chat, truncate too
    p = check_sampling({**job, **(override or {})}, where)
    max_tokens = default_max_tokens(block_size) if p["max_tokens"] is None else p["max_tokens"]
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
