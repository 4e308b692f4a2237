"""The parameters a clipper is given: flattened, checked, fingerprinted."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["ParamsLike", "as_param_list", "bit_checksum", "meta_parameter_message"]

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
                raise ValueError(meta_parameter_message(len(flat), tensor))
            if id(tensor) not in seen:
                seen.add(id(tensor))
                flat.append(tensor)
    if not flat:
        raise ValueError(
            "params is empty: the clipper needs at least one parameter (was a generator "
            "such as model.parameters() already consumed?)"
        )
    return flat


def meta_parameter_message(index: int, tensor: Tensor, of: str = "") -> str:
    """Why parameter ``index`` on the meta device cannot be clipped, and the fix."""
    return (
        f"parameter {index}{of} (shape {tuple(tensor.shape)}) is on the meta device: it "
        "holds no data and gets no gradient to clip; materialise the model first (e.g. "
        "model.to_empty(device=...) and initialise it)"
    )


def bit_checksum(tensor: Tensor) -> Tensor:
    """An int64 checksum sensitive to every bit and position of ``tensor``."""
    flat = tensor.detach().reshape(-1)
    if flat.is_floating_point():
        int_dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()]
        flat = flat.view(int_dtype)
    flat = flat.to(torch.int64)
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64)
    return (flat * weights).sum() + flat.numel()
