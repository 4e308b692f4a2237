"""Every refusal of the DeepSpeed adapter: its error type, its exact message, and no change.

Single process, no ``deepspeed.initialize``: each case is a stand-in engine (an
uninitialised ``DeepSpeedEngine``) holding an uninitialised instance of the real
DeepSpeed wrapper class, with only the attributes the adapter reads set. Most of these
configurations (ZenFlow, Muon, NVMe, the legacy fused paths, torch autocast) cannot be
built on a CPU; the stand-ins reach every row of the refusal table all the same. The
expected messages are written out in full: they are the adapter's contract.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

import distclip.deepspeed  # noqa: E402
from distclip.clippers import resolve_method  # noqa: E402
from distclip.integrations.deepspeed import plan_hook  # noqa: E402

_MODULES = {
    "DeepSpeedZeroOptimizer": "deepspeed.runtime.zero.stage_1_and_2",
    "DeepSpeedZeroOptimizer_Stage3": "deepspeed.runtime.zero.stage3",
    "BF16_Optimizer": "deepspeed.runtime.bf16_optimizer",
    "FP16_Optimizer": "deepspeed.runtime.fp16.fused_optimizer",
    "FP16_UnfusedOptimizer": "deepspeed.runtime.fp16.unfused_optimizer",
}
SUPPORTED = ", ".join(_MODULES)

Z12 = "DeepSpeedZeroOptimizer"
Z3 = "DeepSpeedZeroOptimizer_Stage3"
BF16 = "BF16_Optimizer"
FP16 = "FP16_Optimizer"
UNFUSED = "FP16_UnfusedOptimizer"


def _wrapper_class(name: str) -> type:
    return getattr(importlib.import_module(_MODULES[name]), name)  # type: ignore[no-any-return]


def _inner() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)


def _wrapper(name: str, cls: type | None = None, **attrs: Any) -> Any:
    """An instance of DeepSpeed's wrapper ``name`` (or of ``cls``) without its constructor."""
    cls = cls or _wrapper_class(name)
    wrapper = cls.__new__(cls)
    wrapper.__dict__.update({"optimizer": _inner(), **attrs})
    return wrapper


def _engine(
    optimizer: Any,
    *,
    zero: bool = True,
    bf16: bool = False,
    fp16: bool = False,
    **attrs: Any,
) -> Any:
    """A ``DeepSpeedEngine`` without its constructor: what the adapter reads of one."""
    engine = deepspeed.DeepSpeedEngine.__new__(deepspeed.DeepSpeedEngine)
    engine.__dict__.update(
        {
            "optimizer": optimizer,
            "mpu": None,
            "torch_autocast_z0_gradscaler": None,
            "zero_optimization": lambda: zero,
            "bfloat16_enabled": lambda: bf16,
            "fp16_enabled": lambda: fp16,
            **attrs,
        }
    )
    return engine


class Foreign:
    """An optimizer that is no ``torch.optim.Optimizer``."""


def _muon() -> Any:
    cls = importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer").MuonWithAuxAdam
    return cls.__new__(cls)


def _clamp(wrapper: str) -> str:
    return f"distclip's element-wise clamp (value, coordinate_wise) under DeepSpeed's {wrapper}"


def _inner_clip(method: str, wrapper: str) -> str:
    return (
        f"distclip's {method!r} (clipped in the inner optimizer step) under DeepSpeed's {wrapper}"
    )


