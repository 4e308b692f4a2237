"""Functions run on every rank by ``test_deepspeed_engines.py`` (through the harness).

Each call runs many configurations in the long-lived process group: DeepSpeed's
import and its first ZeRO engine are the expensive part, later engines take
milliseconds. Nothing here asserts: a worker records what happened (exceptions
included, as strings) and the test decides.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from ds_setup import LR, loss_fn, make_model, micro_batch

import distclip

_READY = False


def setup() -> Any:
    """Import DeepSpeed for CPU/gloo in this rank (once): shm op off, quiet logs.

    The shared-memory op must be disabled before ``deepspeed.init_distributed``: its
    backend's constructor would otherwise compile it (tens of seconds).
    """
    global _READY
    os.environ["DS_ACCELERATOR"] = "cpu"
    if not _READY:
        rank, world = dist.get_rank(), dist.get_world_size()
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world)
        )
    import deepspeed

    if not _READY:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.utils.logger.setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        deepspeed.init_distributed(dist_backend="gloo")
        _READY = True
    return deepspeed


def _release(engine: Any) -> None:
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        with contextlib.suppress(Exception):
            destroy()
    gc.collect()


def _norm_value(norm: Any) -> float | None:
    if norm is None:
        return None
    return float(norm)


def _full_fp32_params(deepspeed: Any, engine: Any) -> torch.Tensor:
    """Every parameter's fp32 master copy (ZeRO partitions gathered), flattened."""
    from deepspeed.utils import safe_get_full_fp32_param

    pieces = []
    optimizer = engine.optimizer
    masters = None
    if hasattr(optimizer, "fp32_groups") and type(optimizer).__name__.endswith(
        "FP16_UnfusedOptimizer"
    ):
        masters = [q for group in optimizer.fp32_groups for q in group]
    for index, param in enumerate(engine.module.parameters()):
        full = None
        if engine.zero_optimization() or engine.bfloat16_enabled():
            full = safe_get_full_fp32_param(param) if masters is None else masters[index]
        if full is None:
            full = param
        pieces.append(full.detach().float().clone().reshape(-1))
    return torch.cat(pieces)


def build_engine(spec: dict[str, Any], *, model_seed: int = 0, config: Any = None) -> Any:
    """A DeepSpeed engine for ``spec`` with distclip attached (SGD, lr ``LR``)."""
    deepspeed = setup()
    model = make_model(model_seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ds_config = spec["ds_config"] if config is None else config
    if spec["integration"] == "attach":
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        distclip.deepspeed.attach(engine)
    else:
        engine, *_ = distclip.deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config
        )
    return engine


def train_steps(engine: Any, spec: dict[str, Any], steps: range) -> dict[str, list[Any]]:
    """Run optimizer steps ``steps``; record DeepSpeed's norm and distclip's stats per step."""
    rank = dist.get_rank()
    dtype = torch.bfloat16 if spec["bf16"] else torch.float32
    if spec.get("fp16"):
        dtype = torch.float16
    records: dict[str, list[Any]] = {
        "engine_norm": [],
        "total_norm": [],
        "threshold": [],
        "clip_coef": [],
        "skipped": [],
        "num_steps": [],
        "overflow": [],
        "loss_scale": [],
    }
    for step in steps:
        for micro in range(spec["gas"]):
            x, y = micro_batch(step, rank, micro)
            loss = loss_fn(engine(x.to(dtype)), y)
            if step == spec["nan_step"] and rank == 0:
                loss = loss * math.nan
            engine.backward(loss)
            engine.step()
        stats = engine.distclip.last_clip
        records["engine_norm"].append(_norm_value(engine.get_global_grad_norm()))
        for key, value in stats.as_floats().items():
            if key in records:
                records[key].append(value)
        records["num_steps"].append(engine.distclip.clipper.num_steps)
        records["overflow"].append(bool(getattr(engine.optimizer, "overflow", False)))
        records["loss_scale"].append(float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0))
    return records


