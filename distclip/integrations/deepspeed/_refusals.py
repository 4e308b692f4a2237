"""What the DeepSpeed adapter refuses, as one table, and the one loop that applies it.

Each :class:`Refusal` says what is refused, for which methods (by kind and unit) and
which optimizer wrappers, how it is detected, and the error with its fix.
:func:`refuse` applies the table, in order, before anything is changed; the first row
that applies is raised. ``docs/deepspeed.md`` lists the table (:func:`refusals_markdown`)
and says why each row is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from distclip.integrations.deepspeed._inner_step import inner_optimizers
from distclip.integrations.deepspeed._verified import SUPPORTED_WRAPPERS

__all__ = [
    "REFUSALS",
    "SUBCLASS_MESSAGE",
    "Refusal",
    "Setup",
    "message_of",
    "refusals_markdown",
    "refuse",
]

_MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


@dataclass(frozen=True)
class Setup:
    """An engine about to be hooked: what the refusals look at.

    Attributes:
        engine: the DeepSpeed engine.
        optimizer: ``engine.optimizer`` (a wrapper, or the torch optimizer at ZeRO 0).
        wrapper: the verified wrapper it is hooked as; ``None`` when it is none of them.
        subclass: ``optimizer`` is a proper subclass of ``wrapper``'s class.
        allow_unverified: the caller accepts what distclip has not verified.
        fp16: ``engine.fp16_enabled()``.
        method: the method's registered name.
        unit: ``"global"`` for a global-factor method, else the piecewise method's unit
            (``"element"``, ``"tensor"``, ``"row"``).
    """

    engine: Any
    optimizer: Any
    wrapper: str | None
    subclass: bool
    allow_unverified: bool
    fp16: bool
    method: str
    unit: str

    # The fields a row's message may name as ``{field}``.
    @property
    def optimizer_type(self) -> str:
        """The class name of the engine's optimizer."""
        return type(self.optimizer).__name__

    @property
    def supported(self) -> str:
        """The verified wrappers, comma-separated."""
        return ", ".join(SUPPORTED_WRAPPERS)

    @property
    def clip_in_inner_step(self) -> str:
        """How a message names a piecewise method clipping in the inner step."""
        if self.unit == "element":
            return (
                "distclip's element-wise clamp (value, coordinate_wise) under DeepSpeed's "
                f"{self.wrapper}"
            )
        return (
            f"distclip's {self.method!r} (clipped in the inner optimizer step) under "
            f"DeepSpeed's {self.wrapper}"
        )

    @property
    def per_unit_method(self) -> str:
        """How a message names a method with tensor or row units."""
        return f"distclip's {self.method!r} under DeepSpeed"

    @property
    def foreign_inner(self) -> str:
        """The class name of the first inner optimizer that is no torch optimizer."""
        return next(type(opt).__name__ for opt in _foreign_inner(self))


class Methods(NamedTuple):
    """The methods a row applies to: a label for the docs and the units it covers."""

    label: str
    units: frozenset[str]


ALL = Methods("all", frozenset({"global", "element", "tensor", "row"}))
PIECEWISE = Methods("piecewise", frozenset({"element", "tensor", "row"}))
PER_UNIT = Methods("piecewise with tensor or row units", frozenset({"tensor", "row"}))

#: Wrapper sets of the rows: ``None`` stands for ZeRO 0 without a verified wrapper.
ANY_WRAPPER: tuple[str | None, ...] = SUPPORTED_WRAPPERS
NO_WRAPPER: tuple[str | None, ...] = (None,)
FP16_WRAPPERS: tuple[str | None, ...] = ("FP16_Optimizer", "FP16_UnfusedOptimizer")


@dataclass(frozen=True)
class Refusal:
    """One configuration the adapter refuses.

    Attributes:
        what: what is refused, in words (the docs' first column).
        methods: the methods it applies to.
        wrappers: the wrappers it applies to (``None``: no wrapper, ZeRO 0).
        detected_by: how it is detected, in words (for the docs).
        detect: the test itself, on the :class:`Setup`.
        message: the error message with its fix; ``{field}`` names a field of
            :class:`Setup`.
        error: the error type raised.
    """

    what: str
    methods: Methods
    wrappers: tuple[str | None, ...]
    detected_by: str
    detect: Callable[[Setup], bool]
    message: str
    error: type[Exception] = NotImplementedError

    def applies(self, setup: Setup) -> bool:
        """True when this row refuses ``setup``."""
        return (
            setup.unit in self.methods.units
            and setup.wrapper in self.wrappers
            and bool(self.detect(setup))
        )


def _foreign_inner(setup: Setup) -> list[Any]:
    """The inner optimizers that are no torch optimizer (they have no step pre-hook)."""
    return [
        opt
        for opt in inner_optimizers(setup.optimizer)
        if not isinstance(opt, torch.optim.Optimizer)
    ]


