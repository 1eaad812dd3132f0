"""Sampling parameters and prompt fitting: what a submit checks before any model is loaded.

Kept apart from engine.py so that the client and the CLI can check a job without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gencli.model.errors import ContextOverflowError, InvalidParameterError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidParameterError(f"max_tokens must be a positive integer, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidParameterError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise InvalidParameterError(f"top_k must be a positive integer, got {self.top_k}")
        if not (0 < self.top_p <= 1):  # NaN fails this too
            raise InvalidParameterError(f"top_p must be in (0, 1], got {self.top_p}")


def default_max_tokens(block_size: int) -> int:
    """New tokens when none are asked for: 256, or half the context of a smaller model."""
    return min(256, block_size // 2)


def fit_prompt(ids: list[int], max_tokens: int, block_size: int, *, truncate: bool) -> list[int]:
    """The prompt if it fits with max_tokens new tokens; with truncate, its newest tokens."""
    if max_tokens >= block_size:
        raise ContextOverflowError(
            f"max_tokens {max_tokens} leaves no room for a prompt in the model's context of "
            f"{block_size} tokens: use max_tokens < {block_size}"
        )
    if len(ids) + max_tokens <= block_size:
        return ids
    if truncate:
        return ids[len(ids) + max_tokens - block_size :]
    raise ContextOverflowError(
        f"prompt of {len(ids)} tokens + max_tokens {max_tokens} = {len(ids) + max_tokens} exceeds "
        f"the model's context of {block_size} tokens: shorten the prompt, lower max_tokens, "
        "or pass --truncate to drop the oldest prompt tokens"
    )
