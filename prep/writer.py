"""The token files of a prep run, written so that a killed run leaves no partial file behind.

Every file is written as `<name>.tmp-<pid>` in the output folder, fsynced, and renamed to its name
only when all of them are complete; `meta.json` is written the same way, last, and is the record
that the folder is complete. Before the first byte, the folder's previous meta.json and token files
are removed (so a half-replaced folder never claims to be complete), and so are temp files left by
killed runs (a process that no longer exists). On an error or Ctrl-C the temp files are removed.

Token files are nanoGPT's: the ids back to back in one dtype (`np.memmap(path, dtype, mode="r")`);
mask files hold one uint8 per id.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

META = "meta.json"
_TMP = re.compile(r"^(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear(out: Path, names: Iterable[str]) -> None:
    """Remove meta.json first, then the named outputs and dead runs' temp files of any of them."""
    names = set(names) | {META}
    for name in [META, *sorted(names - {META})]:
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass
    for p in out.iterdir():
        m = _TMP.match(p.name)
        if m and m["name"] in names and not _pid_alive(int(m["pid"])):
            p.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_files(out: Path, names: list[str], *, remove: Iterable[str] = ()) -> Iterator[dict[str, BinaryIO]]:
    """Open temp files for `names` in `out`; on a clean exit fsync and rename all of them into place.

    `remove`: other outputs of earlier runs that this run does not write (cleared with the rest).
    """
    out.mkdir(parents=True, exist_ok=True)
    clear(out, [*names, *remove])
    tmp = {name: out / f"{name}.tmp-{os.getpid()}" for name in names}
    files: dict[str, BinaryIO] = {}
    try:
        for name in names:
            files[name] = open(tmp[name], "wb")
        yield files
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for name in names:
            os.replace(tmp[name], out / name)
        _fsync_dir(out)
    except BaseException:
        for name, f in files.items():
            f.close()
            tmp[name].unlink(missing_ok=True)
        raise


def write_meta(out: Path, meta: dict) -> None:
    """meta.json, atomically: the last file of a run."""
    data = (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode()
    tmp = out / f"{META}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / META)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out)


def read_meta(out: Path) -> dict | None:
    try:
        meta = json.loads((out / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None
