"""What every clipper shares: parameters and their reduction plan, counters, state, checks.

A :class:`Clipper` owns the parameters it clips and a :class:`~distclip.reduction.ReductionPlan`
built once from them, the step counters, the method's :class:`~distclip.clippers.state.MethodState`
(saved in checkpoints) and the cross-rank consistency check. What a step does is the
business of its kind (:mod:`distclip.clippers.kinds`): a global-factor clipper scales
every gradient by one factor decided from the global norm, a piecewise clipper clips
pieces of the gradients by their own norms.

No step reads a tensor back to the host, except with ``nonfinite="error"`` (which must
decide on the host whether to raise) and the optional debug consistency check.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from distclip._checks import is_int, refuse_meta
from distclip.clippers.config import ClipConfig
from distclip.clippers.consistency import check_consistency, state_checksum
from distclip.clippers.params import ParamsLike, as_param_list
from distclip.clippers.state import MethodState
from distclip.clippers.stats import ClipStats
from distclip.errors import NonFiniteNormError
from distclip.reduction import ReductionPlan, is_distributed
from distclip.window import COUNT_DTYPES

if TYPE_CHECKING:
    from distclip.clippers.registry import MethodSpec

__all__ = ["Clipper"]

logger = logging.getLogger(__name__)


class Clipper:
    """Base class of every clipping method (use a kind: ``GlobalFactorClipper``, ``PiecewiseClipper``).

    A method is a subclass of a kind, registered with
    :func:`~distclip.clippers.registry.register_method`; its options are the fields of
    its configuration class, its state a :class:`~distclip.clippers.state.MethodState`
    made by :meth:`_make_state`.

    Args:
        params: the tensors whose gradients are clipped (or param-group dicts).
        model: the FSDP1 root module when FSDP1 manages the parameters (its flat
            parameters do not say which process group they are sharded over).
        pipeline_groups: process group(s) across which pipeline stages' norms are
            summed (each holding one rank per stage); ``None`` without pipelining.
        **options: the method's options; see its configuration class.

    Raises:
        TypeError: the class serves several method names (build it with
            :func:`~distclip.make_clipper`); an unknown option or one of the wrong type.
        ValueError: an option out of range; a layout the method cannot clip.
    """

    #: ``"global"`` or ``"piecewise"``: which engine entry the clipper takes.
    kind: ClassVar[str] = ""
    #: Version of the checkpoint format written by :meth:`state_dict`.
    FORMAT_VERSION: ClassVar[int] = 1

    spec: MethodSpec
    config: ClipConfig
    state: MethodState

    def __init__(
        self,
        params: ParamsLike,
        *,
        model: torch.nn.Module | None = None,
        pipeline_groups: Any = None,
        **options: Any,
    ) -> None:
        spec = self._only_spec()
        self._setup(
            params, spec.config(options), spec, model=model, pipeline_groups=pipeline_groups
        )

    #: The method a direct ``cls(params, ...)`` builds when the class serves several names.
    default_method: ClassVar[str | None] = None

    @classmethod
    def _only_spec(cls) -> MethodSpec:
        from distclip.clippers.registry import METHODS

        specs = {spec.name: spec for spec in METHODS.values() if spec.clipper_cls is cls}
        if cls.default_method in specs:
            return specs[cls.default_method]
        if len(specs) != 1:
            names = ", ".join(sorted(specs)) or "none"
            raise TypeError(
                f"{cls.__name__} is registered as {len(specs)} methods ({names}); build it "
                "with distclip.make_clipper(method, params, ...)"
            )
        return next(iter(specs.values()))

    @classmethod
    def from_config(
        cls,
        params: ParamsLike,
        config: ClipConfig,
        *,
        spec: MethodSpec | None = None,
        model: torch.nn.Module | None = None,
        pipeline_groups: Any = None,
    ) -> Clipper:
        """Build from an already validated configuration (of ``spec``, or of the class's one method)."""
        spec = cls._only_spec() if spec is None else spec
        if not isinstance(config, spec.config_cls):
            raise TypeError(
                f"{cls.__name__} needs a {spec.config_cls.__name__}, got {type(config).__name__}"
            )
        clipper = cls.__new__(cls)
        clipper._setup(params, config, spec, model=model, pipeline_groups=pipeline_groups)
        return clipper

    def _setup(
        self,
        params: ParamsLike,
        config: ClipConfig,
        spec: MethodSpec,
        *,
        model: Any,
        pipeline_groups: Any,
    ) -> None:
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.spec = spec
        self.config = config
        self.model = model
        self.pipeline_groups = pipeline_groups
        self.params = as_param_list(params)
        self._plan: ReductionPlan | None = None
        self.num_steps = 0
        #: The :class:`ClipStats` of the last step (``None`` before the first): the same
        #: object as the ``last_clip`` of the optimizer that clips with this clipper.
        self.last_clip: ClipStats | None = None
        plan = self.plan  # built now: an unsupported layout is refused at construction
        self._num_skipped = torch.zeros((), dtype=torch.long, device=plan.device)
        self.num_clipped = torch.zeros((), dtype=torch.long, device=plan.device)
        #: 1 in the norms' dtype: the factor of a skipped step (made once, not per step).
        self._one = torch.ones((), dtype=plan.dtype, device=plan.device)
        self.state = self._make_state(plan)
        self._check_plan(plan)

    @property
    def last_stats(self) -> ClipStats | None:
        """:attr:`last_clip` under its name of distclip 0.1 (kept for code written then)."""
        return self.last_clip

    @property
    def method(self) -> str:
        """The registered method name (what checkpoints record)."""
        return self.spec.name

    def _make_state(self, plan: ReductionPlan) -> MethodState:
        """The method's state, on ``plan.device`` (none by default)."""
        return MethodState()

    def _check_plan(self, plan: ReductionPlan) -> None:
        """Refuse a layout the method cannot clip (at construction and on a new plan)."""

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
            if "state" in self.__dict__:  # a rebuilt plan: the layout is checked again
                self._check_plan(self._plan)
        return self._plan

    @torch.no_grad()
    def total_norm(self) -> Tensor:
        """The global gradient norm now (0-dim tensor); changes no state."""
        return self.plan.total_norm(self.config.norm_type, foreach=self.config.foreach)

    # -------------------------------------------------------------------- step
    def clip_(self, *, defer_scale: bool = False) -> ClipStats:
        """Clip the gradients in place; return what was seen (see the kinds)."""
        raise NotImplementedError

    def observe_(self, total_norm: Tensor) -> ClipStats:
        """Take a global norm an engine computed itself (see the kinds)."""
        raise NotImplementedError

    def _engine_norm(self, total_norm: Tensor) -> Tensor:
        """An engine's norm as a 0-dim tensor in the state's device and dtype.

        A float64 norm (ZeRO 3's) thus gives the thresholds a float32 native run gives.
        """
        return total_norm.detach().to(self.plan.device, self.plan.dtype).reshape(())

    def _begin(self, total_norm: Tensor) -> tuple[Tensor, Tensor]:
        """``(finite, skipped)`` of this step's norm; with ``nonfinite="error"`` raise instead.

        ``total_norm < inf`` is false for NaN and inf alike (a norm is never negative):
        one op, where ``torch.isfinite`` takes four. Raising needs a host read.
        ``skipped`` is added to ``num_skipped`` here.

        Raises:
            NonFiniteNormError: the norm is NaN/inf and ``nonfinite="error"`` (on every
                rank alike, before anything is modified).
        """
        finite = total_norm < float("inf")
        if self.config.nonfinite == "error" and not bool(finite):
            raise NonFiniteNormError(
                f"The total norm of order {self.config.norm_type} for gradients is "
                f"{float(total_norm)} (the global gradient norm) at step {self.num_steps + 1}; "
                "nothing was modified. Use nonfinite='skip' to skip such steps instead of "
                "raising."
            )
        # torch.logical_not, not ~: a frame that names no torch global and holds no
        # tensor is skipped by torch.compile, which then compiles this method's
        # callees one by one instead of the whole clip as one graph.
        skipped = torch.logical_not(finite)
        if self.state.finite_count() is None:
            self._num_skipped.add_(skipped.to(self._num_skipped.device))
        return finite, skipped

    @property
    def num_skipped(self) -> Tensor:
        """Steps whose global norm was NaN/inf (0-dim int64 on the device).

        A method whose state counts the finite norms anyway (AutoClip's window, ZClip)
        derives it as ``num_steps - finite norms`` when asked: one op fewer per step.
        """
        finite = self.state.finite_count()
        if finite is None:
            return self._num_skipped
        return finite.new_full((), self.num_steps) - finite

    def _finish_step(
        self,
        total_norm: Tensor,
        threshold: Tensor,
        coef: Tensor,
        skipped: Tensor,
        *,
        clipped: Tensor | None = None,
        engine_threshold: Tensor | None = None,
    ) -> ClipStats:
        """Count the step, run the due consistency check and record :attr:`last_clip`."""
        if clipped is not None:
            self.num_clipped.add_(clipped.to(self.num_clipped.device))
        self.num_steps += 1
        if self._check_due():
            self.check_consistency()
        self.last_clip = ClipStats(
            total_norm,
            threshold,
            coef,
            skipped,
            self.num_steps,
            engine_threshold=engine_threshold,
            clipped=clipped,
        )
        return self.last_clip

    def _check_due(self) -> bool:
        every = self.config.check_every
        if every and self.num_steps % every == 0:
            return True
        return self.num_steps == 1 and self.config.check_first_step and is_distributed()

    # ------------------------------------------------------------------- state
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
            "state": self.state.state_dict(),
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
        if not is_int(num_steps) or num_steps < 0:
            raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
        for key in ("num_skipped", "num_clipped"):
            value = state_dict.get(key)
            if not isinstance(value, Tensor) or value.shape != ():
                raise ValueError(f"{key} must be a 0-dim integer tensor >= 0, got {value!r:.80}")
            if value.dtype not in COUNT_DTYPES:
                raise ValueError(
                    f"{key} must be a 0-dim integer tensor >= 0, got dtype {value.dtype}"
                )
            refuse_meta(key, value)
            if int(value) < 0:
                raise ValueError(f"{key} must be a 0-dim integer tensor >= 0, got {int(value)}")
        state = state_dict.get("state")
        if not isinstance(state, dict):
            raise ValueError(f"the method state must be a dict, got {type(state).__name__}")
        self.state.validate_state_dict(state)
        finite = self.state.saved_finite_count(state)
        skipped = int(state_dict["num_skipped"])
        if finite is not None and finite != num_steps - skipped:
            raise ValueError(
                f"the state_dict is inconsistent: {num_steps} steps with {skipped} skipped "
                f"leave {num_steps - skipped} finite norms, but the {self.method} state "
                f"counts {finite}"
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
        self.state.load_state_dict(state_dict["state"])
        self.num_steps = state_dict["num_steps"]
        self._num_skipped, self.num_clipped = num_skipped, num_clipped

    def reset(self) -> None:
        """Forget the history: counters to zero, the method's state emptied."""
        self.num_steps = 0
        self._num_skipped.zero_()
        self.num_clipped.zero_()
        self.state.reset()

    # ------------------------------------------------------------- consistency
    def state_checksum(self) -> Tensor:
        """1-D int64 tensor fingerprinting the whole state, bit for bit (no sync)."""
        return state_checksum(self)

    def check_consistency(
        self, group: Any = None, *, timeout: timedelta | float | None = None
    ) -> None:
        """Debug: raise if any rank's state differs from rank 0's (one all-gather, a sync).

        See :func:`distclip.clippers.consistency.check_consistency`.

        Raises:
            RankDesyncError: naming the ranks whose state differs from rank 0's, or
                the ranks that did not arrive within ``timeout``.
        """
        check_consistency(self, group, timeout=timeout)

    # ----------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Derived or process-bound: process groups and FSDP modules do not pickle.
        state["_plan"] = None
        state["model"] = None
        state["pipeline_groups"] = None
        return state

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config.as_dict().items())
        return f"{type(self).__name__}({len(self.params)} params, {options})"
