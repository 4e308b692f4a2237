"""Ports of torch's ``test_fsdp_clip_grad_norm.py`` to distclip, run on every rank.

torch's tests call ``FullyShardedDataParallel.clip_grad_norm_``; the ports call
``distclip.clip_grad_norm_(fsdp.parameters(), ..., model=fsdp)`` on the same kinds of
FSDP1 models (CPU, gloo) and compare with the same oracle: torch's
``clip_grad_norm_`` on a DDP copy. Each function returns plain numbers for the test
to assert on.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import distclip
from tests.distributed.contract_models import Block, TiedLM, make, tokens
from tests.support.layouts_fsdp1 import fsdp1_full_grads
from tests.support.reference import norm_of

#: torch's test multiplies the gradients by this, so that every max_norm clips.
LARGE_FACTOR = 100


def quiet() -> None:
    """FSDP1 warns about its own deprecation on every construction; it does not matter here."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, message=".*deprecated.*")


def _fsdp1(module: nn.Module, **kwargs: Any) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(module, device_id=torch.device("cpu"), **kwargs)


def tied_fsdp1(sharding: str, use_orig_params: bool) -> nn.Module:
    """:class:`TiedLM` under FSDP1: each block a unit (``mixed``: NO_SHARD encoder,
    FULL_SHARD decoder and root, as torch's ``mixed_strategy``)."""
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = make(TiedLM)
    if sharding == "mixed":
        model.encoder = _fsdp1(
            model.encoder,
            sharding_strategy=ShardingStrategy.NO_SHARD,
            use_orig_params=use_orig_params,
        )
        model.decoder = _fsdp1(
            model.decoder,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            use_orig_params=use_orig_params,
        )
        return _fsdp1(
            model, sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=use_orig_params
        )
    return _fsdp1(
        model,
        sharding_strategy=ShardingStrategy[sharding],
        use_orig_params=use_orig_params,
        auto_wrap_policy=ModuleWrapPolicy({Block}),
    )


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _restore(model: nn.Module, saved: list[torch.Tensor | None]) -> None:
    for p, g in zip(model.parameters(), saved, strict=True):
        if g is not None:
            p.grad.copy_(g)


def _all_changed(model: nn.Module, saved: list[torch.Tensor | None]) -> bool:
    """Every gradient was modified by the clip; a missing one stayed missing."""
    for p, g in zip(model.parameters(), saved, strict=True):
        if (p.grad is None) is not (g is None):
            return False
        if g is not None and g.numel() and torch.equal(p.grad, g):
            return False
    return True


def _max_rel_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want), (sorted(got), sorted(want))
    errors = [float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want]
    return max(errors)


