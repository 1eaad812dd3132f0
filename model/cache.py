"""The slot KV cache: keys and values of every layer for a fixed number of sequence slots.

One preallocated pair of tensors, (n_layer, slots, n_head, max_len, head_dim), and per slot how
many positions it holds. A sequence takes a free slot when it is admitted and gives it back when
it finishes; nothing is copied or reshaped as sequences come and go, except that the engine may
move a sequence down into a free slot (`move`) so the running rows stay a contiguous range, which
attention then reads as a view rather than a gather. A slot's positions past its length hold
stale but finite values (the cache starts zeroed), and attention masks them.

This is the one cache of the engine (model/engine.py), which owns it. A paged cache would replace
the (slot, position) addressing with (block table, position); the engine only uses `write`,
`attend` and the slot bookkeeping below, so it would slot in behind the same calls.
"""

from __future__ import annotations

import heapq
import itertools
import math

import torch
from torch.nn import functional as F

from gencli.model.config import GPTConfig


class SlotCache:
    def __init__(self, config: GPTConfig, slots: int, max_len: int, *, device, dtype):
        if slots < 1 or max_len < 1:
            raise ValueError("a cache needs at least one slot of at least one position")
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, slots, config.n_head, bucketed(max_len), hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slots = slots
        self.max_len = max_len  # positions a slot holds (the tensors hold whole key buckets)
        self.lengths = [0] * slots  # positions each slot holds
        self._free = list(range(slots))  # a heap: the lowest free slot is taken first
        # On the CPU attention is three plain products (see attend); elsewhere the fused kernel.
        self.plain_attention = torch.device(device).type == "cpu"

    @classmethod
    def for_model(cls, model: torch.nn.Module, slots: int, max_len: int | None = None) -> SlotCache:
        """A cache for a GPT's (model/gpt.py) shape, on its device and in its dtype, max_len positions
        a slot (at most, and by default, its context). The engine allocates its cache with this; the
        model never imports the cache."""
        p, block = model.lm_head.weight, model.config.block_size
        return cls(model.config, slots, min(max_len or block, block), device=p.device, dtype=p.dtype)

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        slot = heapq.heappop(self._free)
        self.lengths[slot] = 0
        return slot

    def give_back(self, slot: int) -> None:
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def lowest_free(self) -> int | None:
        return self._free[0] if self._free else None

    def move(self, src: int, dst: int) -> None:
        """Move the sequence in slot src into the free slot dst (src becomes free)."""
        self._free.remove(dst)
        heapq.heapify(self._free)
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n
        self.give_back(src)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: SlotBatch) -> None:
        """Store this pass's keys and values, (B, n_head, T, head_dim), at each row's positions."""
        if batch.uniform:  # every row writes T positions from one start: slice assignment
            s = batch.start_max
            self.k[layer, batch.rows, :, s : s + k.size(2)] = k
            self.v[layer, batch.rows, :, s : s + v.size(2)] = v
            return
        kk, vv = k.transpose(1, 2), v.transpose(1, 2)  # (B, T, nh, hs)
        self.k[layer][batch.w_slot, :, batch.w_pos] = kk[batch.w_row, batch.w_t]
        self.v[layer][batch.w_slot, :, batch.w_pos] = vv[batch.w_row, batch.w_t]

    def attend(self, layer: int, q: torch.Tensor, batch: SlotBatch) -> torch.Tensor:
        """Attention of this pass's queries (B, n_head, T, head_dim) over each row's cached keys.

        Rows go in groups that share their query count and their key bucket (their length rounded
        up to BUCKET), each group one call with a per-row mask. What a row computes so depends only
        on itself (its position, its query count, its bucket), never on its company: the kernels
        round differently for another number of keys or queries, but not for another batch size.

        That last part holds on the CPU only for plain products. PyTorch's fused CPU attention
        (scaled_dot_product_attention's flash kernel) splits its work by the batch size against the
        thread count, and a row's result then changes in its last bits with the rows beside it
        (measured with torch 2.13: at one query per row with 2 threads, one row alone differs from
        the same row among 2 to 16; at 4 to 16 threads, other batch sizes too; at 3 queries too).
        At temperature 1 such bits move the inverse-CDF draw across a boundary now and then: a
        seeded output that changed with its company. So on the CPU a group computes q k^T, the
        mask, a softmax and the product with v as three plain operations, whose every row comes
        out the same for any batch and any thread count (tests/test_engine.py checks both). It is
        as fast as the fused kernel when decoding and slower on long prompts (bench.decode).
        """
        if len(batch.groups) == 1 and batch.groups[0].T == q.size(2):
            return self._attend(layer, q, batch.groups[0])
        y = q.new_zeros(q.shape)
        for g in batch.groups:
            y[g.rows, :, : g.T] = self._attend(layer, q[g.rows, :, : g.T], g)
        return y

    def _attend(self, layer: int, q: torch.Tensor, g: Group) -> torch.Tensor:
        k = self.k[layer, g.slots, :, : g.length]
        v = self.v[layer, g.slots, :, : g.length]
        if not self.plain_attention:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask)
        att = torch.matmul(q, k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.size(-1)))  # (b, nh, T, L)
        att.masked_fill_(g.hidden, float("-inf"))
        return torch.matmul(torch.softmax(att, dim=-1), v)  # (b, nh, T, hs)


