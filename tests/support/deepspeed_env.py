"""DeepSpeed on CPU in a test process: the accelerator, the shm op, the logs, gloo.

DeepSpeed 0.19.8 runs ZeRO 0-3 on CPU with ``DS_ACCELERATOR=cpu``. Its shared-memory
communication op must be turned off before ``deepspeed.init_distributed`` (or before
any engine is built): otherwise each backend constructor compiles it (tens of
seconds). Nothing here runs at import time.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

__all__ = ["import_deepspeed", "init_deepspeed_distributed"]

_IMPORTED = False
_INITIALIZED = False


def import_deepspeed() -> Any:
    """``deepspeed`` for the CPU accelerator, its shm op off and its logs quiet (once)."""
    global _IMPORTED
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    if not _IMPORTED:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.utils.logger.setLevel(logging.ERROR)
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        _IMPORTED = True
    return deepspeed


def init_deepspeed_distributed() -> Any:
    """:func:`import_deepspeed`, then DeepSpeed joined to this rank's gloo group (once).

    Sets the rank variables a launcher would (the process group exists already).
    """
    global _INITIALIZED
    if not _INITIALIZED:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world)
        )
    deepspeed = import_deepspeed()
    if not _INITIALIZED:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        deepspeed.init_distributed(dist_backend="gloo")
        _INITIALIZED = True
    return deepspeed
