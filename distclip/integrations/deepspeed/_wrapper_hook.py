"""The norm-driven methods under a DeepSpeed optimizer wrapper: its ``clip_grad`` supplied.

Each verified wrapper computes the pre-clip global norm inside ``step()``, stores it,
and only then reads its clip value ``self.clip_grad``. distclip makes ``clip_grad`` a
property (on a per-instance subclass) that, armed by a thin ``step`` wrapper, hands the
stored norm to the clipper and returns this step's threshold as a device tensor
(:class:`DeviceClipValue`). For a piecewise method the property reads 0 (DeepSpeed's
clip is neutral) and the inner step's pre-hook clips (``_inner_step``). What was
verified, wrapper by wrapper: ``docs/deepspeed.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from distclip.clippers import ClipStats, PiecewiseClipper
from distclip.integrations.deepspeed._inner_step import (
    InnerApply,
    InnerStepHook,
    inner_apply,
    inner_optimizers,
)
from distclip.integrations.deepspeed._installed import InstalledHook, Observer
from distclip.integrations.deepspeed._verified import VERIFIED_VERSIONS

__all__ = ["DeviceClipValue", "install_wrapper_hook"]

logger = logging.getLogger(__name__)

#: Attribute of a hooked wrapper instance holding its :class:`_WrapperHook`.
_HOOK_ATTR = "_distclip_hook"


def _loss_scale(optimizer: Any) -> float:
    """The loss scale the wrapper divides by now (1 without loss scaling)."""
    scale = getattr(optimizer, "loss_scale", None)
    return 1.0 if scale is None else float(scale)


def _as_norm_tensor(norm: Any) -> Tensor:
    if isinstance(norm, Tensor):
        return norm
    return torch.full((), float(norm), dtype=torch.float64)  # a fill, not a copy from host


class DeviceClipValue(Tensor):
    """A 0-dim threshold on the device that DeepSpeed can use as its ``clip_grad``.

    Every wrapper first asks ``clip_grad > 0.`` / ``clip_grad == 0.0`` on the host, then
    divides a norm tensor by it. A distclip threshold is always positive (``inf`` when
    nothing bounds it), so those comparisons with a number <= 0 are answered on the
    host without reading the tensor, and the division is an ordinary tensor op: the
    threshold reaches DeepSpeed's clip without a read to the host. Every other use is
    that of a plain tensor (results are plain tensors).
    """

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def __new__(cls, value: Tensor) -> DeviceClipValue:
        return Tensor._make_subclass(cls, value)  # type: ignore[no-any-return]

    @staticmethod
    def _nonpositive(other: Any) -> bool:
        return isinstance(other, (int, float)) and not isinstance(other, bool) and other <= 0

    def __gt__(self, other: Any) -> Any:
        return True if self._nonpositive(other) else Tensor.__gt__(self, other)

    def __eq__(self, other: Any) -> Any:  # type: ignore[override]
        return False if self._nonpositive(other) else Tensor.__eq__(self, other)

    def __ne__(self, other: Any) -> Any:  # type: ignore[override]
        return True if self._nonpositive(other) else Tensor.__ne__(self, other)

    __hash__ = Tensor.__hash__


def _threshold_for_deepspeed(stats: ClipStats) -> DeviceClipValue:
    """The number DeepSpeed must clip by this step, as a device tensor (no host read).

    ``stats.engine_threshold`` (which differs from ``stats.threshold`` only for the
    stochastic methods), or ``inf`` (no clipping) on a skipped step.
    """
    engine = stats.engine_threshold if stats.engine_threshold is not None else stats.threshold
    inf = float("inf")
    value = torch.where(stats.skipped, inf, engine).nan_to_num(nan=inf, posinf=inf)
    return DeviceClipValue(value)


class _WrapperHook:
    """The state of distclip's hook on one DeepSpeed optimizer wrapper instance."""

    def __init__(
        self,
        wrapper: str,
        observe: Observer,
        *,
        fp16: bool,
        ds_clip: Any,
        original_class: type,
        original_step: Callable[..., Any],
        clamps: bool = False,
    ) -> None:
        self.wrapper = wrapper
        self.observe = observe
        self.fp16 = fp16
        #: Element-wise clamp: DeepSpeed must not clip by norm; the inner step clamps.
        self.clamps = clamps
        #: Inner optimizer steps clamped in this step (``clamps`` only).
        self.clamp_calls = 0
        #: DeepSpeed's own clip value (its config's, or the one a checkpoint restored).
        self.ds_clip = ds_clip
        self.original_class = original_class
        self.original_step = original_step
        self.armed = False
        self.read = False
        self.threshold: Any = math.inf
        self.scale0 = 1.0

    def arm(self, optimizer: Any) -> None:
        self.armed = True
        self.read = False
        self.clamp_calls = 0
        if self.wrapper == "DeepSpeedZeroOptimizer_Stage3":
            self.scale0 = _loss_scale(optimizer)

    def true_norm(self, optimizer: Any) -> Tensor:
        """This step's unscaled pre-clip norm, from what DeepSpeed stored just before.

        ZeRO 1/2, BF16_Optimizer and the bf16 FP16 wrappers store it unscaled. ZeRO 3
        divides by the loss scale *after* updating it: on an fp16 loss-scale growth
        step the stored norm is too small by the growth factor, undone here.
        """
        norm = getattr(optimizer, "_global_grad_norm", None)
        if norm is None:
            raise RuntimeError(
                f"distclip: DeepSpeed's {self.wrapper}.step() read its clip value without a "
                "stored global norm (_global_grad_norm is None); distclip needs DeepSpeed to "
                "compute the norm (zero_optimization.compute_grad_norm must stay true)"
            )
        if self.wrapper == "DeepSpeedZeroOptimizer_Stage3":
            now = _loss_scale(optimizer)
            if now != self.scale0:
                norm = norm * (now / self.scale0)
        return _as_norm_tensor(norm)

    def clip_value(self, optimizer: Any) -> Any:
        """What ``optimizer.clip_grad`` reads: this step's threshold inside ``step()``."""
        if not self.armed:
            return self.ds_clip
        if not self.read:
            self.read = True
            stats = self.observe(self.true_norm(optimizer))
            if self.clamps:
                # No norm clipping (every wrapper clips only when clip_grad > 0) and no
                # read to the host: the inner step's pre-hook clamps the fp32 gradients.
                self.threshold = 0.0
                return self.threshold
            self.threshold = _threshold_for_deepspeed(stats)
        return self.threshold

    def clamp_active(self) -> bool:
        """True inside a ``step()`` that went past the norm (the inner steps may clamp)."""
        return self.armed and self.read

    def after_step(self, optimizer: Any) -> None:
        """Account for a step that never read the clip value (DeepSpeed skipped it).

        With the element-wise clamp, a step that read the clip value must also have run
        the inner optimizer step (where the clamp is) at least once.
        """
        if self.read:
            if self.clamps and self.clamp_calls == 0:
                raise RuntimeError(
                    f"distclip: DeepSpeed's {self.wrapper}.step() went past its norm but never "
                    "called the step() of its inner optimizer, where distclip clamps the "
                    "gradients; this order of operations is not the one verified for "
                    f"deepspeed{VERIFIED_VERSIONS}"
                )
            return
        if getattr(optimizer, "overflow", False):
            if not self.fp16:
                # A NaN/inf norm in fp32/bf16: the native wrappers count such a step as
                # skipped (and raise with nonfinite="error"); fp16 overflows are loss
                # scaling at work, skipped like torch.amp.GradScaler does, uncounted.
                self.observe(torch.full((), math.inf))
            return
        raise RuntimeError(
            f"distclip: DeepSpeed's {self.wrapper}.step() updated the parameters without "
            "reading its clip value, so distclip's threshold was not applied; this order of "
            f"operations is not the one verified for deepspeed{VERIFIED_VERSIONS}"
        )


