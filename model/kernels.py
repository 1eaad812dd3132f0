"""CPU inference kernels for the Linear layers (model/gpt.py's `Linear.kernel`), chosen by measurement.

Decoding multiplies a few rows (one per running sequence) by every weight matrix each step, so
the step costs what reading the weights costs, plus what a few-row GEMM loses to the CPU's peak.

- `PackedLinear` (float32): oneDNN's matmul over a weight reordered once, at load, into its
  blocked layout. F.linear's MKL sgemm takes a slow path for a handful of rows on some CPUs (AMD
  EPYC, for one); oneDNN over the plain (out, in) weight is about 1.7x faster, and over the
  prepacked one about 1.3x faster again at 8 rows (bench.decode). The packed copy replaces the
  plain weight, which `release` frees and `restore` brings back exactly (a reorder is a
  permutation of the same floats). A product over two rows or more gives each row what it gives
  alone, bit for bit, packed or not; one row alone takes another kernel (the engine doubles it).
- `Int8Linear` (int8): weights quantized per output channel to int8 and prepacked for fbgemm's
  dynamic-quantized linear, which quantizes the activations to 8 bits, multiplies in integers
  and scales back to float. fbgemm picks one activation scale for the whole input, which would
  make a row's result depend on its company; here each row is divided by its own largest
  magnitude first and carries two extra features, +1 and -1, against zero weights, so every
  input spans exactly [-1, 1] and gets the same scale: integer products are exact, so each row
  computes what it computes alone, one row or many, and a seeded or greedy output does not
  depend on its batch. The row's scale is multiplied back in after the product, with the bias.

fbgemm ships in PyTorch's x86-64 builds (`int8_supported` says whether this one has it).
"""

from __future__ import annotations

import warnings

import torch
from torch.nn import functional as F

PACK_ROWS = 16  # the row count oneDNN lays the weights out for (measured: 8 to 64 do alike)


def onednn_works() -> bool:
    """Whether oneDNN's linear runs here and agrees with F.linear (torch may be built without it)."""
    try:
        x = torch.arange(24.0).view(3, 8).sin()  # fixed values: leave the global RNG alone
        w, b = torch.arange(40.0).view(5, 8).cos(), torch.ones(5)
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
        yp = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        ref = F.linear(x, w, b)
        return torch.allclose(y, ref, atol=1e-5) and torch.allclose(yp, ref, atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):  # a torch built without oneDNN: F.linear then
        return False


def int8_supported() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


class PackedLinear:
    """y = x W^T + b through oneDNN, W in oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def dense(self) -> torch.Tensor:
        """The plain (out, in) weight, exactly as it was."""
        return self.packed.to_dense()


class Int8Linear:
    """y ~= x W^T + b with W in int8 (one scale per output row) and each input row in 8 bits."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        w = weight.detach().float()
        out, self.k = w.shape
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        padded = torch.cat([w, w.new_zeros(out, 2)], dim=1)  # the two span features weigh nothing
        with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao; torch<2.14 has them
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(padded, scale.double(), torch.zeros(out, dtype=torch.long), 0, torch.qint8)
            with _engine("fbgemm"):
                self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.bias = None if bias is None else bias.detach().float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.k)
        span = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
        xs = x.new_empty(x.size(0), self.k + 2)
        xs[:, self.k] = 1.0
        xs[:, self.k + 1] = -1.0
        torch.div(x, span, out=xs[:, : self.k])
        y = torch.ops.quantized.linear_dynamic(xs, self.packed, True)  # 7-bit activations: safe on AVX2
        y = torch.addcmul(self.bias, y, span) if self.bias is not None else y.mul_(span)
        return y.view(*shape[:-1], y.size(-1))

    def dense(self) -> torch.Tensor:
        raise RuntimeError("an int8 layer keeps no float weights: load the checkpoint in float32 to save or train it")


class _engine:
    """Prepack for one quantized engine, leaving the global setting as it was."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.before = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.name

    def __exit__(self, *exc):
        torch.backends.quantized.engine = self.before
