"""`prepare(spec)`: one source's conversations into nanoGPT token files, reproducibly.

1. Resolve the inputs and hash them; if `out/meta.json` holds the same fingerprint (inputs, flags,
   chat template, prep version) and its files are there, stop: nothing to do.
2. Read every conversation, in file order. The whole input is validated before any file is written;
   meanwhile worker threads encode what has been read (see encode.py).
3. Split by conversation: the dataset's own split (DailyDialog's release folders), else a seeded
   sample of `val_fraction` of the conversations for val (at least one when there are two or more).
4. Write `train.bin`, `val.bin` (and `test.bin` for a given test split), with `.mask.bin` beside each
   when asked, then `meta.json`, each atomically (see writer.py). Each output's sha256 is taken over
   the bytes as they are written (no second read) and kept in meta.json's "outputs", beside the
   inputs' hashes; a skipped run (step 1) checks the files' sizes, not their hashes.
The same inputs and spec give the same bytes, meta.json included. The ids are held in memory until
they are written (4 bytes a token, 5 with a mask): fine for chat datasets of some GB of text.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from gencli.model.chat import ChatFormat
from gencli.model.provenance import file_sha256
from gencli.model.tokenizer import Tokenizer, load_encoding
from gencli.prep import chat, chitchat, dailydialog
from gencli.prep.common import InputFile, Problems
from gencli.prep.encode import ConversationEncoder, Encoded
from gencli.prep.spec import PrepError, PrepResult, PrepSpec
from gencli.prep.writer import atomic_files, read_meta, write_meta

PREP_VERSION = 2  # of the output format: bump when the same spec would write different bytes
THREADS = 2  # tokenizer threads
PIECE_TURNS = 8192  # turns per encode call (about 0.5 MB of chitchat text)
PROGRESS_INTERVAL = 0.1  # seconds
SPLITS = ("train", "val", "test")
SOURCES = {"chat": chat, "chitchat": chitchat, "dailydialog": dailydialog}
HASHED = ("sha256: of each input as read before the run, of each output's bytes as written; "
          "a skipped (up-to-date) run checks the outputs' sizes, not their hashes")

Progress = Callable[[int, int], None]


def prepare(spec: PrepSpec, *, force: bool = False, progress: Progress | None = None) -> PrepResult:
    """Prepare spec.out from spec's source; `progress(done, total)` conversations, ~10 times a second."""
    fmt = ChatFormat(spec.format)
    source = SOURCES[spec.source]
    inputs = source.inputs(spec.paths)
    hashes = [_hash(i.path) for i in inputs]
    tok = _tokenizer(spec.tokenizer, fmt is ChatFormat.CHATML)
    encoder = ConversationEncoder(tok, fmt, loss_mask=spec.loss_mask)
    fp = fingerprint(spec, inputs, hashes, encoder.signature)
    out = Path(spec.out).expanduser()
    if out.exists() and not out.is_dir():
        raise PrepError(f"--out {out} is a file: give a folder")
    if not force and (meta := up_to_date(out, fp)) is not None:
        return PrepResult(meta, skipped=True)

    problems = Problems(spec.skip_bad)
    pool = ThreadPoolExecutor(THREADS, thread_name_prefix="gencli-prep")
    try:
        read = _read(source, inputs, problems, encoder, pool)
        if not read.turns:
            skipped = f" ({problems.count} malformed skipped)" if problems.count else ""
            raise PrepError(f"no conversations in {', '.join(str(i.path) for i in inputs)}{skipped}")
        names, assign, method = _split(spec, inputs, read.splits)
        try:
            written = _write(out, read.pieces, assign, names, tok, spec.loss_mask, progress)
        except OSError as e:
            raise PrepError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        pool.shutdown(cancel_futures=True)

    meta = _meta(spec, fp, inputs, hashes, tok, encoder, read, names, assign, method, written, problems)
    try:
        write_meta(out, meta)
    except OSError as e:
        raise PrepError(f"cannot write {out / 'meta.json'}: {e.strerror or e}") from None
    return PrepResult(meta, skipped=False)


