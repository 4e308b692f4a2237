"""A small FSDP2 training job that checkpoints with DCP and survives a killed worker.

Run by ``test_resume_crash.py`` under torchrun, on CPU with gloo::

    python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 1 \\
        tests/reliability/crash_train.py --out DIR --steps 16 --ckpt-every 4 --kill-at 10

What it does (the ``RESUME`` problem of ``tests.support.problem``: the model, the data
and the optimizer):

* builds the MLP as the ``fsdp2`` layout (``fully_shard`` on a 1-D CPU mesh) and makes
  ``AutoClippedOptimizer(torch.optim.AdamW, q=0.3, window=6)``;
* if ``DIR/ckpt`` holds a complete checkpoint, loads the latest one
  (``get_state_dict`` / ``dcp.load`` / ``set_state_dict``) and continues from the step
  it records. A restarted worker initialises its model from *another* seed first, so
  only the checkpoint can make it agree with an uninterrupted run;
* trains to ``--steps``, appending every step's clip numbers
  (``optimizer.last_clip.as_floats()``) to ``DIR/log_rank{r}.jsonl`` with the step and
  the attempt (``TORCHELASTIC_RESTART_COUNT``), and saves a DCP checkpoint (model,
  optimizer with distclip's window, the step) after every ``--ckpt-every`` steps;
* on the first attempt only, rank ``--kill-rank`` writes ``DIR/killed.json`` and
  SIGKILLs itself just before step ``--kill-at`` (no clean-up, no exception:
  what the OOM killer or a lost node does). torchrun then restarts every worker;
* at the end, every rank writes ``DIR/result_rank{r}.json`` (its window, restart
  count, the step it resumed from) and rank 0 writes the full parameters
  (gathered from the shards) to ``DIR/params.pt``.

The process leaves with ``os._exit`` after destroying its process group in
``finally:`` (a gloo worker that runs the interpreter's normal shutdown can abort).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.distributed_c10d import PrefixStore
from torch.distributed.rendezvous import rendezvous

from tests.support import layouts
from tests.support.harness import leave
from tests.support.problem import RESUME
from tests.support.training import problem_optimizer, train_step, window_num_seen, window_of

#: Written by rank 0 into a checkpoint's directory once every rank has saved it.
COMPLETE = "COMPLETE"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="logs, checkpoints, results")
    parser.add_argument("--steps", type=int, default=16, help="training steps in all")
    parser.add_argument("--ckpt-every", type=int, default=4, help="save after every N steps")
    parser.add_argument(
        "--kill-at", type=int, default=-1, help="first attempt: die before this step (-1: never)"
    )
    parser.add_argument("--kill-rank", type=int, default=1, help="the rank that dies")
    return parser.parse_args(argv)


def checkpoint_dir(root: Path, step: int) -> Path:
    """Where the checkpoint taken after ``step`` steps goes."""
    return root / f"step_{step:06d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the most steps under ``root``, or ``None``."""
    complete = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())
    return complete[-1] if complete else None


def save_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, steps_done: int, root: Path
) -> None:
    """Save model, optimizer (distclip's window included) and the step count with DCP.

    Every rank calls this; rank 0 marks the directory complete after all have saved.
    """
    model_state, optim_state = get_state_dict(model, optimizer)
    path = checkpoint_dir(root, steps_done)
    state: dict[str, Any] = {
        "model": model_state,
        "optim": optim_state,
        "progress": {"steps_done": torch.tensor(steps_done, dtype=torch.long)},
    }
    dcp_save(state, checkpoint_id=path)
    dist.barrier()
    if dist.get_rank() == 0:
        (path / COMPLETE).write_text(f"{steps_done}\n")
    dist.barrier()


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> int:
    """Load ``path`` into ``model`` and ``optimizer`` (every rank); return the steps done."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {
        "model": model_state,
        "optim": optim_state,
        "progress": {"steps_done": torch.zeros((), dtype=torch.long)},
    }
    dcp_load(state, checkpoint_id=path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    return int(state["progress"]["steps_done"])


def die(out: Path, rank: int, step: int, attempt: int) -> None:
    """Leave a marker, then SIGKILL this process (no clean-up runs)."""
    marker = {"rank": rank, "step": step, "attempt": attempt, "pid": os.getpid()}
    with (out / "killed.json").open("w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def train(args: argparse.Namespace) -> None:
    """Build, maybe resume, train, checkpoint, maybe die, write the results."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    out: Path = args.out
    ckpt_root = out / "ckpt"
    ckpt_root.mkdir(parents=True, exist_ok=True)

    # A restarted worker starts from other weights: only the checkpoint can repair that.
    prepared = layouts.build(RESUME, "fsdp2", seed=RESUME.model_seed + 7919 * attempt)
    model = prepared.module
    optimizer, _ = problem_optimizer(RESUME, prepared.params)

    start = 0
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        start = load_checkpoint(model, optimizer, latest)
    loaded_window = window_of(optimizer).tolist()

    log_path = out / f"log_rank{rank}.jsonl"
    with log_path.open("a") as log:
        for step in range(start, args.steps):
            if attempt == 0 and step == args.kill_at and rank == args.kill_rank:
                die(out, rank, step, attempt)
            floats = train_step(prepared, optimizer, step)
            log.write(json.dumps({**floats, "attempt": attempt, "data_step": step}) + "\n")
            log.flush()  # survives a SIGKILL: the bytes are the kernel's now
            if (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
                save_checkpoint(model, optimizer, step + 1, ckpt_root)

    params = prepared.full_params()  # a collective: every rank gathers
    result = {
        "rank": rank,
        "world_size": world_size,
        "restart_count": attempt,
        "resumed_from": start,
        "resumed_from_checkpoint": None if latest is None else latest.name,
        "loaded_window": loaded_window,
        "window": window_of(optimizer).tolist(),
        "num_seen": window_num_seen(optimizer),
    }
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        torch.save(params, out / "params.pt")
    dist.barrier()


def init_process_group() -> None:
    """Join the torchrun job with gloo, on a store namespace of this attempt.

    torchrun (torch 2.13) shares its own TCPStore with the workers and does not
    prefix it per restart, so a restarted rank can read a dead peer's address from
    the previous attempt (gloo: "connectFullMesh failed ... Connection refused").
    Prefixing the store with ``TORCHELASTIC_RESTART_COUNT`` avoids the stale keys.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store, rank, world_size = next(rendezvous("env://"))
    dist.init_process_group(
        "gloo",
        store=PrefixStore(f"distclip_attempt_{attempt}", store),
        rank=rank,
        world_size=world_size,
    )


def main() -> None:
    """Join the torchrun job (gloo), train, leave with ``os._exit``."""
    args = parse_args()
    torch.set_num_threads(1)
    code = 0
    try:
        init_process_group()
        train(args)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        leave(code)


if __name__ == "__main__":
    main()