def _get_clip_grad(optimizer: Any) -> Any:
    return optimizer.__dict__[_HOOK_ATTR].clip_value(optimizer)


def _set_clip_grad(optimizer: Any, value: Any) -> None:
    optimizer.__dict__[_HOOK_ATTR].ds_clip = value


_HOOKED_CLASSES: dict[type, type] = {}


def _hooked_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``clip_grad`` is distclip's property (cached per class)."""
    hooked = _HOOKED_CLASSES.get(cls)
    if hooked is None:
        hooked = type(
            f"DistClip{cls.__name__}",
            (cls,),
            {
                "clip_grad": property(_get_clip_grad, _set_clip_grad),
                "__module__": cls.__module__,
                "__doc__": f"{cls.__name__} whose clip value distclip supplies in step().",
            },
        )
        _HOOKED_CLASSES[cls] = hooked
    return hooked


def _same_objects(first: list[Any], second: list[Any]) -> bool:
    return len(first) == len(second) and all(a is b for a, b in zip(first, second, strict=True))


def install_wrapper_hook(
    optimizer: Any,
    wrapper: str,
    observe: Observer,
    fp16: bool,
    piecewise: PiecewiseClipper | None = None,
) -> InstalledHook:
    """Hook ``optimizer``, a DeepSpeed wrapper of class ``wrapper``.

    With a ``piecewise`` clipper, its inner optimizers too: the clip happens there, and
    DeepSpeed's own clip is neutral.
    """
    apply: InnerApply | None = None
    if piecewise is not None:
        apply = inner_apply(piecewise, optimizer, wrapper)
    if (
        getattr(optimizer, "dtype", None) is torch.bfloat16
        and getattr(optimizer, "check_grad_overflow", True) is False
    ):
        # (fp32 ZeRO runs with the flag off too: there the norm check catches NaN/inf.)
        logger.warning(
            "distclip: DeepSpeed's %s runs with bf16.check_grad_overflow off, so it applies "
            "steps whose global norm is not finite; distclip keeps such norms out of its "
            "state (last_clip reports the skip), but only DeepSpeed can skip the update",
            wrapper,
        )
    original_class = type(optimizer)
    original_step = optimizer.step
    had_step = "step" in optimizer.__dict__
    hook = _WrapperHook(
        wrapper,
        observe,
        fp16=fp16,
        ds_clip=optimizer.__dict__.get("clip_grad", 0.0),
        original_class=original_class,
        original_step=original_step,
        clamps=apply is not None,
    )
    inner = inner_optimizers(optimizer) if apply is not None else []
    clamp_hook: InnerStepHook | None = None
    if apply is not None:

        def counted() -> None:
            hook.clamp_calls += 1

        clamp_hook = InnerStepHook(inner, apply, hook.clamp_active, counted)

    def step(*args: Any, **kwargs: Any) -> Any:
        hook.arm(optimizer)
        try:
            result = hook.original_step(*args, **kwargs)
        finally:
            hook.armed = False
        hook.after_step(optimizer)
        return result

    step.__doc__ = getattr(original_step, "__doc__", None)
    optimizer.__dict__[_HOOK_ATTR] = hook
    optimizer.__dict__.pop("clip_grad", None)
    optimizer.__class__ = _hooked_class(original_class)
    optimizer.step = step

    def remove() -> None:
        if clamp_hook is not None:
            clamp_hook.remove()
        if optimizer.__dict__.get(_HOOK_ATTR) is not hook:
            return
        optimizer.__class__ = original_class
        del optimizer.__dict__[_HOOK_ATTR]
        optimizer.__dict__["clip_grad"] = hook.ds_clip
        if had_step:
            optimizer.step = original_step
        else:
            optimizer.__dict__.pop("step", None)

    def intact() -> bool:
        return (
            optimizer.__dict__.get(_HOOK_ATTR) is hook
            and optimizer.__dict__.get("step") is step
            and (apply is None or _same_objects(inner_optimizers(optimizer), inner))
        )

    return InstalledHook(intact, remove)
