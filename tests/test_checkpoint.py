"""Checkpoints: gencli's format, nanoGPT ckpt.pt, Hugging Face GPT-2; and what is refused."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from gencli.model.chat import ChatFormat
from gencli.model.checkpoint import META_FILE, WEIGHTS_FILE, create_model, load_model, save_model, vocab_for
from gencli.model.errors import CheckpointError

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])


def logits_of(model, ids=IDS):
    with torch.inference_mode():
        return model(ids)[0]


def assert_one_line_refusal(exc_info):
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, msg
    return msg


# --- gencli's own format ---------------------------------------------------------------------


def test_gencli_round_trip(tmp_path, make_gpt, tok_chatml):
    model = make_gpt(vocab_for(tok_chatml), seed=4)
    path = save_model(model, tmp_path / "m", tokenizer="cl100k_base", chat_format=ChatFormat.CHATML)
    assert sorted(p.name for p in path.iterdir()) == [META_FILE, WEIGHTS_FILE]  # no .tmp left
    meta = json.loads((path / META_FILE).read_text())
    assert meta["tokenizer"] == "cl100k_base" and meta["chat_format"] == "chatml"
    assert meta["config"]["vocab_size"] == vocab_for(tok_chatml) and meta["config"]["n_embd"] == 32
    loaded = load_model(path)
    assert loaded.kind == "gencli"
    assert loaded.chat_format is ChatFormat.CHATML
    assert loaded.tokenizer.chatml and loaded.tokenizer.im_end_id == 100265
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(logits_of(loaded.model), logits_of(model), rtol=1e-5, atol=1e-5)
    # The weights file or gencli.json also name the model.
    for p in (path / WEIGHTS_FILE, path / META_FILE):
        torch.testing.assert_close(logits_of(load_model(p).model), logits_of(model), rtol=1e-5, atol=1e-5)


def test_gencli_legacy_format_and_overrides(tmp_path, make_gpt, tok_legacy):
    model = make_gpt(vocab_for(tok_legacy), seed=5)
    path = save_model(model, tmp_path / "m", tokenizer="cl100k_base", chat_format=ChatFormat.LEGACY)
    loaded = load_model(path)
    assert loaded.chat_format is ChatFormat.LEGACY and not loaded.tokenizer.chatml
    assert load_model(path, chat_format="chatml").chat_format is ChatFormat.CHATML


def test_create_model_tiny(tmp_path):
    path = create_model(tmp_path / "tiny", preset="tiny", tokenizer="cl100k_base", chat_format="legacy")
    loaded = load_model(path)
    assert loaded.model.config.vocab_size == 100288
    assert loaded.model.config.n_layer == 2 and loaded.model.config.block_size == 256
    assert loaded.chat_format is ChatFormat.LEGACY


# --- nanoGPT ---------------------------------------------------------------------------------


def nanogpt_ckpt(model, **extra) -> dict:
    """What nanoGPT's train.py saves after torch.compile: prefixed keys, causal-mask buffers."""
    cfg = model.config
    state = {f"_orig_mod.{k}": v.clone() for k, v in model.state_dict().items()}
    for i in range(cfg.n_layer):
        n = cfg.block_size
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    model_args = dict(
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
        bias=cfg.bias, vocab_size=cfg.vocab_size, dropout=0.0,
    )  # fmt: skip
    return {
        "model": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.95)}]},
        "model_args": model_args,
        "iter_num": 5,
        "best_val_loss": torch.tensor(3.21),
        "config": {"batch_size": 12, "learning_rate": 6e-4, "dataset": "openwebtext", "compile": True},
        **extra,
    }


def test_nanogpt_checkpoint(tmp_path, make_gpt, tok_legacy):
    model = make_gpt(vocab_for(tok_legacy), seed=6)
    out = tmp_path / "out"
    out.mkdir()
    torch.save(nanogpt_ckpt(model), out / "ckpt.pt")
    for path in (out / "ckpt.pt", out):
        loaded = load_model(path, tokenizer="cl100k_base")
        assert loaded.kind == "nanogpt"
        assert loaded.chat_format is ChatFormat.LEGACY
        torch.testing.assert_close(logits_of(loaded.model), logits_of(model), rtol=1e-5, atol=1e-5)


def test_nanogpt_checkpoint_records_tokenizer(tmp_path, make_gpt, tok_chatml):
    model = make_gpt(vocab_for(tok_chatml), seed=7)
    torch.save(nanogpt_ckpt(model, tokenizer="cl100k_base", chat_format="chatml"), tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt")
    assert loaded.chat_format is ChatFormat.CHATML and loaded.tokenizer.spec_name == "cl100k_base"


def test_nanogpt_without_model_args_refused(tmp_path, make_gpt):
    torch.save({"model": make_gpt(300).state_dict()}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="model_args") as e:
        load_model(tmp_path / "ckpt.pt", tokenizer="cl100k_base")
    assert_one_line_refusal(e)


def test_weights_that_do_not_match_config_refused(tmp_path, make_gpt, tok_legacy):
    ckpt = nanogpt_ckpt(make_gpt(vocab_for(tok_legacy), seed=8))
    ckpt["model_args"]["n_layer"] = 3
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="do not match") as e:
        load_model(tmp_path / "ckpt.pt", tokenizer="cl100k_base")
    assert_one_line_refusal(e)