def _full_params(fsdp: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    with FSDP.summon_full_params(fsdp):
        return {clean_tensor_name(n): p.detach().clone() for n, p in fsdp.named_parameters()}


#: torch's norm types for the DDP parity (1, 2, inf) and the ones distclip adds.
PARITY_NORM_TYPES = (1.0, 2.0, float("inf"), 0.0, -1.0, float("-inf"))


def ddp_parity(sharding: str, use_orig_params: bool, iteration_norm_type: float) -> dict[str, Any]:
    """torch's ``test_ddp_parity`` for one (sharding, use_orig_params).

    For each ``max_norm`` of torch's (1, 2.5) and each norm type, on the same
    first-step gradients (restored each time): DDP's norm by torch, FSDP1's by
    distclip, the float64 reference, whether every gradient changed, how far the
    gathered clipped gradients are from DDP's. Then, clipping with
    ``iteration_norm_type``: an Adam step and three more iterations (``zero_grad``
    alternating ``set_to_none``), comparing norms and the parameters after the
    first and the last step. Offloading is left out: FSDP1's CPU offload pins
    memory, which needs an accelerator.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    quiet()
    rank = dist.get_rank()
    ddp = DDP(make(TiedLM))
    fsdp = tied_fsdp1(sharding, use_orig_params)
    ddp_optim = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    fsdp_optim = torch.optim.Adam(fsdp.parameters(), lr=1e-2)
    inp = tokens(rank, 0)
    for model in (ddp, fsdp):
        model(inp).sum().backward()
    for p in itertools.chain(ddp.parameters(), fsdp.parameters()):
        if p.grad is not None:
            p.grad *= LARGE_FACTOR
    ddp_saved, fsdp_saved = _grads(ddp), _grads(fsdp)
    out: dict[str, Any] = {"subtests": [], "iterations": []}
    for norm_type, max_norm in itertools.product(PARITY_NORM_TYPES, (1, 2.5)):
        _restore(ddp, ddp_saved)
        _restore(fsdp, fsdp_saved)
        ddp_norm = torch.nn.utils.clip_grad_norm_(
            ddp.parameters(), max_norm=max_norm, norm_type=norm_type
        )
        fsdp_norm = distclip.clip_grad_norm_(
            fsdp.parameters(), max_norm=max_norm, norm_type=norm_type, model=fsdp
        )
        ddp_grads = {n: p.grad.clone() for n, p in ddp.module.named_parameters()}
        out["subtests"].append(
            {
                "norm_type": norm_type,
                "max_norm": max_norm,
                "reference": norm_of([g for g in ddp_saved if g is not None], norm_type),
                "ddp_norm": ddp_norm,
                "fsdp_norm": fsdp_norm,
                "ddp_changed": _all_changed(ddp, ddp_saved),
                "fsdp_changed": _all_changed(fsdp, fsdp_saved),
                "grad_error": _max_rel_error(fsdp1_full_grads(fsdp, use_orig_params), ddp_grads),
            }
        )
    norm = iteration_norm_type
    _restore(ddp, ddp_saved)
    _restore(fsdp, fsdp_saved)
    torch.nn.utils.clip_grad_norm_(ddp.parameters(), 2.5, norm_type=norm)
    distclip.clip_grad_norm_(fsdp.parameters(), 2.5, norm, model=fsdp)
    ddp_optim.step()
    fsdp_optim.step()
    ddp_params = {n: p.detach() for n, p in ddp.module.named_parameters()}
    out["param_error"] = [_max_rel_error(_full_params(fsdp), ddp_params)]
    for i in range(3):
        set_to_none = i % 2 == 0
        ddp_optim.zero_grad(set_to_none=set_to_none)
        fsdp_optim.zero_grad(set_to_none=set_to_none)
        inp = tokens(rank, i + 1)
        for model in (ddp, fsdp):
            model(inp).sum().backward()
        reference = norm_of([q.grad for q in ddp.parameters()], norm)
        ddp_norm = torch.nn.utils.clip_grad_norm_(ddp.parameters(), 2.5, norm_type=norm)
        fsdp_norm = distclip.clip_grad_norm_(fsdp.parameters(), 2.5, norm, model=fsdp)
        out["iterations"].append({"ddp": ddp_norm, "fsdp": fsdp_norm, "reference": reference})
        ddp_optim.step()
        fsdp_optim.step()
    ddp_params = {n: p.detach() for n, p in ddp.module.named_parameters()}
    out["param_error"].append(_max_rel_error(_full_params(fsdp), ddp_params))
    return out


def low_precision_grads(sharding: str, use_orig_params: bool) -> dict[str, Any]:
    """torch's ``test_low_precision_grads``: fp16 parameters, reductions and gradients kept.

    For each max_norm (1, 2.5) and norm type: the gradients' and the norm's dtype,
    distclip's norm against the float64 norm of the gathered fp16 gradients, and
    (torch's best-effort check) each local gradient's norm after the clip.
    """
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

    quiet()
    mixed = MixedPrecision(
        param_dtype=torch.float16, reduce_dtype=torch.float16, keep_low_precision_grads=True
    )
    kwargs: dict[str, Any] = {
        "sharding_strategy": ShardingStrategy[sharding],
        "use_orig_params": use_orig_params,
        "mixed_precision": mixed,
    }
    model = make(TiedLM)
    model.encoder = _fsdp1(model.encoder, **kwargs)
    model.decoder = _fsdp1(model.decoder, **kwargs)
    fsdp = _fsdp1(model, **kwargs)
    try:
        fsdp(tokens(dist.get_rank(), 0)).sum().backward()
    except RuntimeError as exc:  # FSDP1's own backward, before distclip is called
        return {"torch_error": str(exc)}
    saved = _grads(fsdp)
    gathered = fsdp1_full_grads(fsdp, use_orig_params)
    out: dict[str, Any] = {
        "grad_dtypes": sorted({str(g.dtype) for g in saved if g is not None}),
        "subtests": [],
    }
    for norm_type, max_norm in itertools.product(PARITY_NORM_TYPES, (1, 2.5)):
        _restore(fsdp, saved)
        total = distclip.clip_grad_norm_(fsdp.parameters(), max_norm, norm_type, model=fsdp)
        local = [p.grad for p in fsdp.parameters() if p.grad is not None and p.grad.numel()]
        out["subtests"].append(
            {
                "norm_type": norm_type,
                "max_norm": max_norm,
                "dtype": str(total.dtype),
                "norm": float(total),
                "reference": norm_of(list(gathered.values()), norm_type),
                "local_norms": [float(torch.linalg.vector_norm(g, norm_type)) for g in local],
            }
        )
    return out


def no_gradients(use_orig_params: bool) -> dict[str, Any]:
    """torch's ``test_no_gradients``: a forward without backward, then the clip.

    Returns the warnings raised, the norm's dtype and value.
    """
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

    quiet()
    mixed = MixedPrecision(
        param_dtype=torch.float16, reduce_dtype=torch.float32, buffer_dtype=torch.float32
    )
    fsdp = _fsdp1(
        nn.Linear(24, 24),
        sharding_strategy=ShardingStrategy.SHARD_GRAD_OP,
        mixed_precision=mixed,
        use_orig_params=use_orig_params,
    )
    fsdp(torch.randn(32, 24))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        total = distclip.clip_grad_norm_(fsdp.parameters(), 1, model=fsdp)
    return {
        "warnings": [str(w.message) for w in caught],
        "dtype": str(total.dtype),
        "norm": float(total),
    }


def non_uniform_grad_dtype() -> dict[str, Any]:
    """torch's ``test_non_uniform_grad_dtype``: bf16 gradients in one unit, fp32 in another.

    Returns the gradient dtypes, the norm's dtype and value, and the float64 norm of
    the gathered gradients.
    """
    from torch.distributed.fsdp import MixedPrecision

    quiet()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5))
    model[0] = _fsdp1(
        model[0],
        mixed_precision=MixedPrecision(
            param_dtype=torch.bfloat16, keep_low_precision_grads=True, cast_forward_inputs=True
        ),
    )
    model[1] = _fsdp1(
        model[1],
        mixed_precision=MixedPrecision(param_dtype=torch.float32, cast_forward_inputs=True),
    )
    fsdp = _fsdp1(model)
    gen = torch.Generator().manual_seed(dist.get_rank())
    fsdp(torch.randn((2, 5), generator=gen)).sum().backward()
    dtypes = sorted({str(p.grad.dtype) for p in fsdp.parameters() if p.grad is not None})
    gathered = fsdp1_full_grads(fsdp, False)
    total = distclip.clip_grad_norm_(fsdp.parameters(), max_norm=1, model=fsdp)
    return {
        "grad_dtypes": dtypes,
        "dtype": str(total.dtype),
        "norm": float(total),
        "reference": norm_of(list(gathered.values()), 2.0),
    }


def non_root(use_orig_params: bool) -> dict[str, Any]:
    """torch's ``test_non_root``: clipping through an FSDP unit that is not the root.

    torch's method refuses (its lazy init lives in the root). distclip takes the
    unit for its own parameters (their global norm), and refuses parameters the
    given module does not manage. Returns both and the reference norm of the unit.
    """
    quiet()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5))
    model[1] = _fsdp1(model[1], use_orig_params=use_orig_params)
    fsdp = _fsdp1(model, use_orig_params=use_orig_params)
    gen = torch.Generator().manual_seed(dist.get_rank())
    fsdp(torch.randn((2, 5), generator=gen)).sum().backward()
    unit = fsdp[1] if hasattr(fsdp, "__getitem__") else fsdp.module[1]
    out: dict[str, Any] = {}
    try:
        unit.clip_grad_norm_(max_norm=2)
    except RuntimeError as exc:
        out["torch_error"] = str(exc)
    reference = norm_of(list(fsdp1_full_grads(unit, use_orig_params).values()), 2.0)
    out["reference"] = reference
    out["unit_norm"] = float(distclip.grad_norm(unit.parameters(), model=unit))
    try:
        distclip.grad_norm(fsdp.parameters(), model=unit)
    except ValueError as exc:
        out["refused"] = str(exc)
    return out
