"""Ports of torch's FSDP2 clipping test and of test_nn's clip cases on sharded layouts.

* :func:`fully_shard_clip`: torch's ``test_fully_shard_clip_grad_norm_.py`` (1-D over 2
  ranks, 2-D FSDP2 + TP over 4), distclip's ``clip_grad_norm_`` on the sharded model
  against torch's on a replicated (DDP) copy, as torch's test does;
* :func:`test_nn_cases`: test_nn's ``clip_grad_norm_`` / ``clip_grad_value_`` /
  two-phase cases on a ``Linear(10, 10)`` whose gradients are set by hand and laid
  out as DDP, FSDP2, row-wise TP, an explicit :func:`distclip.mark_layout` or a 2-D
  mesh; the checks compare with the float64 reference of the whole gradients;
* :func:`nonfinite_table`: test_nn's ``error_if_nonfinite`` table on sharded layouts.

Each returns plain numbers and flags; the tests assert on them.
"""

from __future__ import annotations

import copy
import functools
import itertools
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import distclip
from tests.distributed.contract_models import TwoBlocks, features, make
from tests.support import internals
from tests.support.collectives import count_collectives, value_of
from tests.support.reference import norm_of

#: test_nn's norm types, and those distclip adds (checked against the reference only).
TORCH_NORM_TYPES = (0.5, 1.5, 2, 4, "inf")
EXTRA_NORM_TYPES = (0, -1, "-inf")
#: Scales the loss so that every gradient's norm is above max_norm, as torch's test needs.
LOSS_SCALE = 50.0


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


@functools.cache
def _mesh_2d() -> Any:
    """The 2 x 2 ("dp", "tp") mesh, made once per worker (a mesh makes process groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


@functools.cache
def _mesh_1d() -> Any:
    """The 1-D mesh of every rank, made once per worker."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


