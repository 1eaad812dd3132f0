"""Configuration, read in one place from GENCLI_* environment variables.

CLI options that mirror these variables pass their values in; tests override them with
monkeypatch.setenv.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs


@dataclass(frozen=True)
class Settings:
    home: Path  # GENCLI_HOME: data dir (history, default store, private Redis)

    @classmethod
    def from_env(cls) -> Settings:
        home = os.environ.get("GENCLI_HOME") or platformdirs.user_data_dir("gencli")
        return cls(home=Path(home).expanduser())

    @property
    def history_file(self) -> Path:
        return self.home / "history"


def get_settings() -> Settings:
    return Settings.from_env()
