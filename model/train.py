"""Training a GPT on a prep output directory: nanoGPT's loop, saved in gencli's own format.

Input (written by `gencli prep`): `train.bin` and `val.bin` (flat token ids, the dtype named in
meta.json), optionally `train.mask.bin`/`val.mask.bin` (uint8, 1 = assistant token, one per id),
and `meta.json` naming the tokenizer, the chat format and the dtype.
Output: a gencli model directory (`model.safetensors` + `gencli.json`, which records the tokenizer
and chat format, so workers serve it as it is) and `train_state.pt` beside it for `--resume`
(optimizer, iteration, best val loss, config, RNG states; tensors and plain values only, read
back with `torch.load(weights_only=True)`).

The loop: AdamW (no weight decay on biases and LayerNorm), linear warmup then cosine decay to
min_lr, gradient clipping, and an eval on fixed windows of val.bin every eval_interval
iterations; the model is saved when val loss improves and at the end. Evals compare the val
loss with a unigram baseline: what a model that knows only train.bin's token frequencies scores.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from gencli.model.chat import ChatFormat
from gencli.model.checkpoint import META_FILE, PRESETS, load_model, save_model, vocab_for
from gencli.model.config import GPTConfig
from gencli.model.device import resolve_device
from gencli.model.errors import GencliError
from gencli.model.gpt import GPT
from gencli.model.loss import IGNORE
from gencli.model.splits import DTYPES, memmap_ids, read_meta
from gencli.model.tokenizer import Tokenizer, load_encoding

STATE_FILE = "train_state.pt"
CHUNK = 1 << 24  # tokens counted per pass over a memmap


class TrainError(GencliError):
    """The data, the config or the checkpoint to resume cannot be trained on."""


@dataclass
class TrainConfig:
    # Defaults: the tiny preset's run, a few minutes on 2 CPU cores on chitchat-sized data.
    preset: str = "tiny"  # shape of a new model (checkpoint.PRESETS); ignored with init_from/resume
    max_iters: int = 250
    batch_size: int = 4  # sequences per step
    block_size: int | None = None  # tokens per sequence; None: the model's context
    lr: float = 3e-3  # peak learning rate, after warmup
    min_lr: float = 3e-4  # where the cosine decay ends
    warmup_iters: int = 20
    lr_decay_iters: int | None = None  # cosine length; None: max_iters
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    eval_interval: int = 125
    eval_iters: int = 8  # batches per split in an eval, on fixed windows
    log_interval: int = 10
    seed: int = 1337
    assistant_only: bool = False  # loss only on assistant tokens (needs the mask files)
    device: str = "auto"
    dtype: str = "auto"  # of the matmuls (weights stay float32): auto = bfloat16 where it runs fast

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise TrainError(f"unknown preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        positive = ["max_iters", "batch_size", "eval_interval", "eval_iters", "log_interval"]
        if self.block_size is not None:
            positive.append("block_size")
        if self.lr_decay_iters is not None:
            positive.append("lr_decay_iters")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TrainError(f"{name} must be a positive integer, not {value!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise TrainError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.lr <= 0:
            raise TrainError(f"lr must be > 0, not {self.lr!r}")
        if self.min_lr > self.lr:
            raise TrainError(f"min_lr {self.min_lr} is above lr {self.lr}")
        if not isinstance(self.warmup_iters, int) or self.warmup_iters < 0:
            raise TrainError(f"warmup_iters must be an integer >= 0, not {self.warmup_iters!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise TrainError(f"unknown dtype {self.dtype!r}: use auto, float32 or bfloat16")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainResult:
    train_loss: float
    val_loss: float
    baseline: float  # unigram cross-entropy of val under train's frequencies, nats
    tokens_per_s: float  # training steps only, evals excluded
    iters: int  # iteration the model was saved at
    path: Path
    elapsed_s: float = 0.0
    first_val_loss: float = math.nan  # at the first eval of this call


@dataclass
class Step:
    """Progress: a training step, reported every log_interval iterations."""

    iter: int
    max_iters: int
    loss: float
    lr: float
    tokens_per_s: float
    start_iter: int = 0  # where this run (a resumed one: after its checkpoint) began

    def __str__(self) -> str:
        return (f"iter {self.iter}/{self.max_iters}: loss {self.loss:.4f}, lr {self.lr:.2e}, "
                f"{self.tokens_per_s:,.0f} tokens/s")


@dataclass
class Eval:
    """Progress: losses on fixed train and val windows."""

    iter: int
    train_loss: float
    val_loss: float
    baseline: float
    saved: bool

    def __str__(self) -> str:
        saved = ", saved" if self.saved else ""
        return (f"eval at iter {self.iter}: train loss {self.train_loss:.4f}, val loss {self.val_loss:.4f} "
                f"(unigram baseline {self.baseline:.4f}){saved}")


Progress = Callable[[object], None]  # called with a Step, an Eval, or a str


# --- data ------------------------------------------------------------------------------------


@dataclass
class Split:
    name: str
    ids: np.ndarray  # memmap of token ids
    mask: np.ndarray | None  # memmap of 0/1, or None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Data:
    path: Path
    tokenizer_spec: str  # as meta.json names it: an encoding name or a ranks file path
    tokenizer: Tokenizer
    chat_format: ChatFormat
    train: Split
    val: Split


def open_data(data_dir: str | os.PathLike, *, masks: bool) -> Data:
    """Open a prep output: meta.json checked, the bins as memmaps (masks only when asked for)."""
    data_dir = Path(data_dir).expanduser()
    meta = read_meta(data_dir)
    fmt = ChatFormat.parse(meta["chat_format"])
    spec = meta["tokenizer"]
    tok = Tokenizer(load_encoding(spec), chatml=fmt is ChatFormat.CHATML)
    dtype = DTYPES[meta["dtype"]]
    splits = [_open_split(data_dir, name, dtype, masks) for name in ("train", "val")]
    return Data(data_dir, spec, tok, fmt, *splits)


def _open_split(data_dir: Path, name: str, dtype, masks: bool) -> Split:
    path = data_dir / f"{name}.bin"
    ids = memmap_ids(path, dtype)
    mask = None
    if masks:
        mpath = data_dir / f"{name}.mask.bin"
        if not mpath.is_file():
            raise TrainError(f"assistant-only training needs {mpath}: run prep with masks, or train without it")
        mask = memmap_ids(mpath, np.uint8)
        if len(mask) != len(ids):
            raise TrainError(f"{mpath} holds {len(mask)} entries but {path} holds {len(ids)} tokens")
    return Split(name, ids, mask)


def token_counts(split: Split, n: int, *, masked: bool) -> np.ndarray:
    """Occurrences of each id below n (float64), only where mask == 1 when masked."""
    counts = np.zeros(n, dtype=np.float64)
    for start in range(0, len(split), CHUNK):
        ids = np.asarray(split.ids[start : start + CHUNK])
        top = int(ids.max())
        if top >= n:
            raise TrainError(
                f"{split.name}.bin holds token id {top}, beyond the tokenizer's ids (0..{n - 1}): "
                "was it written with another tokenizer?"
            )
        weights = np.asarray(split.mask[start : start + CHUNK], dtype=np.float64) if masked else None
        counts += np.bincount(ids, weights=weights, minlength=n)
    return counts


def unigram_baseline(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """Cross-entropy (nats/token) of val under train's unigram frequencies.

    Ids never seen in train share the Good-Turing missing mass (the fraction of train tokens
    seen once), so an unseen val id costs a finite, honest amount.
    """
    n = train_counts.sum()
    seen = train_counts > 0
    unseen = len(train_counts) - int(seen.sum())
    missing = 0.0
    if unseen:
        missing = float((train_counts == 1).sum()) / n if (train_counts == 1).any() else 1.0 / (n + 1)
    p = np.where(seen, train_counts / n * (1 - missing), missing / max(unseen, 1))
    used = val_counts > 0
    return float(-(val_counts[used] * np.log(p[used])).sum() / val_counts.sum())


def data_baseline(data: Data, *, masked: bool) -> float:
    """The unigram baseline of data's val split (assistant tokens only when masked)."""
    n_ids = data.tokenizer.max_used_id + 1
    train_counts = token_counts(data.train, n_ids, masked=masked)
    val_counts = token_counts(data.val, n_ids, masked=masked)
    if not (train_counts.sum() and val_counts.sum()):
        raise TrainError(f"{data.path}: the masks mark no assistant token in train or val")
    return unigram_baseline(train_counts, val_counts)


