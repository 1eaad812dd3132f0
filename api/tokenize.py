"""vLLM's tokenizer routes: /tokenize, /detokenize and /tokenizer_info, for a served model.

lm-evaluation-harness reads exactly these with `tokenizer_backend=remote`, so a tiktoken-based
gencli model needs no tokenizer files on the evaluating side. Its requests name no model: without
`model`, the routes answer for the model every live worker serves (or the tokenizer, chat format
and context they all share), and ask for a name otherwise.

Text is text here as everywhere in gencli: `<|endoftext|>` in a prompt is eleven characters'
tokens, never the special id, so /tokenize gives exactly the ids /v1/completions decodes from the
same text. gencli's tokenizers add no special token to a prompt, so `add_special_tokens` changes
nothing (it is taken because vLLM's clients send it). /detokenize decodes any id of the
vocabulary, special ones as their text; bytes that are not whole UTF-8 come out as U+FFFD.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from gencli.api.errors import APIError
from gencli.api.jobs import client_of
from gencli.model.chat import render
from gencli.model.errors import GencliError
from gencli.model.tokenizer import ENDOFTEXT

router = APIRouter(tags=["tokenizer"])

MAX_IDS = 1_000_000  # ids one /detokenize takes


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[dict] | None = Field(default=None, description="rendered in the model's chat format, as "
                                                                  "/v1/chat/completions renders them")
    add_generation_prompt: bool = Field(default=True, description="with messages: end with the assistant's "
                                                                  "turn opened, as chat completions do")
    add_special_tokens: bool = Field(default=True, description="taken as vLLM takes it; gencli's tokenizers "
                                                               "add none either way")
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_IDS)


@router.post("/tokenize")
def tokenize(body: TokenizeRequest, request: Request):
    """A prompt's ids (or a conversation's, through the model's chat format), as the model takes them."""
    if (body.prompt is None) == (body.messages is None):
        raise APIError(422, 'give "prompt" (text) or "messages" (a conversation), one of them', param="prompt")
    if body.prompt is not None and "add_generation_prompt" in body.model_fields_set:
        raise APIError(422, 'add_generation_prompt goes with "messages": a text prompt is tokenized as it is',
                       param="add_generation_prompt")
    mt = client_of(request).tokenizer_of(body.model)
    if body.prompt is not None:
        ids = mt.tokenizer.encode(body.prompt)  # (an empty prompt has no ids: nothing to refuse here)
    else:
        try:
            ids = render(mt.tokenizer, mt.chat_format, body.messages, add_generation_prompt=body.add_generation_prompt)
        except GencliError as e:
            raise APIError(422, str(e), param="messages") from None
    strs = [mt.tokenizer.decode([i]) for i in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": mt.block_size, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
def detokenize(body: DetokenizeRequest, request: Request):
    """The text of ids (special ones as their text)."""
    mt = client_of(request).tokenizer_of(body.model)
    try:
        mt.tokenizer.check_ids(body.tokens, mt.vocab_size)
    except GencliError as e:
        raise APIError(422, str(e), param="tokens") from None
    return {"prompt": mt.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
def tokenizer_info(request: Request, model: str | None = Query(default=None)):
    """What a client needs to tokenize as the model does, in vLLM's keys (and gencli's own)."""
    mt = client_of(request).tokenizer_of(model)
    tok = mt.tokenizer
    return {"model": mt.model, "tokenizer_class": "tiktoken", "tokenizer": tok.spec_name,
            "chat_format": mt.chat_format.value, "model_max_length": mt.block_size, "vocab_size": mt.vocab_size,
            "eos_token": ENDOFTEXT if tok.eot_id is not None else None, "eos_token_id": tok.eot_id,
            "bos_token": None, "pad_token": None, "chat_template": None}
