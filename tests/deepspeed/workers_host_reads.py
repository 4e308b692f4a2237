"""Host reads of a DeepSpeed step with and without distclip, on every rank (``test_ds_host_reads.py``)."""

from __future__ import annotations

import traceback
from typing import Any

import torch
import torch.distributed as dist

import distclip
from tests.deepspeed.engines import LR, input_dtype, release
from tests.support.deepspeed_env import init_deepspeed_distributed
from tests.support.op_probe import probe
from tests.support.problem import DEEPSPEED, loss_fn


def run_host_reads(specs: list[dict[str, Any]], steps: int = 5) -> list[dict[str, Any]]:
    """Host reads and tensors from host data per training step, with and without distclip.

    For each spec: the same engine built by plain ``deepspeed.initialize`` (DeepSpeed's
    own ``gradient_clipping``) and by ``distclip.deepspeed.initialize``; after two
    warm-up steps, each of the remaining steps (backward and ``engine.step()``) runs
    under ``tests.support.op_probe.probe``. What distclip adds is the difference.
    """
    deepspeed = init_deepspeed_distributed()
    rank = dist.get_rank()
    results = []
    for spec in specs:
        result: dict[str, Any] = {"name": spec["name"]}
        try:
            for label in ("plain", "distclip"):
                model = DEEPSPEED.model(0)
                optimizer = torch.optim.SGD(model.parameters(), lr=LR)
                config = dict(spec["ds_config"])
                if label == "plain":
                    config.pop("distclip")
                    engine, *_ = deepspeed.initialize(
                        model=model, optimizer=optimizer, config=config
                    )
                else:
                    engine, *_ = distclip.deepspeed.initialize(
                        model=model, optimizer=optimizer, config=config
                    )
                dtype = input_dtype(spec)

                def step(index: int, engine: Any = engine, dtype: torch.dtype = dtype) -> None:
                    x, y = DEEPSPEED.micro_batch(index, rank, 0)
                    engine.backward(loss_fn(engine(x.to(dtype)).float(), y))
                    engine.step()

                counts = []
                for index in range(steps):
                    if index < 2:
                        step(index)
                        continue
                    seen = probe(lambda index=index: step(index))
                    counts.append((seen.host_reads, seen.host_data))
                result[label] = counts
                release(engine)
        except Exception:
            result["error"] = traceback.format_exc()
        results.append(result)
    return results
