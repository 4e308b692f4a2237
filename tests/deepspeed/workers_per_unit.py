"""``layer_wise`` and ``agc`` over DeepSpeed's flat partitions, on every rank (``test_ds_per_unit.py``)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from tests.deepspeed.engines import run_each, train_steps
from tests.support import internals


def _partition_pieces(engine: Any) -> list[tuple[int, int, int]]:
    """This rank's pieces of the model's parameters: ``(param index, start, numel)``.

    ``start`` is the piece's offset in the flattened parameter (ZeRO 1/2 and
    BF16_Optimizer: DeepSpeed's ``_hp_mapping``; ZeRO 3: the ``ds_tensor`` partition).
    Empty at ZeRO 0 (every rank holds every tensor whole).
    """
    pieces = []
    rank = dist.get_rank()
    for index, param in enumerate(engine.module.parameters()):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            address = mapping.lp_fragment_address
            pieces.append((index, int(address.start), int(address.numel)))
        elif hasattr(param, "ds_tensor"):
            size = int(param.partition_numel())
            start = rank * size
            numel = min(int(param.ds_numel) - start, size)
            if numel > 0:
                pieces.append((index, start, numel))
    return pieces


def _train(engine: Any, spec: dict[str, Any], result: dict[str, Any]) -> None:
    result["pieces"] = _partition_pieces(engine)
    result["records"] = train_steps(engine, spec, range(spec["steps"]))
    result["collectives"] = internals.fragment_collectives(engine)
    result["sub_groups"] = len(getattr(engine.optimizer, "fp32_partitioned_groups_flat", [0]))
    result["num_clipped"] = int(engine.distclip.clipper.num_clipped)


def run_per_unit(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train every spec; also the partition pieces and the collectives distclip issued.

    Per spec also: ``pieces`` (see :func:`_partition_pieces`), ``collectives`` (the
    all-reduces distclip issued over the run; ``None`` at ZeRO 0 fp32, which has no
    inner-step hook), ``sub_groups`` (ZeRO 3's; 1 otherwise) and the clipper's
    ``num_clipped``.
    """
    return run_each(specs, _train)
