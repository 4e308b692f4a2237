"""What distclip adds to a DeepSpeed step's host reads and tensors from host data (2 gloo ranks).

The DeepSpeed suite shares one process group (``ds_group``, started once for the package).
"""

from __future__ import annotations

import pytest

from tests.deepspeed import workers_host_reads
from tests.deepspeed.engines import make_spec
from tests.support.harness import ProcessGroupHarness

pytestmark = pytest.mark.distributed

pytest.importorskip("deepspeed")


HOST_READ_SPECS = [
    make_spec("reads-z1-fp32", stage=1),
    make_spec("reads-z2-fp32", stage=2),
    make_spec("reads-z3-fp32", stage=3),
    make_spec("reads-z2-bf16", stage=2, bf16=True),
    make_spec("reads-bf16opt", bf16_optimizer=True),
    make_spec("reads-z2-zclip", stage=2, clip={"method": "zclip", "warmup_steps": 2}),
    make_spec("reads-z2-stoch", stage=2, clip={"method": "linear_stoch_autoclip", "q": 0.5}),
    make_spec("reads-z2-value", stage=2, clip={"method": "value", "clip_value": 0.05}),
    make_spec("reads-z2-layer-wise", stage=2, clip={"method": "layer_wise", "max_norm": 0.1}),
    make_spec("reads-z2-agc", stage=2, clip={"method": "agc", "clip_factor": 0.01}),
    make_spec("reads-z0-fp32", stage=0),
]


def test_distclip_adds_no_host_read_to_a_deepspeed_step(ds_group: ProcessGroupHarness) -> None:
    """Counted around backward + engine.step(): DeepSpeed's own reads, and distclip's on top.

    On the optimizer wrappers (ZeRO 1-3, BF16_Optimizer) distclip adds no host read and
    no tensor from host data for any method: the threshold reaches DeepSpeed's clip as
    a device tensor. ZeRO 0 in fp32 has no wrapper: the torch optimizer inside (SGD,
    not fused) pays the one documented read of the skip decision.
    """
    for per_rank in zip(
        *ds_group.run(workers_host_reads.run_host_reads, HOST_READ_SPECS), strict=True
    ):
        for result in per_rank:
            name = result["name"]
            assert "error" not in result, result.get("error")
            extra = 1 if name == "reads-z0-fp32" else 0
            for (plain_reads, plain_data), (reads, data) in zip(
                result["plain"], result["distclip"], strict=True
            ):
                assert reads <= plain_reads + extra, (name, result)
                assert data <= plain_data, (name, result)
