"""The Lightning runs of ``test_lightning.py`` and their independent reference.

The ``LIGHTNING`` problem (``tests.support.problem``): a small MLP regressed onto
targets whose scale changes from step to step, so that AutoClip clips on some steps and
not on others. Optimizer step ``s`` (0-based) of rank ``r`` trains on
``LIGHTNING.micro_batch(s, r)``; the batch is drawn from ``s``, not from the
dataloader's position, so a run resumed from a checkpoint sees the batches the
uninterrupted run saw whatever Lightning does with the dataloader on a restart.

:func:`reference_run` is the oracle: the slow reference loop of
``tests.support.reference`` in one process on the concatenation of every rank's
micro-batch (what DDP, FSDP2 and ZeRO-2 average to): the norm taken in float64 with
numpy, the threshold from ``SlowAutoClip``, the gradients scaled by hand, then torch's
own SGD.

The runs themselves are in ``lightning_runs.py``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy
from torch import Tensor, nn

import distclip
from distclip.lightning import DistClipCallback
from tests.support.deepspeed_env import import_deepspeed
from tests.support.frameworks import quiet_frameworks
from tests.support.problem import LIGHTNING
from tests.support.reference import reference_train

MICRO_BATCH = LIGHTNING.batch
LR = LIGHTNING.optimizer_kwargs["lr"]
MOMENTUM = LIGHTNING.optimizer_kwargs["momentum"]
#: AutoClip with a short window, so that it wraps within a run.
AUTOCLIP = LIGHTNING.options
STEPS = LIGHTNING.steps
RESUME_AT = 4
#: Batches per epoch: the checkpoint at RESUME_AT falls inside the first epoch.
EPOCH = 6
PREFIX = "distclip/"


# ------------------------------------------------------------------------ problem
def reference_run(world_size: int, steps: int = STEPS) -> dict[str, Any]:
    """The plain loop on the global batches: per-step norms and thresholds, final params."""
    reference = reference_train(
        LIGHTNING,
        steps=steps,
        options=AUTOCLIP,
        optimizer_kwargs=LIGHTNING.optimizer_kwargs,
        batch=lambda step: LIGHTNING.global_micro_batch(step, 0, world_size),
    )
    return {
        "norms": reference.total_norm,
        "thresholds": reference.threshold,
        "params": list(reference.params.values()),
    }


def params_of(net: nn.Module) -> list[Tensor]:
    """Full copies of the parameters (an FSDP2 shard is gathered: a collective)."""
    full = []
    for param in net.parameters():
        data = param.detach()
        if hasattr(data, "full_tensor"):
            data = data.full_tensor()
        full.append(data.clone().cpu())
    return full


# -------------------------------------------------------------------- the module
class ClipNet(pl.LightningModule):
    """The MLP as a LightningModule.

    Args:
        clipped_class: options of ``distclip.AutoClippedOptimizer``: clipping built into
            the optimizer class (no callback needed); ``None``: plain SGD.
        fsdp2: shard the layers with ``fully_shard`` in ``configure_model`` (for
            ``ModelParallelStrategy``).
    """

    def __init__(self, clipped_class: dict[str, Any] | None = None, fsdp2: bool = False) -> None:
        super().__init__()
        self.net = LIGHTNING.model()
        self.clipped_class = clipped_class
        self.fsdp2 = fsdp2
        #: ``distclip.get_clipper(self.optimizers())`` of the first step (a LightningOptimizer).
        self.clipper_seen: Any = None

    def configure_model(self) -> None:
        if not self.fsdp2:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.clipper_seen is None and not isinstance(self.trainer.strategy, DeepSpeedStrategy):
            self.clipper_seen = distclip.get_clipper(self.optimizers())
        x, y = LIGHTNING.micro_batch(self.trainer.global_step, self.global_rank)
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.clipped_class is None:
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)
        cls = distclip.AutoClippedOptimizer(torch.optim.SGD, **self.clipped_class)
        return cls(self.parameters(), lr=LR, momentum=MOMENTUM)

    def train_dataloader(self) -> torch.utils.data.DataLoader[int]:
        # The items are ignored (see micro_batch): the loader only sets the epoch length.
        return torch.utils.data.DataLoader(range(EPOCH), batch_size=None)  # type: ignore[arg-type]


class Recorder(pl.Callback):
    """Records, after every optimizer step, what was logged (and what the clipper holds)."""

    def __init__(self, clip_callback: Any = None) -> None:
        self.clip_callback = clip_callback
        self.logged: list[dict[str, float]] = []
        self.stats: list[dict[str, Any]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = trainer.callback_metrics
        self.logged.append(
            {k[len(PREFIX) :]: float(v) for k, v in metrics.items() if k.startswith(PREFIX)}
        )
        if self.clip_callback is not None:
            stats = self.clip_callback.clipper.last_stats
        else:
            stats = distclip.get_clipper(pl_module.optimizers()).last_stats
        self.stats.append(stats.as_record())


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy with its CUDA-only assumptions lifted, for CPU runs.

    ``DeepSpeedStrategy.setup_environment`` refuses any accelerator but CUDA,
    ``setup_distributed`` refuses devices without an index (a CPU device has none), and
    ``deepspeed.initialize`` gets that index as ``device_rank`` (``None`` on CPU, which
    DeepSpeed cannot compare): the local rank is passed instead. Everything else (the
    config, the engine, backward, step, checkpoints) is Lightning's and DeepSpeed's own.
    """

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        from lightning_fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        import argparse

        import deepspeed

        initialize = deepspeed.initialize

        def with_local_rank(*init_args: Any, **init_kwargs: Any) -> Any:
            init_kwargs["args"] = argparse.Namespace(device_rank=self.local_rank)
            return initialize(*init_args, **init_kwargs)

        deepspeed.initialize = with_local_rank
        try:
            return super()._setup_model_and_optimizer(*args, **kwargs)
        finally:
            deepspeed.initialize = initialize


