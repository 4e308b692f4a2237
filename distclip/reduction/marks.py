"""What a user tells distclip about parameters it cannot classify by itself.

Both marks are attributes of the parameter, so every entry point sees them (the
clippers, the optimizer factories, ``attach``, the functional drop-ins) without an
argument of its own:

* :func:`mark_shared`: the second copy of a tied weight (Megatron-LM's
  ``param.shared = True`` is read too): scaled, never counted;
* :func:`mark_layout`: the process groups a gradient is sharded over and replicated
  over, for layouts no classifier can see (Megatron-style tensor parallelism on plain
  tensors, expert parallelism, a custom sharding), in the spirit of torchrec's
  ``param_to_pgs``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Layout",
    "check_layout_covers",
    "get_layout",
    "is_marked_shared",
    "mark_layout",
    "mark_shared",
]

#: Attribute Megatron-LM sets on the copy of a tied parameter that must not be counted.
SHARED_ATTR = "shared"

#: Attribute :func:`mark_layout` sets on a parameter (a :class:`Layout`).
LAYOUT_ATTR = "_distclip_layout"


@dataclass(frozen=True, eq=False)
class Layout:
    """An explicit layout of one parameter's gradient, set by :func:`mark_layout`.

    Attributes:
        sharded_over: process groups whose ranks hold disjoint pieces of the gradient
            (together, over all these groups, the whole gradient): its power sum is
            all-reduced over each of them.
        replicated_over: process groups whose ranks hold identical copies of this
            rank's piece: nothing is reduced over them, so a copy never counts twice.
            They are checked: the groups must cover every rank of the job (of one
            pipeline stage with ``pipeline_groups=``), so a forgotten group is an
            error rather than a wrong norm.
    """

    sharded_over: tuple[Any, ...]
    replicated_over: tuple[Any, ...]

    def __deepcopy__(self, memo: dict[int, Any]) -> Layout:
        return self  # process groups are handles of this process: shared, not copied


def _as_groups(name: str, groups: Any) -> tuple[Any, ...]:
    """``groups`` (one process group, or a sequence) as a tuple; typed errors otherwise."""
    if groups is None:
        return ()
    items = tuple(groups) if isinstance(groups, (list, tuple)) else (groups,)
    for group in items:
        if group is dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError(
                f"{name}: rank {dist.get_rank()} is not a member of this group "
                "(dist.new_group returns NON_GROUP_MEMBER on the ranks it leaves out); name "
                "the groups this rank belongs to (each rank marks its own parameters)"
            )
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"{name} must be a torch.distributed ProcessGroup or a list of them (e.g. "
                f"dist.new_group(ranks) or mesh.get_group('tp')), got {type(group).__name__}"
            )
    return items


def _check_layout_groups(sharded: tuple[Any, ...], replicated: tuple[Any, ...]) -> None:
    """Every group holds this rank, no group is named twice, two groups share only this rank."""
    if not dist.is_initialized():
        raise RuntimeError(
            "distclip.mark_layout needs torch.distributed to be initialised "
            "(dist.init_process_group) before the groups are named"
        )
    me = dist.get_rank()
    seen: list[tuple[str, set[int]]] = []
    for role, groups in (("sharded_over", sharded), ("replicated_over", replicated)):
        for group in groups:
            ranks = set(dist.get_process_group_ranks(group))
            if me not in ranks:
                raise ValueError(
                    f"{role}: rank {me} is not a member of the group of ranks {sorted(ranks)}; "
                    "name the groups this rank belongs to (each rank marks its own parameters)"
                )
            for other_role, other in seen:
                if ranks & other != {me}:
                    raise ValueError(
                        f"{role}: the group of ranks {sorted(ranks)} overlaps the {other_role} "
                        f"group {sorted(other)} beyond this rank ({me}); the groups of one "
                        "layout must be independent dimensions (e.g. the tensor-parallel and "
                        "the data-parallel group), each named once"
                    )
            seen.append((role, ranks))


def mark_layout(
    params: Tensor | Iterable[Tensor] | torch.nn.Module,
    *,
    sharded_over: Any = None,
    replicated_over: Any = None,
) -> list[Tensor]:
    """State how the gradients of ``params`` are laid out, for layouts distclip cannot see.

    For Megatron-style tensor parallelism on plain tensors, expert parallelism or any
    custom sharding (in the spirit of torchrec's ``param_to_pgs``). Every clipper,
    optimizer factory, :func:`~distclip.attach` and the functional drop-ins honour it;
    it takes precedence over what distclip would infer (FSDP1, DTensor, replicated).

    Args:
        params: a parameter, an iterable of them, or a module (all its parameters).
        sharded_over: the process group(s) whose ranks hold disjoint pieces of each
            gradient; the power sums are all-reduced over each (one all-reduce per
            distinct set of groups per step). ``None``: not sharded.
        replicated_over: the process group(s) whose ranks hold identical copies
            (e.g. the data-parallel group after DDP-style averaging). Never reduced,
            so a copy counts once; checked against the job's size when the clipper
            is built.

    Returns:
        The marked parameters, as a list.

    Raises:
        TypeError: ``params`` holds something that is not a tensor, or a group is
            not a ``ProcessGroup``.
        ValueError: this rank is not in a group, or two groups overlap beyond it.
        RuntimeError: ``torch.distributed`` is not initialised.
    """
    sharded = _as_groups("sharded_over", sharded_over)
    replicated = _as_groups("replicated_over", replicated_over)
    _check_layout_groups(sharded, replicated)
    tensors: list[Tensor]
    if isinstance(params, torch.nn.Module):
        tensors = list(params.parameters())
    elif isinstance(params, Tensor):
        tensors = [params]
    else:
        tensors = list(params)
    layout = Layout(sharded, replicated)
    for tensor in tensors:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"params must hold tensors, got {type(tensor).__name__}")
        setattr(tensor, LAYOUT_ATTR, layout)
    return tensors


def get_layout(param: Tensor) -> Layout | None:
    """The :class:`Layout` :func:`mark_layout` set on ``param``, or ``None``."""
    layout = getattr(param, LAYOUT_ATTR, None)
    return layout if isinstance(layout, Layout) else None


def check_layout_covers(layout: Layout, ranks_per_stage: int) -> None:
    """Raise unless the layout's groups span ``ranks_per_stage`` ranks (sizes multiplied).

    Raises:
        ValueError: a group of the job is missing from the layout (or one too many).
    """
    sizes = [dist.get_world_size(g) for g in (*layout.sharded_over, *layout.replicated_over)]
    if math.prod(sizes) != ranks_per_stage:
        shown = " x ".join(map(str, sizes)) or "no group"
        raise ValueError(
            f"distclip.mark_layout: a parameter's sharded_over and replicated_over groups "
            f"span {shown} = {math.prod(sizes)} ranks, but each copy of the model spans "
            f"{ranks_per_stage} ranks here (the world, or one pipeline stage with "
            "pipeline_groups=). Name every group the gradient is split or copied along, "
            "e.g. sharded_over=tp_group, replicated_over=dp_group."
        )


def mark_shared(param: Tensor) -> Tensor:
    """Mark ``param`` as the second copy of a tied parameter: scaled, never counted.

    For pipeline stages holding the same weight twice (e.g. the input and output
    embedding on the first and last stage): mark the copy on every stage but one,
    as Megatron-LM does with ``param.shared = True``. Returns ``param``.
    """
    setattr(param, SHARED_ATTR, True)
    return param


def is_marked_shared(param: Tensor) -> bool:
    """Whether ``param`` is a tied copy left out of the norm (:func:`mark_shared`)."""
    return bool(getattr(param, SHARED_ATTR, False))