# --- Hugging Face GPT-2 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=260, eos_token_id=260
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # Wide random weights everywhere (LayerNorms included), so a wrong transpose shows plainly.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def hf_logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids).logits


def test_huggingface_safetensors(tmp_path, hf_model, byte_ranks_file):
    hf_model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    loaded = load_model(tmp_path / "hf", tokenizer=str(byte_ranks_file))
    assert loaded.kind == "huggingface"
    ref = hf_logits(hf_model)
    torch.testing.assert_close(logits_of(loaded.model), ref, rtol=0, atol=1e-4)
    # The tolerance is tight enough to catch a missed transpose of even a square Conv1D weight.
    loaded.model.train()  # the plain weights back from the inference kernels', to edit one
    with torch.no_grad():
        w = loaded.model.transformer.h[0].attn.c_proj.weight
        w.copy_(w.t().clone())
    assert (logits_of(loaded.model.prepare_for_inference()) - ref).abs().max() > 1e-2


def test_huggingface_pytorch_model_bin(tmp_path, hf_model, byte_ranks_file):
    """The original GPT-2 upload's layout: GPT2Model keys (no `transformer.`), mask buffers, no head."""
    d = tmp_path / "hf-bin"
    hf_model.config.save_pretrained(d)
    state = {}
    for k, v in hf_model.state_dict().items():
        if k == "lm_head.weight":
            continue
        state[k.removeprefix("transformer.")] = v.clone()
    for i in range(hf_model.config.n_layer):
        n = hf_model.config.n_positions
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, d / "pytorch_model.bin")
    loaded = load_model(d, tokenizer=str(byte_ranks_file))
    assert loaded.kind == "huggingface"
    torch.testing.assert_close(logits_of(loaded.model), hf_logits(hf_model), rtol=0, atol=1e-4)


def test_huggingface_config_without_weights_refused(tmp_path, hf_model, byte_ranks_file):
    hf_model.config.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin") as e:
        load_model(tmp_path / "hf", tokenizer=str(byte_ranks_file))
    assert_one_line_refusal(e)


def test_huggingface_truncated_safetensors_refused(tmp_path, hf_model, byte_ranks_file):
    hf_model.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_model(tmp_path / "hf", tokenizer=str(byte_ranks_file))
    assert_one_line_refusal(e)


# --- refusals --------------------------------------------------------------------------------


def test_missing_path_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no model at") as e:
        load_model(tmp_path / "nowhere")
    assert_one_line_refusal(e)


def test_empty_dir_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint") as e:
        load_model(tmp_path / "empty")
    assert_one_line_refusal(e)


def test_truncated_ckpt_refused(tmp_path, make_gpt, tok_legacy):
    f = tmp_path / "ckpt.pt"
    torch.save(nanogpt_ckpt(make_gpt(vocab_for(tok_legacy), seed=9)), f)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_model(f, tokenizer="cl100k_base")
    assert_one_line_refusal(e)


@pytest.mark.parametrize("garbage", [bytes(range(256)) * 64, b"hello, this is not a checkpoint\n" * 10, b""])
def test_garbage_ckpt_refused(tmp_path, garbage):
    f = tmp_path / "ckpt.pt"
    f.write_bytes(garbage)
    with pytest.raises(CheckpointError) as e:
        load_model(f, tokenizer="cl100k_base")
    assert_one_line_refusal(e)


def test_garbage_ckpt_is_called_corrupt_not_unsafe(tmp_path):
    """Random bytes are not a pickle that runs code: the message should say corrupt (see report)."""
    f = tmp_path / "ckpt.pt"
    f.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CheckpointError) as e:
        load_model(f, tokenizer="cl100k_base")
    msg = assert_one_line_refusal(e)
    assert "corrupt" in msg and "run code" not in msg


def test_truncated_gencli_safetensors_refused(tmp_path, make_gpt, tok_chatml):
    path = save_model(make_gpt(vocab_for(tok_chatml)), tmp_path / "m", tokenizer="cl100k_base", chat_format="chatml")
    f = path / WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_model(path)
    assert_one_line_refusal(e)


