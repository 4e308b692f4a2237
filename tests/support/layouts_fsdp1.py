"""Whole gradients of an FSDP1 model, gathered from its flat shards (for references)."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["fsdp1_full_grads"]


def _flat_full_grads(root: nn.Module) -> dict[str, Tensor]:
    """Whole gradients of every original parameter, gathered from FSDP1's flat shards.

    ``summon_full_params(with_grads=True)`` needs ``use_orig_params=True``; this reads
    the flat parameter's own bookkeeping instead (names, shapes, padding).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    out: dict[str, Tensor] = {}
    for prefix, module in root.named_modules():
        handle = getattr(module, "_handle", None) if isinstance(module, FSDP) else None
        if handle is None:
            continue
        flat = handle.flat_param
        grad = flat.grad
        if handle.uses_sharded_strategy:
            world = dist.get_world_size(module.process_group)
            gathered = grad.new_empty(grad.numel() * world)
            dist.all_gather_into_tensor(gathered, grad.contiguous(), group=module.process_group)
        else:
            gathered = grad
        full = gathered[: flat._unpadded_unsharded_size.numel()]
        names, shapes = iter(flat._fqns), iter(flat._shapes)
        for view, padding in zip(
            full.split(flat._numels_with_padding), flat._is_padding_mask, strict=True
        ):
            if not padding:
                name = clean_tensor_name(f"{prefix}.{next(names)}".lstrip("."))
                out[name] = view.reshape(next(shapes)).clone()
    for name, p in root.named_parameters():  # parameters FSDP does not manage
        name = clean_tensor_name(name)
        if name not in out and p.grad is not None and not getattr(p, "_is_flat_param", False):
            out[name] = p.grad.detach().clone()
    return out


def fsdp1_full_grads(root: nn.Module, use_orig_params: bool) -> dict[str, Tensor]:
    """Every original parameter's whole gradient under the FSDP1 ``root``, by clean name."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    if not use_orig_params:
        return _flat_full_grads(root)
    with FSDP.summon_full_params(root, with_grads=True):
        return {clean_tensor_name(n): p.grad.clone() for n, p in root.named_parameters()}
