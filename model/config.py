"""A GPT model's shape: what a checkpoint records and what the model, its cache and the trainer are
built from (a module of its own, so the cache and the model both read it without importing each other)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
