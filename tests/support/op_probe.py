"""Count what a step asks of the host, as a CPU proxy of its cost on a GPU.

Seen through a ``TorchDispatchMode`` (every aten op that runs):

* ``aten._local_scalar_dense`` is a read of a tensor's value by the host (``.item()``,
  ``float(t)``, ``bool(t)``, ``.tolist()``, ``if t:``): on a GPU the host waits for
  the device to catch up;
* ``aten.lift_fresh`` is a tensor built from host data (``torch.tensor([...])``,
  ``torch.as_tensor(list)``): on a GPU a blocking host-to-device copy;
* every other aten op is (at most) a kernel launch; view ops launch nothing and are
  counted apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpProbe", "StepCounts", "probe"]

_HOST_READ = torch.ops.aten._local_scalar_dense.default
_HOST_DATA = torch.ops.aten.lift_fresh.default


def _is_view(func: Any) -> bool:
    schema = func._schema
    return bool(schema.returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in schema.returns
    )


@dataclass
class StepCounts:
    """What one probed call did: host reads, tensors from host data, other aten ops."""

    host_reads: int = 0
    host_data: int = 0
    ops: int = 0
    views: int = 0
    names: Counter[str] = field(default_factory=Counter)

    @property
    def host_transfers(self) -> int:
        """Host reads plus tensors built from host data."""
        return self.host_reads + self.host_data


class OpProbe(TorchDispatchMode):
    """A dispatch mode that fills a :class:`StepCounts`."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = StepCounts()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        counts = self.counts
        if func is _HOST_READ:
            counts.host_reads += 1
        elif func is _HOST_DATA:
            counts.host_data += 1
        elif _is_view(func):
            counts.views += 1
        else:
            counts.ops += 1
            counts.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def probe(fn: Callable[[], Any]) -> StepCounts:
    """Run ``fn`` once under an :class:`OpProbe` and return its counts.

    ``Tensor.tolist`` and ``Tensor.numpy`` read tensors without dispatching an aten op
    on a CPU tensor: they are counted as host reads too, while the probe runs.
    """
    mode = OpProbe()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def counting(name: str) -> Callable[..., Any]:
        original = originals[name]

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            mode.counts.host_reads += 1
            return original(self, *args, **kwargs)

        return read

    for name in originals:
        setattr(torch.Tensor, name, counting(name))
    try:
        with mode:
            fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return mode.counts
