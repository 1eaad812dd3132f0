"""Shared fixtures: the offline cl100k tokenizer, tiny models built in code, a saved model dir."""

from __future__ import annotations

import base64
import os
import signal
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from services import RedisServer, fresh_pg_database, pg_missing, pg_schema, pg_unavailable, pg_url, start_worker

from gencli.model.chat import ChatFormat
from gencli.model.checkpoint import (
    LoadedModel,
    create_model,
    load_model,
    save_model,
    vocab_for,
)
from gencli.model.config import GPTConfig
from gencli.model.gpt import GPT
from gencli.model.tokenizer import Tokenizer, load_encoding
from gencli.storage.settings import get_settings
from gencli.worker.client import Client
from gencli.worker.keys import Keys

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread pool's
# waiting makes them several times slower.
torch.set_num_threads(1)

# A runner that starts pytest with SIGINT ignored (as a shell does a background job without job
# control: `(pytest &)`) passes that on to every process the tests start, and the Ctrl-C tests'
# SIGINT would then do nothing. The processes the tests start get Python's own handler back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)



# The suite runs its files on three processes at once (pyproject's addopts: pytest-xdist, -n 3, one
# file to a process at a time, so a module's Redis, store and workers are built once). The files
# that take longest start first, so that none of them is left to run alone at the end: xdist hands
# out files in this order (--no-loadscope-reorder: else it orders them by their number of tests).
# Measured with --durations on the 2-core machine, longest first; the rest take seconds.
LONGEST_FIRST = ("test_exact.py", "test_takeover.py", "test_docker.py", "test_redis_restart.py", "test_redis_loss.py",
                 "test_queue.py", "test_crash.py", "test_queue_cli.py", "test_batching.py", "test_workers.py",
                 "test_api.py", "test_score.py", "test_lmeval.py", "test_replay.py", "test_api_fuzz.py", "test_store_races.py", "test_demo.py",
                 "test_deployments.py", "test_invariance.py", "test_cli.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order

@pytest.fixture(scope="session", autouse=True)
def _no_gencli_settings_from_the_shell():
    """A developer's GENCLI_DB_URL, GENCLI_REDIS_URL, ... never reach a test (GENCLI_TEST_* stay:
    they configure the tests themselves)."""
    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k.startswith("GENCLI_") and not k.startswith("GENCLI_TEST_"):
                mp.delenv(k)
        yield


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Each test gets its own GENCLI_HOME and no injected faults left over from the shell."""
    monkeypatch.setenv("GENCLI_HOME", str(tmp_path / "gencli-home"))
    monkeypatch.delenv("GENCLI_INJECT_OOM", raising=False)


@pytest.fixture(scope="session")
def cl100k():
    return load_encoding("cl100k_base")


@pytest.fixture(scope="session")
def tok_chatml(cl100k) -> Tokenizer:
    return Tokenizer(cl100k, chatml=True)


@pytest.fixture(scope="session")
def tok_legacy(cl100k) -> Tokenizer:
    return Tokenizer(cl100k, chatml=False)


def build_gpt(
    vocab_size: int, *, seed: int = 0, n_layer: int = 2, n_head: int = 2, n_embd: int = 32, block_size: int = 64,
    prepare: bool = True, widen: bool = True,
) -> GPT:
    """A tiny randomly initialised GPT, ready for inference on the CPU (prepare=False: as built).

    widen: the embeddings are drawn wider than GPT-2's init, so logits are well separated (for
    tests of what a model says: forced tokens, int8 against float32). widen=False keeps GPT-2's
    init, whose logits are all near 0: near-ties everywhere, where a row that rounds differently in
    company than alone picks another id. The batch-invariance tests use that.
    """
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size)
    model = GPT(config)
    if widen:
        with torch.no_grad():
            model.transformer.wte.weight.normal_(0.0, 0.3)
            model.transformer.wpe.weight.normal_(0.0, 0.3)
    return model.prepare_for_inference() if prepare else model


def force_tokens(model: GPT, favoured: dict[int, float]) -> GPT:
    """Make the logits (almost) constant: id -> logit for the favoured ids, about 0 elsewhere.

    ln_f outputs a fixed vector e0 (weight 0, bias e0), so logits = W[:, 0]; the favoured rows of the
    tied matrix get their logit in column 0, every other row a value near 0.
    """
    with torch.no_grad():
        W = model.lm_head.weight
        W[:, 0].normal_(0.0, 0.01)
        for i, logit in favoured.items():
            W[i, 0] = logit
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
    return model.prepare_for_inference()


@pytest.fixture
def make_gpt():
    return build_gpt


@pytest.fixture
def forced():
    return force_tokens


@pytest.fixture
def loaded_for():
    """A LoadedModel around a model built in code (no file), for TextGenerator tests."""

    def make(model: GPT, tok: Tokenizer, fmt: ChatFormat = ChatFormat.CHATML) -> LoadedModel:
        return LoadedModel(model=model, tokenizer=tok, chat_format=fmt, kind="gencli", path=Path("in-memory"))

    return make


@pytest.fixture(scope="session")
def chatml_model_dir(tmp_path_factory, tok_chatml) -> Path:
    """A tiny model saved in gencli's format: cl100k_base, ChatML."""
    model = build_gpt(vocab_for(tok_chatml), seed=1, block_size=128)
    path = tmp_path_factory.mktemp("model") / "tiny"
    return save_model(model, path, tokenizer="cl100k_base", chat_format=ChatFormat.CHATML)


