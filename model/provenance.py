"""What made an output: the model's content hash, the tokenizer's, the runtime and the software.

A worker computes `model_identity` once when it loads a model and records `runtime_record` with
every attempt of every job it runs (store.record_attempt); `gencli show --provenance`, `results`
and `replay` read it back.

The model hash is sha256 over the checkpoint's files (weights and the config beside them: both
decide the output), cached beside the checkpoint in `.gencli-sha256.json`, keyed by each file's
size and mtime, so a worker that loads an unchanged model does not read its weights twice. Where
the checkpoint's folder is read-only, the cache lives in `$GENCLI_HOME/model-hashes/` instead.

Determinism: a row computes bit for bit what it computes alone (model/engine.py), so on the CPU in
float32, and in int8 (exact integer products of rows quantized each on its own: model/kernels.py),
a greedy or seeded output does not depend on its batch, and a replay gives the same bytes.
In bf16 or fp16 on a GPU the kernels a step picks may depend on the batch's shape, so seeded and
greedy outputs may differ with the batch; the record says which holds.

torch is imported only where a model is at hand: the client reads the records without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path

HASH_CACHE = ".gencli-sha256.json"


def checkpoint_files(path: Path) -> list[Path]:
    """The files a checkpoint is read from (model/checkpoint.py's kinds): weights and config."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.name == "gencli.json" or (path.suffix == ".safetensors" and (path.parent / "gencli.json").is_file()):
            return checkpoint_files(path.parent)
        return [path]  # a nanoGPT ckpt.pt: config and weights in one file
    if (path / "gencli.json").is_file():
        names = ["gencli.json", "model.safetensors"]
    elif (path / "config.json").is_file():
        names = ["config.json", "model.safetensors" if (path / "model.safetensors").is_file() else "pytorch_model.bin"]
    else:
        names = ["ckpt.pt"]
    return [path / n for n in names if (path / n).is_file()]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def model_identity(path: str | os.PathLike, home: Path | None = None) -> dict:
    """{"sha256": the checkpoint's content hash, "files": {name: sha256}}, from the cache where
    each file's size and mtime are unchanged. One file: its own hash; several: the hash of their
    `sha256sum` lines (hash, two spaces, name), sorted by name."""
    files = checkpoint_files(Path(path))
    if not files:
        raise FileNotFoundError(f"no checkpoint files at {path}")
    folder = files[0].parent
    cache_paths = [folder / HASH_CACHE] + ([_home_cache(home, folder)] if home else [])
    cached = {}
    for p in cache_paths:
        try:
            cached |= json.loads(p.read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):
            pass
    hashes, fresh = {}, False
    for f in files:
        st = f.stat()
        entry = cached.get(f.name)
        if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            hashes[f.name] = entry["sha256"]
            continue
        hashes[f.name] = file_sha256(f)
        cached[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hashes[f.name]}
        fresh = True
    if fresh:
        _write_cache(cache_paths, {"files": {n: cached[n] for n in hashes}})
    if len(hashes) == 1:
        digest = next(iter(hashes.values()))
    else:
        lines = "".join(f"{hashes[n]}  {n}\n" for n in sorted(hashes))
        digest = hashlib.sha256(lines.encode()).hexdigest()
    return {"sha256": digest, "files": hashes}


def _home_cache(home: Path, folder: Path) -> Path:
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    return Path(home) / "model-hashes" / f"{key}.json"


def _write_cache(paths: list[Path], data: dict) -> None:
    """Beside the checkpoint when its folder is writable, else in GENCLI_HOME; neither: not cached."""
    for p in paths:
        tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, p)
            return
        except OSError:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


@lru_cache(maxsize=16)
def _ranks_sha256(encoding) -> str:
    h = hashlib.sha256()
    for token, rank in sorted(encoding._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    for text, rank in sorted(encoding._special_tokens.items(), key=lambda kv: kv[1]):
        h.update(b"\xff" + rank.to_bytes(4, "little") + text.encode())
    return h.hexdigest()


def tokenizer_record(tokenizer) -> dict:
    """The tokenizer's name and the hash of its ranks and special tokens (ChatML's included)."""
    return {"name": tokenizer.spec_name, "ranks_sha256": _ranks_sha256(tokenizer.encoding)}


def software() -> dict:
    """The versions that made an output."""
    import torch

    try:
        gencli = metadata.version("gencli")
    except metadata.PackageNotFoundError:
        gencli = "unknown"
    from gencli.model.sampler import SAMPLER_VERSION

    return {"gencli": gencli, "torch": torch.__version__, "python": platform.python_version(),
            "sampler": SAMPLER_VERSION}


def determinism(device: str, dtype: str) -> dict:
    """Whether a greedy or seeded output is independent of its batch, and replays byte for byte."""
    if device.startswith("cpu") and dtype in ("float32", "int8"):
        return {"batch_invariant": True,
                "note": f"{dtype} on the CPU: the same bytes alone, in any batch, resumed or replayed"}
    return {"batch_invariant": False,
            "note": f"{dtype} on {device}: greedy and seeded outputs may depend on the batch they ran in"}


def gpu_name(device) -> str | None:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return None


def runtime_record(loaded, name: str, identity: dict) -> dict:
    """One attempt's provenance: model (name, path, kind, hashes), tokenizer, chat format, dtype,
    device (and GPU), software, and the determinism that holds for it."""
    dev = loaded.device
    dtype = loaded.dtype
    return {
        "model": {"name": name, "path": str(Path(loaded.path).resolve()), "kind": loaded.kind, **identity},
        "tokenizer": tokenizer_record(loaded.tokenizer),
        "chat_format": loaded.chat_format.value,
        "dtype": dtype,
        "device": str(dev),
        "gpu": gpu_name(dev),
        "software": software(),
        **determinism(str(dev), dtype),
    }
