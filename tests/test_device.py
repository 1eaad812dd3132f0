"""Device selection as a pure function of what is present."""

from __future__ import annotations

import pytest
import torch

from gencli.model.device import Inventory, choose_device, describe, inventory, resolve_device
from gencli.model.errors import DeviceError

GiB = 2**30
NONE = Inventory(cuda_free=(), mps=False)
MPS = Inventory(cuda_free=(), mps=True)
THREE_GPUS = Inventory(cuda_free=(2 * GiB, 9 * GiB, 5 * GiB), mps=False)


def test_auto_picks_gpu_with_most_free_memory():
    assert choose_device("auto", THREE_GPUS) == "cuda:1"
    assert choose_device("auto", Inventory(cuda_free=(7 * GiB,), mps=True)) == "cuda:0"
    assert choose_device("", THREE_GPUS) == "cuda:1"  # empty means auto


def test_auto_falls_back_to_mps_then_cpu():
    assert choose_device("auto", MPS) == "mps"
    assert choose_device("auto", NONE) == "cpu"


@pytest.mark.parametrize(
    "spec, inv, expected",
    [
        ("cpu", THREE_GPUS, "cpu"),
        (" CPU ", NONE, "cpu"),
        ("cuda", THREE_GPUS, "cuda:0"),
        ("cuda:2", THREE_GPUS, "cuda:2"),
        ("CUDA:1", THREE_GPUS, "cuda:1"),
        ("mps", MPS, "mps"),
    ],
)
def test_explicit_devices(spec, inv, expected):
    assert choose_device(spec, inv) == expected


@pytest.mark.parametrize(
    "spec, inv, words",
    [
        ("cuda:3", THREE_GPUS, ["cuda:3", "0..2"]),
        ("cuda:x", THREE_GPUS, ["cuda:x", "0..2"]),
        ("cuda:-1", THREE_GPUS, ["0..2"]),
        ("cuda", NONE, ["no CUDA GPU", "--device cpu"]),
        ("cuda:0", MPS, ["no CUDA GPU"]),
        ("mps", NONE, ["mps", "not available", "--device cpu"]),
        ("tpu", THREE_GPUS, ["unknown device", "'tpu'", "auto, cpu, cuda, cuda:N or mps"]),
    ],
)
def test_unavailable_or_unknown_device(spec, inv, words):
    with pytest.raises(DeviceError) as e:
        choose_device(spec, inv)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_resolve_cpu_on_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    inv = inventory()
    assert len(inv.cuda_free) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_describe_cpu():
    text = describe(torch.device("cpu"))
    assert "cpu" in text and "threads" in text
