"""Where distclip plugs into DeepSpeed's optimizer step: one hook per optimizer wrapper.

Verified against DeepSpeed 0.19.8 (the order of operations inside each ``step()``):

* **The wrappers** (:data:`SUPPORTED_WRAPPERS`: ZeRO 1/2, ZeRO 3, ``BF16_Optimizer``,
  ``FP16_Optimizer``, ``FP16_UnfusedOptimizer``, with or without CPU offload) compute the
  pre-clip global norm inside ``step()``, store it in ``self._global_grad_norm``, and only
  then read their clip value ``self.clip_grad``; on a skipped (overflow / NaN) step they
  never read it. distclip turns ``clip_grad`` into a property (on a per-instance
  subclass: the class and other instances are left alone, ``isinstance`` still holds)
  and arms it in a thin ``step`` wrapper. The first read inside a step hands the stored
  norm to the clipper (:meth:`~distclip.Clipper.observe_`) and returns this step's
  threshold; later reads in the same step return the same value. Outside ``step()`` the
  property returns DeepSpeed's own configured value (so ``state_dict()`` stays a plain
  float), and DeepSpeed's writes (the constructor, a checkpoint load) go there too:
  they can no longer replace distclip's threshold.
* **No wrapper** (ZeRO 0 with fp32: the engine clips with
  ``deepspeed.runtime.utils.clip_grad_norm_``, reading the clip value before the norm
  exists and discarding the norm). distclip replaces ``engine.clip_fp32_gradients``
  on the instance by the same norm computation (the same single data-parallel
  all-reduce) with the clipper between the norm and the scaling, and stores the norm
  in ``engine._global_grad_norm`` so that ``engine.get_global_grad_norm()`` reports it.

No second pass over the gradients, no extra collective: the only added work is the
clipper's update on a 0-dim tensor and one read of the threshold to the host, which
DeepSpeed needs as a Python number (it has already read the norm to the host itself).

**The element-wise clamps** (``value``, ``coordinate_wise``) need no norm and no tensor
shapes, so they are exact on any ZeRO partition. distclip registers a step pre-hook
(:meth:`torch.optim.Optimizer.register_step_pre_hook`) on the torch optimizer that
updates the fp32 master weights (the wrapper's ``optimizer``, and ZeRO 3's
``backup_optimizer`` where there is one; ZeRO 0 in fp32: ``engine.optimizer``); inside
a DeepSpeed step that went past its norm it clamps the ``.grad`` of that optimizer's
parameters, with Python-number bounds (no collective, no read to the host).
DeepSpeed's own clip is neutral: inside ``step()`` the ``clip_grad`` property reads 0,
which every wrapper takes as "no clipping" (ZeRO 0 fp32: ``clip_fp32_gradients`` takes
the norm and the skip decision as above but scales nothing). The property's first read
still hands DeepSpeed's stored norm to the clipper, for ``last_clip`` and the
counters, without reading anything to the host.

Verified in DeepSpeed 0.19.8's source, wrapper by wrapper: ZeRO 1/2 (with or without
CPU offload), ZeRO 3 (likewise), ``FP16_Optimizer`` and ``FP16_UnfusedOptimizer`` call
their inner ``step()`` only after ``unscale_and_clip_grads`` has unscaled the fp32
gradients in place, and ``BF16_Optimizer`` after its clip and its copy of the fp32
gradient partitions into ``.grad``; the update reads exactly those ``.grad``. ZeRO 1/2
narrows ``param_groups`` to the group it steps; ZeRO 3 calls the inner step once per
sub-group with only that sub-group's flat partition in ``param_groups`` (a clamp is
idempotent anyway). Every overflow / NaN skip returns before the inner step (fp16
loss-scale overflows included). Two DeepSpeed behaviours the clamp inherits: in fp16,
DeepSpeed grows the loss scale *before* it unscales (ZeRO 1-3 and both FP16 wrappers),
so on a growth step the gradients the update gets (and the clamp sees) are smaller
than the true ones by the growth factor; and ZeRO 1/2 in bf16 with
``bf16.check_grad_overflow`` off applies a NaN/inf step (the clamp bounds the infs,
NaN stays NaN; ``last_clip`` reports the skip). Refused for the clamps: an inner step
that takes its gradients as arguments (``FP16_UnfusedOptimizer``'s legacy fused LAMB),
a ``torch.amp.GradScaler`` inside the wrapper (torch autocast in fp16: a fused
optimizer unscales inside its own step, after the hook), ZeRO 3's ZenFlow, and Muon
(DeepSpeed writes Muon's orthogonalised update into the gradient partitions first: the
clamp would bound the update, not the gradient).

**The per-tensor / per-row methods** (``layer_wise``, ``agc``) act at the same point as
the clamps, with DeepSpeed's own clip neutral in the same way: the step pre-hook on the
inner optimizer clips its flat fp32 gradient partitions (after DeepSpeed has unscaled
them, before the update) with :class:`~._partitions.FragmentClip`, which knows from
DeepSpeed's own bookkeeping which piece of which parameter lies where in each
partition (see ``_partitions`` for what was verified per wrapper). Per inner step, the
per-tensor (per-row, gradient and weight) partial sums go through one all-reduce over
the process group DeepSpeed partitioned the buffer over, in the same order on every
rank (ZeRO 1/2: once per param group; ZeRO 3: once per sub-group; ``BF16_Optimizer``:
once for all its data-parallel groups); every rank joins, whether it holds a piece of
a tensor or not. AGC's weights are the fp32 master weights. Whole tensors (ZeRO 0 in
fp32, where DeepSpeed has already averaged the gradients on every rank, and
``FP16_UnfusedOptimizer``) need no collective; ZeRO 0 in fp32 clips them in
``clip_fp32_gradients``. Refused besides the clamps' refusals: model parallelism (an
``mpu``: tensors are also split across model-parallel ranks in a layout DeepSpeed does
not describe) and ZeRO 3 with the optimizer on NVMe (not verified).
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from distclip.clippers import Clipper, ClipStats, MethodSpec, PiecewiseClipper
from distclip.clippers.flat_pieces import FlatPieces
from distclip.functional import scale_
from distclip.integrations.binding import OptimizerBinding
from distclip.integrations.deepspeed._config import piecewise_unit
from distclip.integrations.deepspeed._partitions import FragmentClip, whole_tensor_clip

__all__ = [
    "ENGINE_CLAMP_HOOK",
    "ENGINE_HOOK",
    "SUPPORTED_WRAPPERS",
    "VERIFIED_VERSIONS",
    "DeepSpeedVersionError",
    "HookPlan",
    "InstalledHook",
    "check_version",
    "import_deepspeed",
    "plan_hook",
]

logger = logging.getLogger(__name__)

#: The DeepSpeed optimizer wrappers whose ``step()`` distclip has verified.
SUPPORTED_WRAPPERS: tuple[str, ...] = (
    "DeepSpeedZeroOptimizer",
    "DeepSpeedZeroOptimizer_Stage3",
    "BF16_Optimizer",
    "FP16_Optimizer",
    "FP16_UnfusedOptimizer",
)

#: The hook point when the engine has no wrapper (ZeRO 0, fp32).
ENGINE_HOOK = "engine.clip_fp32_gradients"

#: The hook point of the element-wise clamps without a wrapper (ZeRO 0, fp32); with a
#: wrapper it is ``"<wrapper>.optimizer.step"``.
ENGINE_CLAMP_HOOK = "engine.optimizer.step"

#: The DeepSpeed releases whose order of operations distclip has verified.
VERIFIED_VERSIONS = ">=0.19,<0.20"
_VERIFIED_MINOR = ((0, 19),)

_WRAPPER_MODULES = {
    "DeepSpeedZeroOptimizer": "deepspeed.runtime.zero.stage_1_and_2",
    "DeepSpeedZeroOptimizer_Stage3": "deepspeed.runtime.zero.stage3",
    "BF16_Optimizer": "deepspeed.runtime.bf16_optimizer",
    "FP16_Optimizer": "deepspeed.runtime.fp16.fused_optimizer",
    "FP16_UnfusedOptimizer": "deepspeed.runtime.fp16.unfused_optimizer",
}

#: Attribute of a hooked wrapper instance holding its :class:`_WrapperHook`.
_HOOK_ATTR = "_distclip_hook"

_warned_versions: set[str] = set()

Observer = Callable[[Tensor], ClipStats]

#: Clamps a list of gradients in place (a piecewise clipper with element units).
Clamp = Callable[[list[Tensor]], None]


def element_clamp(clipper: PiecewiseClipper) -> Clamp:
    """The clamp of an element-unit clipper, as a function of a list of fp32 gradients."""

    def clamp(grads: list[Tensor]) -> None:
        clipper.clip_pieces_(FlatPieces(None, grads))

    return clamp


#: What the inner optimizer's step pre-hook does with that optimizer.
InnerApply = Callable[[Any], None]

_MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed is outside the versions distclip's adapter was verified with."""


