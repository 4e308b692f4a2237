"""Running HF Trainer / Accelerate / DeepSpeed many times in one process, on CPU.

The frameworks keep process-wide state: Accelerate's ``AcceleratorState`` singletons,
environment variables (``ACCELERATE_USE_DEEPSPEED`` and the rank variables), HF's
global DeepSpeed config. :func:`framework_run` gives each run a clean slate and puts
everything back afterwards, so that one long-lived worker can run DDP, then DeepSpeed,
then DDP again.

The frameworks train the ``INTEGRATIONS`` problem as their loops expect it:
:class:`IndexedData` (sample ``i`` a dict of features, target and index) and
:class:`TinyNet` (the problem's MLP; ``forward`` returns ``{"loss": mse}`` and records
the sample indices of every forward pass, so that a test knows exactly which samples
each rank trained on at each step, whatever order the framework's sampler chose).
Nothing here imports a framework at import time.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tests.support.deepspeed_env import import_deepspeed
from tests.support.problem import INTEGRATIONS
from tests.support.training import flat_params

#: Samples per device and step in the framework runs.
BATCH = 4
#: The method, its options and the learning rate of the framework runs.
METHOD = INTEGRATIONS.method
OPTIONS = INTEGRATIONS.options
LR = INTEGRATIONS.optimizer_kwargs["lr"]


def sample(index: int) -> tuple[Tensor, Tensor]:
    """Sample ``index``: features and a target whose scale varies (1 to 5)."""
    x, y = INTEGRATIONS.micro_batch(index)
    return x[0], y[0]


class IndexedData(torch.utils.data.Dataset[dict[str, Tensor]]):
    """``NUM_SAMPLES`` samples as the dicts HF Trainer and Accelerate loops expect."""

    NUM_SAMPLES = 256

    def __len__(self) -> int:
        return self.NUM_SAMPLES

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        x, y = sample(index)
        return {"x": x, "y": y, "idx": torch.tensor(index)}


class TinyNet(nn.Module):
    """The problem's MLP; ``forward`` returns ``{"loss": mse}`` and records the sample indices."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = INTEGRATIONS.model(seed)
        self.seen: list[list[int]] = []

    def forward(self, x: Tensor, y: Tensor, idx: Tensor) -> dict[str, Tensor]:
        if self.training:
            self.seen.append([int(i) for i in idx.reshape(-1)])
        return {"loss": nn.functional.mse_loss(self.net(x.float()), y.float())}


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


def quiet_frameworks(
    loggers: tuple[str, ...] = ("transformers", "accelerate", "deepspeed", "torch.distributed"),
) -> None:
    """Framework logs at error level, deprecation and user warnings off (test output)."""
    for name in loggers:
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
        import_deepspeed()
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
    if not deepspeed:
        return flat_params(module)
    from deepspeed.utils import safe_get_full_fp32_param

    pieces = []
    for param in module.parameters():
        full = safe_get_full_fp32_param(param)  # None without ZeRO (the module holds it)
        pieces.append((param if full is None else full).detach().float().reshape(-1))
    return torch.cat(pieces)
