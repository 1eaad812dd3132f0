"""A GPT-2-architecture model in nanoGPT's shape, with a cached pass for decoding.

Learned positions, pre-LayerNorm (bias optional), GELU MLP, tied token embedding and LM head.
`forward` is the whole-sequence pass (training, scoring). `forward_cached` continues sequences
held in the engine's slot cache (model/cache.py): each row is one sequence at its own position,
taking one token (a decode step) or a chunk of its prompt (prefill); its positions count from
its own first token and it attends only to its own keys, so a row computes what it would alone.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F

from gencli.model import kernels
from gencli.model.config import GPTConfig
from gencli.model.loss import IGNORE, linear_cross_entropy

if TYPE_CHECKING:
    from gencli.model.cache import SlotBatch, SlotCache


class Linear(nn.Linear):
    """nn.Linear that runs through a CPU inference kernel (model/kernels.py) once
    `GPT.prepare_for_inference` gives it one: oneDNN over prepacked float32 weights, or int8.
    Training, and a pass with grad where the plain weight is kept, takes F.linear."""

    kernel = None  # set by GPT.prepare_for_inference

    def forward(self, x):
        if self.kernel is not None and (not torch.is_grad_enabled() or self.weight.numel() == 0):
            return self.kernel(x)  # (with grad: weights in the kernel's form; model.train() brings them back)
        return F.linear(x, self.weight, self.bias)

    def set_kernel(self, kernel, *, release: bool) -> None:
        """Run through kernel; release: free the plain weight, which the kernel holds in its own form."""
        self.kernel = kernel
        if release:
            self.weight.data = self.weight.data.new_empty(0)

    def drop_kernel(self) -> None:
        """Back to F.linear over the plain weight (restored from the kernel's copy where it was freed)."""
        if self.kernel is not None and self.weight.numel() == 0:
            self.weight.data = self.kernel.dense()
        self.kernel = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel is not None and self.weight.numel() == 0:
            destination[prefix + "weight"] = self.kernel.dense()


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

    def forward(self, x, cache: SlotCache | None = None, batch: SlotBatch | None = None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout = self.attn_dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            cache.write(self.layer_idx, k, v, batch)
            y = cache.attend(self.layer_idx, q, batch)  # each row over its own keys so far
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

    def forward(self, x, cache=None, batch=None):
        x = x + self.attn(self.ln_1(x), cache, batch)
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
        self._num_params = sum(p.numel() for p in self.parameters())

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameters, the tied embedding/head matrix counted once (as built: a weight that an
        inference kernel holds in its own form still counts)."""
        return self._num_params

    @property
    def quantized(self) -> bool:
        """Whether prepare_for_inference put it on int8 kernels."""
        return isinstance(self.lm_head.kernel, kernels.Int8Linear)

    @property
    def dtype_name(self) -> str:
        """What its weights compute in: float32, bfloat16, ..., or int8 once quantized."""
        return "int8" if self.quantized else str(self.lm_head.weight.dtype).removeprefix("torch.")

    def train(self, mode: bool = True):
        if mode:
            self._drop_kernels()  # weights will change: back to the plain ones
        return super().train(mode)

    def _drop_kernels(self) -> None:
        if self.quantized:
            raise RuntimeError("an int8 model keeps no float weights to train or prepare again: load the "
                               "checkpoint in float32")
        self._head_t = None
        for m in self.modules():
            if isinstance(m, Linear):
                m.drop_kernel()

    def prepare_for_inference(self, *, int8: bool = False) -> GPT:
        """Switch to eval mode and pick the fastest way to run the Linear layers here.

        On the CPU in float32, every Linear layer runs through oneDNN over weights prepacked once
        (kernels.PackedLinear); each packed copy replaces its plain weight, except the LM head's,
        which is also the token embedding (so it has both). int8 (CPU only): every Linear layer,
        the LM head included, runs on int8 weights through fbgemm (kernels.Int8Linear), and the
        float weights are freed, except the embedding's, which looks up a few rows a step in float32.
        Elsewhere (a GPU, bfloat16, a torch without oneDNN) the LM head keeps a (C, V) row-major copy:
        x @ W.T through F.linear takes a slow BLAS path for a handful of rows against a (V, C)
        matrix this large, and the pre-transposed copy reads the same bytes in a plain product.
        """
        if self.quantized and int8:
            return self  # prepared already
        self._drop_kernels()  # a second call (the weights changed since) prepares them again
        self.eval()
        head = self.lm_head.weight
        cpu32 = head.device.type == "cpu" and head.dtype == torch.float32
        if int8 and not (cpu32 and kernels.int8_supported()):
            raise ValueError("int8 runs on the CPU, from float32 weights, with PyTorch's fbgemm kernels (x86-64)")
        kernel = kernels.Int8Linear if int8 else kernels.PackedLinear if cpu32 and kernels.onednn_works() else None
        if kernel is None:
            self._head_t = head.detach().t().contiguous()
            return self
        for m in self.modules():
            if isinstance(m, Linear):
                m.set_kernel(kernel(m.weight, m.bias), release=m is not self.lm_head)
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

    def forward_cached(self, idx: torch.Tensor, cache: SlotCache, batch: SlotBatch,
                       rows: list[int] | None = None) -> torch.Tensor | None:
        """Continue cached sequences: idx (B, T) holds each row's new tokens (right-padded), for
        positions batch.starts[b].. of slot batch.slots[b]. Returns the logits (len(rows), V) of the last
        new token of each of rows, in that order, a row as often as it is named (default: every
        row; none: None)."""
        return self.last_logits(self.hidden_cached(idx, cache, batch), batch, rows)

    def hidden_cached(self, idx: torch.Tensor, cache: SlotCache, batch: SlotBatch) -> torch.Tensor:
        """forward_cached's last block's output (B, T, C), every new token's (logits_of turns any of
        them into logits)."""
        if batch.length > min(self.config.block_size, cache.max_len):
            raise ValueError(f"sequence of {batch.length} tokens exceeds the context of {cache.max_len}")
        pos = batch.positions.clamp(max=self.config.block_size - 1)  # a pad query's position is never read
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x, cache, batch)
        return x

    def last_logits(self, x: torch.Tensor, batch: SlotBatch, rows: list[int] | None = None) -> torch.Tensor | None:
        """The logits of the last new token of each of rows (forward_cached's result) from x."""
        rows = list(range(batch.n)) if rows is None else rows
        if not rows:
            return None
        return self.logits_of(x[torch.tensor(rows, device=x.device), batch.last[rows]])  # (len(rows), V)

    def logits_of(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, V) of hidden states x (N, C) from hidden_cached."""
        return self._head(self.transformer.ln_f(x))