def import_deepspeed() -> Any:
    """``import deepspeed`` (only here, and only when the adapter is used)."""
    try:
        return importlib.import_module("deepspeed")
    except ImportError as exc:
        raise ImportError(
            "distclip.deepspeed needs DeepSpeed: pip install 'distclip[deepspeed]' "
            f"(verified with deepspeed{VERIFIED_VERSIONS})"
        ) from exc


def _is_verified(version: str) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return False
    return (int(match.group(1)), int(match.group(2))) in _VERIFIED_MINOR


def check_version(allow_unverified: bool) -> str:
    """The installed DeepSpeed version; refuse (or warn once) outside the verified range.

    Raises:
        DeepSpeedVersionError: the version is not verified and ``allow_unverified`` is
            false.
    """
    version = str(getattr(import_deepspeed(), "__version__", "unknown"))
    if _is_verified(version):
        return version
    message = (
        f"distclip's DeepSpeed adapter relies on the order of operations inside DeepSpeed's "
        f"optimizer step (norm stored before the clip value is read), verified for deepspeed"
        f"{VERIFIED_VERSIONS}; the installed DeepSpeed is {version}."
    )
    if not allow_unverified:
        raise DeepSpeedVersionError(
            message + " Install a verified version (pip install 'distclip[deepspeed]'), or pass "
            "allow_unverified=True to use it anyway: distclip then still raises if a step "
            "finishes without reading its threshold, but cannot check everything else."
        )
    if version not in _warned_versions:
        _warned_versions.add(version)
        warnings.warn(
            message + " allow_unverified=True: using it anyway; check the thresholds "
            "(engine.distclip.last_clip) against engine.get_global_grad_norm().",
            RuntimeWarning,
            stacklevel=3,
        )
    return version


