"""`gencli train`: short real training runs on prep-like data written here.

The fast tests use a byte-level ranks file (a vocab of a few hundred ids); one run trains on
cl100k_base, the real tokenizer, and its checkpoint is served by `gencli generate`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import write_ranks

from gencli.cli.main import main
from gencli.model.chat import ChatFormat, encode_segments, segments
from gencli.model.checkpoint import load_model, save_model, vocab_for
from gencli.model.config import GPTConfig
from gencli.model.gpt import GPT
from gencli.model.tokenizer import Tokenizer, load_encoding
from gencli.model.train import (
    STATE_FILE,
    TrainConfig,
    open_data,
    train,
    unigram_baseline,
    window,
)

EXCHANGES = [
    ("hi there", "hello! how are you today?"),
    ("what is your favourite colour?", "i like blue, it is calm."),
    ("do you like cats?", "yes, cats are great company."),
    ("what did you eat?", "i had pasta with tomato sauce."),
    ("where do you live?", "i live in a small town by the sea."),
    ("good night", "good night, sleep well!"),
]


def conversations(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        for user, reply in rng.sample(EXCHANGES, rng.randint(1, 3)):
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        out.append(messages)
    return out


def write_data(path: Path, tokenizer: str, fmt: str = "chatml", *, n_train: int = 300, n_val: int = 30,
               dtype=np.uint32) -> Path:
    """A prep-like data dir: train/val bins, their assistant masks, meta.json."""
    fmt = ChatFormat(fmt)
    tok = Tokenizer(load_encoding(tokenizer), chatml=fmt is ChatFormat.CHATML)
    path.mkdir(parents=True)
    for split, convs in (("train", conversations(n_train, 1)), ("val", conversations(n_val, 2))):
        ids, mask = [], []
        for messages in convs:
            i, m = encode_segments(tok, segments(fmt, messages, add_generation_prompt=False))
            ids += i + [tok.eot_id]
            mask += m + [False]
        np.array(ids, dtype=dtype).tofile(path / f"{split}.bin")
        np.array(mask, dtype=np.uint8).tofile(path / f"{split}.mask.bin")
    meta = {"tokenizer": tokenizer, "chat_format": fmt.value, "dtype": np.dtype(dtype).name}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def ranks(path: Path, merges: int = 4) -> str:
    """A byte-level ranks file: 256 bytes + `merges` tokens; <|endoftext|> gets id 256 + merges."""
    extra = [b"he", b"ll", b"hell", b"hello", b"th", b"the", b"in", b"an", b"er", b"on"]
    extra += [bytes([a, b]) for a in range(97, 123) for b in range(97, 123)]  # two-letter pairs
    tokens = [bytes([b]) for b in range(256)]
    for t in extra:
        if len(tokens) == 256 + merges:
            break
        if t not in tokens:
            tokens.append(t)
    return str(write_ranks(path, tokens))


def quick(**kw) -> TrainConfig:
    """A run of a few seconds on the byte-level data."""
    base = {"preset": "tiny", "max_iters": 40, "batch_size": 8, "block_size": 32, "lr": 3e-3, "min_lr": 3e-4,
            "warmup_iters": 5, "eval_interval": 20, "eval_iters": 2, "log_interval": 10, "seed": 0, "device": "cpu"}
    return TrainConfig(**(base | kw))


def cli(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bytes")
    return write_data(tmp / "data", ranks(tmp / "bytes260.tiktoken"))


@pytest.mark.slow
def test_cl100k_run_beats_the_unigram_baseline_and_generate_serves_it(tmp_path):
    data = write_data(tmp_path / "data", "cl100k_base", n_train=200, n_val=20)
    events = []
    cfg = quick(max_iters=30, batch_size=4, eval_interval=15, lr=1e-2, warmup_iters=10)
    r = train(data, tmp_path / "out", cfg, progress=events.append)

    assert r.val_loss < r.first_val_loss
    assert r.val_loss < r.baseline - 0.5, (r.val_loss, r.baseline)
    assert r.iters == 30 and r.tokens_per_s > 0
    steps = [e for e in events if type(e).__name__ == "Step"]
    assert steps[-1].loss < steps[0].loss
    meta = json.loads((tmp_path / "out" / "gencli.json").read_text())
    assert (meta["tokenizer"], meta["chat_format"]) == ("cl100k_base", "chatml")

    loaded = load_model(tmp_path / "out")
    assert loaded.model.config.vocab_size == vocab_for(loaded.tokenizer)
    res = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "out"), "--device", "cpu", "--chat",
                                    "--prompt", "do you like cats?", "--max_tokens", "5", "--temperature", "0"])
    assert res.exit_code == 0, res.output


def test_cli_trains_and_prints_val_loss_against_the_baseline(byte_data, tmp_path):
    out = tmp_path / "out"
    r = cli("--data", byte_data, "--out", out, "--max-iters", 20, "--batch_size", 8, "--block-size", 32,
            "--eval-interval", 10, "--eval-iters", 2, "--device", "cpu", "--lr", 0.003)
    assert r.exit_code == 0, r.output
    assert "eval at iter 10" in r.output and "tokens/s" in r.output
    assert "train: 100%" in r.stderr and "20/20" in r.stderr and "tok/s" in r.stderr  # the bar, with its ETA
    last = r.stdout.strip().splitlines()[-2:]
    assert last[0].startswith("val loss ") and " vs unigram baseline " in last[0]
    assert last[1] == f"checkpoint (iter 20): {out}"
    assert load_model(out).chat_format is ChatFormat.CHATML


def test_resume_continues_where_the_run_stopped(byte_data, tmp_path):
    cfg = quick(max_iters=40, lr_decay_iters=40, dtype="float32")
    straight = train(byte_data, tmp_path / "straight", cfg)

    first = train(byte_data, tmp_path / "split", quick(max_iters=20, lr_decay_iters=40, dtype="float32"))
    state = torch.load(tmp_path / "split" / STATE_FILE, weights_only=True)
    assert state["iter_num"] == 20 and first.iters == 20
    assert state["optimizer"]["state"][0]["step"].item() == 20

    events = []
    resumed = train(byte_data, tmp_path / "split", cfg, resume=True, progress=events.append)
    steps = [e.iter for e in events if type(e).__name__ == "Step"]
    assert steps[0] == 30 and resumed.iters == 40  # iterations 21..40 only
    # Same weights, optimizer state and batch RNG as the uninterrupted run: the same losses.
    assert resumed.val_loss == pytest.approx(straight.val_loss, abs=1e-5)
    assert resumed.train_loss == pytest.approx(straight.train_loss, abs=1e-5)
    assert torch.load(tmp_path / "split" / STATE_FILE, weights_only=True)["iter_num"] == 40


def test_resume_through_the_cli_takes_the_saved_config(byte_data, tmp_path):
    out = tmp_path / "out"
    assert train(byte_data, out, quick(max_iters=10, eval_interval=10)).iters == 10
    r = cli("--data", byte_data, "--out", out, "--resume", "--max-iters", 20)
    assert r.exit_code == 0, r.output
    assert "batch 8" in r.output and re.search(r"\| +10/20", r.stderr) and re.search(r"\| +20/20", r.stderr)
    assert not re.search(r"\| +0/20", r.stderr)  # the bar starts where the saved run stopped
    assert torch.load(out / STATE_FILE, weights_only=True)["config"]["block_size"] == 32


def test_init_from_a_legacy_model_fine_tunes_on_chatml_in_its_padding(tmp_path):
    spec = ranks(tmp_path / "bytes260.tiktoken")  # <|endoftext|> 260; ChatML takes 261, 262
    legacy = Tokenizer(load_encoding(spec), chatml=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_for(legacy), n_layer=2, n_head=2, n_embd=64, block_size=64))
    save_model(model, tmp_path / "legacy", tokenizer=spec, chat_format=ChatFormat.LEGACY)
    data = write_data(tmp_path / "data", spec, "chatml")

    r = train(data, tmp_path / "tuned", quick(max_iters=10, eval_interval=10), init_from=tmp_path / "legacy")
    assert r.val_loss < r.first_val_loss
    tuned = load_model(tmp_path / "tuned")
    assert tuned.model.config.vocab_size == 320 == vocab_for(legacy)  # the embedding kept its size
    assert tuned.chat_format is ChatFormat.CHATML
    assert tuned.tokenizer.im_start_id == 261 and tuned.model.config.block_size == 64


def test_init_from_refuses_chatml_ids_beyond_the_vocab(tmp_path):
    spec = ranks(tmp_path / "bytes319.tiktoken", merges=63)  # <|endoftext|> 319: vocab 320 is full
    legacy = Tokenizer(load_encoding(spec), chatml=False)
    save_model(GPT(GPTConfig(vocab_size=vocab_for(legacy), n_layer=1, n_head=1, n_embd=16, block_size=32)),
               tmp_path / "legacy", tokenizer=spec, chat_format=ChatFormat.LEGACY)
    data = write_data(tmp_path / "data", spec, "chatml", n_train=20, n_val=5)
    r = cli("--data", data, "--out", tmp_path / "out", "--init-from", tmp_path / "legacy", "--device", "cpu")
    assert r.exit_code == 1
    assert "vocab_size 320" in r.output and "321" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_init_from_refuses_a_model_of_another_tokenizer(byte_data, tmp_path, chatml_model_dir):
    r = cli("--data", byte_data, "--out", tmp_path / "out", "--init-from", chatml_model_dir)
    assert r.exit_code == 1
    assert "trained with tokenizer cl100k_base" in r.output


def test_assistant_only_scores_only_the_masked_tokens(byte_data, tmp_path):
    data = open_data(byte_data, masks=True)
    x, y = window(data.train, 0, 64, masked=True)
    mask = torch.from_numpy(np.asarray(data.train.mask[1:65], dtype=np.bool_))
    assert (y[mask] == x.new_tensor(np.asarray(data.train.ids[1:65], dtype=np.int64))[mask]).all()
    assert (y[~mask] == -1).all() and mask.any() and not mask.all()

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, n_layer=1, n_head=1, n_embd=16, block_size=64))
    logits, loss = model(x[None], y[None])
    assert loss.item() == pytest.approx(F.cross_entropy(logits[0][mask], y[mask]).item(), rel=1e-5)

    everything = train(byte_data, tmp_path / "all", quick(max_iters=10, eval_interval=10))
    replies = train(byte_data, tmp_path / "replies", quick(max_iters=10, eval_interval=10, assistant_only=True))
    assert replies.baseline != pytest.approx(everything.baseline, abs=0.05)
    assert replies.val_loss < replies.first_val_loss


def test_unigram_baseline_is_val_cross_entropy_under_train_frequencies():
    train_counts = np.array([3.0, 1.0, 0.0, 0.0])  # one singleton: missing mass 1/4 for ids 2 and 3
    val_counts = np.array([1.0, 0.0, 1.0, 0.0])
    expected = -(np.log(3 / 4 * 3 / 4) + np.log(1 / 4 / 2)) / 2
    assert unigram_baseline(train_counts, val_counts) == pytest.approx(expected)
    assert unigram_baseline(np.array([2.0, 2.0]), np.array([5.0, 5.0])) == pytest.approx(np.log(2))


def test_uint16_data_trains(tmp_path):
    data = write_data(tmp_path / "data", ranks(tmp_path / "b.tiktoken"), "legacy", n_train=50, n_val=10,
                      dtype=np.uint16)
    r = train(data, tmp_path / "out", quick(max_iters=4, eval_interval=4))
    assert r.iters == 4 and load_model(tmp_path / "out").chat_format is ChatFormat.LEGACY


def _corrupt(data: Path, what: str) -> None:
    if what == "no meta":
        (data / "meta.json").unlink()
    elif what == "garbled meta":
        (data / "meta.json").write_text("{not json")
    elif what == "bad dtype":
        (data / "meta.json").write_text(json.dumps({"tokenizer": "cl100k_base", "chat_format": "chatml",
                                                    "dtype": "float16"}))
    elif what == "short val":
        np.arange(10, dtype=np.uint32).tofile(data / "val.bin")
    elif what == "odd bytes":
        (data / "train.bin").write_bytes(b"\x01\x02\x03")
    elif what == "id beyond vocab":
        np.full(100, 5000, dtype=np.uint32).tofile(data / "train.bin")


@pytest.mark.parametrize("what, message", [
    ("no meta", "has no meta.json"),
    ("garbled meta", "meta.json is not valid JSON"),
    ("bad dtype", "dtype 'float16'"),
    ("short val", "val.bin holds 10 tokens: too few for block_size 32"),
    ("odd bytes", "not a whole number of uint32 ids"),
    ("id beyond vocab", "holds token id 5000"),
])
def test_bad_data_is_a_one_line_error(tmp_path, what, message):
    data = write_data(tmp_path / "data", ranks(tmp_path / "b.tiktoken"), n_train=20, n_val=5)
    _corrupt(data, what)
    r = cli("--data", data, "--out", tmp_path / "out", "--block-size", 32, "--device", "cpu")
    assert r.exit_code == 1, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/nowhere"], "no data directory at"),
    (["--resume"], "nothing to resume in"),
    (["--resume", "--init-from", "{tmp}/x"], "give --resume or --init-from, not both"),
    (["--max-iters", "0"], "max_iters must be a positive integer"),
    (["--lr", "-1"], "lr must be"),
    (["--block-size", "100000"], "block_size 100000 exceeds the tiny preset's 256"),
    (["--assistant-only", "--data", "{tmp}/nomask"], "assistant-only training needs"),
    (["--lr", "0.1", "--min-lr", "1"], "min_lr 1.0 is above lr 0.1"),
    (["--eval-interval", "-5"], "eval_interval must be a positive integer"),
])
def test_bad_options_are_one_line_errors(byte_data, tmp_path, args, message):
    nomask = tmp_path / "nomask"
    nomask.mkdir()
    for f in ("train.bin", "val.bin", "meta.json"):
        (nomask / f).write_bytes((byte_data / f).read_bytes())
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--data" not in args:
        args = ["--data", str(byte_data), *args]
    r = cli(*args, "--out", tmp_path / "out")
    assert r.exit_code == 1, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_an_existing_checkpoint_is_not_overwritten_without_resume(byte_data, tmp_path):
    train(byte_data, tmp_path / "out", quick(max_iters=2, eval_interval=2))
    r = cli("--data", byte_data, "--out", tmp_path / "out", "--max-iters", 2)
    assert r.exit_code == 1 and "already holds a checkpoint" in r.output
