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
  a tied weight, or :func:`~distclip.reduction.marks.mark_shared`) are scaled but not
  counted;
* parameters given an explicit layout (:func:`~distclip.reduction.marks.mark_layout`)
  are reduced over the groups they are sharded over, whatever the classification
  above would say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distclip.reduction.marks import get_layout, is_marked_shared

__all__ = [
    "Placement",
    "classify",
    "flat_shard_pieces",
    "fsdp1_groups",
    "grad_owners",
    "is_dtensor",
    "is_fsdp1_param",
    "local_tensor",
    "model_params",
    "root_mesh",
]


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


def grad_owners(model: torch.nn.Module) -> dict[int, Tensor]:
    """``id(grad)`` to the parameter that holds it, for every gradient of ``model`` now.

    FSDP1's flat parameters are included (their gradients are what a user gathers
    with ``use_orig_params=False``), so a gradient maps back to the parameter whose
    layout it shares.
    """
    owners: dict[int, Tensor] = {}
    for param in model_params(model):
        if param.grad is not None:
            owners.setdefault(id(param.grad), param)
    return owners


def model_params(model: torch.nn.Module) -> list[Tensor]:
    """``model``'s parameters and FSDP1's flat parameters behind them, each once."""
    params: list[Tensor] = list(model.parameters())
    seen = {id(p) for p in params}
    for module in model.modules():
        flat = getattr(getattr(module, "_handle", None), "flat_param", None)
        if isinstance(flat, Tensor) and id(flat) not in seen:
            seen.add(id(flat))
            params.append(flat)
    return params


def flat_shard_pieces(param: Tensor) -> tuple[tuple[int, int], ...] | None:
    """``(offset, numel)`` of the real elements in an FSDP1 flat shard (``None``: not one).

    FSDP1 pads its flat parameters with zeros (to split evenly, and to align the
    original parameters with ``use_orig_params``). Zeros change no p > 0 norm, but
    a negative p or ``-inf`` would see ``|0| ** p = inf`` or a minimum of 0: those
    norms are taken over these pieces only.
    """
    if not getattr(param, "_is_flat_param", False):
        return None
    infos = getattr(param, "_shard_param_infos", None)
    if infos is None:
        return None
    return tuple((i.offset_in_shard, i.numel_in_shard) for i in infos if i.in_shard)


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
    if is_marked_shared(param):
        placement = Placement(placement.kind, placement.process_group, placement.counted, True)
    return placement


def as_group_list(groups: Any) -> tuple[Any, ...]:
    """Normalise ``pipeline_groups``: ``None``, one group, or a sequence of groups."""
    if groups is None:
        return ()
    if isinstance(groups, Sequence) and not isinstance(groups, (str, bytes)):
        return tuple(groups)
    return (groups,)
