"""The chunked LM-head loss gives F.cross_entropy's loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gencli.model.config import GPTConfig
from gencli.model.gpt import GPT
from gencli.model.loss import IGNORE, linear_cross_entropy


def reference(x, weight, targets):
    return F.cross_entropy(x @ weight.t(), targets, ignore_index=IGNORE)


def inputs(n=37, c=16, v=301, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, c, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = IGNORE
    return x, weight, targets


@pytest.mark.parametrize("chunk", [1, 8, 36, 37, 1000])
def test_loss_and_gradients_equal_cross_entropy(chunk):
    x, weight, targets = inputs()
    want = reference(x, weight, targets)
    want_gx, want_gw = torch.autograd.grad(want * 3.0, (x, weight))
    got = linear_cross_entropy(x, weight, targets, chunk=chunk)
    got_gx, got_gw = torch.autograd.grad(got * 3.0, (x, weight))  # backward scales by the outer gradient
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_gx, want_gx)
    torch.testing.assert_close(got_gw, want_gw)


def test_without_gradients_the_loss_alone():
    x, weight, targets = inputs()
    with torch.no_grad():
        got = linear_cross_entropy(x, weight, targets, chunk=10)
    torch.testing.assert_close(got, reference(x, weight, targets).detach())
    assert not got.requires_grad


def test_no_counted_target_is_zero_not_nan():
    x, weight, targets = inputs()
    targets[:] = IGNORE
    loss = linear_cross_entropy(x, weight, targets)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_bfloat16_autocast_is_close():
    x, weight, targets = inputs(dtype=torch.float32)
    want = reference(x, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(x, weight, targets, chunk=16)
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) < 0.05 * want.item()


def test_gpt_loss_is_forward_loss_with_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=200, dropout=0.0))
    model.double()
    idx = torch.randint(0, 200, (3, 16))
    targets = torch.randint(0, 200, (3, 16))
    targets[0, :7] = IGNORE
    _, want = model(idx, targets)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = model.loss(idx, targets)
    got.backward()
    torch.testing.assert_close(got, want)
    for name, p in model.named_parameters():  # the tied embedding/head matrix included
        torch.testing.assert_close(p.grad, want_grads[name], msg=name)
