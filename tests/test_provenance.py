"""What made an output, recorded: the model's content hash and its cache, the tokenizer's hash, the
runtime record, and the store's attempts and item sampling, on a real SQLite file and a real
PostgreSQL (tests/test_store.py's `store_url`)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from test_store import open_stores, store_url  # noqa: F401  (fixtures)

from gencli.model.checkpoint import create_model, load_model
from gencli.model.provenance import (
    HASH_CACHE,
    checkpoint_files,
    determinism,
    model_identity,
    runtime_record,
    tokenizer_record,
)
from gencli.model.tokenizer import Tokenizer, load_encoding
from gencli.storage.db import ItemStatus, JobStatus


@pytest.fixture
def model_dir(tmp_path):
    return create_model(tmp_path / "m", preset="tiny", tokenizer="cl100k_base", chat_format="chatml", seed=1)


def _sha256sum(paths) -> str:
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(paths))
    return hashlib.sha256(lines.encode()).hexdigest()


def test_the_model_hash_covers_weights_and_config_and_is_cached_by_size_and_mtime(model_dir, tmp_path):
    files = checkpoint_files(model_dir)
    assert sorted(p.name for p in files) == ["gencli.json", "model.safetensors"]
    got = model_identity(model_dir, tmp_path / "home")
    assert got["sha256"] == _sha256sum(files)
    weights = model_dir / "model.safetensors"
    assert got["files"]["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    cache = json.loads((model_dir / HASH_CACHE).read_text())
    assert set(cache["files"]) == {"gencli.json", "model.safetensors"}

    # Same size and mtime: the cache answers (the bytes are not read again) ...
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_identity(model_dir, tmp_path / "home")["sha256"] == got["sha256"]
    # ... a new mtime: hashed again, and the cache follows
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    changed = model_identity(model_dir, tmp_path / "home")
    assert changed["sha256"] == _sha256sum(files) != got["sha256"]


def test_a_checkpoint_folder_that_cannot_hold_the_cache_keeps_it_in_gencli_home(model_dir, tmp_path):
    (model_dir / HASH_CACHE).mkdir()  # the cache's name is taken: it cannot be written there
    home = tmp_path / "home"
    got = model_identity(model_dir, home)
    (cached,) = (home / "model-hashes").iterdir()
    assert json.loads(cached.read_text())["files"]["model.safetensors"]["sha256"] == got["files"]["model.safetensors"]
    assert model_identity(model_dir, home) == got


def test_a_nanogpt_file_is_hashed_alone(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"not read as a model here")
    assert checkpoint_files(tmp_path) == [ckpt] == checkpoint_files(ckpt)
    assert model_identity(ckpt)["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_the_tokenizer_hash_tells_formats_and_encodings_apart():
    cl = load_encoding("cl100k_base")
    chatml, legacy = Tokenizer(cl, chatml=True), Tokenizer(cl, chatml=False)
    assert tokenizer_record(chatml) == tokenizer_record(Tokenizer(cl, chatml=True))
    assert tokenizer_record(chatml)["name"] == "cl100k_base"
    assert tokenizer_record(chatml)["ranks_sha256"] != tokenizer_record(legacy)["ranks_sha256"]


def test_the_runtime_record_names_model_tokenizer_dtype_device_and_software(model_dir):
    loaded = load_model(model_dir)
    rec = runtime_record(loaded, "m", model_identity(model_dir))
    assert rec["model"]["name"] == "m" and rec["model"]["path"] == str(model_dir.resolve())
    assert rec["model"]["kind"] == "gencli" and len(rec["model"]["sha256"]) == 64
    assert (rec["dtype"], rec["device"], rec["gpu"], rec["chat_format"]) == ("float32", "cpu", None, "chatml")
    assert rec["batch_invariant"] is True
    assert set(rec["software"]) == {"gencli", "torch", "python", "sampler"} and rec["software"]["sampler"] == 2
    json.dumps(rec)  # what the store keeps
    assert determinism("cuda:0", "bfloat16")["batch_invariant"] is False
    assert "may depend on the batch" in determinism("cuda:0", "bfloat16")["note"]


def test_attempts_are_numbered_under_the_lease_and_item_sampling_is_kept_until_a_retry(store_url, open_stores):  # noqa: F811
    store = open_stores(store_url)
    job, _ = store.create_job(model="m", params={}, items=[{"prompt": "a"}, {"prompt": "b"}])
    assert store.claim(job.id, owner="o1", worker="w1", device="cpu", lease_seconds=30, max_deliveries=3).ok
    assert store.record_attempt(job.id, "o1", worker="w1", provenance={"device": "cpu"}) == 1
    assert store.record_attempt(job.id, "someone else", worker="w9", provenance={}) is None
    big = 2**64 - 1  # the largest seed torch takes survives the store
    assert store.start_items(job.id, "o1", [(0, 0, {"seed": big}), (1, 0, {"seed": 5})])
    assert store.start_items(job.id, "o1", [(0, 0, {"seed": 7})])  # recorded already: kept
    assert not store.start_items(job.id, "someone else", [(1, 0, {"seed": 8})])
    assert [it.sampling["seed"] for it in store.items(job.id)] == [big, 5]
    assert store.save_item(job.id, "o1", 0, epoch=0, status=ItemStatus.SUCCEEDED, output="x", finish_reason="length",
                           prompt_tokens=1, completion_tokens=1, ids=[1], attempt=1, device="cpu", dtype="float32")
    store.release(job.id, "o1")  # a worker shutting down: the next claim is attempt 2 of the record
    assert store.claim(job.id, owner="o2", worker="w2", device="cpu", lease_seconds=30, max_deliveries=3).ok
    assert store.record_attempt(job.id, "o2", worker="w2", provenance={"device": "cpu"}) == 2
    assert store.request_cancel(job.id) == JobStatus.RUNNING.value
    assert store.finish(job.id, "o2", JobStatus.CANCELLED)
    assert [(a.attempt, a.worker) for a in store.attempts(job.id)] == [(1, "w1"), (2, "w2")]
    first, second = store.items(job.id)
    assert (first.attempt, first.device, first.dtype) == (1, "cpu", "float32")
    assert second.status == ItemStatus.CANCELLED.value and second.sampling["seed"] == 5
    assert store.reset_for_retry(job.id) == 1  # the cancelled line, in a new epoch: a new draw
    first, second = store.items(job.id)
    assert second.sampling is None and second.attempt is None and first.sampling["seed"] == big
    assert store.claim(job.id, owner="o3", worker="w3", device="cpu", lease_seconds=30, max_deliveries=3).ok
    assert store.start_items(job.id, "o3", [(1, 1, {"seed": 9})])
    assert store.items(job.id)[1].sampling == {"seed": 9}
