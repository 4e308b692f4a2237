"""How one parameter's gradient is laid out across processes, decided at plan time.

Each parameter is classified once into a :class:`Placement`: which process group its
local power sum is all-reduced over (``None``: nothing to reduce) and whether this
rank's local part is counted at all (a copy held by several ranks is counted on one).

* plain tensors (single process, DDP, parameters nobody shards): replicated, counted
  locally and never reduced again;
* FSDP1 flat parameters and the original parameters viewing them: sharded over the
  FSDP module's process group (NO_SHARD: replicated; HYBRID_SHARD: the shard group,
  the replicas already agree). Flat parameters do not know their group, so the FSDP
  root module must be given (``model=``);
* DTensors (FSDP2, tensor parallel, 2-D meshes, HSDP): reduced over the full group of
  the mesh they live on; along every mesh dimension where the gradient is not
  sharded only the rank at coordinate 0 counts its copy. Without pipeline groups, a
  parameter on a sub-mesh is reduced over the root mesh instead (one collective for
  all), counted once along the root's other dimensions, but only when some
  parameter lives on those dimensions (they are then data or tensor parallel, not
  pipeline stages);
* parameters marked shared (Megatron's ``param.shared = True`` on the second copy of
  a tied weight, or :func:`mark_shared`) are scaled but not counted;
* parameters given an explicit layout (:func:`mark_layout`: the process groups their
  gradient is sharded over and replicated over) are reduced over the sharded groups,
  whatever the classification above would say: the escape hatch for layouts distclip
  cannot see (Megatron-style tensor parallelism on plain tensors, expert parallelism,
  a custom sharding).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Layout",
    "Placement",
    "classify",
    "fsdp1_groups",
    "get_layout",
    "is_dtensor",
    "is_fsdp1_param",
    "local_tensor",
    "mark_layout",
    "mark_shared",
    "root_mesh",
]

#: Attribute Megatron-LM sets on the copy of a tied parameter that must not be counted.
SHARED_ATTR = "shared"

#: Attribute :func:`mark_layout` sets on a parameter (a :class:`Layout`).
LAYOUT_ATTR = "_distclip_layout"


@dataclass(frozen=True)
class Placement:
    """Where a parameter's power sum goes: its reduction group(s) and whether it counts here.

    ``process_group`` is ``None`` (nothing to reduce), one process group, or a tuple
    of process groups reduced one after the other (an explicit :class:`Layout`
    sharded over several groups).
    """

    kind: str  # "replicated", "fsdp1", "dtensor", "marked"
    process_group: Any = None
    counted: bool = True  # this rank's local part enters the group's reduction
    shared: bool = False  # a tied copy: its norm is its own, but the global norm skips it


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


def is_dtensor(tensor: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (no communication), or the tensor itself."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor  # type: ignore[attr-defined, no-any-return]


def is_fsdp1_param(param: Tensor) -> bool:
    """True for FSDP1's flat parameters and the original parameters that view them."""
    return bool(getattr(param, "_is_flat_param", False) or getattr(param, "_fsdp_flattened", False))


