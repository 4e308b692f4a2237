"""HF Trainer runs for the integration tests, in one process or on every rank of a group.

:func:`hf_run` trains :class:`~tests.support.frameworks.TinyNet` with a real ``transformers.Trainer``
as a spec describes (see :func:`make_spec`) and records what happened; nothing here
asserts: the tests decide. Exceptions are recorded too (type and message), so that a
test can check that a setting is refused with the documented error.

The clip's per-step record is read by a callback at ``on_optimizer_step`` through
``distclip.get_clipper(optimizer)`` (whatever wraps the optimizer), and separately from
the Trainer's ``log_history`` (``logging_steps=1``).
"""

from __future__ import annotations

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
)

#: Path of the training: how distclip gets into the Trainer.
PATHS = ("class", "integration", "callback", "class+integration")


def make_spec(
    name: str,
    output_dir: str,
    *,
    path: str = "integration",
    zero: int | None = None,
    steps: int = 8,
    save_steps: int | None = None,
    resume: str | None = None,
    max_grad_norm: float | None = 0.0,
    method: str | None = METHOD,
    options: dict[str, Any] | None = None,
    section: dict[str, Any] | None = None,
    report_to: list[str] | None = None,
    model_as_params: bool = False,
    gas: int = 1,
) -> dict[str, Any]:
    """A Trainer run.

    Args:
        path: ``"class"`` (``optimizer_cls_and_kwargs`` with a ``ClippedOptimizer``
            class, no integration), ``"integration"`` (``distclip.hf.attach``), or
            ``"callback"`` (``distclip.attach`` in ``on_train_begin``), or
            ``"class+integration"`` (the class and ``distclip.hf.attach(trainer)``).
        zero: the DeepSpeed ZeRO stage (``None``: no DeepSpeed).
        max_grad_norm: ``TrainingArguments.max_grad_norm``; ``None`` leaves HF's default.
        method, options: for ``distclip.hf.attach`` / the class / the callback.
        section: the DeepSpeed config's ``"distclip"`` section.
        model_as_params: put ``{"model": model}`` in ``optimizer_cls_and_kwargs``.
        gas: ``gradient_accumulation_steps``.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return {
        "name": name,
        "output_dir": output_dir,
        "path": path,
        "zero": zero,
        "steps": steps,
        "save_steps": save_steps,
        "resume": resume,
        "max_grad_norm": max_grad_norm,
        "method": method,
        "options": dict(OPTIONS if options is None else options),
        "section": section,
        "report_to": list(report_to or []),
        "model_as_params": model_as_params,
        "gas": gas,
    }


def deepspeed_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config of a spec, with HF's ``"auto"`` values."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": spec["zero"]},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if spec["section"] is not None:
        config["distclip"] = spec["section"]
    return config


def _training_args(spec: dict[str, Any]) -> Any:
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = {
        "output_dir": spec["output_dir"],
        "use_cpu": True,
        "report_to": spec["report_to"],
        "per_device_train_batch_size": BATCH,
        "max_steps": spec["steps"],
        "logging_steps": 1,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "optim": "sgd",
        "weight_decay": 0.0,
        "disable_tqdm": True,
        "save_strategy": "steps" if spec["save_steps"] else "no",
        "save_steps": spec["save_steps"] or 10**6,
        "dataloader_num_workers": 0,
        "gradient_accumulation_steps": spec["gas"],
        "seed": 7,
    }
    if dist.is_initialized():
        kwargs["ddp_backend"] = "gloo"
    if spec["max_grad_norm"] is not None:
        kwargs["max_grad_norm"] = spec["max_grad_norm"]
    if spec["zero"] is not None:
        kwargs["deepspeed"] = deepspeed_config(spec)
    return TrainingArguments(**kwargs)


def _make_recorder(spec: dict[str, Any]) -> Any:
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):  # type: ignore[misc]
        """Attaches distclip at ``on_train_begin`` (callback path); records every step."""

        def __init__(self) -> None:
            self.records: list[dict[str, Any]] = []
            self.mirrored: list[bool] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if spec["path"] == "callback":
                distclip.attach(kwargs["optimizer"], spec["method"], **spec["options"])

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            optimizer = kwargs["optimizer"]
            stats = distclip.get_clipper(optimizer).last_stats
            self.records.append(stats.as_record())
            # last_clip through the framework's wrapper is the clipper's latest record.
            self.mirrored.append(getattr(optimizer, "last_clip", None) is stats)

    return Recorder()


def _error(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}


def hf_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train as ``spec`` says; return the records (see the module docstring)."""
    out: dict[str, Any] = {"name": spec["name"], "error": None}
    deepspeed = spec["zero"] is not None
    with WarningCapture() as capture, framework_run(deepspeed=deepspeed):
        from transformers import Trainer
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        model = TinyNet()
        recorder = _make_recorder(spec)
        kwargs: dict[str, Any] = {}
        if spec["path"] in ("class", "class+integration"):
            cls = distclip.ClippedOptimizer(torch.optim.SGD, spec["method"], **spec["options"])
            optimizer_kwargs: dict[str, Any] = {"lr": LR}
            if spec["model_as_params"]:
                optimizer_kwargs["model"] = model
            kwargs["optimizer_cls_and_kwargs"] = (cls, optimizer_kwargs)
        trainer = Trainer(
            model=model,
            args=_training_args(spec),
            train_dataset=IndexedData(),
            callbacks=[recorder],
            **kwargs,
        )
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        handle = None
        try:
            if spec["path"] == "integration":
                handle = distclip.hf.attach(trainer, spec["method"], **spec["options"])
            elif spec["path"] == "class+integration":
                handle = distclip.hf.attach(trainer)
            out["max_grad_norm_after_attach"] = trainer.args.max_grad_norm
            trainer.train(resume_from_checkpoint=spec["resume"])
        except Exception as exc:
            out["error"] = _error(exc)
        out["records"] = recorder.records
        out["mirrored"] = recorder.mirrored
        out["seen"] = model.seen
        out["log"] = [
            {
                k: v
                for k, v in entry.items()
                if k.startswith("distclip/") or k in ("step", "grad_norm")
            }
            for entry in trainer.state.log_history
            if "loss" in entry
        ]
        if out["error"] is None:
            out.update(_wrapper_checks(trainer, spec))
            module = trainer.model_wrapped.module if deepspeed else trainer.model
            out["params"] = full_params(module, deepspeed=deepspeed)
        if handle is not None:
            handle.remove()
            out["max_grad_norm_after_remove"] = trainer.args.max_grad_norm
            out["log_restored"] = "log" not in trainer.__dict__
        del trainer, model
    out["warnings"] = [m for m in capture.messages if m.startswith("distclip")]
    return out


def _wrapper_checks(trainer: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """What distclip sees through the Trainer's optimizer wrapper (and DeepSpeed's)."""
    optimizer = trainer.optimizer
    clipper = distclip.get_clipper(optimizer)
    checks: dict[str, Any] = {
        "chain": internals.wrappers.describe_chain(internals.wrappers.wrapper_chain(optimizer)),
        "window": clipper.window.chronological().tolist(),
        "num_steps": clipper.num_steps,
    }
    if spec["zero"] is not None:
        engine = trainer.model_wrapped
        adapter = distclip.deepspeed.get_adapter(engine)
        checks["engine_adapter_clipper"] = clipper is adapter.clipper
        checks["engine_get_clipper"] = distclip.get_clipper(engine) is clipper
        try:
            distclip.attach(optimizer)
        except TypeError as exc:
            checks["attach_refused"] = str(exc)
    return checks