def _hash(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as e:
        raise PrepError(f"cannot read {path}: {e.strerror or e}") from None


@lru_cache(maxsize=8)
def _tokenizer(name: str, chatml: bool) -> Tokenizer:
    return Tokenizer(load_encoding(name), chatml=chatml)  # building one costs ~0.1 s for cl100k


def fingerprint(spec: PrepSpec, inputs: list[InputFile], hashes: list[str], render_signature: str) -> str:
    """sha256 over the inputs' contents, the spec less `out`, the chat template and PREP_VERSION."""
    fields = spec.to_dict()
    del fields["out"]
    tok_path = Path(spec.tokenizer).expanduser()
    payload = {
        "prep_version": PREP_VERSION,
        "spec": fields,
        "inputs": [[i.split, h] for i, h in zip(inputs, hashes, strict=True)],
        "tokenizer_file": file_sha256(tok_path) if tok_path.is_file() else None,
        "render": render_signature,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def up_to_date(out: Path, fp: str) -> dict | None:
    """out's meta.json when it has this fingerprint and every file it lists is there, whole."""
    meta = read_meta(out)
    if meta is None or meta.get("fingerprint") != fp:
        return None
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        for name, files in meta["files"].items():
            tokens = meta["counts"][name]["tokens"]
            if (out / files["tokens"]).stat().st_size != tokens * itemsize:
                return None
            if "mask" in files and (out / files["mask"]).stat().st_size != tokens:
                return None
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return meta


@dataclass
class _Read:
    pieces: list[Future[Encoded]] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)  # per conversation
    splits: list[str | None] = field(default_factory=list)  # per conversation: a given split, or None


def _read(source, inputs: list[InputFile], problems: Problems, encoder: ConversationEncoder, pool) -> _Read:
    """Every conversation of the inputs, validated; each full piece is rendered here and encoded on the pool."""
    read = _Read()
    batch: list = []
    turns = 0
    for inp in inputs:
        for conv in source.read(inp, problems):
            batch.append(conv.messages)
            read.turns.append(len(conv.messages))
            read.splits.append(conv.split)
            turns += len(conv.messages)
            if turns >= PIECE_TURNS:
                read.pieces.append(pool.submit(encoder.encode, encoder.render(batch)))
                batch, turns = [], 0
    if batch:
        read.pieces.append(pool.submit(encoder.encode, encoder.render(batch)))
    return read


def _meta(spec: PrepSpec, fp: str, inputs: list[InputFile], hashes: list[str], tok: Tokenizer,
          encoder: ConversationEncoder, read: _Read, names: list[str], assign: np.ndarray, method: str,
          written: _Written, problems: Problems) -> dict:
    """What meta.json holds: everything needed to train on the files and to compare runs."""
    turns = np.array(read.turns, dtype=np.int64)
    counts = {}
    for j, name in enumerate(names):
        sel = assign == j
        counts[name] = {"conversations": int(sel.sum()), "turns": int(turns[sel].sum()), "tokens": written.tokens[j]}
    total_tokens = sum(written.tokens)
    return {
        "prep_version": PREP_VERSION,
        "fingerprint": fp,
        "source": spec.source,
        "inputs": [
            {"path": str(i.path), "split": i.split, "sha256": h, "bytes": i.path.stat().st_size}
            for i, h in zip(inputs, hashes, strict=True)
        ],
        "tokenizer": spec.tokenizer,
        "encoding": tok.spec_name,
        "vocab_size": tok.max_used_id + 1,
        "chat_format": spec.format,
        "special_ids": {
            "endoftext": tok.eot_id,
            **({"im_start": tok.im_start_id, "im_end": tok.im_end_id} if tok.chatml else {}),
        },
        "dtype": written.dtype,
        "files": {
            name: {"tokens": f"{name}.bin", **({"mask": f"{name}.mask.bin"} if spec.loss_mask else {})}
            for name in names
        },
        "outputs": written.outputs,
        "hashed": HASHED,
        "split": {"method": method, "seed": spec.seed, "val_fraction": spec.val_fraction},
        "loss_mask": spec.loss_mask,
        "counts": counts,
        "total": {
            "conversations": len(assign),
            "turns": int(turns.sum()),
            "tokens": total_tokens,
        },
        # template and <|endoftext|> tokens included: what a turn costs in this format
        "mean_tokens_per_turn": round(total_tokens / max(int(turns.sum()), 1), 3),
        "literal_special_strings": {s: written.literals.get(s, 0) for s in encoder.literal_strings},
        "malformed": {"skipped": problems.count, "first": problems.first},
    }


def _split(spec: PrepSpec, inputs: list[InputFile], tags: list[str | None]) -> tuple[list[str], np.ndarray, str]:
    """(split names, split index per conversation, method)."""
    if tags[0] is not None:  # the dataset's own split
        given = {i.split for i in inputs}
        names = [s for s in SPLITS if s in given]
        index = {s: j for j, s in enumerate(names)}
        return names, np.array([index[t] for t in tags], dtype=np.int64), "given"
    n = len(tags)
    assign = np.zeros(n, dtype=np.int64)
    if n >= 2:
        n_val = min(n - 1, max(1, round(n * spec.val_fraction)))
        assign[random.Random(spec.seed).sample(range(n), n_val)] = 1
    return ["train", "val"], assign, "seeded"


@dataclass
class _Written:
    dtype: str
    tokens: list[int]  # per split
    literals: Counter
    outputs: dict[str, dict] = field(default_factory=dict)  # file name -> {"sha256", "bytes"} of what was written


def _write(out: Path, pieces: list[Future[Encoded]], assign: np.ndarray, names: list[str], tok: Tokenizer,
           loss_mask: bool, progress: Progress | None) -> _Written:
    dtype = np.dtype(np.uint16 if tok.max_used_id < 1 << 16 else np.uint32)
    bins = [f"{s}.bin" for s in names]
    masks = [f"{s}.mask.bin" for s in names] if loss_mask else []
    every = {f"{s}{ext}" for s in SPLITS for ext in (".bin", ".mask.bin")}
    written = _Written(dtype.name, [0] * len(names), Counter())
    total = len(assign)
    done = 0
    last = time.monotonic()
    if progress:
        progress(0, total)
    digests = {name: hashlib.sha256() for name in bins + masks}
    sizes = dict.fromkeys(bins + masks, 0)
    with atomic_files(out, bins + masks, remove=every - set(bins + masks)) as files:

        def put(name: str, data: bytes) -> None:
            files[name].write(data)
            digests[name].update(data)
            sizes[name] += len(data)

        for future in pieces:
            enc = future.result()
            k = len(enc.lengths)
            which = assign[done : done + k]
            per_token = None if (which == which[0]).all() else np.repeat(which, enc.lengths)
            for j, name in enumerate(names):
                if per_token is None and which[0] != j:
                    continue
                ids, mask = (enc.ids, enc.mask) if per_token is None else _select(enc, per_token == j)
                put(f"{name}.bin", ids.astype(dtype, copy=False).tobytes())
                if loss_mask:
                    put(f"{name}.mask.bin", mask.astype(np.uint8).tobytes())
                written.tokens[j] += len(ids)
            written.literals.update(enc.literals)
            done += k
            if progress and time.monotonic() - last >= PROGRESS_INTERVAL:
                progress(done, total)
                last = time.monotonic()
    if progress:
        progress(done, total)
    written.outputs = {name: {"sha256": digests[name].hexdigest(), "bytes": sizes[name]}
                       for name in sorted(digests)}
    return written


def _select(enc: Encoded, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    return enc.ids[sel], None if enc.mask is None else enc.mask[sel]
