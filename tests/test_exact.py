"""bench.exact's CI size: the promises under real load, with faults, against the oracle.

Real clients at once (the `openai` client, SSE followers, the Python client, `gencli submit`, the
Batch API) against a real `gencli serve` and two real workers, on weights with near-ties, at
temperature 1 and 0, while a worker is killed, one is stopped past its lease and Redis restarts
empty: every stored line must equal the line run alone, every client's view the store, every job
end once, and `gencli replay` say equal (bench/exact.py says how each is checked).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from services import child_env, in_ci, pg_missing, pg_url

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_real_clients_through_faults_get_exactly_what_each_line_gives_alone(backend):
    if backend == "postgresql" and (missing := pg_missing(pg_url())):
        if in_ci():
            pytest.fail(missing)
        pytest.skip(missing)
    cmd = [sys.executable, "-m", "bench.exact", "--quick", "--json"] + (["--sqlite"] if backend == "sqlite" else [])
    env = child_env({"GENCLI_TEST_PG_URL": pg_url()})
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.stdout.strip(), done.stderr[-4000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    report = done.stderr[-4000:]
    assert done.returncode == 0 and res["pass"], report
    counts = {k: res[k] for k in ("differing", "stream_mismatches", "lost", "duplicated", "hung", "replay_differ")}
    assert counts == dict.fromkeys(counts, 0), report
    assert res["jobs"] == 64 and res["lines"] >= 100 and res["replay_equal"] > 0, report  # it really ran the load
    assert len(res["faults"]) == 3 and not res["faults_missing"], report
    assert set(res["kinds"]) == {"completion", "chat", "disconnect", "jobs", "client", "cli", "batch"}, report
