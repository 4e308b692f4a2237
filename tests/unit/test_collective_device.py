"""Where a collective runs: the gradients' own device, whatever the current device is."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.support.internals import collectives


@pytest.mark.parametrize(
    ("backend", "like", "expected"),
    [
        ("nccl", "cuda:1", "cuda:1"),  # a rank that moved its model without set_device
        ("nccl", "cuda:3", "cuda:3"),
        ("gloo", "cpu", "cpu"),
        ("gloo", "cuda:1", "cpu"),  # gloo reduces host tensors
        ("cpu:gloo,cuda:nccl", "cuda:2", "cuda:2"),
        ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    ],
)
def test_collective_device_follows_the_tensor(
    monkeypatch: pytest.MonkeyPatch, backend: str, like: str, expected: str
) -> None:
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: backend)
    with FakeTensorMode():  # a tensor that claims a CUDA device, on a machine without one
        tensor = torch.empty((), device=like)
    assert collectives.collective_device(None, tensor) == torch.device(expected)