def test_gencli_meta_without_weights_or_bad_json_refused(tmp_path, make_gpt, tok_chatml):
    path = save_model(make_gpt(vocab_for(tok_chatml)), tmp_path / "m", tokenizer="cl100k_base", chat_format="chatml")
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"no {WEIGHTS_FILE}"):
        load_model(path)
    (path / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a gencli model description") as e:
        load_model(path)
    assert_one_line_refusal(e)


class RunsCode:
    """Unpickling this calls exec, which writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, make_gpt, tok_legacy):
    model = make_gpt(vocab_for(tok_legacy), seed=10)
    # The payload is live: a plain unpickle does run it.
    probe = tmp_path / "probe-marker"
    torch.save({"x": RunsCode(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()

    marker = tmp_path / "marker"
    torch.save(nanogpt_ckpt(model, evil=RunsCode(marker)), tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "ckpt.pt", tokenizer="cl100k_base")
    msg = assert_one_line_refusal(e)
    assert "refused" in msg
    assert not marker.exists()

    # The same payload inside a Hugging Face pytorch_model.bin.
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(n_positions=64, vocab_size=300, n_layer=2, n_head=2, n_embd=32)))
    torch.save({"wte.weight": torch.zeros(300, 32), "evil": RunsCode(marker)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused"):
        load_model(d, tokenizer="cl100k_base")
    assert not marker.exists()


def test_vocab_too_small_for_tokenizer_refused(tmp_path, make_gpt):
    path = save_model(make_gpt(1000), tmp_path / "small", tokenizer="cl100k_base", chat_format="legacy")
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = assert_one_line_refusal(e)
    assert "1000" in msg and "100258" in msg
    # ChatML needs two more ids than the legacy format.
    path = save_model(make_gpt(100260), tmp_path / "almost", tokenizer="cl100k_base", chat_format="legacy")
    assert load_model(path).model.config.vocab_size == 100260
    with pytest.raises(CheckpointError) as e:
        load_model(path, chat_format="chatml")
    msg = assert_one_line_refusal(e)
    assert "100260" in msg and "100266" in msg


def _bad_gencli_weights(tmp_path, make_gpt):
    from safetensors.torch import save_file

    path = save_model(make_gpt(100288), tmp_path / "m", tokenizer="cl100k_base", chat_format="legacy")
    save_file({"something.else": torch.zeros(2)}, path / WEIGHTS_FILE)  # valid file, wrong tensors
    return path


def _nanogpt_with(tmp_path, make_gpt, **changes):
    ckpt = nanogpt_ckpt(make_gpt(100288))
    for k, v in changes.items():
        if k == "model":
            ckpt["model"] = v
        else:
            ckpt["model_args"][k] = v
    torch.save(ckpt, tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


def _hf_with_bad_config(tmp_path, make_gpt):
    d = tmp_path / "hf"
    d.mkdir()
    config = dict(n_positions="64", vocab_size=100288, n_layer=1, n_head=2, n_embd=32)
    (d / "config.json").write_text(json.dumps(config))
    torch.save({"wte.weight": torch.zeros(100288, 32)}, d / "pytorch_model.bin")
    return d


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(_bad_gencli_weights, id="gencli-weights-without-wte"),
        pytest.param(lambda t, m: _nanogpt_with(t, m, n_head=3), id="nanogpt-n_embd-not-divisible-by-n_head"),
        pytest.param(lambda t, m: _nanogpt_with(t, m, block_size=-1), id="nanogpt-negative-block_size"),
        pytest.param(lambda t, m: _nanogpt_with(t, m, model=[1, 2]), id="nanogpt-model-not-a-dict"),
        pytest.param(_hf_with_bad_config, id="hf-config-with-a-string-size"),
    ],
)
def test_malformed_checkpoint_contents_are_checkpoint_errors(tmp_path, make_gpt, make_bad):
    """A readable file with nonsense inside is still a refused checkpoint, not a crash (see report)."""
    path = make_bad(tmp_path, make_gpt)
    with pytest.raises(CheckpointError) as e:
        load_model(path, tokenizer="cl100k_base")
    assert_one_line_refusal(e)


@pytest.mark.parametrize("make_file", ["random", "renamed_safetensors"])
def test_a_file_that_is_no_checkpoint_says_what_gencli_reads_without_torchs_unsafe_advice(tmp_path, make_file,
                                                                                         make_gpt, tok_chatml):
    f = tmp_path / "ckpt.pt"
    if make_file == "random":
        f.write_bytes(bytes(range(256)) * 64)
    else:
        path = save_model(make_gpt(vocab_for(tok_chatml)), tmp_path / "m", tokenizer="cl100k_base",
                          chat_format="chatml")
        (path / WEIGHTS_FILE).rename(f)
    with pytest.raises(CheckpointError) as e:
        load_model(f, tokenizer="cl100k_base")
    msg = assert_one_line_refusal(e)
    assert "weights_only" not in msg and "Re-running" not in msg
    assert "gencli reads a gencli model directory" in msg and "nanoGPT ckpt.pt" in msg


def test_saved_weights_are_as_readable_as_the_metadata(tmp_path, make_gpt, tok_chatml):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = save_model(make_gpt(vocab_for(tok_chatml)), tmp_path / "m", tokenizer="cl100k_base",
                          chat_format="chatml")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes == {WEIGHTS_FILE: 0o644, "gencli.json": 0o644}
