"""The Lightning runs of ``test_lightning.py``, on every rank of a harness group.

Each ``run_*(strategy, root)`` runs on every rank of the 2-rank group (see
``tests/distributed/harness.py``), or in the test process for a single device, and
returns plain data; it asserts nothing. The problem, the module, the strategies and
the reference are in ``lightning_support.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import distclip
from tests.integrations.lightning_support import (
    AUTOCLIP,
    RESUME_AT,
    ClipNet,
    Recorder,
    make_callback,
    make_trainer,
    params_of,
    reference_run,
)


def _result(module: ClipNet, recorder: Recorder) -> dict[str, Any]:
    return {
        "logged": recorder.logged,
        "stats": recorder.stats,
        "params": params_of(module.net),
        "clipper_seen": module.clipper_seen is not None,
    }


def run_strategy(strategy: str, root: str) -> dict[str, Any]:
    """Train ``STEPS`` steps with the callback, resume from step ``RESUME_AT``; and the reference.

    Returns ``full`` (the uninterrupted run: what was logged, the clipper's records,
    the final parameters, the CSV logger's rows, the JSON lines), ``resumed`` (a fresh
    Trainer and module, ``fit(ckpt_path=<checkpoint of step RESUME_AT>)``), and
    ``reference`` (:func:`reference_run`), and ``get_clipper`` (whether
    ``distclip.get_clipper`` through the ``LightningOptimizer`` found the callback's
    clipper).
    """
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    base = Path(root) / strategy
    world = 1 if strategy == "single" else 2
    fsdp2 = strategy == "fsdp2"

    metrics = base / "metrics.jsonl"
    clip = make_callback(strategy, metrics_path=metrics)
    recorder = Recorder(clip)
    checkpoint = ModelCheckpoint(
        dirpath=base / "ckpt", every_n_train_steps=RESUME_AT, save_top_k=-1, filename="{step}"
    )
    trainer = make_trainer(
        strategy,
        base,
        [clip, recorder, checkpoint],
        logger=CSVLogger(base, name="csv"),
        enable_checkpointing=True,
    )
    module = ClipNet(fsdp2=fsdp2)
    trainer.fit(module)
    full = _result(module, recorder)
    full["get_clipper"] = module.clipper_seen is clip.clipper
    full["csv"] = str(Path(trainer.logger.log_dir) / "metrics.csv") if trainer.logger else None
    full["jsonl"] = str(metrics)
    del trainer, module

    resume_clip = make_callback(strategy, metrics_path=metrics)  # appends to the file
    resume_recorder = Recorder(resume_clip)
    trainer = make_trainer(strategy, base / "resumed", [resume_clip, resume_recorder])
    module = ClipNet(fsdp2=fsdp2)
    trainer.fit(module, ckpt_path=str(base / "ckpt" / f"step={RESUME_AT}.ckpt"))
    resumed = _result(module, resume_recorder)
    resumed["window"] = resume_clip.clipper.window.chronological().tolist()
    del trainer, module
    return {"full": full, "resumed": resumed, "reference": reference_run(world)}


def run_refusals(strategy: str, root: str) -> dict[str, str]:
    """What is refused before training: each case's exception as ``"TypeName: message"``.

    ``gradient_clip_val=1.0`` with the callback, and with clipping built into the
    optimizer class (no callback); under DeepSpeed, a clipping optimizer class with the
    callback. ``"no error"`` for a case that trained.
    """
    cases: dict[str, tuple[list[Any], dict[str, Any] | None, float | None]] = {
        "callback": ([make_callback(strategy)], None, 1.0),
        "optimizer_class": ([], AUTOCLIP, 1.0),
    }
    if strategy == "deepspeed":
        # DeepSpeed wraps the optimizer; a clipping class inside it would clip each
        # rank's partition by its own norm.
        cases["optimizer_class"] = ([make_callback(strategy)], AUTOCLIP, None)
    outcomes = {}
    for name, (callbacks, clipped_class, clip_val) in cases.items():
        trainer = make_trainer(
            strategy,
            Path(root) / "refused" / strategy / name,
            callbacks,
            gradient_clip_val=clip_val,
            max_steps=2,
        )
        try:
            trainer.fit(ClipNet(clipped_class=clipped_class, fsdp2=strategy == "fsdp2"))
            outcomes[name] = "no error"
        except Exception as err:
            outcomes[name] = f"{type(err).__name__}: {err}"
        del trainer
    return outcomes


def run_optimizer_class(strategy: str, root: str) -> dict[str, Any]:
    """Clipping built into the optimizer class (no distclip callback): a run and a resume.

    The checkpoint carries the clipper's state inside the optimizer's state dict.
    """
    from pytorch_lightning.callbacks import ModelCheckpoint

    base = Path(root) / f"{strategy}-class"
    recorder = Recorder()
    checkpoint = ModelCheckpoint(
        dirpath=base / "ckpt", every_n_train_steps=RESUME_AT, save_top_k=-1, filename="{step}"
    )
    trainer = make_trainer(strategy, base, [recorder, checkpoint], enable_checkpointing=True)
    module = ClipNet(clipped_class=AUTOCLIP, fsdp2=strategy == "fsdp2")
    trainer.fit(module)
    full = _result(module, recorder)
    del trainer, module

    recorder = Recorder()
    trainer = make_trainer(strategy, base / "resumed", [recorder])
    module = ClipNet(clipped_class=AUTOCLIP, fsdp2=strategy == "fsdp2")
    trainer.fit(module, ckpt_path=str(base / "ckpt" / f"step={RESUME_AT}.ckpt"))
    resumed = _result(module, recorder)
    del trainer, module
    return {"full": full, "resumed": resumed}


def run_accumulation(strategy: str, root: str) -> dict[str, Any]:
    """``accumulate_grad_batches=2``: one optimizer step, and one window entry, per 2 batches.

    Both micro-batches of a step are ``micro_batch(step, rank)`` (the step's index), so
    the accumulated gradient is the gradient of one of them: the reference without
    accumulation applies.
    """
    base = Path(root) / f"{strategy}-accumulate"
    clip = make_callback(strategy, metrics_path=base / "metrics.jsonl")
    trainer = make_trainer(strategy, base, [clip], accumulate_grad_batches=2)
    trainer.fit(ClipNet())
    result = {
        "num_steps": clip.clipper.num_steps,
        "global_step": trainer.global_step,
        "lines": distclip.read_metrics(base / "metrics.jsonl") if trainer.is_global_zero else [],
    }
    del trainer
    return result
