"""Sampling parameters: one strict check at submit, the same check under what the worker runs."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import pytest

from gencli.model.engine import generate
from gencli.model.errors import GencliError, InvalidParameterError
from gencli.model.params import (
    DEFAULTS,
    OPTIONAL_KEYS,
    SAMPLING_KEYS,
    SamplingParams,
    check_overrides,
    check_sampling,
    default_max_tokens,
    resolve_sampling,
)

VOCAB = 300
BLOCK = 64

BAD = [
    ("max_tokens", 5.0),
    ("max_tokens", True),
    ("max_tokens", False),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", "5"),
    ("max_tokens", [5]),
    ("top_k", 200.0),
    ("top_k", True),
    ("top_k", False),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", "200"),
    ("temperature", "hot"),
    ("temperature", True),
    ("temperature", None),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", -math.inf),
    ("temperature", -0.1),
    ("temperature", 10**400),  # an int too large for a float
    ("temperature", [1.0]),
    ("top_p", 0),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("top_p", math.nan),
    ("top_p", math.inf),
    ("top_p", True),
    ("top_p", "0.9"),
    ("top_p", None),
    ("seed", 1.5),
    ("seed", 3.0),
    ("seed", True),
    ("seed", "7"),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("stop", 5),
    ("stop", ""),
    ("stop", [""]),
    ("stop", ["a", 3]),
    ("stop", [None]),
    ("stop", None),
    ("stop", {"a": 1}),
    ("presence_penalty", 2.5),
    ("presence_penalty", "0"),
    ("frequency_penalty", float("nan")),
    ("repetition_penalty", 0),
    ("repetition_penalty", 11),
    ("logit_bias", {"x": 1}),
    ("logit_bias", {"5": 101}),
    ("logit_bias", [5]),
    ("min_tokens", -1),
    ("min_tokens", 1.5),
    ("min_p", 1.5),
    ("stop_token_ids", 5),
    ("stop_token_ids", [-1]),
    ("ignore_eos", "yes"),
    ("structured", {"xml": "a"}),
    ("structured", {"json": {"type": "array", "uniqueItems": True}}),
    ("structured", {"regex": "(?=a)b"}),
    ("structured", {"choice": []}),
    ("colour", "red"),  # not a sampling parameter at all
]
BAD_IDS = [f"{name}={repr(value)[:12]}" for name, value in BAD]


def _raises(call, name: str, where: str = "") -> str:
    with pytest.raises(InvalidParameterError) as e:
        call()
    msg = str(e.value)
    assert isinstance(e.value, GencliError)
    assert "\n" not in msg and len(msg) < 200, msg
    assert msg.startswith(f"{where}{name}") or msg.startswith(f"{where}unknown parameter(s) {name}"), msg
    assert "use " in msg, msg  # says what to use instead
    return msg


@pytest.mark.parametrize("name, value", BAD, ids=BAD_IDS)
def test_bad_value_is_refused_in_one_line_naming_it(name, value):
    msg = _raises(lambda: check_sampling({name: value}, "line 3: "), name, "line 3: ")
    if name in SAMPLING_KEYS and name != "structured":  # (structured's names the part of the spec at fault)
        shown = repr(value)
        assert (shown if len(shown) <= 40 else shown[:37]) in msg  # the bad value, as given


@pytest.mark.parametrize("name, value", BAD, ids=BAD_IDS)
def test_worker_side_refuses_what_submit_refuses(name, value):
    """resolve_sampling runs the same check, in a job's params and in a line's overrides."""
    expected = _raises(lambda: check_sampling({name: value}), name)
    assert _raises(lambda: resolve_sampling({}, {name: value}, BLOCK), name) == expected
    if name in SAMPLING_KEYS:  # a job's own params hold chat and truncate beside these
        assert _raises(lambda: resolve_sampling({name: value}, None, BLOCK), name) == expected


@pytest.mark.parametrize(
    "kw",
    [dict(top_k=3.0), dict(top_k=True), dict(max_tokens=True), dict(max_tokens=5.0), dict(temperature=True),
     dict(temperature="1"), dict(top_p=True), dict(seed=True), dict(seed=1.0), dict(seed=2**64), dict(stop=[""]),
     dict(stop=3), dict(logprobs=21), dict(logprobs=-1), dict(logprobs=True), dict(logprobs=2.0)],
)
def test_sampling_params_refuses_bools_floats_and_strings(kw):
    _raises(lambda: SamplingParams(**kw), next(iter(kw)))


def test_sampling_params_hold_the_seed_and_the_stop_strings():
    sp = SamplingParams(temperature=1.0, seed=7, stop="END")
    assert sp.stop == ("END",) and sp.seed == 7  # one string is a list of one, kept as a tuple
    assert sp.seeded(8) == SamplingParams(temperature=1.0, seed=8, stop=("END",)) and sp.seed == 7
    assert hash(sp) == hash(SamplingParams(temperature=1.0, seed=7, stop=["END"]))
    # what the store records and a replay submits: check_sampling's own form, less the logprobs keys unset
    as_json = sp.as_json()
    assert check_sampling(as_json) == as_json | {k: DEFAULTS[k] for k in OPTIONAL_KEYS}
    assert json.loads(json.dumps(as_json)) == as_json and SamplingParams(**as_json) == sp
    scored = SamplingParams(max_tokens=0, prompt_logprobs=2, logprobs=0)
    assert scored.as_json()["prompt_logprobs"] == 2
    assert check_sampling(scored.as_json()) == {k: DEFAULTS[k] for k in OPTIONAL_KEYS} | scored.as_json()
    assert SamplingParams(**scored.as_json()) == scored
    # the other keys too: recorded where set, back to the same params
    shaped = SamplingParams(presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.3,
                            logit_bias={"7": -100, 3: 2.5}, min_tokens=4, min_p=0.1, stop_token_ids=[9, 2],
                            ignore_eos=True)
    recorded = json.loads(json.dumps(shaped.as_json()))
    assert recorded["logit_bias"] == {"3": 2.5, "7": -100.0} and recorded["stop_token_ids"] == [2, 9]
    assert SamplingParams(**recorded) == shaped and check_sampling(recorded)["min_tokens"] == 4
    structured = SamplingParams(structured={"json": {"type": "object", "required": ["a"]}})
    assert SamplingParams(**json.loads(json.dumps(structured.as_json()))) == structured


def test_defaults_complete_a_fresh_copy():
    full = check_sampling({})
    assert full == DEFAULTS and list(full) == list(SAMPLING_KEYS)
    full["stop"].append("x")
    assert DEFAULTS["stop"] == [] and check_sampling({})["stop"] == []


@pytest.mark.parametrize(
    "given, normalised",
    [
        (dict(temperature=1), dict(temperature=1.0)),
        (dict(temperature=0), dict(temperature=0.0)),
        (dict(top_p=1), dict(top_p=1.0)),
        (dict(top_p=1e-9), dict(top_p=1e-9)),
        (dict(top_k=None), dict(top_k=None)),
        (dict(top_k=0), dict(top_k=None)),  # 0 is off, as in transformers
        (dict(top_k=10**9), dict(top_k=10**9)),
        (dict(max_tokens=None), dict(max_tokens=None)),
        (dict(max_tokens=7), dict(max_tokens=7)),
        (dict(seed=0), dict(seed=0)),
        (dict(seed=-1), dict(seed=-1)),
        (dict(seed=2**64 - 1), dict(seed=2**64 - 1)),
        (dict(stop="\n\n"), dict(stop=["\n\n"])),
        (dict(stop=("a", "b")), dict(stop=["a", "b"])),
        (dict(stop=[]), dict(stop=[])),
    ],
)
def test_good_values_normalised(given, normalised):
    full = check_sampling(given)
    assert full == {**DEFAULTS, **normalised}
    for k, v in normalised.items():
        assert type(full[k]) is type(v)  # 1 -> 1.0, a tuple or a string -> a list
    assert json.loads(json.dumps(full, allow_nan=False)) == full  # what the store records
    assert check_sampling(full) == full


def test_overrides_keep_only_the_keys_a_line_gives():
    assert check_overrides({"temperature": 1, "stop": "x"}, "line 2: ") == {"temperature": 1.0, "stop": ["x"]}
    assert check_overrides({}) == {}
    _raises(lambda: check_overrides({"top_k": 200.0}, "line 2: "), "top_k", "line 2: ")


def test_resolve_merges_job_line_and_model_default():
    job = {**check_sampling({"temperature": 0.5, "top_k": 40, "stop": ["END"]}), "chat": True, "truncate": False}
    sp = resolve_sampling(job, {"top_k": None, "seed": 9}, BLOCK)
    assert sp == SamplingParams(max_tokens=default_max_tokens(BLOCK), temperature=0.5, top_k=None, top_p=1.0, seed=9,
                                stop=("END",))
    sp = resolve_sampling(job, None, BLOCK)
    assert (sp.top_k, sp.seed) == (40, None)
    assert resolve_sampling(job, {"max_tokens": 5}, BLOCK).max_tokens == 5


ACCEPTED = [
    {},
    dict(temperature=0),
    dict(temperature=0, top_k=1),
    dict(temperature=2),  # an int
    dict(temperature=1e-300),
    dict(temperature=5e-324),
    dict(temperature=1e300),
    dict(temperature=sys.float_info.max),
    dict(top_k=1),
    dict(top_k=VOCAB - 1),
    dict(top_k=VOCAB),
    dict(top_k=VOCAB + 1),  # larger than the vocabulary: no cut
    dict(top_k=10**30),
    dict(top_k=None),
    dict(top_k=0),
    dict(top_p=1e-9),
    dict(top_p=0.5, top_k=5, temperature=1.7),
    dict(max_tokens=1),
    dict(max_tokens=BLOCK - 4),
    dict(seed=0),
    dict(seed=2**64 - 1),
    dict(seed=-(2**63)),
    dict(stop="x", seed=3),
    dict(stop=["a", "bc"], max_tokens=None),
]


@pytest.mark.parametrize("given", ACCEPTED)
def test_every_accepted_dict_runs_a_real_engine_step(make_gpt, given):
    gpt = make_gpt(VOCAB, seed=0, block_size=BLOCK)
    sp = resolve_sampling({}, check_overrides(given), BLOCK)
    assert isinstance(sp, SamplingParams) and all(isinstance(s, str) for s in sp.stop)
    prompt = [1, 2, 3, 4]
    n = min(sp.max_tokens, 6)
    params = replace(sp, max_tokens=n)
    (out,) = generate(gpt, [prompt], params)
    assert len(out) == n and all(0 <= t < VOCAB for t in out)
    if sp.temperature < 1e-30 or sp.top_k == 1 or sp.top_p < 1e-6:
        assert out == generate(gpt, [prompt], SamplingParams(max_tokens=n, temperature=0))[0]
    if sp.max_tokens == BLOCK - 4:  # the whole budget: the prompt fills the rest of the context
        assert len(generate(gpt, [prompt], sp)[0]) == BLOCK - 4


def test_max_tokens_0_only_where_the_prompt_is_scored():
    with pytest.raises(InvalidParameterError, match="max_tokens must be a whole number >= 1 or null, got 0"):
        check_sampling({"max_tokens": 0})
    assert check_sampling({"max_tokens": 0, "prompt_logprobs": 0})["max_tokens"] == 0
    # a line's own max_tokens 0 is checked again with its job's parameters, at submit
    assert check_overrides({"max_tokens": 0}, "line 2: ") == {"max_tokens": 0}
    for bad in ({"logprobs": 21}, {"prompt_logprobs": -1}, {"logprobs": True}):
        with pytest.raises(InvalidParameterError, match="from 0 to 20 or null"):
            check_sampling(bad)
