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
  a tied weight, or :func:`mark_shared`) are scaled but not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Placement",
    "classify",
    "fsdp1_groups",
    "is_dtensor",
    "is_fsdp1_param",
    "local_tensor",
    "mark_shared",
]

#: Attribute Megatron-LM sets on the copy of a tied parameter that must not be counted.
SHARED_ATTR = "shared"


@dataclass(frozen=True)
class Placement:
    """Where a parameter's power sum goes: its reduction group and whether it counts here."""

    kind: str  # "replicated", "fsdp1", "dtensor"
    process_group: Any = None  # a ProcessGroup, or None for no reduction
    counted: bool = True  # this rank's local part enters the group's reduction
    shared: bool = False  # a tied copy: its norm is its own, but the global norm skips it


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
    return placements


def _mesh_group(mesh: Any) -> Any:
    """One process group spanning every rank of ``mesh``."""
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    if mesh.ndim == 1:
        return mesh.get_group(0)
    return mesh._flatten().get_group()


def _root_of(mesh: Any) -> Any:
    return mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh


def mesh_dims_in_use(params: Sequence[Tensor]) -> dict[int, frozenset[str]]:
    """For each root mesh (by id), the named dimensions some DTensor parameter lives on."""
    used: dict[int, set[str]] = {}
    for param in params:
        if is_dtensor(param):
            mesh = param.device_mesh  # type: ignore[attr-defined]
            used.setdefault(id(_root_of(mesh)), set()).update(mesh.mesh_dim_names or ())
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
        root = _root_of(mesh)
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
    if is_dtensor(param):
        placement = _classify_dtensor(param, fold_into_root, dims_in_use or {})
    elif fsdp1 is not None and id(param) in fsdp1:
        placement = fsdp1[id(param)]
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