# ---------------------------------------------------------------------- workers
def prepare_rank() -> None:
    """Once per worker: the environment Lightning's launcher would set, quiet logs.

    ``LOCAL_RANK`` tells Lightning that the processes were started already (it does
    not re-run the script) and the process group exists (Lightning does not create
    another).
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_SIZE=str(world))
    os.environ["DS_ACCELERATOR"] = "cpu"
    quiet()


def quiet() -> None:
    """Lightning's and DeepSpeed's start-up chatter off."""
    quiet_frameworks(("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "DeepSpeed"))


#: Lightning's DeepSpeed config in the DeepSpeed runs: ZeRO-2 and a "distclip" section,
#: which the callback reads when it is given no method and no options.
DEEPSPEED_CONFIG = {
    "zero_optimization": {"stage": 2},
    "zero_allow_untested_optimizer": True,
    "train_micro_batch_size_per_gpu": MICRO_BATCH,
    "distclip": {"method": "autoclip", **AUTOCLIP},
}


def make_strategy(name: str) -> Any:
    """The Lightning strategy called ``name`` (``single``, ``ddp``, ``fsdp2``, ``deepspeed``)."""
    if name == "single":
        return "auto"
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if name == "fsdp2":
        from pytorch_lightning.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    if name == "deepspeed":
        import_deepspeed()  # its shm op off: no C++ build
        return CPUDeepSpeedStrategy(
            config=copy.deepcopy(DEEPSPEED_CONFIG), process_group_backend="gloo"
        )
    raise ValueError(f"unknown strategy {name!r}")


def make_callback(strategy: str, **kwargs: Any) -> Any:
    """The distclip callback: explicit options, or (DeepSpeed) the config's section."""
    if strategy == "deepspeed":
        return DistClipCallback(**kwargs)
    return DistClipCallback("autoclip", **AUTOCLIP, **kwargs)


def make_trainer(strategy: str, root: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer for ``strategy`` writing under ``root``."""
    devices = 1 if strategy == "single" else 2
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": devices,
        "num_nodes": 1,
        "strategy": make_strategy(strategy),
        "max_steps": STEPS,
        "callbacks": callbacks,
        "default_root_dir": str(root),
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "use_distributed_sampler": False,
        "log_every_n_steps": 1,
    }
    options.update(kwargs)
    return pl.Trainer(**options)