def _muon(setup: Setup) -> bool:
    muon = getattr(sys.modules.get(_MUON_MODULE), "MuonWithAuxAdam", None)
    return muon is not None and any(isinstance(o, muon) for o in inner_optimizers(setup.optimizer))


#: The start of the subclass message, shared with the warning when it is allowed.
SUBCLASS_MESSAGE = (
    "the engine's optimizer is {optimizer_type}, a subclass of DeepSpeed's {wrapper} whose "
    "step() distclip has not verified (distclip supports exactly: {supported}, and ZeRO 0 "
    "in fp32)"
)

_USE_GLOBAL_NORM = "use a global-norm method (norm, autoclip, zclip) or value"

#: Everything the adapter refuses, in the order it is checked.
REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        "a subclass of a verified wrapper",
        ALL,
        ANY_WRAPPER,
        "`type(engine.optimizer)` is a proper subclass of a verified wrapper, and "
        "`allow_unverified` is false",
        lambda s: s.subclass and not s.allow_unverified,
        SUBCLASS_MESSAGE + "; allow_unverified=True hooks it as a {wrapper}",
    ),
    Refusal(
        "an optimizer that is no verified wrapper, under ZeRO, bf16 or fp16",
        ALL,
        NO_WRAPPER,
        "`engine.zero_optimization()`, `engine.bfloat16_enabled()` or `engine.fp16_enabled()`",
        lambda s: bool(s.engine.zero_optimization() or s.engine.bfloat16_enabled() or s.fp16),
        "the engine's optimizer is {optimizer_type}, not one of the DeepSpeed optimizer "
        "wrappers distclip has verified ({supported}); distclip does not know where this "
        "one computes its norm and reads its clip value",
    ),
    Refusal(
        "ZeRO 0 with torch autocast in fp16",
        ALL,
        NO_WRAPPER,
        "`engine.torch_autocast_z0_gradscaler` is set",
        lambda s: getattr(s.engine, "torch_autocast_z0_gradscaler", None) is not None,
        "ZeRO 0 with torch autocast in fp16 (a GradScaler inside the engine) is not "
        "supported by distclip's DeepSpeed adapter",
    ),
    Refusal(
        "ZeRO 0 in fp32 with an optimizer that is no torch optimizer",
        ALL,
        NO_WRAPPER,
        "`engine.optimizer` is not a `torch.optim.Optimizer`",
        lambda s: not isinstance(s.optimizer, torch.optim.Optimizer),
        "ZeRO 0 in fp32 with a {optimizer_type} that is not a torch.optim.Optimizer is not "
        "supported by distclip's DeepSpeed adapter",
    ),
    Refusal(
        "ZeRO 0 with fp16",
        ALL,
        FP16_WRAPPERS,
        "`engine.fp16_enabled()`",
        lambda s: s.fp16,
        "ZeRO 0 with fp16 (DeepSpeed's FP16_Optimizer / FP16_UnfusedOptimizer) is not "
        "supported: in DeepSpeed 0.19 engine.backward() does not loss-scale for these "
        "wrappers while their step() unscales, so DeepSpeed's updates and norms are off by "
        "the loss scale; use bf16, or ZeRO 1-3 for fp16",
    ),
    Refusal(
        "the legacy fused-Adam step",
        ALL,
        ("FP16_Optimizer",),
        "`optimizer.fused_adam_legacy`",
        lambda s: bool(getattr(s.optimizer, "fused_adam_legacy", False)),
        "DeepSpeed's FP16_Optimizer legacy fused-Adam step (optimizer.legacy_fusion) reads "
        "the clip value before it computes this step's norm; distclip does not support it",
    ),
    Refusal(
        "ZeRO 1/2 without a global norm",
        ALL,
        ("DeepSpeedZeroOptimizer",),
        "`optimizer.compute_grad_norm` is false",
        lambda s: not getattr(s.optimizer, "compute_grad_norm", True),
        "zero_optimization.compute_grad_norm is false: DeepSpeed then computes no global "
        "norm, and distclip clips by DeepSpeed's norm; set it to true",
        ValueError,
    ),
    Refusal(
        "the legacy fused-LAMB step",
        PIECEWISE,
        ("FP16_UnfusedOptimizer",),
        "`optimizer.fused_lamb_legacy`",
        lambda s: bool(getattr(s.optimizer, "fused_lamb_legacy", False)),
        "{clip_in_inner_step}: the legacy fused-LAMB step hands the gradients to its inner "
        "optimizer as arguments, not in .grad, so distclip cannot clip them; use another "
        "optimizer",
    ),
    Refusal(
        "torch autocast in fp16 inside a wrapper",
        PIECEWISE,
        ANY_WRAPPER,
        "`optimizer.torch_autocast_gradscaler` is set",
        lambda s: getattr(s.optimizer, "torch_autocast_gradscaler", None) is not None,
        "{clip_in_inner_step}: torch autocast in fp16 puts a torch.amp.GradScaler inside "
        "the wrapper, and with a fused optimizer the gradients are only unscaled inside its "
        "step, after distclip's clip would run; use bf16 or DeepSpeed's own fp16",
    ),
    Refusal(
        "ZenFlow",
        PIECEWISE,
        ANY_WRAPPER,
        "`optimizer.zenflow`",
        lambda s: bool(getattr(s.optimizer, "zenflow", False)),
        "{clip_in_inner_step}: ZenFlow updates the parameters in its own CPU step, not in "
        "the inner optimizer's step where distclip clips",
    ),
    Refusal(
        "Muon",
        PIECEWISE,
        ANY_WRAPPER,
        "an inner optimizer is DeepSpeed's `MuonWithAuxAdam`",
        _muon,
        "{clip_in_inner_step}: with Muon, DeepSpeed writes Muon's orthogonalised update "
        "into the gradient partitions before the inner step, so a clip there would act on "
        "the update, not the gradient",
    ),
    Refusal(
        "an inner optimizer that is no torch optimizer",
        PIECEWISE,
        ANY_WRAPPER,
        "`optimizer.optimizer` (or ZeRO 3's `backup_optimizer`) is not a `torch.optim.Optimizer`",
        lambda s: bool(_foreign_inner(s)),
        "{clip_in_inner_step}: the inner optimizer {foreign_inner} is not a "
        "torch.optim.Optimizer, so it has no step pre-hook for distclip's clip",
    ),
    Refusal(
        "model parallelism",
        PER_UNIT,
        (*ANY_WRAPPER, None),
        "`engine.mpu` is set",
        lambda s: getattr(s.engine, "mpu", None) is not None,
        "{per_unit_method} with model parallelism (an mpu): tensors are also split across "
        "the model-parallel ranks, in a layout DeepSpeed does not describe, so per-tensor "
        f"(per-row) norms cannot be assembled; {_USE_GLOBAL_NORM}",
    ),
    Refusal(
        "ZeRO 3 with the optimizer on NVMe",
        PER_UNIT,
        ("DeepSpeedZeroOptimizer_Stage3",),
        "`optimizer.swap_optimizer`",
        lambda s: bool(getattr(s.optimizer, "swap_optimizer", False)),
        "{per_unit_method}: ZeRO 3 with the optimizer offloaded to NVMe swaps the fp32 "
        "partitions in and out around the inner step, a path distclip has not verified; "
        f"offload to the CPU instead, or {_USE_GLOBAL_NORM}",
    ),
)


