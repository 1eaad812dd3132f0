"""Shared fixtures: the offline cl100k tokenizer, tiny models built in code, a saved model dir."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
from services import RedisServer, start_worker

from gencli.model.chat import ChatFormat
from gencli.model.checkpoint import (
    LoadedModel,
    create_model,
    load_model,
    save_model,
    vocab_for,
)
from gencli.model.gpt import GPT, GPTConfig
from gencli.model.tokenizer import Tokenizer, load_encoding
from gencli.storage.settings import get_settings
from gencli.worker.client import Client

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread pool's
# waiting makes them several times slower.
torch.set_num_threads(1)


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
    vocab_size: int, *, seed: int = 0, n_layer: int = 2, n_head: int = 2, n_embd: int = 32, block_size: int = 64
) -> GPT:
    """A tiny randomly initialised GPT, ready for inference on the CPU.

    The weights are drawn wider than GPT-2's init so logits are well separated: greedy choices are
    not near-ties that float rounding (batch vs alone) could flip.
    """
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size)
    model = GPT(config)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 0.3)
        model.transformer.wpe.weight.normal_(0.0, 0.3)
    return model.prepare_for_inference()


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


# --- the queue: a Redis database of the tests' own, a store, worker processes -------------------
# A test module that uses these shares one store, one Redis database and its workers.


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """GENCLI_* settings for this module: its own store, a Redis database of its own, short leases."""
    tmp = tmp_path_factory.mktemp("queue")
    server = RedisServer(tmp)
    server.flush()
    values = {
        "GENCLI_HOME": str(tmp / "home"),
        "GENCLI_REDIS_URL": server.url,
        "GENCLI_DB_URL": f"sqlite:///{tmp / 'store.db'}",
        "GENCLI_LEASE_SECONDS": "3",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        mp.delenv("GENCLI_INJECT_OOM", raising=False)
        yield {"vars": values, "tmp": tmp, "redis": server}
    server.flush()
    server.stop()


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
    w = start_worker(env, tiny, "w1@test")
    yield w
    w.stop()


@pytest.fixture
def client(env):
    return Client(get_settings())
