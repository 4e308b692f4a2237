"""What ``test_resume_reshard.py`` runs on each rank (through the harness) or in-process.

* :func:`train_save_continue`: FSDP2 on every rank of the group, ``save_after``
  steps, a DCP checkpoint (model + optimizer, distclip's window inside the
  optimizer's ``param_groups[0]["distclip"]``), then on to ``total`` steps: the
  uninterrupted reference;
* :func:`load_and_continue`: a fresh model (another seed) and optimizer, the
  checkpoint loaded through ``get_state_dict`` / ``dcp.load`` / ``set_state_dict``,
  then the same later steps. FSDP2 over the current group (any world size), or a
  plain, unsharded model in a process with no process group at all (the ``fsdp2``
  and ``single`` layouts of the ``RESUME`` problem).

Nothing here asserts: the functions return plain tensors and numbers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from tests.support import layouts
from tests.support.problem import RESUME
from tests.support.training import (
    STATS_FIELDS,
    problem_optimizer,
    train_step,
    window_num_seen,
    window_of,
)

#: The model seed of a resumed run: not the saved run's, so only the checkpoint can
#: make the runs agree.
OTHER_SEED = 12345


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _stack(records: list[dict[str, float]]) -> dict[str, torch.Tensor]:
    """Per-step clip numbers as float64 tensors by field (``step``: the clipper's count)."""
    fields = (*STATS_FIELDS, "step")
    return {name: torch.tensor([r[name] for r in records], dtype=torch.float64) for name in fields}


def train_save_continue(directory: str, save_after: int, total: int) -> dict[str, Any]:
    """Train ``save_after`` steps with FSDP2, ``dcp.save`` to ``directory``, go on to ``total``.

    Returns the clip numbers before and after the save, the window (and its count)
    at the save and at the end, and the full parameters at the end.
    """
    _, world_size = _rank_and_world()
    prepared = layouts.build(RESUME, "fsdp2")
    model = prepared.module
    optimizer, _ = problem_optimizer(RESUME, prepared.params)
    before = [train_step(prepared, optimizer, step) for step in range(save_after)]
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp_save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    del model_state, optim_state
    saved_window, saved_num_seen = window_of(optimizer), window_num_seen(optimizer)
    later = [train_step(prepared, optimizer, step) for step in range(save_after, total)]
    result = {
        "world_size": world_size,
        "before": _stack(before),
        "later": _stack(later),
        "saved_window": saved_window,
        "saved_num_seen": saved_num_seen,
        "final_window": window_of(optimizer),
        "final_num_seen": window_num_seen(optimizer),
        "params": prepared.full_params(),
    }
    del model, optimizer, prepared
    return result


def load_and_continue(directory: str, start: int, total: int, *, shard: bool) -> dict[str, Any]:
    """Load the checkpoint in ``directory`` into fresh objects and train steps ``start..total``.

    ``shard``: ``fully_shard`` the model over the current process group (FSDP2);
    otherwise a plain model, with or without a process group. Returns what the
    optimizer held right after the load (window, count) and the later steps' clip
    numbers, final window and full parameters.
    """
    _, world_size = _rank_and_world()
    prepared = layouts.build(RESUME, "fsdp2" if shard else "single", seed=OTHER_SEED)
    model = prepared.module
    optimizer, _ = problem_optimizer(RESUME, prepared.params)
    model_state, optim_state = get_state_dict(model, optimizer)
    fresh_num_seen = window_num_seen(optimizer)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    dcp_load(state, checkpoint_id=directory)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    del state, model_state, optim_state
    loaded_window, loaded_num_seen = window_of(optimizer), window_num_seen(optimizer)
    later = [train_step(prepared, optimizer, step) for step in range(start, total)]
    result = {
        "world_size": world_size,
        "sharded": shard,
        "fresh_num_seen": fresh_num_seen,
        "loaded_window": loaded_window,
        "loaded_num_seen": loaded_num_seen,
        "later": _stack(later),
        "final_window": window_of(optimizer),
        "final_num_seen": window_num_seen(optimizer),
        "params": prepared.full_params(),
    }
    del model, optimizer, prepared
    return result