_MPU = (
    " with model parallelism (an mpu): tensors are also split across the model-parallel "
    "ranks, in a layout DeepSpeed does not describe, so per-tensor (per-row) norms cannot "
    "be assembled; use a global-norm method (norm, autoclip, zclip) or value"
)
_LAMB = (
    ": the legacy fused-LAMB step hands the gradients to its inner optimizer as arguments, "
    "not in .grad, so distclip cannot clip them; use another optimizer"
)
_SCALER = (
    ": torch autocast in fp16 puts a torch.amp.GradScaler inside the wrapper, and with a "
    "fused optimizer the gradients are only unscaled inside its step, after distclip's "
    "clip would run; use bf16 or DeepSpeed's own fp16"
)
_ZENFLOW = (
    ": ZenFlow updates the parameters in its own CPU step, not in the inner optimizer's "
    "step where distclip clips"
)
_MUON = (
    ": with Muon, DeepSpeed writes Muon's orthogonalised update into the gradient "
    "partitions before the inner step, so a clip there would act on the update, not the "
    "gradient"
)
_NVME = (
    ": ZeRO 3 with the optimizer offloaded to NVMe swaps the fp32 partitions in and out "
    "around the inner step, a path distclip has not verified; offload to the CPU instead, "
    "or use a global-norm method (norm, autoclip, zclip) or value"
)
_UNKNOWN = (
    "the engine's optimizer is SGD, not one of the DeepSpeed optimizer wrappers distclip "
    f"has verified ({SUPPORTED}); distclip does not know where this one computes its norm "
    "and reads its clip value"
)
_FP16_ZERO0 = (
    "ZeRO 0 with fp16 (DeepSpeed's FP16_Optimizer / FP16_UnfusedOptimizer) is not "
    "supported: in DeepSpeed 0.19 engine.backward() does not loss-scale for these "
    "wrappers while their step() unscales, so DeepSpeed's updates and norms are off by "
    "the loss scale; use bf16, or ZeRO 1-3 for fp16"
)
_SUBCLASS = (
    "the engine's optimizer is CustomZero, a subclass of DeepSpeed's DeepSpeedZeroOptimizer "
    f"whose step() distclip has not verified (distclip supports exactly: {SUPPORTED}, and "
    "ZeRO 0 in fp32)"
)


def _custom_zero() -> Any:
    return _wrapper(Z12, type("CustomZero", (_wrapper_class(Z12),), {}))