def _wrapper_classes() -> dict[str, type]:
    return {
        name: getattr(importlib.import_module(module), name)
        for name, module in _WRAPPER_MODULES.items()
    }


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


# ------------------------------------------------------------------------- wrappers
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


class InstalledHook:
    """A hook in place: :meth:`intact` says whether it still is, :meth:`remove` undoes it."""

    def __init__(self, intact: Callable[[], bool], remove: Callable[[], None]) -> None:
        self._intact = intact
        self._remove = remove

    def intact(self) -> bool:
        """True while the hook is in place (nothing replaced the hooked object or method)."""
        return self._intact()

    def remove(self) -> None:
        """Undo the hook (DeepSpeed clips by its own configured value again)."""
        self._remove()


class _ClampHook:
    """The step pre-hook that clips the gradients of torch optimizers' parameters.

    Registered on the optimizers that update the fp32 master weights; acts only while
    ``active()`` (inside a DeepSpeed step that went past its norm), so other calls of
    those optimizers' ``step()`` are left alone. ``apply`` gets the optimizer: it
    clamps its gradients (``value``) or clips them tensor by tensor / row by row
    (``layer_wise``, ``agc``: :class:`~._partitions.FragmentClip`).
    """

    def __init__(
        self,
        optimizers: list[torch.optim.Optimizer],
        apply: InnerApply,
        active: Callable[[], bool],
        on_call: Callable[[], None] | None = None,
    ) -> None:
        self.optimizers = optimizers
        self.apply = apply
        self.active = active
        self.on_call = on_call
        self.handles = [opt.register_step_pre_hook(self) for opt in optimizers]

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.active():
            return
        if self.on_call is not None:
            self.on_call()
        self.apply(optimizer)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _clamp_apply(clamp: Clamp) -> InnerApply:
    """Clamp the ``.grad`` of every parameter the optimizer is about to step."""

    def apply(optimizer: Any) -> None:
        clamp(
            [
                param.grad
                for group in optimizer.param_groups
                for param in group["params"]
                if param.grad is not None
            ]
        )

    return apply


