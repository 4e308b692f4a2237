"""A method added through the extension point, from its own file only (``tests/toy_method.py``).

The method is registered by importing its module, nothing else in distclip is edited.
On 2 gloo ranks: DDP and FSDP2 through ``ClippedOptimizer``, and DeepSpeed ZeRO-2 through
the ``"distclip"`` section of its config, each against the single-process run on every
rank's data, whose thresholds are in turn the rule's in plain Python.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch

from distclip.clippers.registry import METHODS
from tests.deepspeed.engines import make_spec, reference_train
from tests.support.harness import ProcessGroupHarness

pytestmark = pytest.mark.distributed

pytest.importorskip("deepspeed")

STEPS = 8
NAME = "toy_mean_fraction"
SECTION = {"method": NAME, "fraction": 0.7}


@pytest.fixture(scope="module")
def toy() -> Iterator[ModuleType]:
    """The toy method's module, imported (so registered) only while these tests run.

    Other test modules see the methods distclip ships: collected before, and cleaned up
    after (the registration and the module, so a later import registers it again).
    """
    module = importlib.import_module("tests.toy_method")
    yield module
    METHODS.pop(module.NAME, None)
    sys.modules.pop("tests.toy_method", None)
    sys.modules.pop("tests.deepspeed.toy_workers", None)


@pytest.fixture(scope="module")
def workers(toy: ModuleType) -> ModuleType:
    """The rank functions (their module imports the toy method in every rank)."""
    return importlib.import_module("tests.deepspeed.toy_workers")


def _spec(stage: int) -> dict[str, Any]:
    return make_spec(f"toy-z{stage}", stage=stage, clip=SECTION, steps=STEPS)


def _close(got: list[float], want: list[float], what: str) -> None:
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64),
        torch.tensor(want, dtype=torch.float64),
        rtol=1e-6,
        atol=0,
        msg=lambda m: f"{what}: {m}",
    )


@pytest.fixture(scope="module")
def reference(toy: ModuleType) -> dict[str, Any]:
    """One process on every rank's data; its thresholds are the plain-Python rule's."""
    ref = reference_train(_spec(2))
    records = ref["records"]
    expected = toy.slow_thresholds(records["total_norm"], SECTION["fraction"])
    _close(records["threshold"], expected, "single-process thresholds vs the rule")
    clipped = sum(n > t for n, t in zip(records["total_norm"], records["threshold"], strict=True))
    assert 0 < clipped < STEPS  # the rule clips some steps and not others
    return ref


@pytest.mark.parametrize("layout", ["ddp", "fsdp2"])
def test_toy_method_on_ddp_and_fsdp2(
    ds_group: ProcessGroupHarness, workers: ModuleType, reference: dict[str, Any], layout: str
) -> None:
    spec = _spec(2)
    for rank, out in enumerate(ds_group.run(workers.native_run, layout, spec)):
        assert out["method"] == NAME
        for key in ("total_norm", "threshold", "clip_coef"):
            _close(out["records"][key], reference["records"][key], f"{layout} rank {rank} {key}")
        torch.testing.assert_close(out["params"], reference["params"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("stage", [0, 2])
def test_toy_method_from_the_deepspeed_config(
    ds_group: ProcessGroupHarness, workers: ModuleType, reference: dict[str, Any], stage: int
) -> None:
    for rank, out in enumerate(ds_group.run(workers.deepspeed_run, _spec(stage))):
        assert "error" not in out, out.get("error")
        assert out["method"] == NAME
        assert out["hook_point"].endswith(("clip_grad", "clip_fp32_gradients")), out["hook_point"]
        for key in ("total_norm", "threshold", "clip_coef"):
            _close(
                out["records"][key], reference["records"][key], f"ZeRO {stage} rank {rank} {key}"
            )
        torch.testing.assert_close(out["params"], reference["params"], rtol=1e-5, atol=1e-7)