#: (case id, engine builder, method, error type, exact message)
REFUSED: list[tuple[str, Callable[[], Any], str, type[Exception], str]] = [
    (
        "subclass",
        lambda: _engine(_custom_zero()),
        "autoclip",
        NotImplementedError,
        _SUBCLASS + "; allow_unverified=True hooks it as a DeepSpeedZeroOptimizer",
    ),
    ("unknown-zero", lambda: _engine(_inner()), "autoclip", NotImplementedError, _UNKNOWN),
    (
        "unknown-bf16",
        lambda: _engine(_inner(), zero=False, bf16=True),
        "value",
        NotImplementedError,
        _UNKNOWN,
    ),
    (
        "unknown-fp16",
        lambda: _engine(_inner(), zero=False, fp16=True),
        "agc",
        NotImplementedError,
        _UNKNOWN,
    ),
    (
        "zero0-autocast",
        lambda: _engine(_inner(), zero=False, torch_autocast_z0_gradscaler=object()),
        "norm",
        NotImplementedError,
        "ZeRO 0 with torch autocast in fp16 (a GradScaler inside the engine) is not "
        "supported by distclip's DeepSpeed adapter",
    ),
    (
        "zero0-foreign",
        lambda: _engine(Foreign(), zero=False),
        "autoclip",
        NotImplementedError,
        "ZeRO 0 in fp32 with a Foreign that is not a torch.optim.Optimizer is not supported "
        "by distclip's DeepSpeed adapter",
    ),
    (
        "zero0-mpu",
        lambda: _engine(_inner(), zero=False, mpu=object()),
        "agc",
        NotImplementedError,
        "distclip's 'agc' under DeepSpeed" + _MPU,
    ),
    (
        "fp16-fused",
        lambda: _engine(_wrapper(FP16), fp16=True),
        "autoclip",
        NotImplementedError,
        _FP16_ZERO0,
    ),
    (
        "fp16-unfused",
        lambda: _engine(_wrapper(UNFUSED), fp16=True),
        "value",
        NotImplementedError,
        _FP16_ZERO0,
    ),
    (
        "fp16-legacy-adam",
        lambda: _engine(_wrapper(FP16, fused_adam_legacy=True), bf16=True),
        "zclip",
        NotImplementedError,
        "DeepSpeed's FP16_Optimizer legacy fused-Adam step (optimizer.legacy_fusion) reads "
        "the clip value before it computes this step's norm; distclip does not support it",
    ),
    (
        "no-grad-norm",
        lambda: _engine(_wrapper(Z12, compute_grad_norm=False)),
        "norm",
        ValueError,
        "zero_optimization.compute_grad_norm is false: DeepSpeed then computes no global "
        "norm, and distclip clips by DeepSpeed's norm; set it to true",
    ),
    (
        "lamb-clamp",
        lambda: _engine(_wrapper(UNFUSED, fused_lamb_legacy=True), bf16=True),
        "value",
        NotImplementedError,
        _clamp(UNFUSED) + _LAMB,
    ),
    (
        "lamb-layer-wise",
        lambda: _engine(_wrapper(UNFUSED, fused_lamb_legacy=True), bf16=True),
        "layer_wise",
        NotImplementedError,
        _inner_clip("layer_wise", UNFUSED) + _LAMB,
    ),
    (
        "scaler-clamp",
        lambda: _engine(_wrapper(Z12, torch_autocast_gradscaler=object())),
        "coordinate_wise",
        NotImplementedError,
        _clamp(Z12) + _SCALER,
    ),
    (
        "scaler-agc",
        lambda: _engine(_wrapper(Z3, torch_autocast_gradscaler=object())),
        "agc",
        NotImplementedError,
        _inner_clip("agc", Z3) + _SCALER,
    ),
    (
        "zenflow",
        lambda: _engine(_wrapper(Z3, zenflow=True)),
        "agc",
        NotImplementedError,
        _inner_clip("agc", Z3) + _ZENFLOW,
    ),
    (
        "muon",
        lambda: _engine(_wrapper(BF16, optimizer=_muon()), zero=False, bf16=True),
        "value",
        NotImplementedError,
        _clamp(BF16) + _MUON,
    ),
    (
        "foreign-backup",
        lambda: _engine(_wrapper(Z3, backup_optimizer=Foreign())),
        "coordinate_wise",
        NotImplementedError,
        _clamp(Z3) + ": the inner optimizer Foreign is not a torch.optim.Optimizer, so it "
        "has no step pre-hook for distclip's clip",
    ),
    (
        "mpu",
        lambda: _engine(_wrapper(Z12), mpu=object()),
        "layer_wise",
        NotImplementedError,
        "distclip's 'layer_wise' under DeepSpeed" + _MPU,
    ),
    (
        "nvme",
        lambda: _engine(_wrapper(Z3, swap_optimizer=True)),
        "agc",
        NotImplementedError,
        "distclip's 'agc' under DeepSpeed" + _NVME,
    ),
    # Several reasons at once: the first in the table's order is the one reported.
    (
        "first-of-three",
        lambda: _engine(_wrapper(Z3, zenflow=True, swap_optimizer=True), mpu=object()),
        "layer_wise",
        NotImplementedError,
        _inner_clip("layer_wise", Z3) + _ZENFLOW,
    ),
    (
        "norm-before-clamp",
        lambda: _engine(_wrapper(Z12, compute_grad_norm=False, torch_autocast_gradscaler=object())),
        "value",
        ValueError,
        "zero_optimization.compute_grad_norm is false: DeepSpeed then computes no global "
        "norm, and distclip clips by DeepSpeed's norm; set it to true",
    ),
    (
        "not-an-engine",
        lambda: torch.nn.Linear(2, 2),
        "autoclip",
        TypeError,
        "engine must be a deepspeed.DeepSpeedEngine (what deepspeed.initialize returns "
        "first), got Linear",
    ),
    (
        "no-optimizer",
        lambda: _engine(None),
        "autoclip",
        ValueError,
        "engine has no optimizer (deepspeed.initialize without an optimizer and without one "
        "in the config): there is nothing to clip",
    ),
]


def _state(engine: Any) -> list[Any]:
    """What attaching would change: the engine's dict, the wrapper's class, dict and hooks."""
    optimizer = engine.__dict__.get("optimizer")
    inner = [getattr(optimizer, "optimizer", None), getattr(optimizer, "backup_optimizer", None)]
    return [
        sorted(engine.__dict__),
        type(optimizer),
        sorted(getattr(optimizer, "__dict__", {})),
        [len(getattr(opt, "_optimizer_step_pre_hooks", {})) for opt in inner],
    ]