def _inner_optimizers(wrapper: Any) -> list[Any]:
    """The optimizers a DeepSpeed wrapper's ``step()`` calls on its fp32 partitions."""
    inner = [wrapper.optimizer]
    backup = getattr(wrapper, "backup_optimizer", None)  # ZeRO 3, partial offload
    if backup is not None:
        inner.append(backup)
    return inner


def _same_objects(first: list[Any], second: list[Any]) -> bool:
    return len(first) == len(second) and all(a is b for a, b in zip(first, second, strict=True))


def _install_wrapper_hook(
    optimizer: Any,
    wrapper: str,
    observe: Observer,
    fp16: bool,
    clamp: Clamp | None = None,
    fragments: PiecewiseClipper | None = None,
) -> InstalledHook:
    """Hook ``optimizer`` (a DeepSpeed wrapper); with ``clamp`` or ``fragments``, its inner
    optimizers too (the clip happens there, DeepSpeed's own clip is neutral)."""
    inner_apply: InnerApply | None = None
    if clamp is not None:
        inner_apply = _clamp_apply(clamp)
    elif fragments is not None:
        inner_apply = FragmentClip(optimizer, wrapper, fragments)
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
        clamps=inner_apply is not None,
    )
    inner = _inner_optimizers(optimizer) if inner_apply is not None else []
    clamp_hook: _ClampHook | None = None
    if inner_apply is not None:

        def counted() -> None:
            hook.clamp_calls += 1

        clamp_hook = _ClampHook(inner, inner_apply, hook.clamp_active, counted)

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
            and (inner_apply is None or _same_objects(_inner_optimizers(optimizer), inner))
        )

    return InstalledHook(intact, remove)


# ----------------------------------------------------------------------------- ZeRO 0
def _deepspeed_fp32_norm(engine: Any, params: list[Tensor]) -> Tensor:
    """The global L2 norm exactly as ``deepspeed.runtime.utils.clip_grad_norm_`` takes it.

    Per-parameter fp32 norms, the model-parallel sum (with an ``mpu``), then the one
    data-parallel all-reduce DeepSpeed uses (it averages, for MoE experts).
    """
    dist = importlib.import_module("deepspeed.comm")
    groups = importlib.import_module("deepspeed.utils.groups")
    accelerator = importlib.import_module("deepspeed.accelerator").get_accelerator()
    is_model_parallel_parameter = importlib.import_module(
        "deepspeed.runtime.utils"
    ).is_model_parallel_parameter
    mpu = engine.mpu
    norms = [
        p.grad.detach().float().norm(2)  # type: ignore[union-attr]
        for p in params
        if mpu is None or mpu.get_model_parallel_rank() == 0 or is_model_parallel_parameter(p)
    ]
    if norms:
        total = torch.stack(norms).pow(2.0).sum().float()
    else:
        total = torch.zeros(1, dtype=torch.float32)
    total = total.to(accelerator.current_device_name())
    if mpu is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=mpu.get_model_parallel_group())
    total = total.pow(1.0 / 2.0)
    group = groups._get_data_parallel_group()
    total = total * 1.0 / float(dist.get_world_size(group=group))
    dist.all_reduce(total, group=group)
    return total.to(params[0].device)


