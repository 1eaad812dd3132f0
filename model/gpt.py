"""A GPT-2-architecture model in nanoGPT's shape, with a cached pass for decoding.

Learned positions, pre-LayerNorm (bias optional), GELU MLP, tied token embedding and LM head.
`forward` is the whole-sequence pass (training, scoring). `forward_cached` continues sequences
held in the engine's slot cache (model/cache.py): each row is one sequence at its own position,
taking one token (a decode step) or a chunk of its prompt (prefill); its positions count from
its own first token and it attends only to its own keys, so a row computes what it would alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F

from gencli.model.loss import IGNORE, linear_cross_entropy

if TYPE_CHECKING:
    from gencli.model.cache import SlotBatch, SlotCache


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context, in tokens
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # used in training only
    bias: bool = True  # biases in Linear and LayerNorm layers, as in GPT-2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class Linear(nn.Linear):
    """nn.Linear that can run through oneDNN at CPU inference (`GPT.prepare_for_inference`).

    For the few-row products of decoding, F.linear's MKL sgemm takes a slow path on some CPUs
    (AMD EPYC, for one); oneDNN's matmul reads the same (out, in) weight in place, no copy,
    and a GPT-2-small decoding step takes about 1.7x less time at batch 1 and at batch 8 on
    2 cores of one (see bench.decode). Training, and anything with grad enabled, takes F.linear.
    """

    onednn = False  # set by GPT.prepare_for_inference where oneDNN works

    def forward(self, x):
        if self.onednn and x.is_cpu and x.dtype == torch.float32 and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _onednn_linear_works(weight: torch.Tensor) -> bool:
    """Whether oneDNN's linear runs here and agrees with F.linear (CPU float32 weights only)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    try:
        x = torch.arange(24.0).view(3, 8).sin()  # fixed values: leave the global RNG alone
        w, b = torch.arange(40.0).view(5, 8).cos(), torch.ones(5)
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return torch.allclose(y, F.linear(x, w, b), atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):  # torch built without oneDNN
        return False


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v fused
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer_idx = layer_idx

    def forward(self, x, cache: SlotCache | None = None, at: SlotBatch | None = None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout = self.attn_dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            cache.write(self.layer_idx, k, v, at)
            y = cache.attend(self.layer_idx, q, at)  # each row over its own keys so far
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, at=None):
        x = x + self.attn(self.ln_1(x), cache, at)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied: one matrix
        self._head_t: torch.Tensor | None = None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def train(self, mode: bool = True):
        self._head_t = None  # weights may change: drop the inference copy of the head
        self._set_onednn(False)
        return super().train(mode)

    def _set_onednn(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, Linear):
                m.onednn = on

    def prepare_for_inference(self) -> GPT:
        """Switch to eval mode and pick the fastest way to run the Linear layers here.

        On the CPU in float32, every Linear layer (the LM head included) runs through oneDNN
        (see `Linear`), with no extra copy of any weight. Otherwise (another device or dtype, a
        torch without oneDNN) the LM head keeps a (C, V) row-major copy: x @ W.T through
        F.linear takes a slow BLAS path for a handful of rows against a (V, C) matrix this
        large, and the pre-transposed copy reads the same bytes in a plain matrix product,
        about twice as fast at batch 1 on the CPU.
        """
        self.eval()
        onednn = _onednn_linear_works(self.lm_head.weight)
        self._set_onednn(onednn)
        self._head_t = None if onednn else self.lm_head.weight.detach().t().contiguous()
        return self

    def _head(self, x):
        if self._head_t is not None and not self.training and not torch.is_grad_enabled():
            return x @ self._head_t
        return self.lm_head(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) token ids, each row one whole sequence from its first token. Returns
        (logits (B, T, V), loss or None)."""
        x = self._hidden(idx)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=IGNORE)
            return logits, loss
        return self._head(x), None

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """forward(idx, targets)'s loss without its (B, T, vocab) logits: what training uses (see loss.py)."""
        x = self._hidden(idx)
        return linear_cross_entropy(x.view(-1, x.size(-1)), self.lm_head.weight, targets.view(-1))

    def _hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm's output (B, T, n_embd) of whole sequences."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def forward_cached(self, idx: torch.Tensor, cache: SlotCache, at: SlotBatch, rows: list[int] | None = None,
                       *, min_rows: int = 1) -> torch.Tensor | None:
        """Continue cached sequences: idx (B, T) holds each row's new tokens (right-padded), for
        positions at.starts[b].. of slot at.slots[b]. Returns the logits (len(rows), V) of the last
        new token of each of rows (default: every row; none: None). min_rows: the LM head runs
        over at least this many rows (the first repeated), as a one-row product rounds apart."""
        if at.length > min(self.config.block_size, cache.max_len):
            raise ValueError(f"sequence of {at.length} tokens exceeds the context of {cache.max_len}")
        pos = at.positions.clamp(max=self.config.block_size - 1)  # a pad query's position is never read
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x, cache, at)
        rows = list(range(at.n)) if rows is None else rows
        if not rows:
            return None
        take = rows + rows[:1] * (min_rows - len(rows))
        last = x[torch.tensor(take, device=x.device), at.last[take]]  # (b, C)
        return self._head(self.transformer.ln_f(last))[: len(rows)]

    def make_cache(self, slots: int, max_len: int | None = None) -> SlotCache:
        from gencli.model.cache import SlotCache

        p = self.lm_head.weight
        return SlotCache(self.config, slots, max_len or self.config.block_size, device=p.device, dtype=p.dtype)
