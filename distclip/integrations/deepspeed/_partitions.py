"""Where each parameter's pieces lie in DeepSpeed's flat fp32 partitions (``layer_wise``, ``agc``).

A :class:`FlatLayout` per buffer, found once from DeepSpeed's own bookkeeping (each
wrapper keeps it differently), and :class:`FragmentClip`, the inner step's pre-hook
body that clips a batch of buffers with one all-reduce over the process group they are
partitioned over. The bookkeeping read, wrapper by wrapper: ``docs/deepspeed.md``.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from distclip.clippers import PiecewiseClipper
from distclip.clippers.flat_pieces import FlatPieces, FlatUnits, TensorFragment

__all__ = ["FlatLayout", "FragmentClip", "whole_tensor_clip"]

#: Wrappers whose inner optimizer updates whole tensors (no flat buffer, no collective).
_WHOLE_TENSOR_WRAPPERS = ("FP16_UnfusedOptimizer", None)


@dataclass
class FlatLayout:
    """Which pieces of which parameters lie where in one flat fp32 buffer.

    Attributes:
        shapes: the shape of every parameter that has pieces in the buffers of this
            param group / sub-group on some rank (the same list on every rank).
        fragments: this rank's pieces (``buffer`` 0, ``tensor`` indexes ``shapes``).
        group: the process group the buffer is partitioned over; ``None``: whole
            tensors, no collective.
        batch_key: layouts with equal keys in one inner step are reduced together.
    """

    shapes: list[tuple[int, ...]]
    fragments: list[TensorFragment]
    group: Any
    batch_key: Any
    plans: dict[Any, Any] = field(default_factory=dict)


def _comm() -> Any:
    return importlib.import_module("deepspeed.comm")


def _hp_layout(lp_params: list[Any], group: Any, batch_key: Any) -> FlatLayout:
    """ZeRO 1/2 and ``BF16_Optimizer``: the pieces DeepSpeed linked with ``_hp_mapping``."""
    fragments = []
    for index, param in enumerate(lp_params):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        if hp.numel > 0:
            fragments.append(TensorFragment(0, index, int(hp.start), int(hp.numel), int(lp.start)))
    shapes = [tuple(p.shape) for p in lp_params]
    return FlatLayout(shapes, fragments, group, batch_key)


def _zero3_layout(wrapper: Any, sub_group: int) -> FlatLayout:
    """ZeRO 3: each parameter's ``ds_tensor`` partition inside the sub-group's buffer."""
    group = wrapper.sub_group_process_groups[sub_group]
    rank = _comm().get_rank(group=group)
    fragments, shapes = [], []
    for index, param in enumerate(wrapper.fp16_groups[sub_group]):
        shapes.append(tuple(param.ds_shape))
        size = int(param.partition_numel())
        offset = int(wrapper.grad_position[wrapper.get_param_id(param)][1])
        start = rank * size
        numel = min(int(param.ds_numel) - start, size)
        if numel > 0:
            fragments.append(TensorFragment(0, index, offset, numel, start))
    key = "dp" if group is wrapper.dp_process_group else ("sub_group", sub_group)
    return FlatLayout(shapes, fragments, group, key)


def _whole_layout(params: list[Tensor]) -> FlatLayout:
    """Whole tensors: each buffer is one parameter (no collective)."""
    fragments = [TensorFragment(i, i, 0, p.numel(), 0) for i, p in enumerate(params) if p.numel()]
    return FlatLayout([tuple(p.shape) for p in params], fragments, None, None)


def _concatenated_layout(lp_params: list[Tensor]) -> FlatLayout:
    """``FP16_Optimizer``: the whole param group flattened into one buffer."""
    fragments, offset = [], 0
    for index, param in enumerate(lp_params):
        if param.numel():
            fragments.append(TensorFragment(0, index, offset, param.numel(), 0))
        offset += param.numel()
    return FlatLayout([tuple(p.shape) for p in lp_params], fragments, None, None)


class FragmentClip:
    """The inner optimizer's step pre-hook body for ``layer_wise`` / ``agc`` under a wrapper.

    Called with the inner torch optimizer; clips the ``.grad`` of its flat fp32
    parameters in place. Layouts are found once per buffer and cached (weakly: a
    buffer DeepSpeed replaces, e.g. on a checkpoint load, gets a new layout).

    Args:
        wrapper: the DeepSpeed optimizer wrapper instance.
        name: its class name (one of ``_verified.SUPPORTED_WRAPPERS``); ``None`` for
            whole tensors without a wrapper (ZeRO 0 in fp32).
        clipper: a piecewise clipper with tensor or row units (``layer_wise``, ``agc``).
    """

    def __init__(self, wrapper: Any, name: str | None, clipper: PiecewiseClipper) -> None:
        self.wrapper = wrapper
        self.name = name
        self.clipper = clipper
        self._layouts: dict[int, tuple[weakref.ref[Tensor], FlatLayout]] = {}
        self._batch_plans: dict[tuple[int, ...], tuple[list[weakref.ref[Tensor]], FlatUnits]] = {}
        #: Collectives issued (for tests and debugging).
        self.collectives = 0

    # ---------------------------------------------------------------- layouts
    def _find_layout(self, flat: Tensor) -> FlatLayout:
        wrapper, name = self.wrapper, self.name
        if name == "DeepSpeedZeroOptimizer":
            for i, buffer in enumerate(wrapper.single_partition_of_fp32_groups):
                if buffer is flat:
                    group = wrapper.real_dp_process_group[i]
                    key = "dp" if group is wrapper.dp_process_group else ("group", i)
                    return _hp_layout(wrapper.bit16_groups[i], group, key)
        elif name == "BF16_Optimizer":
            for i, buffer in enumerate(wrapper.fp32_groups_flat_partition):
                if buffer is flat:
                    group = wrapper.real_dp_process_group[i]
                    key = "dp" if group is wrapper.dp_process_group else ("group", i)
                    return _hp_layout(wrapper.bf16_groups[i], group, key)
        elif name == "DeepSpeedZeroOptimizer_Stage3":
            for i, buffer in enumerate(wrapper.fp32_partitioned_groups_flat):
                if buffer is flat:
                    return _zero3_layout(wrapper, i)
        elif name == "FP16_Optimizer":
            for i, buffer in enumerate(wrapper.fp32_groups_flat):
                if buffer is flat:
                    return _concatenated_layout(wrapper.fp16_groups[i])
        elif name in _WHOLE_TENSOR_WRAPPERS:
            return _whole_layout([flat])
        raise RuntimeError(
            f"distclip: DeepSpeed's {name} stepped a parameter of shape {tuple(flat.shape)} "
            "that is none of its fp32 partitions, so distclip cannot tell which tensors "
            "(rows) it holds; this layout is not the one verified for DeepSpeed 0.19"
        )

    def layout(self, flat: Tensor) -> FlatLayout:
        """The (cached) layout of the flat fp32 buffer ``flat``."""
        entry = self._layouts.get(id(flat))
        if entry is not None and entry[0]() is flat:
            return entry[1]
        found = self._find_layout(flat)
        self._layouts[id(flat)] = (weakref.ref(flat), found)
        return found

    # ------------------------------------------------------------------- step
    def __call__(self, optimizer: Any) -> None:
        """Clip the gradients of every flat buffer ``optimizer`` is about to step."""
        flats = [p for group in optimizer.param_groups for p in group["params"]]
        if self.name in _WHOLE_TENSOR_WRAPPERS:
            self.clip_batch(flats, [_whole_layout(flats)])
            return
        batches: dict[Any, tuple[list[Tensor], list[FlatLayout]]] = {}
        for flat in flats:
            layout = self.layout(flat)
            key = layout.batch_key if layout.batch_key is not None else ("flat", id(flat))
            entry = batches.setdefault(key, ([], []))
            entry[0].append(flat)
            entry[1].append(layout)
        for batch_flats, layouts in batches.values():
            self.clip_batch(batch_flats, layouts)

    def clip_batch(self, flats: list[Tensor], layouts: list[FlatLayout]) -> None:
        """Clip buffers that share one process group: one collective (none without a group)."""
        units = self._units(flats, layouts)
        group = layouts[0].group if layouts else None
        all_reduce = self._all_reduce(group) if group is not None else None
        grads = [None if flat.grad is None else flat.grad.reshape(-1) for flat in flats]
        weights = [flat.detach().reshape(-1) for flat in flats]
        self.clipper.clip_pieces_(FlatPieces(units, grads, weights, all_reduce))

    def _units(self, flats: list[Tensor], layouts: list[FlatLayout]) -> FlatUnits:
        """The clipper's units of a batch of buffers (cached while the buffers live)."""
        key = tuple(id(flat) for flat in flats)
        cached = self._batch_plans.get(key)
        if cached is not None and all(
            ref() is flat for ref, flat in zip(cached[0], flats, strict=True)
        ):
            return cached[1]
        shapes: list[tuple[int, ...]] = []
        fragments: list[TensorFragment] = []
        for buffer, layout in enumerate(layouts):
            base = len(shapes)
            shapes.extend(layout.shapes)
            # A whole-tensor layout spans several buffers (its own ``buffer`` indexes);
            # a flat layout is one buffer (``buffer`` 0).
            fragments.extend(
                f._replace(buffer=buffer + f.buffer, tensor=base + f.tensor)
                for f in layout.fragments
            )
        device = flats[0].device if flats else None
        units = FlatUnits.build(self.clipper.unit, shapes, fragments, device)
        self._batch_plans[key] = ([weakref.ref(flat) for flat in flats], units)
        return units

    def _all_reduce(self, group: Any) -> Callable[[Tensor], Tensor]:
        dist = _comm()
        accelerator = importlib.import_module("deepspeed.accelerator").get_accelerator()

        def all_reduce(vector: Tensor) -> Tensor:
            self.collectives += 1
            on_device = vector.to(accelerator.current_device_name())
            dist.all_reduce(on_device, group=group)
            return on_device

        return all_reduce


def whole_tensor_clip(clipper: PiecewiseClipper) -> Callable[[list[Tensor]], None]:
    """Clips whole parameter tensors held by this rank (ZeRO 0 in fp32): no collective.

    The gradients are DeepSpeed's data-parallel averages, identical on every rank.
    """
    clip = FragmentClip(None, None, clipper)

    def apply(params: list[Tensor]) -> None:
        clip.clip_batch(params, [_whole_layout(params)])

    return apply
