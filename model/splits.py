"""Reading a `gencli prep` output: meta.json and the flat token files of its splits, as memmaps.

The trainer (train.py) and scoring jobs (`gencli score --data DIR --split val`) read them
alike; nothing here needs torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gencli.model.errors import GencliError

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DataError(GencliError):
    """A prep output that cannot be read: no meta.json, a bad dtype, a missing or torn token file."""


def read_meta(data_dir: Path) -> dict:
    if not data_dir.is_dir():
        raise DataError(f"no data directory at {data_dir}: run `gencli prep` first and pass its --out")
    path = data_dir / "meta.json"
    if not path.is_file():
        raise DataError(f"{data_dir} has no meta.json: is it a `gencli prep` output?")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object")
    for key in ("tokenizer", "chat_format", "dtype"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise DataError(f"{path} has no {key!r} (a string)")
    if meta["dtype"] not in DTYPES:
        raise DataError(f"{path}: dtype {meta['dtype']!r} is not one of {', '.join(DTYPES)}")
    return meta


def memmap_ids(path: Path, dtype) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"missing {path}")
    size = path.stat().st_size
    itemsize = np.dtype(dtype).itemsize
    if size % itemsize:
        raise DataError(f"{path} is {size} bytes, not a whole number of {np.dtype(dtype).name} ids")
    if size == 0:
        raise DataError(f"{path} is empty")
    return np.memmap(path, dtype=dtype, mode="r")


def split_ids(data_dir: str | Path, split: str) -> tuple[dict, np.ndarray]:
    """(meta.json, the split's ids as a memmap) of a prep output."""
    data_dir = Path(data_dir).expanduser()
    meta = read_meta(data_dir)
    return meta, memmap_ids(data_dir / f"{split}.bin", DTYPES[meta["dtype"]])