def _install_engine_hook(
    engine: Any,
    observe: Observer,
    binding: OptimizerBinding,
    clamp: Clamp | None = None,
    whole: Callable[[list[Tensor]], None] | None = None,
) -> InstalledHook:
    """Hook a ZeRO-0 fp32 engine (no wrapper); with ``clamp``, its optimizer's step too.

    The norm and the skip decision stay in ``clip_fp32_gradients``; a norm-driven method
    scales there, ``layer_wise`` / ``agc`` clip the whole tensors there (``whole``: every
    rank holds DeepSpeed's averaged gradients, no collective), the element-wise clamp
    happens in ``engine.optimizer``'s step pre-hook (on a skipped step the binding has
    hidden the gradients, or set ``found_inf``).
    """
    optimizer = engine.optimizer
    original_clipping = engine._config.gradient_clipping

    def clip_fp32_gradients() -> Tensor | None:
        binding.recover_stale(optimizer)  # the last optimizer step raised before its end
        params = [p for p in engine.module.parameters() if p.grad is not None]
        if not params:
            return None
        total = _deepspeed_fp32_norm(engine, params)
        stats = observe(total)
        engine._global_grad_norm = total
        if whole is not None:
            whole(params)
        elif clamp is None:
            grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
            scale_(grads, stats.clip_coef, foreach=binding.clipper.config.foreach)
        binding.arm_step(optimizer, stats)
        return total

    def disarm(opt: Any, args: Any, kwargs: Any) -> None:
        binding.end_step(opt)

    clamp_hook = None
    if clamp is not None:
        clamp_hook = _ClampHook([optimizer], _clamp_apply(clamp), lambda: binding.armed)
    post_hook = optimizer.register_step_post_hook(disarm)
    engine.clip_fp32_gradients = clip_fp32_gradients
    if not original_clipping > 0.0:
        # The engine clips only when gradient_clipping() > 0; nothing else reads it
        # after initialize.
        engine._config.gradient_clipping = math.inf

    def remove() -> None:
        post_hook.remove()
        if clamp_hook is not None:
            clamp_hook.remove()
        engine.__dict__.pop("clip_fp32_gradients", None)
        engine._config.gradient_clipping = original_clipping

    def intact() -> bool:
        return (
            engine.__dict__.get("clip_fp32_gradients") is clip_fp32_gradients
            and engine.optimizer is optimizer
            and engine._config.gradient_clipping > 0.0
        )

    return InstalledHook(intact, remove)