def fsdp1_groups(model: torch.nn.Module) -> dict[int, Placement]:
    """Map ``id(param)`` to its placement for every parameter FSDP1 manages in ``model``."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    placements: dict[int, Placement] = {}
    for module in FullyShardedDataParallel.fsdp_modules(model):
        handle = getattr(module, "_handle", None)
        if handle is None:
            continue
        flat = handle.flat_param
        if module.sharding_strategy == ShardingStrategy.NO_SHARD:
            placement = Placement("replicated")
        else:
            placement = Placement("fsdp1", module.process_group)
        placements[id(flat)] = placement
        for param in getattr(flat, "_params", None) or ():
            placements[id(param)] = placement
        # While unsharded after a forward, the module holds views of the flat parameter
        # (use_orig_params=True) instead of its parameters: they belong to it too.
        for view in getattr(flat, "_tensors", None) or ():
            if view is not None:
                placements[id(view)] = placement
    return placements


def _mesh_group(mesh: Any) -> Any:
    """One process group spanning every rank of ``mesh``."""
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    if mesh.ndim == 1:
        return mesh.get_group(0)
    return mesh._flatten().get_group()


def root_mesh(mesh: Any) -> Any:
    """The device mesh ``mesh`` was sliced from (``mesh`` itself if it is a root)."""
    return mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh


def mesh_dims_in_use(params: Sequence[Tensor]) -> dict[int, frozenset[str]]:
    """For each root mesh (by id), the named dimensions some DTensor parameter lives on."""
    used: dict[int, set[str]] = {}
    for param in params:
        if is_dtensor(param):
            mesh = param.device_mesh  # type: ignore[attr-defined]
            used.setdefault(id(root_mesh(mesh)), set()).update(mesh.mesh_dim_names or ())
    return {key: frozenset(names) for key, names in used.items()}


def _classify_dtensor(
    param: Tensor, fold_into_root: bool, dims_in_use: dict[int, frozenset[str]]
) -> Placement:
    mesh = param.device_mesh  # type: ignore[attr-defined]
    placements = param.placements  # type: ignore[attr-defined]
    if any(p.is_partial() for p in placements):
        raise NotImplementedError(
            f"distclip: a DTensor parameter has a Partial placement {tuple(placements)}; "
            "its gradient is not a sum distclip can reduce. Use Shard or Replicate placements."
        )
    # Shard and _StridedShard both split the tensor; only Replicate keeps whole copies.
    is_split = [not p.is_replicate() for p in placements]
    names = mesh.mesh_dim_names
    reduce_mesh = mesh
    if fold_into_root:
        # A parameter on a sub-mesh is a copy along the root's other dimensions only if
        # some parameter lives on them (TP next to FSDP); a dimension nobody lives on
        # may hold different parameters (pipeline stages): never fold across it.
        root = root_mesh(mesh)
        if root is not mesh and names is not None and root.mesh_dim_names is not None:
            missing = set(root.mesh_dim_names) - set(names)
            if missing <= dims_in_use.get(id(root), frozenset()):
                reduce_mesh = root
    if reduce_mesh is mesh:
        sharded = is_split
    else:
        split_names = {n for n, split in zip(names, is_split, strict=True) if split}
        sharded = [n in split_names for n in reduce_mesh.mesh_dim_names]
    if not any(sharded):
        return Placement("replicated")
    coordinate = reduce_mesh.get_coordinate()
    counted = coordinate is not None and all(
        is_sharded or c == 0 for is_sharded, c in zip(sharded, coordinate, strict=True)
    )
    return Placement("dtensor", _mesh_group(reduce_mesh), counted)


def classify(
    param: Tensor,
    *,
    fsdp1: dict[int, Placement] | None,
    fold_into_root: bool,
    dims_in_use: dict[int, frozenset[str]] | None = None,
) -> Placement:
    """The placement of one parameter; refuses layouts it cannot reduce correctly.

    Raises:
        ValueError: an FSDP1 parameter without ``model=`` (its group is unknown).
        NotImplementedError: a DTensor with a Partial placement.
    """
    placement: Placement
    layout = get_layout(param)
    if layout is not None:
        groups = layout.sharded_over
        if not groups:
            placement = Placement("replicated")
        else:
            placement = Placement("marked", groups[0] if len(groups) == 1 else groups)
    elif is_dtensor(param):
        placement = _classify_dtensor(param, fold_into_root, dims_in_use or {})
    elif fsdp1 is not None and id(param) in fsdp1:
        placement = fsdp1[id(param)]
    elif is_fsdp1_param(param) and fsdp1 is not None:
        raise ValueError(
            "distclip: a parameter is managed by an FSDP1 (FullyShardedDataParallel) unit "
            "that the module given as model= does not contain, so its process group is "
            "unknown; pass the FSDP root module (or a module holding every FSDP unit whose "
            "parameters are clipped) as model="
        )
    elif is_fsdp1_param(param):
        raise ValueError(
            "distclip: the parameters are managed by FSDP1 (FullyShardedDataParallel), whose "
            "flat parameters do not say which process group they are sharded over; pass "
            "model=<the FSDP root module> (e.g. cls(model.parameters(), lr=..., model=model) "
            "or distclip.attach(optimizer, model=model)). Without it the norm would be a "
            "shard-local one, so distclip refuses."
        )
    else:
        placement = Placement("replicated")
    if getattr(param, SHARED_ATTR, False):
        placement = Placement(placement.kind, placement.process_group, placement.counted, True)
    return placement


def as_group_list(groups: Any) -> tuple[Any, ...]:
    """Normalise ``pipeline_groups``: ``None``, one group, or a sequence of groups."""
    if groups is None:
        return ()
    if isinstance(groups, Sequence) and not isinstance(groups, (str, bytes)):
        return tuple(groups)
    return (groups,)
