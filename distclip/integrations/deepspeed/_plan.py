"""Where distclip hooks a DeepSpeed engine, decided (and refused) before anything changes.

:func:`plan_hook` finds the engine's optimizer wrapper, applies the refusal table
(``_refusals``) and returns a :class:`HookPlan`, whose :meth:`HookPlan.install` puts the
hook in place: the wrapper's ``clip_grad`` (``_wrapper_hook``), the inner step's
pre-hook (``_inner_step``), or ZeRO 0's ``clip_fp32_gradients`` (``_zero0``). The hook
points, wrapper by wrapper: ``docs/deepspeed.md``.
"""

from __future__ import annotations

import warnings
from typing import Any

from distclip.clippers import Clipper, MethodSpec, PiecewiseClipper
from distclip.integrations.binding import OptimizerBinding
from distclip.integrations.deepspeed._config import piecewise_unit
from distclip.integrations.deepspeed._installed import InstalledHook, Observer
from distclip.integrations.deepspeed._refusals import SUBCLASS_MESSAGE, Setup, message_of, refuse
from distclip.integrations.deepspeed._verified import import_deepspeed, wrapper_classes
from distclip.integrations.deepspeed._wrapper_hook import install_wrapper_hook
from distclip.integrations.deepspeed._zero0 import install_engine_hook

__all__ = ["ENGINE_CLAMP_HOOK", "ENGINE_HOOK", "HookPlan", "plan_hook"]

#: The hook point when the engine has no wrapper (ZeRO 0, fp32).
ENGINE_HOOK = "engine.clip_fp32_gradients"

#: The hook point of the element-wise clamps without a wrapper (ZeRO 0, fp32); with a
#: wrapper it is ``"<wrapper>.optimizer.step"``.
ENGINE_CLAMP_HOOK = "engine.optimizer.step"


class HookPlan:
    """Where distclip will hook an engine, decided before anything is changed.

    Attributes:
        wrapper: the wrapper's class name, or ``None`` for ZeRO 0 fp32 (no wrapper).
        unit: ``"global"`` for a global-factor method, else the piecewise unit
            (``"element"``: ``value``, ``coordinate_wise``; ``"tensor"`` / ``"row"``:
            ``layer_wise``, ``agc``).
        hook_point: where the method acts: ``"<wrapper>.clip_grad"`` or
            :data:`ENGINE_HOOK` for the norm-driven methods (and ``layer_wise`` /
            ``agc`` at ZeRO 0 fp32); ``"<wrapper>.optimizer.step"`` or
            :data:`ENGINE_CLAMP_HOOK` for the element-wise clamps;
            ``"<wrapper>.optimizer.step"`` for ``layer_wise`` / ``agc`` under a wrapper.
    """

    def __init__(self, engine: Any, wrapper: str | None, fp16: bool, *, unit: str) -> None:
        self.engine = engine
        self.wrapper = wrapper
        self.fp16 = fp16
        self.unit = unit
        if unit == "element":
            self.hook_point = ENGINE_CLAMP_HOOK if wrapper is None else f"{wrapper}.optimizer.step"
        elif unit != "global" and wrapper is not None:
            self.hook_point = f"{wrapper}.optimizer.step"
        else:
            self.hook_point = ENGINE_HOOK if wrapper is None else f"{wrapper}.clip_grad"

    def install(
        self, observe: Observer, binding: OptimizerBinding | None, clipper: Clipper
    ) -> InstalledHook:
        """Install the hook.

        Args:
            observe: takes DeepSpeed's norm of each step, returns the clip's stats.
            binding: the clipper and optimizer, for ZeRO 0 (skips a NaN/inf step).
            clipper: the clipper; a piecewise one also gets DeepSpeed's fp32
                partitions as pieces, in the inner optimizer step.
        """
        piecewise: PiecewiseClipper | None = None
        if self.unit != "global":
            assert isinstance(clipper, PiecewiseClipper)
            piecewise = clipper
        if self.wrapper is None:
            assert binding is not None
            return install_engine_hook(self.engine, observe, binding, piecewise)
        return install_wrapper_hook(
            self.engine.optimizer, self.wrapper, observe, self.fp16, piecewise
        )


def _identify_wrapper(optimizer: Any) -> tuple[str | None, bool]:
    """The verified wrapper ``optimizer`` is hooked as, and whether it is a subclass of it."""
    classes = wrapper_classes()
    exact = next((name for name, cls in classes.items() if type(optimizer) is cls), None)
    if exact is not None:
        return exact, False
    base = next((name for name, cls in classes.items() if isinstance(optimizer, cls)), None)
    return base, base is not None


def plan_hook(engine: Any, *, allow_unverified: bool, spec: MethodSpec) -> HookPlan:
    """Decide how to hook ``engine`` for method ``spec``; refuse what has not been verified.

    A global-factor method clips by DeepSpeed's own norm; a piecewise one clips the fp32
    partitions in the inner optimizer step, those with tensor or row units knowing from
    DeepSpeed's bookkeeping which piece of which tensor lies where.

    Args:
        engine: the DeepSpeed engine.
        allow_unverified: hook a subclass of a supported wrapper as that wrapper.
        spec: the registered method.

    Raises:
        TypeError: ``engine`` is not a ``deepspeed.DeepSpeedEngine``.
        ValueError: the engine has no optimizer, or ZeRO 1/2 with
            ``compute_grad_norm`` off (there is then no norm to use).
        NotImplementedError: a row of the refusal table (``_refusals.REFUSALS``,
            listed in ``docs/deepspeed.md``).
    """
    deepspeed = import_deepspeed()
    if not isinstance(engine, deepspeed.DeepSpeedEngine):
        raise TypeError(
            f"engine must be a deepspeed.DeepSpeedEngine (what deepspeed.initialize returns "
            f"first), got {type(engine).__name__}"
        )
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            "engine has no optimizer (deepspeed.initialize without an optimizer and without "
            "one in the config): there is nothing to clip"
        )
    wrapper, subclass = _identify_wrapper(optimizer)
    setup = Setup(
        engine=engine,
        optimizer=optimizer,
        wrapper=wrapper,
        subclass=subclass,
        allow_unverified=allow_unverified,
        fp16=bool(engine.fp16_enabled()),
        method=spec.name,
        unit=piecewise_unit(spec) or "global",
    )
    if subclass and allow_unverified:
        warnings.warn(
            message_of(
                SUBCLASS_MESSAGE + "; allow_unverified=True: hooking it as a {wrapper}", setup
            ),
            RuntimeWarning,
            stacklevel=3,
        )
    refuse(setup)
    fp16 = setup.fp16 if wrapper is not None else False
    return HookPlan(engine, wrapper, fp16=fp16, unit=setup.unit)