BUCKET = 64  # attention reads a row's keys in whole buckets of this many positions


def bucketed(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


class Group:
    """Rows of one pass that attend in one call: the same query count T and key bucket."""

    def __init__(self, rows: list[int], slots: list[int], starts: list[int], T: int, device):
        self.T = T
        self.length = bucketed(max(starts) + T)
        self.rows = _index(rows, device)
        self.slots = _index(slots, device)
        pos = torch.tensor(starts, device=device).view(-1, 1, 1) + torch.arange(T, device=device).view(1, -1, 1)
        self.mask = (torch.arange(self.length, device=device).view(1, 1, -1) <= pos).unsqueeze(1)  # (b, 1, T, L)
        self.hidden = ~self.mask  # the keys each query must not see


def _index(ids: list[int], device):
    """A slice where the ids are a run (a view, no copy), else an index tensor."""
    if all(b == a + 1 for a, b in itertools.pairwise(ids)):
        return slice(ids[0], ids[-1] + 1)
    return torch.tensor(ids, dtype=torch.long, device=device)


class SlotBatch:
    """Where one forward pass reads and writes the cache: row b continues slot slots[b] at
    position starts[b] with counts[b] new tokens (rows right-padded to the longest)."""

    def __init__(self, slots: list[int], starts: list[int], counts: list[int], device):
        self.n = len(slots)
        self.T = max(counts)
        self.length = max(s + c for s, c in zip(starts, counts))  # positions the pass reaches
        self.start_max = max(starts)
        self.rows = _index(slots, device)  # the rows' slots, as a slice where they are a run
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.uniform = min(starts) == self.start_max and min(counts) == self.T
        self.starts = torch.tensor(starts, dtype=torch.long, device=device)
        if not self.uniform:  # one (row, t) -> (slot, position) pair per real token
            rows = [b for b, c in enumerate(counts) for _ in range(c)]
            ts = [t for c in counts for t in range(c)]
            self.w_row = torch.tensor(rows, dtype=torch.long, device=device)
            self.w_t = torch.tensor(ts, dtype=torch.long, device=device)
            self.w_slot = self.slots[self.w_row]
            self.w_pos = self.starts[self.w_row] + self.w_t
        # Positions count from each sequence's first token; a pad query takes a clamped one.
        self.positions = self.starts.view(-1, 1) + torch.arange(self.T, device=device).view(1, -1)  # (B, T)
        by: dict[tuple[int, int], list[int]] = {}
        for b, (st, c) in enumerate(zip(starts, counts)):
            by.setdefault((c, bucketed(st + c)), []).append(b)
        self.groups = [Group(rows, [slots[b] for b in rows], [starts[b] for b in rows], c, device)
                       for (c, _), rows in by.items()]
        self.last = torch.tensor([c - 1 for c in counts], dtype=torch.long, device=device)  # each row's last token
