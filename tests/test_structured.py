"""Structured output held by the grammar alone: a random-weights model at temperature 1 over
cl100k_base (100k ids) makes only schema-valid JSON, regex matches and choices; a structured row
is batch-invariant, and a free row beside it is unchanged bit for bit."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from gencli.model.chat import ChatFormat
from gencli.model.errors import InvalidParameterError
from gencli.model.params import SamplingParams, check_sampling
from gencli.model.textgen import TextGenerator
from tests.conftest import build_gpt, vocab_for

S = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer"}}, "required": ["name", "age"],
     "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3},
    {"enum": ["alpha", "beta", 3, None]},
    {"const": "fixed"},
    {"type": "integer", "minimum": -5, "maximum": 40},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
    {"type": "string", "pattern": "^[a-z]{2,6}@[a-z]{2,5}\\.(com|org)$"},
    {"type": "string", "minLength": 3, "maxLength": 5},
    {"type": "string", "format": "date"},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "integer"}}, "required": ["c"], "additionalProperties": False}}, "required": ["b"],
        "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                      "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
     "required": ["from", "to"], "additionalProperties": False},
    {"anyOf": [{"type": "integer"}, {"type": "boolean"}, {"type": "null"}]},
    {"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"], "additionalProperties": False},
               {"type": "object", "properties": {"k": {"const": "b"}, "n": {"type": "integer"}}, "required": ["k", "n"],
                "additionalProperties": False}]},
    {"type": "object", "properties": {"req": {"type": "integer"}, "opt": S}, "required": ["req"],
     "additionalProperties": False},
    {"type": ["integer", "string"], "maxLength": 4},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "maxItems": 2}}, "required": ["tags"],
     "additionalProperties": False},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}], "items": False, "minItems": 2},
    {"type": "object", "properties": {"level": {"enum": ["low", "mid", "high"]}, "score": {
        "type": "number", "minimum": -1, "maximum": 1}}, "required": ["level", "score"], "additionalProperties": False},
    {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 2},
    {"type": "null"},
    {"type": "boolean"},
]


@pytest.fixture(scope="module")
def gen(tok_chatml) -> TextGenerator:
    from gencli.model.checkpoint import LoadedModel

    model = build_gpt(vocab_for(tok_chatml), seed=3, block_size=256, widen=False)  # near-ties: a hard case
    return TextGenerator(LoadedModel(model=model, tokenizer=tok_chatml, chat_format=ChatFormat.CHATML, kind="gencli",
                                     path=__import__("pathlib").Path("in-memory")))


def test_each_schema_is_accepted_and_every_finished_reply_validates(gen):
    assert len(SCHEMAS) >= 20
    prompt = gen.encode([{"role": "user", "content": "Give me a record."}], chat=True)
    seeds = range(4)
    params = [SamplingParams(max_tokens=96, temperature=1.0, top_k=None, seed=s, structured=check_sampling(
        {"structured": {"json": schema}})["structured"]) for schema in SCHEMAS for s in seeds]
    streams = gen.generate([prompt] * len(params), params, slots=32)
    stopped = {}
    for (schema, stream) in zip([s for s in SCHEMAS for _ in seeds], streams):
        if stream.finish_reason == "stop":
            jsonschema.validate(json.loads(stream.text), schema)  # the constraint alone guarantees it
            stopped[json.dumps(schema)] = stopped.get(json.dumps(schema), 0) + 1
        else:
            assert stream.finish_reason == "length" and len(stream.ids) == 96
    assert len(stopped) >= 20, f"only {len(stopped)} schemas got a finished reply"


def test_regex_and_choice_hold_and_a_cut_reply_says_length(gen):
    prompt = gen.encode("Pick:", chat=False)
    choice = [SamplingParams(max_tokens=20, temperature=1.0, top_k=None, seed=s,
                             structured={"choice": ["yes", "no", "maybe later"]}) for s in range(6)]
    regex = [SamplingParams(max_tokens=40, temperature=1.0, top_k=None, seed=s,
                            structured={"regex": "[0-9]{3}-[a-z]{2,4}"}) for s in range(6)]
    cut = [SamplingParams(max_tokens=3, temperature=1.0, top_k=None, seed=1, structured={"json": {"type": "object", "properties": {"a": S}, "required": ["a"]}})]
    streams = gen.generate([prompt] * 13, choice + regex + cut, slots=13)
    for s in streams[:6]:
        assert s.finish_reason == "stop" and s.text in ("yes", "no", "maybe later")
    for s in streams[6:12]:
        assert s.finish_reason == "stop" and re.fullmatch("[0-9]{3}-[a-z]{2,4}", s.text), s.text
    assert streams[12].finish_reason == "length" and len(streams[12].ids) == 3


def test_structured_rows_are_batch_invariant_and_leave_free_rows_alone(gen):
    prompts = [gen.encode(t, chat=False) for t in ("one", "two three", "four five six", "seven")]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": S}, "required": ["n", "s"]}
    rows = [SamplingParams(max_tokens=24, temperature=1.0, top_k=None, seed=7, structured={"json": schema}),
            SamplingParams(max_tokens=24, temperature=1.0, top_k=None, top_p=0.9, seed=8),
            SamplingParams(max_tokens=24, temperature=0.0, presence_penalty=1.5, repetition_penalty=1.3),
            SamplingParams(max_tokens=24, temperature=0.7, seed=9, structured={"regex": "[a-z ]{4,30}"})]
    alone = [gen.generate([p], sp)[0] for p, sp in zip(prompts, rows)]
    together = gen.generate(prompts, rows, slots=4)
    for a, t in zip(alone, together):
        assert (a.ids, a.text, a.finish_reason) == (t.ids, t.text, t.finish_reason)


@pytest.mark.parametrize("spec, part", [
    ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"json": {"not": {"type": "string"}}}, "not"),
    ({"json": {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}}, "if"),
    ({"regex": "(?=a)b"}, "look-around"),
    ({"grammar": "start: missing"}, "missing"),
])
def test_what_the_engine_cannot_enforce_is_refused_by_name(spec, part):
    with pytest.raises(InvalidParameterError) as e:
        check_sampling({"structured": spec}, "line 2: ")
    msg = str(e.value)
    assert msg.startswith("line 2: structured.") and part in msg and "\n" not in msg, msg
