"""Loading and saving checkpoints.

Three kinds load from one path (`--model PATH`):
1. nanoGPT: a `ckpt.pt` (or a directory holding one) with keys `model` and `model_args`;
   torch.compile's `_orig_mod.` prefix is stripped.
2. Hugging Face GPT-2: a directory with `config.json` and `model.safetensors` or
   `pytorch_model.bin` (its Conv1D weights are stored transposed).
3. gencli's own: a directory with `model.safetensors` and `gencli.json`, which records the
   config, the tokenizer and the chat format, so the model is served the way it was trained.

Pickled files are only ever read with `torch.load(weights_only=True)`: a pickle that would run
code is refused, not run.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gencli.model.chat import ChatFormat
from gencli.model.config import GPTConfig
from gencli.model.errors import CheckpointError, DeviceError, GencliError
from gencli.model.gpt import GPT
from gencli.model.kernels import int8_supported
from gencli.model.params import DTYPES
from gencli.model.tokenizer import Tokenizer, load_encoding

META_FILE = "gencli.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_TOKENIZER = "gpt2"  # what nanoGPT and GPT-2 checkpoints were trained with
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    chat_format: ChatFormat
    kind: str  # "gencli", "nanogpt" or "huggingface"
    path: Path

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> str:
        """What it computes in: float32, bfloat16, float16 or int8."""
        return self.model.dtype_name


def load_model(
    path: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    chat_format: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Read a checkpoint of any supported kind, check it against its tokenizer, place it in dtype
    (a torch dtype, or one of DTYPES: auto is the device's default; int8 quantizes on the CPU)."""
    path = Path(path).expanduser()
    device = torch.device(device)
    dtype, int8 = resolve_dtype(dtype, device)
    kind, state, config, meta = read_checkpoint(path)
    tok_name = tokenizer or meta.get("tokenizer") or DEFAULT_TOKENIZER
    fmt = ChatFormat.parse(chat_format or meta.get("chat_format") or ChatFormat.LEGACY.value)
    tok = Tokenizer(load_encoding(tok_name), chatml=fmt is ChatFormat.CHATML)
    if tok.max_used_id >= config.vocab_size:
        raise CheckpointError(
            f"{path}: vocab_size {config.vocab_size} cannot hold tokenizer {tok_name} "
            f"({fmt.value}) ids up to {tok.max_used_id}: it needs vocab_size >= {tok.max_used_id + 1}"
        )
    model = _build(path, config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not match the config: {' '.join(first[:3])[:400]}") from None
    model.to(device=device, dtype=dtype)
    model.prepare_for_inference(int8=int8)
    return LoadedModel(model=model, tokenizer=tok, chat_format=fmt, kind=kind, path=path)


def _build(path: Path, config: GPTConfig) -> GPT:
    fields = {k: getattr(config, k) for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
    bad = [f"{k}={v!r}" for k, v in fields.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
    if bad:
        raise CheckpointError(f"{path}: bad model config: {', '.join(bad)} (each must be a positive integer)")
    if config.n_embd % config.n_head:
        raise CheckpointError(f"{path}: bad model config: n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
    return GPT(config)


def resolve_dtype(spec: torch.dtype | str | None, device: torch.device) -> tuple[torch.dtype, bool]:
    """(the dtype the weights load in, whether they are then quantized to int8) for a --dtype value."""
    if isinstance(spec, torch.dtype):
        return spec, False
    spec = (spec or "auto").strip().lower()
    if spec not in DTYPES:
        raise DeviceError(f"unknown dtype {spec!r}: use {', '.join(DTYPES)}")
    if spec == "int8":
        if device.type != "cpu":
            raise DeviceError(f"--dtype int8 runs on the CPU only: use --device cpu, or --dtype auto on {device}")
        if not int8_supported():
            raise DeviceError("--dtype int8 needs PyTorch's fbgemm kernels (x86-64 builds), which this torch "
                              f"{torch.__version__} lacks: use --dtype float32")
        return torch.float32, True
    return (default_dtype(device) if spec == "auto" else getattr(torch, spec)), False


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU; bf16 on a GPU that supports it, else fp16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def read_checkpoint(path: Path) -> tuple[str, dict, GPTConfig, dict]:
    """(kind, state dict in gencli's names, config, meta) of the checkpoint at path."""
    if not path.exists():
        raise CheckpointError(f"no model at {path}: pass --model a checkpoint file or directory")
    if path.is_dir():
        if (path / META_FILE).is_file():
            return _read_gencli(path)
        if (path / "config.json").is_file():
            return _read_huggingface(path)
        if (path / "ckpt.pt").is_file():
            return _read_nanogpt(path / "ckpt.pt")
        raise CheckpointError(
            f"{path} holds no checkpoint: expected {META_FILE} + {WEIGHTS_FILE} (gencli), "
            "config.json + model.safetensors or pytorch_model.bin (Hugging Face), or ckpt.pt (nanoGPT)"
        )
    if path.name == META_FILE or (path.suffix == ".safetensors" and (path.parent / META_FILE).is_file()):
        return _read_gencli(path.parent)
    return _read_nanogpt(path)


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # what a pickle that would call code produces
            raise CheckpointError(
                f"refused {path}: it holds pickled objects that could run code; only tensors and "
                "plain containers are loaded (weights_only=True)"
            ) from None
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({_torch_reason(e)}); {ACCEPTED}") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(
            f"{path} is truncated or corrupt, or not a PyTorch checkpoint at all ({_torch_reason(e)}); {ACCEPTED}"
        ) from None


ACCEPTED = ("gencli reads a gencli model directory, a Hugging Face GPT-2 directory (config.json + model.safetensors "
            "or pytorch_model.bin), or a nanoGPT ckpt.pt")


def _torch_reason(e: BaseException) -> str:
    """torch.load's reason, without its advice to load with weights_only=False (gencli never does)."""
    text = str(e)
    for marker in ("Please file an issue", "(1) In PyTorch 2.6", "Re-running `torch.load`", "In PyTorch 2.6"):
        text = text.split(marker)[0]
    text = text.replace("Weights only load failed.", "").strip(" .\n") or type(e).__name__
    return _first_line(Exception(text))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def _read_nanogpt(path: Path):
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a nanoGPT checkpoint: it needs keys 'model' and 'model_args'")
    try:
        config = GPTConfig.from_dict(dict(ckpt["model_args"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model_args: {e}") from None
    if not isinstance(ckpt["model"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise CheckpointError(f"{path}: 'model' must be a state dict of tensors")
    state = {}
    for k, v in ckpt["model"].items():
        k = k.removeprefix("_orig_mod.")
        if k.endswith(".attn.bias") and v.dim() == 4:  # nanoGPT's causal-mask buffer
            continue
        state[k] = v
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    meta = {k: ckpt[k] for k in ("tokenizer", "chat_format") if isinstance(ckpt.get(k), str)}
    return "nanogpt", state, config, meta


def _read_huggingface(path: Path):
    try:
        cfg = json.loads((path / "config.json").read_text())
        config = GPTConfig(
            block_size=cfg["n_positions"],
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["n_layer"],
            n_head=cfg["n_head"],
            n_embd=cfg["n_embd"],
            bias=True,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'} is not a GPT-2 config: {e}") from None
    if (path / "model.safetensors").is_file():
        raw = _safetensors(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        raw = _torch_load(path / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{path} has config.json but no model.safetensors or pytorch_model.bin")
    state = {}
    for k, v in raw.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # mask buffers, not weights
            continue
        if k == "lm_head.weight":
            state[k] = v
            continue
        k = "transformer." + k.removeprefix("transformer.")
        state[k] = v.t().contiguous() if k.endswith(CONV1D) else v  # Conv1D keeps (in, out)
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    return "huggingface", state, config, {}


def _safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt: {_first_line(e)}") from None


def _read_gencli(path: Path):
    try:
        meta = json.loads((path / META_FILE).read_text())
        config = GPTConfig.from_dict(meta["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / META_FILE} is not a gencli model description: {e}") from None
    state = _safetensors(path / WEIGHTS_FILE) if (path / WEIGHTS_FILE).is_file() else None
    if state is None:
        raise CheckpointError(f"{path} has {META_FILE} but no {WEIGHTS_FILE}")
    if "transformer.wte.weight" not in state:
        raise CheckpointError(f"{path / WEIGHTS_FILE} has no transformer.wte.weight: not a gencli model")
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: stored once
    return "gencli", state, config, meta


def save_model(model: GPT, path: str | os.PathLike, *, tokenizer: str, chat_format: ChatFormat) -> Path:
    """Write gencli's format: weights (tied matrix once) + gencli.json. Atomic per file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    meta = {
        "format": "gencli",
        "version": 1,
        "config": model.config.to_dict(),
        "tokenizer": tokenizer,
        "chat_format": ChatFormat(chat_format).value,
    }
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(state, tmp)
    os.chmod(tmp, _file_mode())  # safetensors writes 0600: readable by whoever may read gencli.json
    os.replace(tmp, path / WEIGHTS_FILE)
    tmp = path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path / META_FILE)
    return path


def _file_mode() -> int:
    """The mode a new file gets under the process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


PRESETS = {
    # Small enough to build and run in a test or on 2 CPU cores.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=256),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=512),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # GPT-2 small, 124M
}


def vocab_for(tokenizer: Tokenizer) -> int:
    """A vocab that holds every id the tokenizer uses, padded up to a multiple of 64."""
    return (tokenizer.max_used_id + 1 + 63) // 64 * 64


def create_model(
    path: str | os.PathLike, *, preset: str, tokenizer: str, chat_format: str, seed: int = 0
) -> Path:
    """A randomly initialised model in gencli's format (for trying the pipeline end to end)."""
    if preset not in PRESETS:
        raise GencliError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    fmt = ChatFormat.parse(chat_format)
    tok = Tokenizer(load_encoding(tokenizer), chatml=fmt is ChatFormat.CHATML)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_for(tok), **PRESETS[preset]))
    return save_model(model, path, tokenizer=tokenizer, chat_format=fmt)