# ------------------------------------------------------------------------ FSDP2 port
def fully_shard_clip(norm_type: float | str, two_d: bool, iterations: int = 4) -> dict[str, Any]:
    """torch's ``_test_clip_grad_norm``: ``iterations`` steps of the sharded model and its
    DDP reference (one replica per data-parallel rank, tensor-parallel ranks sharing
    its data), each clipping to ``max_norm=1`` with ``foreach=True``.

    Per iteration: whether the sharded gradients equal the reference's, whether every
    gradient's norm exceeded max_norm before the clip (torch's norm types), both
    returned norms, the all-reduces of distclip's clip and the norm's placements,
    the local gradients' norms after the clip and whether each non-zero one changed.
    """
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    _quiet()
    p, max_norm = float(norm_type), 1.0
    model = make(TwoBlocks)
    if two_d:
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = _mesh_2d()
        dp_mesh, dp_rank = mesh["dp"], mesh.get_local_rank("dp")
        ref = DDP(copy.deepcopy(model), process_group=dp_mesh.get_group())
        for block in model.blocks:
            parallelize_module(
                block, mesh["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
            )
    else:
        dp_mesh, dp_rank = _mesh_1d(), dist.get_rank()
        ref = DDP(copy.deepcopy(model))
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    ref_optim = torch.optim.Adam(ref.parameters(), lr=1e-2)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    inp = features(dp_rank, 0)
    out: list[dict[str, Any]] = []
    for _ in range(iterations):
        ref_optim.zero_grad()
        (ref(inp).sum() * LOSS_SCALE).backward()
        optim.zero_grad()
        (model(inp).sum() * LOSS_SCALE).backward()
        ref_grads = [q.grad.detach().clone() for q in ref.parameters()]
        local_grads = [q.grad.to_local().detach().clone() for q in model.parameters()]
        full_grads = [q.grad.full_tensor() for q in model.parameters()]
        same = all(
            torch.allclose(r, g, rtol=1.3e-6, atol=1e-5)
            for r, g in zip(ref_grads, full_grads, strict=True)
        )
        reference = norm_of(ref_grads, p)
        ref_total = torch.nn.utils.get_total_norm(ref_grads, p)
        # torch's p = 0 counts tensors: the reference is clipped by the count of elements
        # (distclip's), so that both models keep training alike.
        clip_by = torch.tensor(reference) if p == 0 else ref_total
        torch.nn.utils.clip_grads_with_norm_(ref.parameters(), max_norm, clip_by)
        with count_collectives() as counts:
            total = distclip.clip_grad_norm_(model.parameters(), max_norm, norm_type, foreach=True)
        out.append(
            {
                "grads_match_reference": same,
                "all_above_max_norm": all(
                    float(torch.linalg.vector_norm(g, p)) > max_norm
                    for g in [*ref_grads, *local_grads]
                ),
                "reference": reference,
                "sharded_reference": norm_of(full_grads, p),
                "ref_total": float(ref_total),
                "total": value_of(total),
                "placements": [type(x).__name__ for x in total.placements],
                "all_reduces": counts["all_reduce"],
                "debug_all_reduces": counts["debug_all_reduce"],
                "local_norms_after": [
                    float(torch.linalg.vector_norm(q.grad.to_local(), p))
                    for q in model.parameters()
                ],
                "changed": all(
                    not torch.equal(q.grad.to_local(), g)
                    for q, g in zip(model.parameters(), local_grads, strict=True)
                    if torch.count_nonzero(g)
                ),
            }
        )
        ref_optim.step()
        optim.step()
    return {"iterations": out}


# ------------------------------------------------------------- test_nn on layouts
def _layout_linear(layout: str) -> tuple[nn.Linear, Any]:
    """A ``Linear(10, 10)`` laid out as ``layout``; returns it and a grad setter."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    with torch.random.fork_rng():
        torch.manual_seed(0)
        linear = nn.Linear(10, 10)
    if layout in ("ddp", "marked"):
        if layout == "marked":  # rows split by hand over tp (the world on 2 ranks)
            tp, dp = _marked_groups()
            size, rank = dist.get_world_size(tp), dist.get_rank(tp)
            rows = slice(rank * 10 // size, (rank + 1) * 10 // size)
            with torch.no_grad():
                linear.weight = nn.Parameter(linear.weight[rows].clone())
                linear.bias = nn.Parameter(linear.bias[rows].clone())
            distclip.mark_layout(linear, sharded_over=tp, replicated_over=dp)

            def set_grads(full: list[Tensor]) -> None:
                for param, g in zip(linear.parameters(), full, strict=True):
                    param.grad = g[rows].clone()

            return linear, set_grads

        def set_plain(full: list[Tensor]) -> None:
            for param, g in zip(linear.parameters(), full, strict=True):
                param.grad = g.clone()

        return linear, set_plain
    if layout == "fsdp2":
        mesh = _mesh_1d()
        placements = {"weight": [Shard(0)], "bias": [Shard(0)]}
    elif layout == "tp-rowwise":
        mesh = _mesh_1d()
        placements = {"weight": [Shard(1)], "bias": [Replicate()]}
    else:  # "2d": the weight split both ways, the bias split and replicated
        mesh = _mesh_2d()
        placements = {"weight": [Shard(0), Shard(1)], "bias": [Shard(0), Replicate()]}
    for name in ("weight", "bias"):
        full = getattr(linear, name).detach()
        setattr(linear, name, nn.Parameter(distribute_tensor(full, mesh, placements[name])))

    def set_dtensor(full: list[Tensor]) -> None:
        for (name, param), g in zip(linear.named_parameters(), full, strict=True):
            param.grad = distribute_tensor(g.clone(), mesh, placements[name], src_data_rank=None)

    return linear, set_dtensor


def _marked_groups() -> tuple[Any, Any]:
    """(tp, dp) groups for the hand-sharded layout: the world and none on 2 ranks, 2 x 2 on 4."""
    if dist.get_world_size() == 2:
        return dist.group.WORLD, None
    mesh = _mesh_2d()
    return mesh["tp"].get_group(), mesh["dp"].get_group()


def _gather(grad: Tensor, layout: str) -> Tensor:
    """The whole gradient, gathered (a collective) from this layout's shards."""
    if hasattr(grad, "full_tensor"):
        return grad.full_tensor()  # type: ignore[no-any-return]
    if layout == "marked":
        tp, _ = _marked_groups()
        pieces = [torch.empty_like(grad) for _ in range(dist.get_world_size(tp))]
        dist.all_gather(pieces, grad.contiguous(), group=tp)
        return torch.cat(pieces)
    return grad.clone()


def _full_grads(linear: nn.Linear, layout: str) -> list[Tensor]:
    return [_gather(q.grad, layout) for q in linear.parameters()]


def _large() -> list[Tensor]:
    return [torch.arange(1.0, 101).view(10, 10), torch.ones(10).div(1000)]


def _small() -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(10, 10, generator=gen).div(10000), torch.ones(10).div(500)]


def _scale_of(after: list[Tensor], before: list[Tensor]) -> tuple[float, float]:
    """(the mean, the spread) of ``after / before`` over every element."""
    ratios = torch.cat([(a / b).reshape(-1) for a, b in zip(after, before, strict=True)])
    return float(ratios.mean()), float(ratios.std())


