"""Saving results with `--out DIR`: one JSON file per result, named by time, never overwritten."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from gencli.model.errors import GencliError


class ResultWriter:
    def __init__(self, out_dir: Path):
        if out_dir.exists() and not out_dir.is_dir():
            raise GencliError(f"--out {out_dir} is a file: give a directory")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GencliError(f"cannot create --out {out_dir}: {e.strerror}") from None
        self.dir = out_dir
        self.stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        self.count = 0

    def save(self, record: dict) -> Path:
        """Write record whole under a fresh name (a temp file linked into place)."""
        tmp = self.dir / f".{self.stamp}-{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        try:
            while True:
                self.count += 1
                path = self.dir / f"{self.stamp}-{self.count:04d}.json"
                try:
                    os.link(tmp, path)  # fails rather than overwrite
                    return path
                except FileExistsError:
                    continue
        finally:
            tmp.unlink(missing_ok=True)
