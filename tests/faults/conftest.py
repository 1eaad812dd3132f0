"""Fixtures of the fault tests: a store URL on SQLite and on PostgreSQL, for tests below the queue."""

from __future__ import annotations

import pytest
from services import pg_schema


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """An empty store: a SQLite file in tmp_path, or a schema of its own in the run's PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    with pg_schema(request.getfixturevalue("pg_database")) as url:
        yield url
