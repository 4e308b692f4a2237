"""Accelerate training loops for the integration tests, in one process or on every rank.

:func:`accel_run` trains :class:`~tests.support.frameworks.TinyNet` with a real ``Accelerator``
(``cpu=True`` for DDP over gloo; DeepSpeed through Accelerate's plugin) as a spec
describes (see :func:`make_spec`) and records what happened; nothing here asserts.
:func:`fsdp1_layout_run` checks the FSDP1 root that :func:`distclip.accelerate.layout_model`
finds, with torch's FSDP1 directly (Accelerate enables FSDP only on GPUs).
"""

from __future__ import annotations

import math
import traceback
from typing import Any

import torch
import torch.distributed as dist

import distclip
from tests.support import internals
from tests.support.frameworks import (
    BATCH,
    LR,
    METHOD,
    OPTIONS,
    IndexedData,
    TinyNet,
    WarningCapture,
    framework_run,
    full_params,
    sample,
)


def make_spec(
    name: str,
    *,
    integration: bool = True,
    class_optimizer: bool = False,
    zero: int | None = None,
    steps: int = 8,
    save_at: int | None = None,
    resume: tuple[str, int] | None = None,
    state_dir: str | None = None,
    user_clip: float | None = None,
    section: dict[str, Any] | None = None,
    method: str | None = METHOD,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An Accelerate loop.

    Args:
        integration: call ``distclip.accelerate.attach(accelerator, ...)`` first.
        class_optimizer: a ``ClippedOptimizer(SGD)`` instead of a plain SGD.
        zero: the DeepSpeed ZeRO stage through Accelerate's plugin (``None``: DDP).
        save_at: ``accelerator.save_state(state_dir)`` after this many steps.
        resume: ``(state_dir, step)``: ``load_state`` and skip the loader to ``step``.
        user_clip: call ``accelerator.clip_grad_norm_(parameters, user_clip)`` each step.
        section: the DeepSpeed config's ``"distclip"`` section.
    """
    return {
        "name": name,
        "integration": integration,
        "class_optimizer": class_optimizer,
        "zero": zero,
        "steps": steps,
        "save_at": save_at,
        "resume": resume,
        "state_dir": state_dir,
        "user_clip": user_clip,
        "section": section,
        "method": method,
        "options": dict(OPTIONS if options is None else options),
    }


def _accelerator(spec: dict[str, Any]) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    if spec["zero"] is None:
        return Accelerator(cpu=True)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": spec["zero"]},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if spec["section"] is not None:
        config["distclip"] = spec["section"]
    # Without an accelerator device, Accelerate's DeepSpeed path needs gloo named.
    return Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )


def accel_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the loop ``spec`` describes; return the records (see the module docstring)."""
    out: dict[str, Any] = {"name": spec["name"], "error": None, "records": [], "mirrored": []}
    out["user_norms"] = []
    with WarningCapture() as capture, framework_run(deepspeed=spec["zero"] is not None):
        accelerator = _accelerator(spec)
        out["distributed_type"] = str(accelerator.distributed_type)
        out["num_processes"] = accelerator.num_processes
        model = TinyNet()
        if spec["class_optimizer"]:
            cls = distclip.ClippedOptimizer(torch.optim.SGD, METHOD, **spec["options"])
            optimizer = cls(model.parameters(), lr=LR)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        loader = torch.utils.data.DataLoader(IndexedData(), batch_size=BATCH, shuffle=False)
        handle = None
        try:
            if spec["integration"]:
                method = None if spec["class_optimizer"] else spec["method"]
                options = {} if spec["class_optimizer"] else spec["options"]
                handle = distclip.accelerate.attach(accelerator, method, **options)
            prepared_model, prepared_opt, loader = accelerator.prepare(model, optimizer, loader)
            out["chain"] = internals.wrappers.describe_chain(
                internals.wrappers.wrapper_chain(prepared_opt)
            )
            start = 0
            if spec["resume"] is not None:
                directory, start = spec["resume"]
                accelerator.load_state(directory)
                loader = accelerator.skip_first_batches(loader, start)
            _train(accelerator, prepared_model, prepared_opt, loader, spec, start, out)
            out["params"] = full_params(model, deepspeed=spec["zero"] is not None)
            clipper = distclip.get_clipper(prepared_opt)
            out["window"] = clipper.window.chronological().tolist()
            if spec["zero"] is not None:
                adapter = distclip.deepspeed.get_adapter(prepared_model)
                out["engine_adapter_clipper"] = clipper is adapter.clipper
                out["section_present"] = adapter.section.present
        except Exception as exc:
            out["error"] = {
                "type": type(exc).__name__,
                "message": str(exc),
                "traceback": traceback.format_exc(),
            }
        out["seen"] = model.seen
        if handle is not None:
            handle.remove()
            out["removed"] = all(
                name not in accelerator.__dict__
                for name in (
                    "prepare",
                    "clip_grad_norm_",
                    "clip_grad_value_",
                    "_distclip_accelerate",
                )
            )
        del accelerator, model, optimizer
    out["warnings"] = [m for m in capture.messages if m.startswith("distclip")]
    return out


def _train(
    accelerator: Any,
    model: Any,
    optimizer: Any,
    loader: Any,
    spec: dict[str, Any],
    start: int,
    out: dict[str, Any],
) -> None:
    for step, batch in zip(range(start, spec["steps"]), loader, strict=False):
        loss = model(**batch)["loss"]
        accelerator.backward(loss)
        if spec["user_clip"] is not None:
            norm = accelerator.clip_grad_norm_(model.parameters(), spec["user_clip"])
            out["user_norms"].append(None if norm is None else float(norm))
        optimizer.step()
        optimizer.zero_grad()
        stats = distclip.get_clipper(optimizer).last_stats
        out["records"].append(stats.as_record())
        out["mirrored"].append(getattr(optimizer, "last_clip", None) is stats)
        if spec["save_at"] == step + 1:
            accelerator.save_state(spec["state_dir"])


def fsdp1_layout_run(steps: int = 4) -> dict[str, Any]:
    """FSDP1 (torch's, on gloo) + ``layout_model`` + ``distclip.attach``: norms and thresholds.

    Rank ``r`` trains samples ``8 * step + 4 * r ... + 3`` at each step. Then the
    optimizer state goes through FSDP1's ``optim_state_dict`` /
    ``optim_state_dict_to_load`` (Accelerate's FSDP1 ``save_state`` / ``load_state``) into
    a fresh attached optimizer.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    plain = TinyNet()
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=LR)
    out: dict[str, Any] = {
        "plain_root": distclip.accelerate.layout_model([plain], plain_optimizer),
    }
    fsdp = FullyShardedDataParallel(TinyNet(), device_id=torch.device("cpu"))
    optimizer = torch.optim.SGD(fsdp.parameters(), lr=LR)
    root = distclip.accelerate.layout_model([plain, fsdp], optimizer)
    out["found_root"] = root is fsdp
    handle = distclip.attach(optimizer, METHOD, model=root, **OPTIONS)
    rank, world = dist.get_rank(), dist.get_world_size()
    records = []
    for step in range(steps):
        indices = [BATCH * (world * step + rank) + i for i in range(BATCH)]
        x = torch.stack([sample(i)[0] for i in indices])
        y = torch.stack([sample(i)[1] for i in indices])
        optimizer.zero_grad()
        fsdp(x, y, torch.tensor(indices))["loss"].backward()
        optimizer.step()
        records.append(handle.clipper.last_stats.as_record())
    out["records"] = records
    out["batches"] = [
        [BATCH * (world * step + r) + i for r in range(world) for i in range(BATCH)]
        for step in range(steps)
    ]
    out["finite"] = all(math.isfinite(r["threshold"]) for r in records)
    # What Accelerate's save_state / load_state do for FSDP1's optimizer (full state).
    saved = FullyShardedDataParallel.optim_state_dict(fsdp, optimizer)
    out["saved_has_clipper"] = "distclip" in saved["param_groups"][0]
    fresh = torch.optim.SGD(fsdp.parameters(), lr=LR)
    fresh_handle = distclip.attach(fresh, METHOD, model=root, **OPTIONS)
    fresh.load_state_dict(FullyShardedDataParallel.optim_state_dict_to_load(fsdp, fresh, saved))
    out["window"] = handle.clipper.window.chronological().tolist()
    out["loaded_window"] = fresh_handle.clipper.window.chronological().tolist()
    out["loaded_steps"] = fresh_handle.clipper.num_steps
    handle.remove()
    fresh_handle.remove()
    del fsdp, optimizer, fresh
    return out