def run_specs(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train every spec from scratch; per spec: records, final fp32 params, what was hooked."""
    deepspeed = setup()
    results = []
    for spec in specs:
        result: dict[str, Any] = {"name": spec["name"]}
        try:
            engine = build_engine(spec)
            adapter = engine.distclip
            result["wrapper"] = adapter.wrapper
            result["hook_point"] = adapter.hook_point
            result["optimizer_class"] = type(engine.optimizer).__name__
            result["records"] = train_steps(engine, spec, range(spec["steps"]))
            result["params"] = _full_fp32_params(deepspeed, engine)
            result["checksum"] = adapter.clipper.state_checksum()
            result["num_skipped"] = int(adapter.clipper.num_skipped)
            _release(engine)
        except Exception:
            result["error"] = traceback.format_exc()
        results.append(result)
    return results


@contextlib.contextmanager
def _fp16_allowed() -> Iterator[None]:
    """DeepSpeed's fp16 allowed on the CPU accelerator, for the duration of the block.

    DeepSpeed refuses fp16 on a CPU without AVX-512 fp16 kernels; torch computes fp16
    on the CPU anyway (slowly), which is all these small runs need. The check is
    restored afterwards.
    """
    setup()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    saved = accelerator.__dict__.get("is_fp16_supported")
    accelerator.is_fp16_supported = lambda: True
    try:
        yield
    finally:
        if saved is None:
            accelerator.__dict__.pop("is_fp16_supported", None)
        else:
            accelerator.is_fp16_supported = saved


def run_fp16(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`run_specs` with DeepSpeed's fp16 allowed on the CPU accelerator."""
    with _fp16_allowed():
        results = run_specs(specs)
        refused = []
        for stage in (0,):  # ZeRO 0 fp16: refused (DeepSpeed's own updates are off there)
            spec = {**specs[0], "name": f"z{stage}-fp16-refused"}
            config = {k: v for k, v in spec["ds_config"].items() if k != "zero_optimization"}
            refused.append(_outcome(lambda c=config, s=spec: build_engine(s, config=c)))
    return [*results, {"refused": refused}]


class InnerStepProbe:
    """Watches every ``step()`` of the optimizers that update the fp32 master weights.

    Through torch's *global* step hooks, which run before the optimizer's own pre-hooks
    (distclip's clamp) and after its post-hooks: each call sees the gradients before the
    clamp and, afterwards, the clamped gradients and the updated parameters. Per
    optimizer step it keeps: the calls, the elements and how many exceed ``bound``, the
    sum of squares of the gradients before the clamp (this rank's elements), and the
    largest deviation of the gradients from ``clamp(g, -bound, bound)`` and of the
    parameters from SGD's ``p - lr * clamp(g)``, computed here by hand.
    """

    def __init__(self, optimizers: list[Any], bound: float, lr: float) -> None:
        self.optimizers = optimizers
        self.bound = bound
        self.lr = lr
        self.steps: list[dict[str, float]] = []
        self._before: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> InnerStepProbe:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        self._handles = [
            register_optimizer_step_pre_hook(self._pre),
            register_optimizer_step_post_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()

    def new_step(self) -> None:
        self.steps.append(
            {
                "calls": 0,
                "elements": 0,
                "clamped": 0,
                "sumsq": 0.0,
                "grad_error": 0.0,
                "update_error": 0.0,
            }
        )

    def _watched(self, optimizer: Any) -> bool:
        return any(optimizer is watched for watched in self.optimizers)

    def _params(self, optimizer: Any) -> list[torch.Tensor]:
        return [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]

    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._watched(optimizer):
            return
        self._before = [
            (p, p.detach().clone(), p.grad.detach().clone()) for p in self._params(optimizer)
        ]

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._watched(optimizer):
            return
        step = self.steps[-1]
        step["calls"] += 1
        for param, before, grad in self._before:
            clamped = grad.clamp(-self.bound, self.bound)
            expected = before.add(clamped, alpha=-self.lr)
            step["elements"] += grad.numel()
            step["clamped"] += int((grad.abs() > self.bound).sum())
            step["sumsq"] += float(grad.double().square().sum())
            if param.grad is not None:
                step["grad_error"] = max(
                    step["grad_error"], float((param.grad - clamped).abs().max())
                )
            step["update_error"] = max(
                step["update_error"], float((param.detach() - expected).abs().max())
            )
        self._before = []


def run_elementwise(specs: list[dict[str, Any]], fp16: bool = False) -> list[dict[str, Any]]:
    """:func:`run_specs` for ``value``/``coordinate_wise``, with an :class:`InnerStepProbe`.

    Per spec also: ``probe`` (per step, see the probe) with ``grad_norm``, the global
    norm of the gradients the inner steps saw before the clamp (summed over the ranks
    where the wrapper partitions them), and which optimizers were watched.
    """
    if fp16:
        with _fp16_allowed():
            return run_elementwise(specs)
    deepspeed = setup()
    results = []
    for spec in specs:
        result: dict[str, Any] = {"name": spec["name"]}
        try:
            engine = build_engine(spec)
            adapter = engine.distclip
            result["wrapper"] = adapter.wrapper
            result["hook_point"] = adapter.hook_point
            wrapper = engine.optimizer
            inner = [wrapper] if adapter.wrapper is None else [wrapper.optimizer]
            result["inner_class"] = type(inner[0]).__name__
            records: dict[str, list[Any]] = {}
            with InnerStepProbe(inner, adapter.clipper.config.clip_value, LR) as probe:
                for step in range(spec["steps"]):
                    probe.new_step()
                    for key, values in train_steps(engine, spec, range(step, step + 1)).items():
                        records.setdefault(key, []).extend(values)
            sumsq = torch.tensor([s["sumsq"] for s in probe.steps], dtype=torch.float64)
            if adapter.wrapper not in (None, "FP16_UnfusedOptimizer", "FP16_Optimizer"):
                dist.all_reduce(sumsq)  # ZeRO partitions: each rank holds its own elements
            for entry, total in zip(probe.steps, sumsq.sqrt().tolist(), strict=True):
                entry["grad_norm"] = total
            result["probe"] = probe.steps
            result["records"] = records
            result["params"] = _full_fp32_params(deepspeed, engine)
            result["checksum"] = adapter.clipper.state_checksum()
            _release(engine)
        except Exception:
            result["error"] = traceback.format_exc()
        results.append(result)
    return results


def run_checkpoint(spec: dict[str, Any], directory: str, split: int) -> dict[str, Any]:
    """Uninterrupted run vs. save after ``split`` steps and resume in a fresh engine.

    The resumed engine starts from other weights and another ``gradient_clipping``
    (DeepSpeed restores its own saved clip value on load: distclip must still win).
    """
    deepspeed = setup()
    steps = spec["steps"]
    out: dict[str, Any] = {"name": spec["name"]}
    try:
        engine = build_engine(spec)
        out["full"] = train_steps(engine, spec, range(steps))
        out["full_params"] = _full_fp32_params(deepspeed, engine)
        _release(engine)

        engine = build_engine(spec)
        out["first"] = train_steps(engine, spec, range(split))
        saved_state = engine.distclip.clipper.state_dict()
        engine.save_checkpoint(directory, tag="split", client_state={"user_key": 7})
        out["saved_num_steps"] = saved_state["num_steps"]
        _release(engine)

        resumed_config = {**spec["ds_config"], "gradient_clipping": 2.5}
        engine = build_engine(spec, model_seed=123, config=resumed_config)
        before = engine.distclip.clipper.num_steps
        load_path, client_state = engine.load_checkpoint(directory, tag="split")
        out["load_path"] = str(load_path)
        out["client_state_keys"] = sorted(client_state)
        out["user_key"] = client_state.get("user_key")
        out["num_steps_before_load"] = before
        out["num_steps_after_load"] = engine.distclip.clipper.num_steps
        out["hooked_after_load"] = engine.distclip.hooked
        out["ds_clip_after_load"] = (
            engine.optimizer.clip_grad if hasattr(engine.optimizer, "clip_grad") else None
        )
        out["resumed"] = train_steps(engine, spec, range(split, steps))
        out["resumed_params"] = _full_fp32_params(deepspeed, engine)
        _release(engine)
    except Exception:
        out["error"] = traceback.format_exc()
    return out


def _outcome(fn: Any) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def run_attach_checks(spec: dict[str, Any]) -> dict[str, Any]:
    """Refusals at attach time and attach with explicit options, on engines of ``spec``."""
    deepspeed = setup()
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    out: dict[str, Any] = {}
    config = {k: v for k, v in spec["ds_config"].items() if k != "distclip"}

    def plain_engine() -> Any:
        model = make_model()
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config
        )
        return engine

    # layer_wise / agc with model parallelism: refused before any change.
    engine = plain_engine()
    engine.mpu = object()
    for method in ("agc", "layer_wise"):
        out[f"refuse_{method}"] = _outcome(lambda m=method: distclip.deepspeed.attach(engine, m))
    engine.mpu = None
    out["no_adapter_after_refusal"] = "distclip" not in engine.__dict__

    # layer_wise / agc: a step pre-hook on the inner optimizer, gone after remove().
    inner = engine.optimizer.optimizer
    hooks_before = len(inner._optimizer_step_pre_hooks)
    adapter = distclip.deepspeed.attach(engine, "agc", clip_factor=0.1)
    out["agc_hook_point"] = adapter.hook_point
    out["agc_hooks_added"] = len(inner._optimizer_step_pre_hooks) - hooks_before
    adapter.remove()
    out["agc_hooks_after_remove"] = len(inner._optimizer_step_pre_hooks) - hooks_before

    # The element-wise clamp: a step pre-hook on the inner optimizer, gone after remove().
    adapter = distclip.deepspeed.attach(engine, "value", clip_value=0.5)
    out["value_hook_point"] = adapter.hook_point
    out["value_hooks_added"] = len(inner._optimizer_step_pre_hooks) - hooks_before
    out["value_hooked"] = adapter.hooked
    adapter.remove()
    out["value_hooks_after_remove"] = len(inner._optimizer_step_pre_hooks) - hooks_before
    out["value_removed_class"] = type(engine.optimizer).__name__

    # Explicit options; no section in the config: the keywords decide.
    adapter = distclip.deepspeed.attach(engine, "norm", max_norm=0.5)
    out["explicit_method"] = adapter.method
    out["explicit_max_norm"] = adapter.clipper.config.max_norm
    out["double_attach"] = _outcome(lambda: distclip.deepspeed.attach(engine))
    out["get_adapter_is_adapter"] = distclip.deepspeed.get_adapter(engine) is adapter
    records = train_steps(engine, {**spec, "steps": 3}, range(3))
    out["explicit_thresholds"] = records["threshold"]
    # remove(): the wrapper is back to DeepSpeed's class and its own clip value.
    adapter.remove()
    out["removed_class"] = type(engine.optimizer).__name__
    out["removed_clip_grad"] = engine.optimizer.clip_grad
    out["removed_attr"] = "distclip" not in engine.__dict__
    _release(engine)

    # No "distclip" section and no options: AutoClip's defaults.
    engine = plain_engine()
    adapter = distclip.deepspeed.attach(engine)
    out["default_method"] = adapter.method
    out["default_section_present"] = adapter.section.present
    _release(engine)

    # A subclass of a supported wrapper: refused unless allow_unverified (then warned).
    engine = plain_engine()
    engine.optimizer.__class__ = type("CustomZero", (DeepSpeedZeroOptimizer,), {})
    out["subclass_refused"] = _outcome(lambda: distclip.deepspeed.attach(engine))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distclip.deepspeed.attach(engine, allow_unverified=True)
    out["subclass_warning"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
    out["subclass_hook_point"] = engine.distclip.hook_point
    _release(engine)

    # Something that is no DeepSpeed wrapper at all, under ZeRO: refused.
    engine = plain_engine()
    engine.optimizer = torch.optim.SGD(engine.module.parameters(), lr=LR)
    out["unknown_refused"] = _outcome(lambda: distclip.deepspeed.attach(engine))
    _release(engine)

    # Not an engine.
    out["not_engine"] = _outcome(lambda: distclip.deepspeed.attach(torch.nn.Linear(2, 2)))
    return out


def _partition_pieces(engine: Any) -> list[tuple[int, int, int]]:
    """This rank's pieces of the model's parameters: ``(param index, start, numel)``.

    ``start`` is the piece's offset in the flattened parameter (ZeRO 1/2 and
    BF16_Optimizer: DeepSpeed's ``_hp_mapping``; ZeRO 3: the ``ds_tensor`` partition).
    Empty at ZeRO 0 (every rank holds every tensor whole).
    """
    pieces = []
    rank = dist.get_rank()
    for index, param in enumerate(engine.module.parameters()):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            address = mapping.lp_fragment_address
            pieces.append((index, int(address.start), int(address.numel)))
        elif hasattr(param, "ds_tensor"):
            size = int(param.partition_numel())
            start = rank * size
            numel = min(int(param.ds_numel) - start, size)
            if numel > 0:
                pieces.append((index, start, numel))
    return pieces


def run_per_unit(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`run_specs` for ``layer_wise``/``agc``; also the partition pieces and collectives.

    Per spec also: ``pieces`` (see :func:`_partition_pieces`), ``collectives`` (the
    all-reduces distclip issued over the run; ``None`` at ZeRO 0 fp32, which has no
    inner-step hook), ``sub_groups`` (ZeRO 3's; 1 otherwise) and the clipper's
    ``num_clipped``.
    """
    deepspeed = setup()
    results = []
    for spec in specs:
        result: dict[str, Any] = {"name": spec["name"]}
        try:
            engine = build_engine(spec)
            adapter = engine.distclip
            result["wrapper"] = adapter.wrapper
            result["hook_point"] = adapter.hook_point
            result["pieces"] = _partition_pieces(engine)
            result["records"] = train_steps(engine, spec, range(spec["steps"]))
            # distclip's FragmentClip, the body of its step pre-hook on the inner optimizer.
            inner = getattr(engine.optimizer, "optimizer", None) if adapter.wrapper else None
            hooks = getattr(inner, "_optimizer_step_pre_hooks", {}).values()
            clips = [h.apply for h in hooks if hasattr(h, "apply")]
            result["collectives"] = clips[0].collectives if clips else None
            result["sub_groups"] = len(
                getattr(engine.optimizer, "fp32_partitioned_groups_flat", [0])
            )
            result["params"] = _full_fp32_params(deepspeed, engine)
            result["checksum"] = adapter.clipper.state_checksum()
            result["num_clipped"] = int(adapter.clipper.num_clipped)
            _release(engine)
        except Exception:
            result["error"] = traceback.format_exc()
        results.append(result)
    return results


def run_host_reads(specs: list[dict[str, Any]], steps: int = 5) -> list[dict[str, Any]]:
    """Host reads and tensors from host data per training step, with and without distclip.

    For each spec: the same engine built by plain ``deepspeed.initialize`` (DeepSpeed's
    own ``gradient_clipping``) and by ``distclip.deepspeed.initialize``; after two
    warm-up steps, each of the remaining steps (backward and ``engine.step()``) runs
    under ``tests.support.op_probe.probe``. What distclip adds is the difference.
    """
    from tests.support.op_probe import probe

    deepspeed = setup()
    rank = dist.get_rank()
    results = []
    for spec in specs:
        result: dict[str, Any] = {"name": spec["name"]}
        try:
            for label in ("plain", "distclip"):
                model = make_model(0)
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
                dtype = torch.bfloat16 if spec["bf16"] else torch.float32

                def step(index: int, engine: Any = engine, dtype: torch.dtype = dtype) -> None:
                    x, y = micro_batch(index, rank, 0)
                    engine.backward(loss_fn(engine(x.to(dtype)), y))
                    engine.step()

                counts = []
                for index in range(steps):
                    if index < 2:
                        step(index)
                        continue
                    seen = probe(lambda index=index: step(index))
                    counts.append((seen.host_reads, seen.host_data))
                result[label] = counts
                _release(engine)
        except Exception:
            result["error"] = traceback.format_exc()
        results.append(result)
    return results