def check_length(split: Split, block_size: int) -> None:
    if len(split) < block_size + 1:
        raise TrainError(
            f"{split.name}.bin holds {len(split)} tokens: too few for block_size {block_size} "
            f"(it needs at least {block_size + 1}); lower --block-size or prep more data"
        )


def window(split: Split, start: int, block_size: int, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) ids of one window; targets outside the mask are IGNORE (-1)."""
    chunk = torch.from_numpy(np.asarray(split.ids[start : start + block_size + 1], dtype=np.int64))
    x, y = chunk[:-1], chunk[1:].clone()
    if masked:
        keep = torch.from_numpy(np.asarray(split.mask[start + 1 : start + block_size + 1], dtype=np.bool_))
        y[~keep] = IGNORE
    return x, y


def get_batch(split: Split, batch_size: int, block_size: int, gen: torch.Generator, masked: bool):
    """A random batch (nanoGPT's get_batch). Masked: redrawn while it has no target at all."""
    for _ in range(100):
        starts = torch.randint(len(split) - block_size, (batch_size,), generator=gen).tolist()
        xs, ys = zip(*(window(split, s, block_size, masked) for s in starts))
        x, y = torch.stack(xs), torch.stack(ys)
        if not masked or (y != IGNORE).any():
            return x, y
    raise TrainError(f"{split.name}.mask.bin: 100 random batches held no assistant token")


def eval_starts(split: Split, block_size: int, count: int) -> list[int]:
    """Window starts spread evenly over the split: every eval scores the same windows."""
    last = len(split) - block_size - 1
    return sorted({round(i * last / max(count - 1, 1)) for i in range(count)})


# --- the schedule and the optimizer -----------------------------------------------------------


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr over lr_decay_iters (nanoGPT's)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(decay_iters - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases or LayerNorm gains)."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """float32, or bfloat16 autocast: `auto` takes it where the hardware runs it natively.

    On a CPU with AVX-512 BF16, bfloat16 matmuls and the 100k-wide logits they write cost
    about 0.6x of float32's time per token; the loss itself is computed in float32.
    """
    if name == "float32":
        return torch.float32
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        supported = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    else:
        supported = False
    if name == "bfloat16" and not supported:
        raise TrainError(f"bfloat16 is not supported on {device}: use --dtype float32")
    return torch.bfloat16 if supported else torch.float32


def reuse_freed_memory() -> None:
    """Have glibc keep freed memory for reuse instead of returning it to the system (Linux only).

    A training step allocates and frees tensors of batch x block x vocab floats (100k wide with
    cl100k): hundreds of MB, which glibc gets from fresh mmaps, so every step pays for page faults
    that zero them again; on 2 cores that was a third of the step time. For a process that only
    trains (the CLI); its resident memory stays at the peak.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap, not fresh mmaps
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        pass


# --- checkpoints ------------------------------------------------------------------------------


def read_state(out_dir: Path) -> dict:
    path = out_dir / STATE_FILE
    if not path.is_file() or not (out_dir / META_FILE).is_file():
        raise TrainError(f"nothing to resume in {out_dir}: it has no {STATE_FILE} and {META_FILE} "
                         "(train without --resume first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line problem
        raise TrainError(f"{path} is truncated or corrupt: {_first_line(e)}") from None
    if not isinstance(state, dict) or not {"optimizer", "iter_num", "config", "rng"} <= state.keys():
        raise TrainError(f"{path} is not a gencli training state")
    return state


def saved_config(out_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig a checkpoint directory was trained with (for --resume's defaults)."""
    return TrainConfig.from_dict(read_state(Path(out_dir).expanduser())["config"])


def _family(spec: str) -> str:
    """A tokenizer's family as gencli.json or meta.json names it: `x/gpt2.tiktoken` -> `gpt2`."""
    return Path(spec).name.removesuffix(".tiktoken")


def load_for_training(path: Path, data: Data, device: torch.device) -> GPT:
    """A saved model (any kind load_model reads) in float32, checked against the data's tokenizer.

    A model is read with the data's tokenizer and chat format: a legacy-format model takes
    ChatML data when the ChatML ids fall inside its vocab (GPT-2's padding, for one), and keeps
    its embedding size; otherwise load_model refuses with both numbers.
    """
    meta_file = path / META_FILE if path.is_dir() else None
    if meta_file is not None and meta_file.is_file():
        try:
            recorded = json.loads(meta_file.read_text()).get("tokenizer")
        except (ValueError, OSError, AttributeError):
            recorded = None  # load_model reports a damaged gencli.json
        if isinstance(recorded, str) and _family(recorded) != _family(data.tokenizer_spec):
            raise TrainError(f"{path} was trained with tokenizer {recorded}, but {data.path} is tokenized "
                             f"with {data.tokenizer_spec}: prep the data with the model's tokenizer")
    loaded = load_model(path, tokenizer=data.tokenizer_spec, chat_format=data.chat_format.value,
                        device=device, dtype=torch.float32)
    return loaded.model


# --- the loop ---------------------------------------------------------------------------------


class Trainer:
    """One model, its optimizer and batch RNG, on one data dir: steps, evals, saves."""

    def __init__(self, model: GPT, data: Data, cfg: TrainConfig, device: torch.device, block_size: int):
        self.model, self.data, self.cfg, self.device, self.block_size = model, data, cfg, device, block_size
        model.train()
        self.opt = make_optimizer(model, cfg, device)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.amp = compute_dtype(cfg.dtype, device) == torch.bfloat16
        n_windows = cfg.eval_iters * cfg.batch_size
        self.eval_windows = {s.name: eval_starts(s, block_size, n_windows) for s in (data.train, data.val)}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def step(self, lr: float) -> float:
        """One optimizer step on a random batch; its loss (before the step)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = get_batch(self.data.train, self.cfg.batch_size, self.block_size, self.gen, self.cfg.assistant_only)
        with self.autocast():
            loss = self.model.loss(x.to(self.device), y.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        return loss.item()  # syncs the device, so step times are real

    @torch.no_grad()
    def evaluate(self, split: Split) -> float:
        """Mean loss per scored token over the split's fixed eval windows."""
        self.model.eval()
        total, count = 0.0, 0
        starts = self.eval_windows[split.name]
        for i in range(0, len(starts), self.cfg.batch_size):
            xs, ys = zip(*(window(split, s, self.block_size, self.cfg.assistant_only)
                           for s in starts[i : i + self.cfg.batch_size]))
            x, y = torch.stack(xs).to(self.device), torch.stack(ys).to(self.device)
            n = int((y != IGNORE).sum())
            if n:
                with self.autocast():
                    total += self.model.loss(x, y).item() * n
                count += n
        self.model.train()
        return total / count if count else math.nan

    def save(self, out_dir: Path, *, iter_num: int, best_val_loss: float) -> None:
        """The model in gencli's format, then train_state.pt; each file replaced atomically."""
        save_model(self.model, out_dir, tokenizer=self.data.tokenizer_spec, chat_format=self.data.chat_format)
        state = {
            "optimizer": self.opt.state_dict(),
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "config": asdict(self.cfg),
            "rng": {"batches": self.gen.get_state(), "torch": torch.get_rng_state()},
        }
        tmp = out_dir / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, out_dir / STATE_FILE)

    def restore(self, state: dict, path: Path) -> tuple[int, float]:
        """Optimizer and RNG states of a saved run; (iter_num, best_val_loss)."""
        try:
            self.opt.load_state_dict(state["optimizer"])
            self.gen.set_state(state["rng"]["batches"])
            torch.set_rng_state(state["rng"]["torch"])
            iter_num, best = int(state["iter_num"]), float(state["best_val_loss"])
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise TrainError(f"{path} does not fit this model: {_first_line(e)}") from None
        for group, decay in zip(self.opt.param_groups, (self.cfg.weight_decay, 0.0)):
            group["weight_decay"] = decay  # the saved groups carry the old run's values
        return iter_num, best

    def describe(self) -> str:
        c, d = self.model.config, self.data
        return (f"training {self.model.num_params() / 1e6:.1f}M params (n_layer {c.n_layer}, n_embd {c.n_embd}, "
                f"vocab {c.vocab_size}) on {self.device} in {'bfloat16' if self.amp else 'float32'}, block_size "
                f"{self.block_size}, batch {self.cfg.batch_size}; data: {len(d.train):,} train / {len(d.val):,} "
                f"val tokens, {d.tokenizer_spec}, {d.chat_format.value}")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def build_model(cfg: TrainConfig, data: Data, device: torch.device, *, load_from: Path | None) -> GPT:
    """The model to train: loaded from a checkpoint, or new in the preset's shape."""
    if load_from is not None:
        model = load_for_training(load_from, data, device)
    else:
        shape = dict(PRESETS[cfg.preset])
        if cfg.block_size is not None:
            if cfg.block_size > shape["block_size"]:
                raise TrainError(f"block_size {cfg.block_size} exceeds the {cfg.preset} preset's "
                                 f"{shape['block_size']}")
            shape["block_size"] = cfg.block_size  # the context it is trained for is the one it serves
        model = GPT(GPTConfig(vocab_size=vocab_for(data.tokenizer), **shape)).to(device)
    if cfg.block_size is not None and cfg.block_size > model.config.block_size:
        raise TrainError(f"block_size {cfg.block_size} exceeds the model's context {model.config.block_size}")
    return model


def train(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: TrainConfig,
    *,
    init_from: str | os.PathLike | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> TrainResult:
    """Train (or fine-tune, or resume) a GPT on a prep output; the model ends up in out_dir."""
    t_start = time.perf_counter()
    say = progress or (lambda event: None)
    cfg.check()
    out_dir = Path(out_dir).expanduser()
    if resume and init_from is not None:
        raise TrainError("give --resume or --init-from, not both")
    if not resume and ((out_dir / STATE_FILE).exists() or (out_dir / META_FILE).exists()):
        raise TrainError(f"{out_dir} already holds a checkpoint: pass --resume to continue it, "
                         "or choose another --out")
    state = read_state(out_dir) if resume else None
    data = open_data(data_dir, masks=cfg.assistant_only)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    load_from = out_dir if resume else Path(init_from).expanduser() if init_from is not None else None
    model = build_model(cfg, data, device, load_from=load_from)
    block_size = cfg.block_size or model.config.block_size
    check_length(data.train, block_size)
    check_length(data.val, block_size)
    baseline = data_baseline(data, masked=cfg.assistant_only)

    t = Trainer(model, data, cfg, device, block_size)
    iter_num, best_val = t.restore(state, out_dir / STATE_FILE) if state else (0, math.inf)
    start_iter = iter_num
    say(t.describe())
    train_loss = val_loss = first_val = math.nan
    saved_at = iter_num  # resumed at max_iters: the checkpoint stays as it was
    step_time = log_time = 0.0
    losses: list[float] = []
    tokens_per_step = cfg.batch_size * block_size
    while True:
        if iter_num >= cfg.max_iters or (iter_num % cfg.eval_interval == 0 and (iter_num > start_iter or not resume)):
            train_loss, val_loss = t.evaluate(data.train), t.evaluate(data.val)
            first_val = val_loss if math.isnan(first_val) else first_val
            save = iter_num > start_iter and (val_loss < best_val or iter_num >= cfg.max_iters)
            best_val = min(best_val, val_loss)
            if save:
                t.save(out_dir, iter_num=iter_num, best_val_loss=best_val)
                saved_at = iter_num
            say(Eval(iter_num, train_loss, val_loss, baseline, save))
        if iter_num >= cfg.max_iters:
            break
        lr = lr_at(iter_num, cfg)
        t0 = time.perf_counter()
        loss = t.step(lr)
        if not math.isfinite(loss):  # nothing is saved from here on: the last save stays good
            raise TrainError(f"loss became {loss} at iter {iter_num}: lower --lr")
        dt = time.perf_counter() - t0
        iter_num += 1
        step_time, log_time = step_time + dt, log_time + dt
        losses.append(loss)
        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            say(Step(iter_num, cfg.max_iters, sum(losses) / len(losses), lr, len(losses) * tokens_per_step / log_time,
                     start_iter))
            log_time, losses = 0.0, []

    steps = iter_num - start_iter
    return TrainResult(
        train_loss=train_loss,
        val_loss=val_loss,
        baseline=baseline,
        tokens_per_s=steps * tokens_per_step / step_time if step_time else 0.0,
        iters=saved_at,
        path=out_dir,
        elapsed_s=time.perf_counter() - t_start,
        first_val_loss=first_val,
    )