def nn_cases(layout: str) -> dict[str, Any]:
    """test_nn's clip cases for every norm type and ``foreach``, on one layout.

    For each case: the returned norm (and whether it is a DTensor), the whole
    gradients' norm before and after, and the factor every element was multiplied
    by; the exhausted generator's warnings; ``clip_grad_value_``'s bounds.
    """
    _quiet()
    linear, set_grads = _layout_linear(layout)
    max_norm = 2
    out: dict[str, Any] = {"cases": [], "value": []}
    for norm_type, foreach in itertools.product(
        (*TORCH_NORM_TYPES, *EXTRA_NORM_TYPES), (False, True)
    ):
        p = float(norm_type)
        for grads_of, phases in ((_large, "one"), (_large, "two"), (_small, "one")):
            set_grads(grads_of())
            if phases == "one":
                norm = distclip.clip_grad_norm_(
                    linear.parameters(), max_norm, norm_type=norm_type, foreach=foreach
                )
            else:
                grads = [q.grad for q in linear.parameters()]
                norm = distclip.get_total_norm(
                    grads, norm_type=norm_type, foreach=foreach, model=linear
                )
                distclip.clip_grads_with_norm_(linear.parameters(), max_norm, norm, foreach=foreach)
            after = _full_grads(linear, layout)
            mean, spread = _scale_of(after, grads_of())
            torch_norm = None
            if layout == "ddp" and p != 0:  # torch is the oracle where gradients are whole
                torch_norm = float(torch.nn.utils.get_total_norm(grads_of(), norm_type))
            out["cases"].append(
                {
                    "torch": torch_norm,
                    "norm_type": p,
                    "foreach": foreach,
                    "grads": grads_of.__name__,
                    "phases": phases,
                    "norm": value_of(norm),
                    "dtensor": hasattr(norm, "placements"),
                    "before": norm_of(grads_of(), p),
                    "after": norm_of(after, p),
                    "scale": mean,
                    "spread": spread,
                }
            )
        # A single tensor and a list of one give the same result.
        set_grads(_large())
        single = [q.grad.clone() for q in linear.parameters()]
        distclip.clip_grad_norm_(linear.weight, max_norm, norm_type=norm_type, foreach=foreach)
        once = _full_grads(linear, layout)[0]
        linear.weight.grad.copy_(single[0])
        distclip.clip_grad_norm_([linear.weight], max_norm, norm_type=norm_type, foreach=foreach)
        out.setdefault("single_equal", []).append(
            bool(torch.equal(once, _full_grads(linear, layout)[0]))
        )
    params = linear.parameters()
    for _ in params:
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distclip.clip_grad_norm_(params, max_norm)
    out["generator_warnings"] = [str(w.message) for w in caught]
    for foreach, with_bias in itertools.product((False, True), (True, False)):
        full = [torch.arange(-50.0, 50).view(10, 10).div(5), torch.ones(10).mul(2)]
        set_grads(full)
        if not with_bias:
            linear.bias.grad = None
        distclip.clip_grad_value_(linear.parameters(), 2.5, foreach=foreach)
        weight = _gather(linear.weight.grad, layout)
        bias_ok = linear.bias.grad is None if not with_bias else True
        if with_bias:
            bias_ok = bool(torch.equal(_gather(linear.bias.grad, layout), full[1].clamp(-2.5, 2.5)))
        out["value"].append(bias_ok and bool(torch.equal(weight, full[0].clamp(-2.5, 2.5))))
    return out


# ------------------------------------------------------------ error_if_nonfinite
def _sharded_vector(layout: str, full: Tensor) -> Tensor:
    """A float64 parameter holding ``full``, laid out as ``layout``, its gradient ``full``."""
    from torch.distributed.tensor import Shard, distribute_tensor

    if layout == "fsdp2":
        mesh = _mesh_1d()
        ones = distribute_tensor(torch.ones_like(full), mesh, [Shard(0)], src_data_rank=None)
        param = nn.Parameter(ones)
        param.grad = distribute_tensor(full.clone(), mesh, [Shard(0)], src_data_rank=None)
        return param
    chunks = torch.ones_like(full).tensor_split(dist.get_world_size())
    param = nn.Parameter(chunks[dist.get_rank()].clone())
    param.grad = full.tensor_split(dist.get_world_size())[dist.get_rank()].clone()
    distclip.mark_layout(param, sharded_over=dist.group.WORLD)
    return param


def nonfinite_table(layout: str, cases: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """test_nn's ``error_if_nonfinite`` cases with the parameters sharded as ``layout``.

    Per (case, error_if_nonfinite, norm_type, scalar): whether this rank raised and
    with which message, whether its gradients were left as they were, the norm.
    """
    _quiet()
    out = []
    for index, (one_elem, prefix, scalars, nonfinite, finite) in enumerate(cases):
        for error_if_nonfinite, norm_type, scalar in itertools.product(
            (False, True), (*nonfinite, *finite), scalars
        ):
            grad = torch.zeros(10, dtype=torch.float64)
            if one_elem:
                grad[1] = scalar
            else:
                grad.fill_(scalar)
            params = [_sharded_vector(layout, grad)]
            if prefix:
                params.insert(0, _sharded_vector(layout, torch.ones(1, dtype=torch.float64)))
            before = [internals.local_tensor(q.grad).clone() for q in params]
            row: dict[str, Any] = {
                "case": index,
                "error_if_nonfinite": error_if_nonfinite,
                "norm_type": norm_type,
                "scalar": scalar,
                "error": None,
            }
            try:
                norm = distclip.clip_grad_norm_(
                    params, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite
                )
                row["norm"] = value_of(norm)
            except RuntimeError as exc:
                row["error"] = str(exc)
                row["unchanged"] = all(
                    torch.equal(internals.local_tensor(q.grad).nan_to_num(7.0), b.nan_to_num(7.0))
                    for q, b in zip(params, before, strict=True)
                )
            out.append(row)
    return out