# ------------------------------------------------------------------------------ plan
class HookPlan:
    """Where distclip will hook an engine, decided before anything is changed.

    Attributes:
        wrapper: the wrapper's class name, or ``None`` for ZeRO 0 fp32 (no wrapper).
        elementwise: the method is an element-wise clamp (``value``, ``coordinate_wise``).
        per_unit: the method clips per tensor or per row (``layer_wise``, ``agc``).
        hook_point: where the method acts: ``"<wrapper>.clip_grad"`` or
            :data:`ENGINE_HOOK` for the norm-driven methods (and ``layer_wise`` /
            ``agc`` at ZeRO 0 fp32); ``"<wrapper>.optimizer.step"`` or
            :data:`ENGINE_CLAMP_HOOK` for the element-wise clamps;
            ``"<wrapper>.optimizer.step"`` for ``layer_wise`` / ``agc`` under a wrapper.
    """

    def __init__(
        self,
        engine: Any,
        wrapper: str | None,
        fp16: bool,
        *,
        elementwise: bool = False,
        per_unit: bool = False,
    ) -> None:
        self.engine = engine
        self.wrapper = wrapper
        self.fp16 = fp16
        #: A piecewise method with element units (``value``, ``coordinate_wise``).
        self.elementwise = elementwise
        #: A piecewise method with tensor or row units (``layer_wise``, ``agc``).
        self.per_unit = per_unit
        if elementwise:
            self.hook_point = ENGINE_CLAMP_HOOK if wrapper is None else f"{wrapper}.optimizer.step"
        elif per_unit and wrapper is not None:
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
        clamp: Clamp | None = None
        fragments: PiecewiseClipper | None = None
        if self.elementwise:
            assert isinstance(clipper, PiecewiseClipper)
            clamp = element_clamp(clipper)
        elif self.per_unit:
            assert isinstance(clipper, PiecewiseClipper)
            fragments = clipper
        if self.wrapper is None:
            assert binding is not None
            whole = whole_tensor_clip(fragments) if fragments is not None else None
            return _install_engine_hook(self.engine, observe, binding, clamp, whole)
        return _install_wrapper_hook(
            self.engine.optimizer, self.wrapper, observe, self.fp16, clamp, fragments
        )


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
        NotImplementedError: an optimizer wrapper distclip has not verified, the legacy
            fused-Adam fp16 path, ZeRO 0 with fp16, ZeRO 0 with torch autocast; for the
            element-wise clamps and ``layer_wise`` / ``agc`` also the cases listed in
            the module docstring.
    """
    unit = piecewise_unit(spec)
    elementwise = unit == "element"
    per_unit = spec.name if unit in ("tensor", "row") else None
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
    classes = _wrapper_classes()
    fp16 = bool(engine.fp16_enabled())
    wrapper = next((name for name, cls in classes.items() if type(optimizer) is cls), None)
    if wrapper is None:
        base = next((name for name, cls in classes.items() if isinstance(optimizer, cls)), None)
        if base is not None:
            message = (
                f"the engine's optimizer is {type(optimizer).__name__}, a subclass of "
                f"DeepSpeed's {base} whose step() distclip has not verified (distclip supports "
                f"exactly: {', '.join(SUPPORTED_WRAPPERS)}, and ZeRO 0 in fp32)"
            )
            if not allow_unverified:
                raise NotImplementedError(message + "; allow_unverified=True hooks it as a " + base)
            warnings.warn(
                message + f"; allow_unverified=True: hooking it as a {base}",
                RuntimeWarning,
                stacklevel=3,
            )
            wrapper = base
    if wrapper is None:
        if engine.zero_optimization() or engine.bfloat16_enabled() or fp16:
            raise NotImplementedError(
                f"the engine's optimizer is {type(optimizer).__name__}, not one of the DeepSpeed "
                f"optimizer wrappers distclip has verified ({', '.join(SUPPORTED_WRAPPERS)}); "
                "distclip does not know where this one computes its norm and reads its clip value"
            )
        if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
            raise NotImplementedError(
                "ZeRO 0 with torch autocast in fp16 (a GradScaler inside the engine) is not "
                "supported by distclip's DeepSpeed adapter"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise NotImplementedError(
                f"ZeRO 0 in fp32 with a {type(optimizer).__name__} that is not a "
                "torch.optim.Optimizer is not supported by distclip's DeepSpeed adapter"
            )
        if per_unit is not None:
            _check_per_unit_supported(engine, None, per_unit)
        return HookPlan(
            engine, None, fp16=False, elementwise=elementwise, per_unit=per_unit is not None
        )
    if wrapper in ("FP16_Optimizer", "FP16_UnfusedOptimizer") and fp16:
        raise NotImplementedError(
            "ZeRO 0 with fp16 (DeepSpeed's FP16_Optimizer / FP16_UnfusedOptimizer) is not "
            "supported: in DeepSpeed 0.19 engine.backward() does not loss-scale for these "
            "wrappers while their step() unscales, so DeepSpeed's updates and norms are off "
            "by the loss scale; use bf16, or ZeRO 1-3 for fp16"
        )
    if wrapper == "FP16_Optimizer" and getattr(optimizer, "fused_adam_legacy", False):
        raise NotImplementedError(
            "DeepSpeed's FP16_Optimizer legacy fused-Adam step (optimizer.legacy_fusion) reads "
            "the clip value before it computes this step's norm; distclip does not support it"
        )
    if wrapper == "DeepSpeedZeroOptimizer" and not getattr(optimizer, "compute_grad_norm", True):
        raise ValueError(
            "zero_optimization.compute_grad_norm is false: DeepSpeed then computes no global "
            "norm, and distclip clips by DeepSpeed's norm; set it to true"
        )
    if elementwise:
        _check_clamp_supported(optimizer, wrapper)
    if per_unit is not None:
        _check_clamp_supported(optimizer, wrapper, per_unit)
        _check_per_unit_supported(engine, wrapper, per_unit)
    return HookPlan(
        engine, wrapper, fp16=fp16, elementwise=elementwise, per_unit=per_unit is not None
    )


def _check_per_unit_supported(engine: Any, wrapper: str | None, method: str) -> None:
    """Refuse what ``layer_wise`` / ``agc`` cannot see the tensor layout of."""
    where = f"distclip's {method!r} under DeepSpeed"
    if getattr(engine, "mpu", None) is not None:
        raise NotImplementedError(
            f"{where} with model parallelism (an mpu): tensors are also split across the "
            "model-parallel ranks, in a layout DeepSpeed does not describe, so per-tensor "
            "(per-row) norms cannot be assembled; use a global-norm method (norm, "
            "autoclip, zclip) or value"
        )
    optimizer = engine.optimizer
    if wrapper == "DeepSpeedZeroOptimizer_Stage3" and getattr(optimizer, "swap_optimizer", False):
        raise NotImplementedError(
            f"{where}: ZeRO 3 with the optimizer offloaded to NVMe swaps the fp32 partitions "
            "in and out around the inner step, a path distclip has not verified; offload "
            "to the CPU instead, or use a global-norm method (norm, autoclip, zclip) or value"
        )


def _check_clamp_supported(optimizer: Any, wrapper: str, method: str | None = None) -> None:
    """Refuse the wrapper configurations where a clip in the inner step would be wrong."""
    if method is None:
        where = (
            f"distclip's element-wise clamp (value, coordinate_wise) under DeepSpeed's {wrapper}"
        )
    else:
        where = f"distclip's {method!r} (clipped in the inner optimizer step) under DeepSpeed's {wrapper}"
    if wrapper == "FP16_UnfusedOptimizer" and getattr(optimizer, "fused_lamb_legacy", False):
        raise NotImplementedError(
            f"{where}: the legacy fused-LAMB step hands the gradients to its inner optimizer "
            "as arguments, not in .grad, so distclip cannot clip them; use another optimizer"
        )
    if getattr(optimizer, "torch_autocast_gradscaler", None) is not None:
        raise NotImplementedError(
            f"{where}: torch autocast in fp16 puts a torch.amp.GradScaler inside the wrapper, "
            "and with a fused optimizer the gradients are only unscaled inside its step, after "
            "distclip's clip would run; use bf16 or DeepSpeed's own fp16"
        )
    if getattr(optimizer, "zenflow", False):
        raise NotImplementedError(
            f"{where}: ZenFlow updates the parameters in its own CPU step, not in the inner "
            "optimizer's step where distclip clips"
        )
    muon = getattr(sys.modules.get(_MUON_MODULE), "MuonWithAuxAdam", None)
    inner = _inner_optimizers(optimizer)
    if muon is not None and any(isinstance(opt, muon) for opt in inner):
        raise NotImplementedError(
            f"{where}: with Muon, DeepSpeed writes Muon's orthogonalised update into the "
            "gradient partitions before the inner step, so a clip there would act on the "
            "update, not the gradient"
        )
    for opt in inner:
        if not isinstance(opt, torch.optim.Optimizer):
            raise NotImplementedError(
                f"{where}: the inner optimizer {type(opt).__name__} is not a "
                "torch.optim.Optimizer, so it has no step pre-hook for distclip's clip"
            )