@pytest.mark.parametrize(
    ("build", "method", "error", "message"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_refused_with_its_message_before_any_change(
    build: Callable[[], Any], method: str, error: type[Exception], message: str
) -> None:
    engine = build()
    before = _state(engine)
    with pytest.raises(error) as info:
        distclip.deepspeed.attach(engine, method)
    assert type(info.value) is error
    assert str(info.value) == message
    assert _state(engine) == before


#: (case id, engine builder, method, hook point): configurations the table lets through.
ACCEPTED: list[tuple[str, Callable[[], Any], str, str]] = [
    ("zero0-norm", lambda: _engine(_inner(), zero=False), "autoclip", "engine.clip_fp32_gradients"),
    ("zero0-clamp", lambda: _engine(_inner(), zero=False), "value", "engine.optimizer.step"),
    ("zero0-agc", lambda: _engine(_inner(), zero=False), "agc", "engine.clip_fp32_gradients"),
    (
        "zero0-mpu-norm",
        lambda: _engine(_inner(), zero=False, mpu=object()),
        "norm",
        "engine.clip_fp32_gradients",
    ),
    ("zero2-norm", lambda: _engine(_wrapper(Z12)), "zclip", f"{Z12}.clip_grad"),
    ("zero2-clamp", lambda: _engine(_wrapper(Z12)), "value", f"{Z12}.optimizer.step"),
    ("zero3-layer-wise", lambda: _engine(_wrapper(Z3)), "layer_wise", f"{Z3}.optimizer.step"),
    (
        "bf16-agc",
        lambda: _engine(_wrapper(BF16), zero=False, bf16=True),
        "agc",
        f"{BF16}.optimizer.step",
    ),
    # What is refused to a piecewise method only: a global-norm method clips by the norm.
    ("zenflow-norm", lambda: _engine(_wrapper(Z3, zenflow=True)), "autoclip", f"{Z3}.clip_grad"),
    ("muon-norm", lambda: _engine(_wrapper(Z12, optimizer=_muon())), "norm", f"{Z12}.clip_grad"),
    ("mpu-norm", lambda: _engine(_wrapper(Z12), mpu=object()), "autoclip", f"{Z12}.clip_grad"),
    ("mpu-clamp", lambda: _engine(_wrapper(Z12), mpu=object()), "value", f"{Z12}.optimizer.step"),
    (
        "nvme-clamp",
        lambda: _engine(_wrapper(Z3, swap_optimizer=True)),
        "value",
        f"{Z3}.optimizer.step",
    ),
    (
        "lamb-norm",
        lambda: _engine(_wrapper(UNFUSED, fused_lamb_legacy=True), bf16=True),
        "autoclip",
        f"{UNFUSED}.clip_grad",
    ),
]


@pytest.mark.parametrize(
    ("build", "method", "hook_point"),
    [case[1:] for case in ACCEPTED],
    ids=[case[0] for case in ACCEPTED],
)
def test_accepted_configurations_get_their_hook_point(
    build: Callable[[], Any], method: str, hook_point: str
) -> None:
    engine = build()
    before = _state(engine)
    plan = plan_hook(engine, allow_unverified=False, spec=resolve_method(method))
    assert plan.hook_point == hook_point
    assert plan.wrapper == (None if hook_point.startswith("engine.") else hook_point.split(".")[0])
    assert _state(engine) == before  # planning changes nothing


def test_subclass_allowed_is_warned_then_checked_as_its_base() -> None:
    engine = _engine(_custom_zero())
    with pytest.warns(RuntimeWarning) as caught:
        plan = plan_hook(engine, allow_unverified=True, spec=resolve_method("autoclip"))
    assert [str(w.message) for w in caught] == [
        _SUBCLASS + "; allow_unverified=True: hooking it as a DeepSpeedZeroOptimizer"
    ]
    assert plan.hook_point == f"{Z12}.clip_grad"
    # As its base it meets the base's refusals (the warning comes first, as before).
    engine.optimizer.__dict__["compute_grad_norm"] = False
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="compute_grad_norm"):
        plan_hook(engine, allow_unverified=True, spec=resolve_method("autoclip"))


def _matches(refusal: Any, message: str) -> bool:
    """Whether ``message`` is ``refusal``'s template with its fields filled in."""
    parts = re.split(r"\{\w+\}", refusal.message)
    return re.fullmatch(".+".join(map(re.escape, parts)), message) is not None


def test_docs_list_the_refusal_table() -> None:
    from distclip.integrations.deepspeed._refusals import REFUSALS, refusals_markdown

    page = (Path(__file__).resolve().parents[2] / "docs" / "deepspeed.md").read_text()
    table = refusals_markdown()
    assert table in page, "docs/deepspeed.md: regenerate the table with refusals_markdown()"
    assert len(table.splitlines()) == 2 + len(REFUSALS)
    # Every refused case above is one row's message, and every row is reached.
    rows = {row.message for row in REFUSALS}
    reached = {row.message for row in REFUSALS for case in REFUSED if _matches(row, case[4])}
    assert reached == rows
