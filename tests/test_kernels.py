"""The CPU inference kernels (model/kernels.py) on real weights and real forward passes: float32
through oneDNN over prepacked weights, int8 through fbgemm; each row computes what it computes alone,
and `--dtype int8` from load_model to the CLI and the provenance record."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

from gencli.cli.main import main
from gencli.model.checkpoint import create_model, load_model, resolve_dtype
from gencli.model.engine import Engine, generate
from gencli.model.errors import DeviceError
from gencli.model.kernels import Int8Linear, PackedLinear, int8_supported
from gencli.model.params import SamplingParams
from gencli.model.provenance import runtime_record

needs_int8 = pytest.mark.skipif(not int8_supported(), reason="this torch has no fbgemm (int8 needs x86-64)")


def _weights(n_out: int, n_in: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_out, n_in, generator=g) * 0.05, torch.randn(n_out, generator=g) * 0.01


def _inputs(rows: int, n_in: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n_in, generator=g) * (torch.rand(rows, 1, generator=g) * 8 + 0.01)  # unlike scales


@needs_int8
@pytest.mark.parametrize("shape", [(96, 64), (384, 128), (64, 256)])
def test_an_int8_row_computes_bit_for_bit_what_it_computes_alone(shape):
    w, b = _weights(*shape)
    x = _inputs(40, shape[1])
    lin = Int8Linear(w, b)
    with torch.inference_mode():
        alone = [lin(x[i : i + 1])[0] for i in range(len(x))]
        for rows in (1, 2, 3, 8, 17, 40):
            together = lin(x[:rows])
            for i in range(rows):
                assert torch.equal(together[i], alone[i]), (rows, i)
        # a row's company with other magnitudes changes nothing either (each row has its own scale)
        loud = torch.cat([x[:1], x[1:2] * 1000])
        assert torch.equal(lin(loud)[0], alone[0])
        ref = F.linear(x, w, b)
        err = (lin(x) - ref).abs().amax(dim=1) / ref.abs().amax(dim=1)
    assert err.max() < 0.05  # about 1-2 % of each row's largest output: 7-bit activations, 8-bit weights


@needs_int8
def test_int8_keeps_batched_leading_dims_and_zero_rows():
    w, b = _weights(48, 32)
    lin = Int8Linear(w, None)
    x = torch.zeros(2, 3, 32)
    x[1, 2] = _inputs(1, 32)[0]
    with torch.inference_mode():
        y = lin(x)
    assert y.shape == (2, 3, 48)
    assert torch.equal(y[0], torch.zeros(3, 48))  # an all-zero row stays zero, no division by zero
    ref = F.linear(x[1, 2], w)
    assert (y[1, 2] - ref).abs().max() < 0.05 * ref.abs().max()


def test_packed_float32_gives_back_its_exact_weight_and_matches_f_linear():
    w, b = _weights(200, 96)
    packed = PackedLinear(w, b)
    assert torch.equal(packed.dense(), w)
    x = _inputs(9, 96)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_float32_preparation_frees_plain_weights_and_training_brings_them_back_exactly(make_gpt):
    model = make_gpt(320, n_embd=64)  # prepared for inference
    ref = make_gpt(320, n_embd=64, prepare=False).eval()  # the same weights as built, through F.linear
    plain = ref.state_dict()
    fc = model.transformer.h[0].mlp.c_fc
    assert fc.weight.numel() == 0 and isinstance(fc.kernel, PackedLinear)  # one copy of each weight, not two
    assert model.lm_head.weight.numel() > 0  # the head is the embedding too: kept
    assert model.num_params() == ref.num_params()
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())  # saved as the plain weights
    x = torch.randint(0, 320, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref.eval()(x)[0], rtol=1e-4, atol=1e-4)
        assert model(x)[0].shape == (3, 12, 320)
    model.train()
    assert fc.kernel is None and all(torch.equal(p, plain[k]) for k, p in model.state_dict().items())
    loss = model.loss(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    loss.backward()  # trains as before
    assert fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0


@needs_int8
def test_int8_greedy_and_seeded_outputs_do_not_depend_on_company(make_gpt):
    model = make_gpt(320, seed=3, n_embd=64).prepare_for_inference(int8=True)
    assert model.dtype_name == "int8" and Engine(model, 1).min_rows == 1  # exact at one row: no lone row run twice
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 320, (int(n),), generator=g).tolist() for n in torch.randint(1, 20, (6,), generator=g)]
    for params, seeds in ((SamplingParams(max_tokens=16, temperature=0), [None] * 6),
                          (SamplingParams(max_tokens=16, temperature=1.0), list(range(6)))):
        per_row = [params.seeded(s) for s in seeds]
        alone = [generate(model, [p], sp)[0] for p, sp in zip(prompts, per_row, strict=True)]
        assert generate(model, prompts, per_row) == alone
        assert generate(model, prompts, per_row, slots=2) == alone  # joining as others finish
    fp32 = make_gpt(320, seed=3, n_embd=64)
    greedy = SamplingParams(max_tokens=16, temperature=0)
    same = sum(a == b for x, y in zip(generate(fp32, prompts, greedy), generate(model, prompts, greedy), strict=True)
               for a, b in zip(x, y, strict=True))
    assert same >= 0.5 * 16 * 6  # int8 follows float32 (on trained weights closely: python -m bench.quality)


@needs_int8
def test_an_int8_model_cannot_be_trained_or_saved(make_gpt):
    model = make_gpt(320, n_embd=64).prepare_for_inference(int8=True)
    assert model.transformer.h[0].attn.c_attn.weight.numel() == 0  # float weights freed
    with pytest.raises(RuntimeError, match="int8 model keeps no float weights"):
        model.train()
    with pytest.raises(RuntimeError, match="load the checkpoint in float32"):
        model.state_dict()
    assert model.prepare_for_inference(int8=True) is model


@needs_int8
def test_load_model_in_int8_is_recorded_as_int8_and_batch_invariant(tmp_path):
    path = create_model(tmp_path / "m", preset="tiny", tokenizer="cl100k_base", chat_format="chatml", seed=2)
    loaded = load_model(path, dtype="int8")
    assert loaded.dtype == "int8" and loaded.device.type == "cpu"
    rec = runtime_record(loaded, "m", {"sha256": "x"})
    assert rec["dtype"] == "int8" and rec["batch_invariant"] is True
    assert load_model(path).dtype == "float32" == load_model(path, dtype="auto").dtype


def test_dtype_errors_say_what_to_use():
    with pytest.raises(DeviceError, match="int8 runs on the CPU only: use --device cpu"):
        resolve_dtype("int8", torch.device("cuda:0"))
    with pytest.raises(DeviceError, match="unknown dtype 'int4'"):
        resolve_dtype("int4", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.float32, False)
    assert resolve_dtype(None, torch.device("cpu")) == (torch.float32, False)


@needs_int8
def test_generate_dtype_int8_from_the_command_line(tmp_path):
    path = create_model(tmp_path / "m", preset="tiny", tokenizer="cl100k_base", chat_format="chatml", seed=2)
    args = ["generate", "--model", str(path), "--max_tokens", "8", "--temperature", "0", "-v", "Hello"]
    r = CliRunner().invoke(main, [*args, "--dtype", "int8"])
    assert r.exit_code == 0, r.output
    assert " in int8]" in r.stderr
    r = CliRunner().invoke(main, [*args, "--dtype", "int4"])
    assert r.exit_code == 2 and "'int4' is not one of" in r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, [*args, "--dtype", "int8", "--device", "cuda"])
        assert r.exit_code == 1 and "no CUDA GPU is visible" in r.output and "Traceback" not in r.output
