"""The stateful clipper: reduction plan + threshold rule + scaling + checkpointable state.

A :class:`Clipper` owns the parameters it clips and a :class:`~distclip.reduction.ReductionPlan`
built once from them. Each :meth:`Clipper.clip_`:

1. computes the global norm ``n`` through the plan (one collective per process group);
2. asks the method for this step's threshold ``tau`` (methods with state update it
   here, only with finite norms, so every rank's state stays identical);
3. multiplies every gradient by ``c = min(1, tau / (n + eps))`` (1 when ``n`` is
   NaN/inf: the update is then skipped by the integration);
4. returns a :class:`ClipStats` of 0-dim device tensors.

No step reads a tensor back to the host, except with ``nonfinite="error"`` (which must
decide on the host whether to raise) and the optional debug consistency check.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from datetime import timedelta
from typing import Any, ClassVar

import torch
from torch import Tensor

from distclip.clippers.config import ClipConfig
from distclip.clippers.stats import ClipStats
from distclip.errors import NonFiniteNormError, RankDesyncError
from distclip.functional import clip_coefficient, scale_
from distclip.reduction import ReductionPlan, all_gather_tensor, is_distributed, wait_for_ranks
from distclip.window import COUNT_DTYPES

__all__ = ["Clipper", "ParamsLike", "as_param_list"]

logger = logging.getLogger(__name__)

#: Tensors, or param-group dicts with a ``"params"`` entry (as optimizers take them).
ParamsLike = Iterable[Tensor] | Iterable[dict[str, Any]]


def as_param_list(params: ParamsLike) -> list[Tensor]:
    """Flatten tensors or param groups into a list of distinct tensors (order kept).

    Raises:
        TypeError: ``params`` is a single tensor or dict, is not iterable, or holds
            something that is not a tensor.
        ValueError: ``params`` is empty (for example a generator already consumed); a
            param-group dict has no ``"params"``; a tensor is on the meta device.
    """
    if isinstance(params, (Tensor, dict)):
        kind = "Tensor" if isinstance(params, Tensor) else "dict"
        raise TypeError(
            "params must be an iterable of tensors or of param-group dicts, got a single "
            f"{kind}; wrap it in a list"
        )
    if not isinstance(params, Iterable):
        raise TypeError(
            "params must be an iterable of tensors or of param-group dicts, got "
            f"{type(params).__name__}"
        )
    flat: list[Tensor] = []
    seen: set[int] = set()
    for entry in params:
        if isinstance(entry, dict) and "params" not in entry:
            raise ValueError(f"a param-group dict needs a 'params' entry, got keys {sorted(entry)}")
        tensors = entry["params"] if isinstance(entry, dict) else [entry]
        if isinstance(tensors, Tensor):
            tensors = [tensors]
        for tensor in tensors:
            if not isinstance(tensor, Tensor):
                raise TypeError(f"params must hold tensors, got {type(tensor).__name__}")
            if tensor.is_meta:
                raise ValueError(
                    f"parameter {len(flat)} (shape {tuple(tensor.shape)}) is on the meta "
                    "device: it holds no data and gets no gradient to clip; materialise the "
                    "model first (e.g. model.to_empty(device=...) and initialise it)"
                )
            if id(tensor) not in seen:
                seen.add(id(tensor))
                flat.append(tensor)
    if not flat:
        raise ValueError(
            "params is empty: the clipper needs at least one parameter (was a generator "
            "such as model.parameters() already consumed?)"
        )
    return flat


def _bit_checksum(tensor: Tensor) -> Tensor:
    """An int64 checksum sensitive to every bit and position of ``tensor``."""
    flat = tensor.detach().reshape(-1)
    if flat.is_floating_point():
        int_dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()]
        flat = flat.view(int_dtype)
    flat = flat.to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64)
    return (flat * weights).sum() + flat.numel()


class Clipper:
    """Base class of every clipping method; see the module docstring for the step.

    Subclasses set ``method``, ``config_cls`` and ``class_prefix`` and implement
    :meth:`_threshold`; stateful ones also implement the ``_*state*`` methods.

    Args:
        params: the tensors whose gradients are clipped (or param-group dicts).
        model: the FSDP1 root module when FSDP1 manages the parameters (its flat
            parameters do not say which process group they are sharded over).
        pipeline_groups: process group(s) across which pipeline stages' norms are
            summed (each holding one rank per stage); ``None`` without pipelining.
        **options: the method's options; see its configuration class.
    """

    method: ClassVar[str] = ""
    class_prefix: ClassVar[str] = "Clipped"
    config_cls: ClassVar[type[ClipConfig]] = ClipConfig
    #: Version of the checkpoint format written by :meth:`state_dict`.
    FORMAT_VERSION: ClassVar[int] = 1

    config: ClipConfig

    def __init__(
        self,
        params: ParamsLike,
        *,
        model: torch.nn.Module | None = None,
        pipeline_groups: Any = None,
        **options: Any,
    ) -> None:
        config = self.config_cls.from_options(self.method, options)
        self._setup(params, config, model=model, pipeline_groups=pipeline_groups)

    @classmethod
    def from_config(
        cls,
        params: ParamsLike,
        config: ClipConfig,
        *,
        model: torch.nn.Module | None = None,
        pipeline_groups: Any = None,
    ) -> Clipper:
        """Build from an already validated configuration of this method."""
        if not isinstance(config, cls.config_cls):
            raise TypeError(
                f"{cls.__name__} needs a {cls.config_cls.__name__}, got {type(config).__name__}"
            )
        clipper = cls.__new__(cls)
        clipper._setup(params, config, model=model, pipeline_groups=pipeline_groups)
        return clipper

    def _setup(
        self, params: ParamsLike, config: ClipConfig, *, model: Any, pipeline_groups: Any
    ) -> None:
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.config = config
        self.model = model
        self.pipeline_groups = pipeline_groups
        self.params = as_param_list(params)
        self._plan: ReductionPlan | None = None
        self.num_steps = 0
        #: The :class:`ClipStats` of the last :meth:`clip_` (``None`` before the first).
        self.last_stats: ClipStats | None = None
        #: The factor :meth:`clip_` left to the caller with ``defer_scale=True``.
        self.deferred_coef: Tensor | None = None
        self._defer_scale = False
        plan = self.plan  # built now: an unsupported layout is refused at construction
        self._num_skipped = torch.zeros((), dtype=torch.long, device=plan.device)
        self.num_clipped = torch.zeros((), dtype=torch.long, device=plan.device)
        #: 1 in the norms' dtype: the factor of a skipped step (made once, not per step).
        self._one = torch.ones((), dtype=plan.dtype, device=plan.device)
        self._init_state(plan)

    # ------------------------------------------------------------------ params
    def set_params(self, params: ParamsLike) -> None:
        """Replace the clipped parameters (e.g. after ``add_param_group``); the plan is rebuilt."""
        self.params = as_param_list(params)
        self._plan = None

    @property
    def plan(self) -> ReductionPlan:
        """The reduction plan, built on first use after construction or :meth:`set_params`."""
        if self._plan is None:
            self._plan = ReductionPlan.build(
                self.params, model=self.model, pipeline_groups=self.pipeline_groups
            )
        return self._plan

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def total_norm(self) -> Tensor:
        """The global gradient norm now (0-dim tensor); changes no state."""
        return self.plan.total_norm(self.config.norm_type, foreach=self.config.foreach)

    @torch.no_grad()
    def clip_(self, *, defer_scale: bool = False) -> ClipStats:
        """Clip the gradients in place by this step's threshold; return what was seen.

        With ``defer_scale=True``, a method whose rule is one global factor leaves the
        gradients as they are and puts the factor in :attr:`deferred_coef` for the
        caller to apply (a fused optimizer divides by ``1 / coef`` as its
        ``grad_scale``, saving a pass over the gradients); other methods clip as usual
        and leave :attr:`deferred_coef` ``None``.

        The returned ``skipped`` is true when the global norm is NaN/inf: the gradients
        are left untouched and the state is not updated; the caller must not apply
        this step's update (the optimizer integrations do that for you).

        Raises:
            NonFiniteNormError: the norm is NaN/inf and ``nonfinite="error"`` (on
                every rank alike, before anything is modified).
        """
        plan = self.plan
        total_norm, measured = self._measure(plan)
        finite = self._finite_or_raise(total_norm)
        # torch.logical_not, not ~: a frame that names no torch global and holds no
        # tensor is skipped by torch.compile, which then compiles this method's
        # callees one by one (4 graphs) instead of the whole clip as one graph.
        skipped = torch.logical_not(finite)
        self.deferred_coef = None
        self._defer_scale = defer_scale
        try:
            threshold, coef, clipped = self._apply(plan, total_norm, finite, measured)
        finally:
            self._defer_scale = False
        self._count(skipped, clipped)
        return self._finish_step(total_norm, threshold, coef, skipped, clipped=clipped)

    def _finite_or_raise(self, total_norm: Tensor) -> Tensor:
        """Whether the (non-negative) norm is finite; with ``nonfinite="error"`` raise instead.

        ``total_norm < inf`` is false for NaN and inf alike: one op, where
        ``torch.isfinite`` takes four. Raising needs a host read.
        """
        finite = total_norm < float("inf")
        if self.config.nonfinite == "error" and not bool(finite):
            raise NonFiniteNormError(
                f"The total norm of order {self.config.norm_type} for gradients is "
                f"{float(total_norm)} (the global gradient norm) at step {self.num_steps + 1}; "
                "nothing was modified. Use nonfinite='skip' to skip such steps instead of "
                "raising."
            )
        return finite

    def _measure(self, plan: ReductionPlan) -> tuple[Tensor, Any]:
        """The global norm (0-dim) and whatever else the method measured on the way."""
        return plan.total_norm(self.config.norm_type, foreach=self.config.foreach), None

    def _apply(
        self, plan: ReductionPlan, total_norm: Tensor, finite: Tensor, measured: Any
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Clip the gradients; return ``(threshold, clip_coef, clipped)`` as 0-dim tensors.

        ``clipped`` (bool, the same on every rank, false on a skipped step) feeds
        ``num_clipped``; ``None`` where the method cannot say without extra
        communication. The default scales every gradient by
        ``min(1, threshold / (total_norm + eps))`` (1 on a skipped step).
        """
        threshold = self._threshold(total_norm, finite)
        coef, clipped = self._global_factor(threshold, total_norm, finite)
        self._scale(plan, coef)
        return threshold, coef, clipped

    def _global_factor(
        self, threshold: Tensor, total_norm: Tensor, finite: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(clip_coef, clipped)`` of the rule ``min(1, threshold / (total_norm + eps))``.

        On a skipped step (``finite`` false) the factor is 1 and ``clipped`` false.
        """
        coef = clip_coefficient(threshold, total_norm, self.config.eps)
        return torch.where(finite, coef, self._one), (total_norm > threshold) & finite

    def _scale(self, plan: ReductionPlan, coef: Tensor) -> None:
        """Multiply every local gradient by the 0-dim ``coef`` (or defer it: see :meth:`clip_`)."""
        if self._defer_scale:
            self.deferred_coef = coef
            return
        scale_(plan.grads(), coef, foreach=self.config.foreach)

    #: Whether the method's rule is one global factor ``min(1, threshold / (n + eps))``,
    #: so that a norm computed elsewhere (DeepSpeed's) can drive it: see :meth:`observe_`.
    supports_external_norm: ClassVar[bool] = True

    @torch.no_grad()
    def observe_(self, total_norm: Tensor) -> ClipStats:
        """Take a global norm computed elsewhere and return this step's threshold.

        For engines that compute the pre-clip global norm themselves and then clip by
        ``min(1, threshold / (n + eps))`` (DeepSpeed's optimizers): the norm updates
        the state exactly as in :meth:`clip_` (window first, NaN/inf ignored, counters,
        consistency checks), but no gradient is touched. The caller applies
        ``stats.threshold``. ``total_norm`` is cast to the state's dtype first, so a
        float64 norm gives the thresholds a float32 native run gives.

        Raises:
            NotImplementedError: the method needs more than the global norm.
            NonFiniteNormError: as in :meth:`clip_`.
        """
        if not self.supports_external_norm:
            raise NotImplementedError(
                f"distclip: method {self.method!r} needs per-tensor or per-element gradients, "
                "not only the global norm, so it cannot be driven by an engine's own norm"
            )
        total_norm = total_norm.detach().to(self.plan.device, self.plan.dtype).reshape(())
        finite = self._finite_or_raise(total_norm)
        skipped = torch.logical_not(finite)
        threshold, coef, clipped, engine_threshold = self._external_threshold(total_norm, finite)
        self._count(skipped, clipped)
        stats = self._finish_step(total_norm, threshold, coef, skipped, clipped=clipped)
        self.last_stats = dataclasses.replace(stats, engine_threshold=engine_threshold)
        return self.last_stats

    def _external_threshold(
        self, total_norm: Tensor, finite: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(threshold, clip_coef, clipped, engine_threshold)`` for :meth:`observe_`.

        Updates the state. ``engine_threshold`` is what an engine clipping by
        ``min(1, t / (n + eps))`` must use as ``t``.
        """
        threshold = self._threshold(total_norm, finite)
        coef, clipped = self._global_factor(threshold, total_norm, finite)
        return threshold, coef, clipped, threshold

    @property
    def num_skipped(self) -> Tensor:
        """Steps whose global norm was NaN/inf (0-dim int64 on the device).

        A method that counts the finite norms in its own state (:meth:`_finite_count`)
        derives it as ``num_steps - finite norms`` when asked, one op fewer per step.
        """
        finite = self._finite_count()
        if finite is None:
            return self._num_skipped
        return finite.new_full((), self.num_steps) - finite

    def _finite_count(self) -> Tensor | None:
        """The method state's own count of finite norms (0-dim int64), if it keeps one."""
        return None

    def _state_finite_count(self, state: dict[str, Any]) -> int | None:
        """The count of finite norms in a validated method ``state``, if the method keeps one."""
        return None

    def _count(self, skipped: Tensor, clipped: Tensor | None) -> None:
        """Add this step to ``num_skipped`` and (where known) ``num_clipped``."""
        if self._finite_count() is None:
            self._num_skipped.add_(skipped.to(self._num_skipped.device))
        if clipped is not None:
            self.num_clipped.add_(clipped.to(self.num_clipped.device))

    def _finish_step(
        self,
        total_norm: Tensor,
        threshold: Tensor,
        coef: Tensor,
        skipped: Tensor,
        *,
        clipped: Tensor | None = None,
    ) -> ClipStats:
        self.num_steps += 1
        if self._check_due():
            self.check_consistency()
        self.last_stats = ClipStats(
            total_norm, threshold, coef, skipped, self.num_steps, clipped=clipped
        )
        return self.last_stats

    def _check_due(self) -> bool:
        every = self.config.check_every
        if every and self.num_steps % every == 0:
            return True
        return self.num_steps == 1 and self.config.check_first_step and is_distributed()

    def _threshold(self, total_norm: Tensor, finite: Tensor) -> Tensor:
        """This step's threshold (0-dim, ``total_norm``'s device); may update state."""
        raise NotImplementedError

    # ------------------------------------------------------------------- state
    def _init_state(self, plan: ReductionPlan) -> None:
        """Create the method's state tensors on ``plan.device``."""

    def _state(self) -> dict[str, Any]:
        """The method's own state (tensors, ints, floats, strings)."""
        return {}

    def _validate_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` does not fit this clipper."""

    def _load_state(self, state: dict[str, Any]) -> None:
        """Load a validated ``state``."""

    def _reset_state(self) -> None:
        """Forget what the method has learnt."""

    def _state_tensors(self) -> list[Tensor]:
        """Tensors compared across ranks by :meth:`check_consistency`."""
        return [t for t in self._state().values() if isinstance(t, Tensor)]

    def state_dict(self) -> dict[str, Any]:
        """The clipper's checkpoint: method, options, counters and the method's state.

        Holds only tensors, numbers, strings and ``None`` (loadable with
        ``torch.load(weights_only=True)``). The state is replicated: identical on
        every rank, so a checkpoint loads at any world size.
        """
        return {
            "format_version": self.FORMAT_VERSION,
            "method": self.method,
            "config": self.config.as_dict(),
            "num_steps": self.num_steps,
            "num_skipped": self.num_skipped,
            "num_clipped": self.num_clipped,
            "state": self._state(),
        }

    def validate_state_dict(self, state_dict: Any) -> None:
        """Raise ``TypeError``/``ValueError`` if ``state_dict`` cannot be loaded here.

        Checks everything :meth:`load_state_dict` reads (reading the counters on the
        host: a load is not on the hot path), so that a load that passes cannot fail
        half-way.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"a clipper state_dict must be a dict, got {type(state_dict).__name__}")
        version = state_dict.get("format_version")
        if (
            isinstance(version, bool)
            or not isinstance(version, int)
            or not 1 <= version <= self.FORMAT_VERSION
        ):
            raise ValueError(
                f"clipper state format_version {version!r} is not supported; this distclip "
                f"reads versions 1 to {self.FORMAT_VERSION}"
            )
        method = state_dict.get("method")
        if method != self.method:
            raise ValueError(
                f"the state_dict was saved by method {method!r} but this clipper is "
                f"{self.method!r}; build the clipper with method={method!r} to resume from it"
            )
        num_steps = state_dict.get("num_steps")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
        for key in ("num_skipped", "num_clipped"):
            value = state_dict.get(key)
            if not isinstance(value, Tensor) or value.shape != ():
                raise ValueError(f"{key} must be a 0-dim integer tensor >= 0, got {value!r:.80}")
            if value.dtype not in COUNT_DTYPES:
                raise ValueError(
                    f"{key} must be a 0-dim integer tensor >= 0, got dtype {value.dtype}"
                )
            if value.is_meta:
                raise ValueError(f"{key} is on the meta device and holds no data")
            if int(value) < 0:
                raise ValueError(f"{key} must be a 0-dim integer tensor >= 0, got {int(value)}")
        state = state_dict.get("state")
        if not isinstance(state, dict):
            raise ValueError(f"the method state must be a dict, got {type(state).__name__}")
        self._validate_state(state)
        finite = self._state_finite_count(state)
        if finite is not None and finite != num_steps - int(state_dict["num_skipped"]):
            raise ValueError(
                f"the state_dict is inconsistent: {num_steps} steps with "
                f"{int(state_dict['num_skipped'])} skipped leave "
                f"{num_steps - int(state_dict['num_skipped'])} finite norms, but the "
                f"{self.method} state counts {finite}"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; it is validated first and nothing changes on error."""
        self.validate_state_dict(state_dict)
        saved_config = state_dict.get("config")
        if isinstance(saved_config, dict) and saved_config != self.config.as_dict():
            logger.info(
                "distclip: resuming %s with options %s (the checkpoint was saved with %s)",
                self.method,
                self.config.as_dict(),
                saved_config,
            )
        device = self._num_skipped.device
        num_skipped = state_dict["num_skipped"].detach().to(device, torch.long, copy=True)
        num_clipped = state_dict["num_clipped"].detach().to(device, torch.long, copy=True)
        self._load_state(state_dict["state"])
        self.num_steps = state_dict["num_steps"]
        self._num_skipped, self.num_clipped = num_skipped, num_clipped

    def reset(self) -> None:
        """Forget the history: counters to zero, the method's state emptied."""
        self.num_steps = 0
        self._num_skipped.zero_()
        self.num_clipped.zero_()
        self._reset_state()

    # ------------------------------------------------------------- consistency
    def state_checksum(self) -> Tensor:
        """1-D int64 tensor fingerprinting the whole state, bit for bit (no sync)."""
        device = self._num_skipped.device
        parts = [
            torch.tensor(self.num_steps, dtype=torch.long, device=device),
            self.num_skipped,
            self.num_clipped,
            *(_bit_checksum(t).to(device) for t in self._state_tensors()),
        ]
        return torch.stack(parts)

    def check_consistency(
        self, group: Any = None, *, timeout: timedelta | float | None = None
    ) -> None:
        """Debug: raise if any rank's state differs from rank 0's (one all-gather, a sync).

        Does nothing without an initialised process group. With ``timeout`` (seconds
        or a ``timedelta``), every rank first waits at a barrier that, on gloo, fails
        after ``timeout`` naming the ranks that never arrived (see
        :func:`distclip.reduction.wait_for_ranks`); without it a missing rank is
        reported by the process group's own timeout.

        Raises:
            RankDesyncError: naming the ranks whose state differs from rank 0's, or
                the ranks that did not arrive within ``timeout``.
        """
        if not is_distributed():
            return
        if timeout is not None:
            wait_for_ranks(group, timeout)
        gathered = all_gather_tensor(self.state_checksum(), group)
        reference = gathered[0]
        bad = [
            rank for rank, checksum in enumerate(gathered) if not torch.equal(checksum, reference)
        ]
        if bad:
            raise RankDesyncError(
                f"distclip {self.method}: the clipper state on rank(s) {bad} differs from "
                f"rank 0's at step {self.num_steps}. Every rank must compute the same global "
                "norm: are some gradients neither replicated (DDP) nor in a layout distclip "
                "reduces (FSDP1 with model=, FSDP2/DTensor, pipeline stages with "
                "pipeline_groups=)? Under DeepSpeed (ZeRO partitions) an optimizer cannot "
                'clip by itself: clip in the engine with distclip.deepspeed (a "distclip" '
                "section in the DeepSpeed config, or distclip.deepspeed.attach(engine))."
            )

    # ----------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Derived or process-bound: process groups and FSDP modules do not pickle.
        state["_plan"] = None
        if "_checked_plan" in state:
            state["_checked_plan"] = None
        state["model"] = None
        state["pipeline_groups"] = None
        return state

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config.as_dict().items())
        return f"{type(self).__name__}({len(self.params)} params, {options})"