@pytest.fixture(scope="session")
def chatml_loaded(chatml_model_dir) -> LoadedModel:
    return load_model(chatml_model_dir)


def write_ranks(path: Path, tokens: list[bytes]) -> Path:
    """A `.tiktoken` ranks file: base64(token bytes), a space, the rank, one per line."""
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


@pytest.fixture
def byte_ranks_file(tmp_path) -> Path:
    """A ranks file of the 256 single bytes plus a few merges: its <|endoftext|> gets id 260."""
    tokens = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello"]
    return write_ranks(tmp_path / "bytes260.tiktoken", tokens)


# --- the queue: a redis-server of the module's own, a store, worker processes ---------------------
# A test module that uses these shares one redis-server, one store, one namespace and its workers;
# it runs once on SQLite and once on PostgreSQL.


@pytest.fixture(scope="session")
def pg_database():
    """One fresh PostgreSQL database for this test run, dropped at its end; tests make schemas in it.

    Skips, saying why, when no PostgreSQL answers at GENCLI_TEST_PG_URL; fails instead under CI.
    """
    url = pg_url()
    missing = pg_missing(url)
    if missing:
        pg_unavailable(missing)
    with fresh_pg_database(url) as db_url:
        yield db_url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(request, tmp_path_factory):
    """GENCLI_* settings for this module: a redis-server of its own, a store of its own (a SQLite file,
    or a schema of its own in the run's PostgreSQL database), a namespace of its own, short leases.

    env["id"] is unique to this module's run: fixtures put it in the names of the workers they start.
    """
    run_id = uuid.uuid4().hex[:8]
    tmp = tmp_path_factory.mktemp(f"queue-{request.param}")
    with ExitStack() as stack:
        if request.param == "sqlite":
            db_url = f"sqlite:///{tmp / 'store.db'}"
        else:
            db_url = stack.enter_context(pg_schema(request.getfixturevalue("pg_database")))
        server = RedisServer(tmp)
        stack.callback(server.stop)
        namespace = f"t{run_id}"
        values = {
            "GENCLI_HOME": str(tmp / "home"),
            "GENCLI_REDIS_URL": server.url,
            "GENCLI_DB_URL": db_url,
            "GENCLI_NAMESPACE": namespace,
            "GENCLI_LEASE_SECONDS": "3",
        }
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        for k, v in values.items():
            mp.setenv(k, v)
        mp.delenv("GENCLI_INJECT_OOM", raising=False)
        yield {"vars": values, "tmp": tmp, "redis": server, "keys": Keys(namespace), "id": run_id,
               "backend": request.param}


@pytest.fixture
def queue_env(env, monkeypatch):
    """Use with pytestmark = pytest.mark.usefixtures("queue_env"): every test sees the module's settings."""
    for k, v in env["vars"].items():  # the per-test GENCLI_HOME above must not split the module
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def tiny(env):
    return str(create_model(env["tmp"] / "tiny", preset="tiny", tokenizer="cl100k_base", chat_format="chatml", seed=3))


@pytest.fixture(scope="module")
def worker(env, tiny):
    w = start_worker(env, tiny, f"w1-{env['id']}@test")
    yield w
    w.stop()


@pytest.fixture
def client(env):
    return Client(get_settings())
