"""Running HF Trainer / Accelerate / DeepSpeed many times in one process, on CPU.

The frameworks keep process-wide state: Accelerate's ``AcceleratorState`` singletons,
environment variables (``ACCELERATE_USE_DEEPSPEED`` and the rank variables), HF's
global DeepSpeed config. :func:`framework_run` gives each run a clean slate and puts
everything back afterwards, so that one long-lived worker can run DDP, then DeepSpeed,
then DDP again.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

_DEEPSPEED_READY = False


def _rank_env() -> dict[str, str]:
    """The variables a launcher (torchrun) would set for this rank of the harness group."""
    if not dist.is_initialized():
        return {}
    rank, world = dist.get_rank(), dist.get_world_size()
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "LOCAL_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",  # never dialled: the process group exists already
    }


def setup_deepspeed() -> Any:
    """Import DeepSpeed for CPU/gloo in this process (once): shm op off, quiet logs."""
    global _DEEPSPEED_READY
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    if not _DEEPSPEED_READY:
        # Without this every initialize compiles the shared-memory op (tens of seconds).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.utils.logger.setLevel(logging.ERROR)
        _DEEPSPEED_READY = True
    return deepspeed


def quiet_frameworks() -> None:
    """Framework logs at error level, deprecation and user warnings off (test output)."""
    for name in ("transformers", "accelerate", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def reset_frameworks() -> None:
    """Forget Accelerate's singletons and HF's global DeepSpeed config."""
    import sys

    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(True)
        state.GradientState._reset_state()
    hf_deepspeed = sys.modules.get("transformers.integrations.deepspeed")
    if hf_deepspeed is not None:
        hf_deepspeed.unset_hf_deepspeed_config()
    gc.collect()


@contextlib.contextmanager
def framework_run(*, deepspeed: bool = False) -> Iterator[None]:
    """One framework run: rank variables set, state reset before and after, env restored."""
    saved = dict(os.environ)
    os.environ.update(_rank_env())
    if deepspeed:
        setup_deepspeed()
    quiet_frameworks()
    reset_frameworks()
    try:
        yield
    finally:
        reset_frameworks()
        os.environ.clear()
        os.environ.update(saved)


class WarningCapture(logging.Handler):
    """Collects the warnings of one logger (distclip's) on this rank, while installed."""

    def __init__(self, logger_name: str = "distclip") -> None:
        super().__init__(logging.WARNING)
        self.logger_name = logger_name
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> WarningCapture:
        logging.getLogger(self.logger_name).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger(self.logger_name).removeHandler(self)


def full_params(module: Any, *, deepspeed: bool) -> Any:
    """Every parameter of ``module`` as one flat float32 tensor (ZeRO partitions gathered).

    Under DeepSpeed every rank must call it: gathering a ZeRO-3 parameter is a collective.
    """
    import torch
    from integ_setup import flat_params

    if not deepspeed:
        return flat_params(module)
    from deepspeed.utils import safe_get_full_fp32_param

    pieces = []
    for param in module.parameters():
        full = safe_get_full_fp32_param(param)  # None without ZeRO (the module holds it)
        pieces.append((param if full is None else full).detach().float().reshape(-1))
    return torch.cat(pieces)
