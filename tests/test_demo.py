"""The README's main job, `gencli demo`, end to end (with a short training run)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gencli.cli.main import main
from gencli.worker.keys import Keys

# The demo is the README's main job on its default store, SQLite: once is enough (the queue's
# PostgreSQL path is run by the queue and fault tests).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("queue_env"),
              pytest.mark.parametrize("env", ["sqlite"], indirect=True)]


def test_demo_preps_trains_serves_and_streams_then_reuses_its_steps(env, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi! How are you?\nDo you like music?\n")
    args = ["demo", "--prompt_file", str(prompts), "--max_tokens", "8", "--train-iters", "20"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "=== line 1 ===" in first.stdout and "=== line 2 ===" in first.stdout
    assert "[1/4] dataset" in first.stderr and "written" in first.stderr
    assert "[2/4] model" in first.stderr and "vs unigram baseline" in first.stderr
    assert "[3/4] started a worker for chitchat-tiny" in first.stderr
    assert "succeeded]" in first.stderr
    home = env["tmp"] / "home" / "demo"
    meta = json.loads((home / "data" / "chitchat-chatml" / "meta.json").read_text())
    assert meta["chat_format"] == "chatml" and sum(c["conversations"] for c in meta["counts"].values()) == 7168
    assert (home / "models" / "chitchat-tiny" / "gencli.json").exists()

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "up to date" in again.stderr and "trained already" in again.stderr
    r = env["redis"].client()
    namespace = env["vars"].get("GENCLI_NAMESPACE")
    beats = Keys(namespace).worker("*") if namespace else Keys("*").worker("*")  # every namespace's
    assert not [k for k in r.scan_iter(beats) if b"chitchat-tiny" in (r.get(k) or b"")]  # stopped


def test_demo_without_redis_says_so_before_any_work(env, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    monkeypatch.setenv("GENCLI_REDIS_URL", dead)
    monkeypatch.setenv("GENCLI_HOME", str(env["tmp"] / "home-no-redis"))
    r = CliRunner().invoke(main, ["demo", "--train-iters", "20"])
    assert r.exit_code == 1 and "does not answer" in r.output and "Traceback" not in r.output, r.output
    assert "[1/4]" not in r.output and not (env["tmp"] / "home-no-redis" / "demo" / "data").exists()