class _Fields:
    """The fields of a :class:`Setup` a message names, looked up only when used."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup

    def __getitem__(self, name: str) -> Any:
        return getattr(self.setup, name)


def message_of(refusal: Refusal | str, setup: Setup) -> str:
    """A row's message (or a message template) with ``setup``'s fields filled in."""
    template = refusal if isinstance(refusal, str) else refusal.message
    return template.format_map(_Fields(setup))


def refuse(setup: Setup) -> None:
    """Raise the first row of :data:`REFUSALS` that applies to ``setup``; else nothing.

    Raises:
        NotImplementedError, ValueError: that row's error, with its message.
    """
    for refusal in REFUSALS:
        if refusal.applies(setup):
            raise refusal.error(message_of(refusal, setup))


#: How the docs show the fields of a message.
_DOC_FIELDS = {
    "optimizer_type": "{optimizer class}",
    "wrapper": "{wrapper}",
    "supported": "{the verified wrappers}",
    "clip_in_inner_step": "distclip's {method} under DeepSpeed's {wrapper}",
    "per_unit_method": "distclip's {method} under DeepSpeed",
    "foreign_inner": "{inner optimizer class}",
}


def _wrappers_label(wrappers: tuple[str | None, ...]) -> str:
    names = [f"`{name}`" for name in wrappers if name is not None]
    if set(wrappers) >= set(SUPPORTED_WRAPPERS):
        names = ["any wrapper"]
    if None in wrappers:
        names.append("no verified wrapper")
    return ", ".join(names)


def refusals_markdown() -> str:
    """:data:`REFUSALS` as a Markdown table (what ``docs/deepspeed.md`` lists)."""
    lines = [
        "| # | Refused | Methods | Wrappers | Detected by | Error | Message (with the fix) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for number, refusal in enumerate(REFUSALS, start=1):
        message = refusal.message.format_map(_DOC_FIELDS)
        lines.append(
            f"| {number} | {refusal.what} | {refusal.methods.label} | "
            f"{_wrappers_label(refusal.wrappers)} | {refusal.detected_by} | "
            f"`{refusal.error.__name__}` | {message} |"
        )
    return "\n".join(lines) + "\n"
