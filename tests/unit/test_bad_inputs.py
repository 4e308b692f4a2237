"""The bad input table: every entry point refuses invalid input with a typed error.

Each row makes one bad call and says which exception it must raise and what the
message must say (the argument or the problem, and the valid range where there is
one). Rows that act on an existing optimizer or clipper also check that the error
came before anything changed: the optimizer's ``state_dict()`` (the clipper entry and
its window tensors included), the parameters, the gradients and the hooks are bit for
bit what they were.

Below the table: checkpoints load with ``torch.load(weights_only=True)`` and resume
exactly, and distclip itself never unpickles arbitrary objects.
"""

from __future__ import annotations

import ast
import copy
import math
import pathlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

import distclip
from distclip.window import NormWindow

SGD = torch.optim.SGD
WINDOW = 5
WARMUP = 3
METHOD_LIST = "agc, auto_clip, autoclip, coordinate_wise, layer_wise, linear_stoch_autoclip"


# ----------------------------------------------------------------------- targets
def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _train(opt: torch.optim.Optimizer, model: torch.nn.Module, steps: int = 4) -> None:
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        opt.zero_grad()
        scale = 10.0 if step == 2 else 1.0  # one spike, so that clipping happens
        model(torch.randn(8, 3, generator=gen) * scale).pow(2).sum().backward()
        opt.step()


def _trained_optimizer(cls: type[SGD] | None = None) -> torch.optim.Optimizer:
    """A ClippedOptimizer (AutoClip, window 5) with momentum buffers and a window history."""
    model = _model()
    cls = cls or distclip.AutoClippedOptimizer(SGD, q=0.3, window=WINDOW)
    opt = cls(model.parameters(), lr=0.05, momentum=0.9)
    _train(opt, model)
    return opt


def _trained_attached() -> torch.optim.Optimizer:
    model = _model()
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    distclip.attach(opt, q=0.3, window=WINDOW)
    _train(opt, model)
    return opt


def _trained_plain() -> torch.optim.Optimizer:
    model = _model()
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(opt, model)
    return opt


def _clipper_with_history(method: str, **options: Any) -> distclip.Clipper:
    model = _model()
    clipper = distclip.make_clipper(method, model.parameters(), **options)
    gen = torch.Generator().manual_seed(2)
    for _ in range(WARMUP + 3):
        model.zero_grad()
        model(torch.randn(8, 3, generator=gen)).pow(2).sum().backward()
        clipper.clip_()
    return clipper


TARGETS: dict[str, Callable[[], Any]] = {
    "none": lambda: None,
    "optimizer": _trained_optimizer,
    "attached": _trained_attached,
    "plain": _trained_plain,
    "autoclip": lambda: _clipper_with_history("autoclip", q=0.3, window=WINDOW),
    "zclip": lambda: _clipper_with_history("zclip", warmup_steps=WARMUP),
}


# ------------------------------------------------------------- state snapshots
def _hook_counts(opt: torch.optim.Optimizer) -> dict[str, int]:
    return {
        name: len(hooks)
        for name, hooks in vars(opt).items()
        if name.startswith("_optimizer_") and isinstance(hooks, dict)
    }


def _snapshot(target: Any) -> dict[str, Any] | None:
    """Everything an error must leave alone, deep-copied."""
    if isinstance(target, torch.optim.Optimizer):
        params = [p for group in target.param_groups for p in group["params"]]
        return copy.deepcopy(
            {
                "state_dict": target.state_dict(),
                "params": params,
                "grads": [p.grad for p in params],
                "hooks": _hook_counts(target),
                "class": type(target).__name__,
                "binding": id(getattr(target, "_distclip", None)),
                "attributes": sorted(vars(target)),
            }
        )
    if isinstance(target, distclip.Clipper):
        return copy.deepcopy(
            {
                "state_dict": target.state_dict(),
                "config": target.config,
                "params": list(target.params),
                "grads": [p.grad for p in target.params],
            }
        )
    return None


def _assert_same(before: Any, after: Any, where: str = "") -> None:
    """Bit-for-bit equality of nested dicts, lists, tensors and numbers (NaN == NaN)."""
    assert type(before) is type(after), f"{where}: {type(before)} != {type(after)}"
    if isinstance(before, dict):
        assert before.keys() == after.keys(), f"{where}: keys {before.keys()} != {after.keys()}"
        for key in before:
            _assert_same(before[key], after[key], f"{where}[{key!r}]")
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after), f"{where}: length {len(before)} != {len(after)}"
        for index, (b, a) in enumerate(zip(before, after, strict=True)):
            _assert_same(b, a, f"{where}[{index}]")
    elif isinstance(before, Tensor):
        assert (before.dtype, before.shape, before.device) == (
            after.dtype,
            after.shape,
            after.device,
        )
        as_bytes = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (before, after)]
        assert torch.equal(*as_bytes), f"{where}: tensor bits changed"
    elif isinstance(before, float) and math.isnan(before):
        assert math.isnan(after), where
    else:
        assert before == after, f"{where}: {before!r} != {after!r}"


# --------------------------------------------------------- bad state builders
def _entry(state_dict: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = state_dict["param_groups"][0]["distclip"]
    return entry


def _poisoned(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the optimizer's own part changed too: a load that went ahead
    before refusing the clipper entry would show in the snapshot."""
    for group in state_dict["param_groups"]:
        group["lr"] = 123.0
    for state in state_dict["state"].values():
        for key, value in state.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                state[key] = value * 2 + 1
    return state_dict


def _load_mutated(mutate: Callable[[dict[str, Any]], object]) -> Callable[[Any], object]:
    """A row call: ``target.load_state_dict`` of its own state_dict with the clipper entry mutated."""

    def call(target: Any) -> object:
        state_dict = copy.deepcopy(target.state_dict())
        mutate(_entry(state_dict))
        return target.load_state_dict(_poisoned(state_dict))

    return call


def _load_whole(mutate: Callable[[dict[str, Any]], object]) -> Callable[[Any], object]:
    """A row call: ``target.load_state_dict`` of its own state_dict mutated as a whole."""

    def call(target: Any) -> object:
        state_dict = _poisoned(copy.deepcopy(target.state_dict()))
        mutate(state_dict)
        return target.load_state_dict(state_dict)

    return call


def _load_from(source: Callable[[], torch.optim.Optimizer]) -> Callable[[Any], object]:
    """A row call: ``target.load_state_dict`` of another optimizer's state_dict."""
    return lambda target: target.load_state_dict(_poisoned(source().state_dict()))


def _clipper_load_mutated(mutate: Callable[[dict[str, Any]], object]) -> Callable[[Any], object]:
    """A row call: ``clipper.load_state_dict`` of its own state_dict, mutated."""

    def call(clipper: Any) -> object:
        state_dict = copy.deepcopy(clipper.state_dict())
        mutate(state_dict)
        return clipper.load_state_dict(state_dict)

    return call


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], object]:
    return lambda d: d.update({key: value})


def _drop(key: str) -> Callable[[dict[str, Any]], object]:
    return lambda d: d.pop(key)


def _set_window(key: str, value: Any) -> Callable[[dict[str, Any]], object]:
    return lambda entry: entry["state"]["window"].update({key: value})


def _set_zclip(key: str, value: Any) -> Callable[[dict[str, Any]], object]:
    return lambda entry: entry["state"].update({key: value})


def _consumed() -> Iterator[Tensor]:
    params = (p for p in _model().parameters())
    list(params)
    return params


def _cpu_and_meta() -> list[Tensor]:
    return [
        torch.nn.Parameter(torch.zeros(3)),
        torch.nn.Parameter(torch.zeros(2, 3, device="meta")),
    ]


def _frozen() -> list[Tensor]:
    return [torch.zeros(2, 3), torch.zeros(3)]


def _state_dict_of_method(method: str, **options: Any) -> Callable[[], torch.optim.Optimizer]:
    return lambda: _trained_optimizer(distclip.ClippedOptimizer(SGD, method=method, **options))


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Bad:
    """One row: ``call(target)`` must raise ``error`` with a message matching ``match``."""

    id: str
    target: str
    call: Callable[[Any], object]
    error: type[Exception]
    match: str


TABLE: list[Bad] = [
    # --- the seed factory: AutoClippedOptimizer(cls, q=..., window=..., max_norm=...)
    Bad(
        "seed-q-above-range",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD, q=1.5),
        ValueError,
        r"^q must be in \[0, 1\], got 1\.5$",
    ),
    Bad(
        "seed-q-nan",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD, q=math.nan),
        ValueError,
        r"^q must be in \[0, 1\], got nan$",
    ),
    Bad(
        "seed-q-wrong-type",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD, q="0.1"),  # type: ignore[arg-type]
        TypeError,
        r"^q must be a real number in \[0, 1\], got '0\.1'$",
    ),
    Bad(
        "seed-window-zero",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD, window=0),
        ValueError,
        r"^window must be an integer >= 1, got 0$",
    ),
    Bad(
        "seed-window-float",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD, window=2.5),  # type: ignore[arg-type]
        TypeError,
        r"^window must be an integer >= 1, got 2\.5$",
    ),
    Bad(
        "seed-window-bool",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD, window=True),
        TypeError,
        r"^window must be an integer >= 1, got True$",
    ),
    Bad(
        "seed-max-norm-negative",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD, max_norm=-1.0),
        ValueError,
        r"^max_norm must be a positive finite number or None \(0 < max_norm < inf\), got -1\.0$",
    ),
    Bad(
        "seed-max-norm-inf",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD, max_norm=math.inf),
        ValueError,
        r"max_norm must be a positive finite number or None \(0 < max_norm < inf\), got inf",
    ),
    Bad(
        "seed-max-norm-tensor",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD, max_norm=torch.tensor(1.0)),  # type: ignore[arg-type]
        TypeError,
        r"^max_norm must be a positive finite number or None, got tensor\(1\.\)$",
    ),
    Bad(
        "seed-min-norm-above-max-norm",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD, max_norm=2.0, min_norm=3.0),
        ValueError,
        r"^min_norm must not exceed max_norm, got min_norm=3\.0 > max_norm=2\.0$",
    ),
    Bad(
        "seed-optimizer-instance-not-class",
        "plain",
        lambda opt: distclip.AutoClippedOptimizer(opt),
        TypeError,
        r"^optimizer_cls must be a subclass of torch\.optim\.Optimizer, got SGD \(",
    ),
    Bad(
        "seed-unknown-option",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD, quantile=0.1),
        TypeError,
        r"^method 'autoclip' got unknown option\(s\) 'quantile'; valid options: .*\bq, window, max_norm, min_norm$",
    ),
    Bad(
        "seed-class-already-clips",
        "none",
        lambda _: distclip.AutoClippedOptimizer(distclip.AutoClippedOptimizer(SGD)),
        ValueError,
        r"^AutoClippedSGD already clips its gradients; pass its base class SGD instead$",
    ),
    # --- ClippedOptimizer(cls, method=..., **options)
    Bad(
        "method-unknown",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, method="autoclipp"),
        ValueError,
        rf"^unknown clipping method 'autoclipp'; valid methods: {METHOD_LIST}",
    ),
    Bad(
        "method-not-a-string",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, method=3),  # type: ignore[arg-type]
        TypeError,
        rf"^method must be a string, one of: {METHOD_LIST}.*; got 3$",
    ),
    Bad(
        "method-option-of-another-method",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, method="norm", q=0.5),
        TypeError,
        r"^method 'norm' got unknown option\(s\) 'q'; valid options: .*\bmax_norm$",
    ),
    Bad(
        "norm-max-norm-none",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, method="norm", max_norm=None),
        TypeError,
        r"^max_norm must be a positive finite number, got None$",
    ),
    Bad(
        "zclip-alpha-out-of-range",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, method="zclip", alpha=1.0),
        ValueError,
        r"^alpha must be in \(0, 1\), got 1\.0$",
    ),
    Bad(
        "zclip-mode-unknown",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, method="zclip", mode="clip"),
        ValueError,
        r"^mode must be one of 'adaptive_scaling', 'mean'; got 'clip'$",
    ),
    Bad(
        "zclip-mode-wrong-type",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, method="zclip", mode=1),
        TypeError,
        r"^mode must be a string, one of 'adaptive_scaling', 'mean'; got 1$",
    ),
    Bad(
        "stochastic-beta-zero",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, method="linear_stoch_norm", beta=0.0),
        ValueError,
        r"^beta must be in \(0, 1\] \(0 would never clip\), got 0\.0$",
    ),
    Bad(
        "stochastic-seed-negative",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, method="quadratic_stoch_autoclip", seed=-1),
        ValueError,
        r"^seed must be an integer >= 0, got -1$",
    ),
    Bad(
        "agc-clip-factor-zero",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, method="agc", clip_factor=0),
        ValueError,
        r"^clip_factor must be a positive finite number \(0 < clip_factor < inf\), got 0$",
    ),
    Bad(
        "nonfinite-unknown",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, nonfinite="ignore"),
        ValueError,
        r"^nonfinite must be one of 'skip', 'error'; got 'ignore'$",
    ),
    Bad(
        "nonfinite-wrong-type",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, nonfinite=False),
        TypeError,
        r"^nonfinite must be a string, one of 'skip', 'error'; got False$",
    ),
    Bad(
        "eps-negative",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, method="norm", eps=-1e-6),
        ValueError,
        r"^eps must be a finite number >= 0 \(0 <= eps < inf\), got -1e-06$",
    ),
    Bad(
        "eps-wrong-type",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, method="norm", eps="1e-6"),
        TypeError,
        r"^eps must be a finite number >= 0 \(a real number\), got '1e-6'$",
    ),
    Bad(
        "norm-type-nan",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, norm_type=math.nan),
        ValueError,
        r"^norm_type must be a real number p .*; NaN is not a norm type, got nan$",
    ),
    Bad(
        "norm-type-string",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, norm_type="fro"),
        ValueError,
        r"^norm_type must be a real number p \(0, negative, inf and -inf included\) or a "
        r"string such as 'inf', got 'fro'$",
    ),
    Bad(
        "norm-type-bool",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, norm_type=True),
        TypeError,
        r"^norm_type must be a real number p .* got True$",
    ),
    Bad(
        "check-every-negative",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, check_every=-1),
        ValueError,
        r"^check_every must be an integer >= 0, got -1$",
    ),
    Bad(
        "foreach-not-bool",
        "none",
        lambda _: distclip.ClippedOptimizer(SGD, foreach=1),
        TypeError,
        r"^foreach must be True, False or None, got 1$",
    ),
    # --- the constructed optimizer, with bad parameters
    Bad(
        "optimizer-consumed-generator",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD)(_consumed(), lr=0.1),
        ValueError,
        r"^optimizer got an empty parameter list$",
    ),
    Bad(
        "optimizer-params-do-not-require-grad",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD)(_frozen(), lr=0.1),
        ValueError,
        r"^none of the 2 parameters requires grad, .*set requires_grad=True",
    ),
    Bad(
        "optimizer-cpu-and-meta-params",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD)(_cpu_and_meta(), lr=0.1),
        ValueError,
        r"^parameter 1 of 2 \(shape \(2, 3\)\) is on the meta device: it holds no data",
    ),
    Bad(
        "optimizer-single-tensor",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD)(torch.zeros(2, requires_grad=True), lr=0.1),
        TypeError,
        r"params argument given to the optimizer should be an iterable of Tensors or dicts",
    ),
    Bad(
        "optimizer-model-not-a-module",
        "none",
        lambda _: distclip.AutoClippedOptimizer(SGD)(_model().parameters(), lr=0.1, model="m"),  # type: ignore[call-arg]
        TypeError,
        r"^model must be a torch\.nn\.Module, got str$",
    ),
    # --- attach(optimizer, ...)
    Bad(
        "attach-not-an-optimizer",
        "none",
        lambda _: distclip.attach(_model()),  # type: ignore[arg-type]
        TypeError,
        r"^optimizer must be a torch\.optim\.Optimizer or a wrapper exposing one as \.optimizer, "
        r"got Sequential$",
    ),
    Bad(
        "attach-twice",
        "attached",
        lambda opt: distclip.attach(opt, method="norm"),
        ValueError,
        r"^this optimizer already clips its gradients with distclip; remove the first clipper",
    ),
    Bad(
        "attach-to-a-clipped-optimizer",
        "optimizer",
        lambda opt: distclip.attach(opt),
        ValueError,
        r"^this optimizer \(AutoClippedSGD\) already clips its gradients: it was built by "
        r"distclip\.ClippedOptimizer",
    ),
    Bad(
        "attach-option-out-of-range",
        "plain",
        lambda opt: distclip.attach(opt, q=0.3, window=-2),
        ValueError,
        r"^window must be an integer >= 1, got -2$",
    ),
    Bad(
        "attach-unknown-option",
        "plain",
        lambda opt: distclip.attach(opt, method="zclip", window=10),
        TypeError,
        r"^method 'zclip' got unknown option\(s\) 'window'; valid options: ",
    ),
    Bad(
        "attach-unknown-method",
        "plain",
        lambda opt: distclip.attach(opt, method="zlcip"),
        ValueError,
        rf"^unknown clipping method 'zlcip'; valid methods: {METHOD_LIST}",
    ),
    Bad(
        "attach-params-do-not-require-grad",
        "none",
        lambda _: distclip.attach(SGD(_frozen(), lr=0.1)),
        ValueError,
        r"^none of the 2 parameters requires grad",
    ),
    Bad(
        "attach-cpu-and-meta-params",
        "none",
        lambda _: distclip.attach(SGD(_cpu_and_meta(), lr=0.1)),
        ValueError,
        r"^parameter 1 of 2 \(shape \(2, 3\)\) is on the meta device",
    ),
    # --- make_clipper and the clipper classes
    Bad(
        "make-clipper-unknown-method",
        "none",
        lambda _: distclip.make_clipper("zclipp", _model().parameters()),
        ValueError,
        rf"^unknown clipping method 'zclipp'; valid methods: {METHOD_LIST}",
    ),
    Bad(
        "make-clipper-unknown-option",
        "none",
        lambda _: distclip.make_clipper("value", _model().parameters(), max_norm=1.0),
        TypeError,
        r"^method 'value' got unknown option\(s\) 'max_norm'; valid options: .*\bclip_value$",
    ),
    Bad(
        "make-clipper-consumed-generator",
        "none",
        lambda _: distclip.make_clipper("autoclip", _consumed()),
        ValueError,
        r"^params is empty: .*generator such as model\.parameters\(\) already consumed",
    ),
    Bad(
        "clipper-single-tensor",
        "none",
        lambda _: distclip.AutoClip(torch.zeros(2, requires_grad=True)),
        TypeError,
        r"^params must be an iterable of tensors or of param-group dicts, got a single Tensor",
    ),
    Bad(
        "clipper-params-hold-a-string",
        "none",
        lambda _: distclip.NormClip(["w"]),  # type: ignore[arg-type]
        TypeError,
        r"^params must hold tensors, got str$",
    ),
    Bad(
        "clipper-from-config-of-another-method",
        "none",
        lambda _: distclip.NormClip.from_config(
            _model().parameters(), distclip.clippers.AutoClipConfig()
        ),
        TypeError,
        r"^NormClip needs a NormClipConfig, got AutoClipConfig$",
    ),
    Bad(
        "clipper-option-out-of-range",
        "none",
        lambda _: distclip.clippers.ZClip(_model().parameters(), warmup_steps=0),
        ValueError,
        r"^warmup_steps must be an integer >= 1, got 0$",
    ),
    Bad(
        "make-clipper-cpu-and-meta-params",
        "none",
        lambda _: distclip.make_clipper("autoclip", _cpu_and_meta()),
        ValueError,
        r"meta device",
    ),
    Bad(
        "clipper-params-none",
        "none",
        lambda _: distclip.AutoClip(None),  # type: ignore[arg-type]
        TypeError,
        r"^params must be an iterable of tensors or of param-group dicts, got NoneType",
    ),
    Bad(
        "clipper-param-group-without-params",
        "none",
        lambda _: distclip.AutoClip([{"lr": 0.1}]),
        ValueError,
        r"^a param-group dict needs a 'params' entry",
    ),
    Bad(
        "window-size-zero",
        "none",
        lambda _: NormWindow(0),
        ValueError,
        r"^window size must be an integer >= 1, got 0$",
    ),
    # --- optimizer.load_state_dict with a bad clipper entry (ClippedOptimizer)
    Bad(
        "load-state-of-another-method",
        "optimizer",
        _load_from(_state_dict_of_method("norm")),
        ValueError,
        r"^the state_dict was saved by method 'norm' but this clipper is 'autoclip'; build "
        r"the clipper with method='norm'",
    ),
    Bad(
        "load-state-of-another-window-size",
        "optimizer",
        _load_from(lambda: _trained_optimizer(distclip.AutoClippedOptimizer(SGD, window=7))),
        ValueError,
        r"^the saved window holds 7 norms but this clipper's window is 5; build the clipper "
        r"with window=7",
    ),
    Bad(
        "load-format-version-too-new",
        "optimizer",
        _load_mutated(_set("format_version", 99)),
        ValueError,
        r"^clipper state format_version 99 is not supported; this distclip reads versions 1 to 1$",
    ),
    Bad(
        "load-window-values-wrong-shape",
        "optimizer",
        _load_mutated(_set_window("values", torch.zeros(7))),
        ValueError,
        r"^window 'values' must be a floating-point tensor of shape \(5,\), got a "
        r"torch\.float32 tensor of shape \(7,\)$",
    ),
    Bad(
        "load-window-values-integer-dtype",
        "optimizer",
        _load_mutated(_set_window("values", torch.zeros(WINDOW, dtype=torch.int32))),
        ValueError,
        r"^window 'values' must be a floating-point tensor of shape \(5,\), got a "
        r"torch\.int32 tensor",
    ),
    Bad(
        "load-window-num-seen-bool",
        "optimizer",
        _load_mutated(_set_window("num_seen", torch.tensor(True))),
        ValueError,
        r"^window 'num_seen' must be a 0-dim integer tensor >= 0, got dtype torch\.bool$",
    ),
    Bad(
        "load-window-num-seen-negative",
        "optimizer",
        _load_mutated(_set_window("num_seen", torch.tensor(-1))),
        ValueError,
        r"^window 'num_seen' must be a 0-dim integer tensor >= 0, got -1$",
    ),
    Bad(
        "load-window-values-nan",
        "optimizer",
        _load_mutated(_set_window("values", torch.tensor([1.0, math.nan, 2.0, 3.0, 4.0]))),
        ValueError,
        r"^window 'values' holds a NaN or inf among its valid entries",
    ),
    Bad(
        "load-window-values-on-meta",
        "optimizer",
        _load_mutated(_set_window("values", torch.zeros(WINDOW, device="meta"))),
        ValueError,
        r"^window 'values' is on the meta device and holds no data",
    ),
    Bad(
        "load-window-size-not-int",
        "optimizer",
        _load_mutated(_set_window("size", float(WINDOW))),
        ValueError,
        r"^the saved window 'size' must be an int >= 1, got 5\.0$",
    ),
    Bad(
        "load-num-steps-negative",
        "optimizer",
        _load_mutated(_set("num_steps", -3)),
        ValueError,
        r"^num_steps must be an int >= 0, got -3$",
    ),
    Bad(
        "load-missing-window",
        "optimizer",
        _load_mutated(lambda entry: entry["state"].pop("window")),
        ValueError,
        r"^an autoclip state must hold a 'window' dict, got None$",
    ),
    Bad(
        "load-missing-window-values",
        "optimizer",
        _load_mutated(lambda entry: entry["state"]["window"].pop("values")),
        ValueError,
        r"^the window state misses 'values'",
    ),
    Bad(
        "load-missing-state",
        "optimizer",
        _load_mutated(_drop("state")),
        ValueError,
        r"^the method state must be a dict, got NoneType$",
    ),
    Bad(
        "load-missing-num-clipped",
        "optimizer",
        _load_mutated(_drop("num_clipped")),
        ValueError,
        r"^num_clipped must be a 0-dim integer tensor",
    ),
    Bad(
        "load-clipper-entry-not-a-dict",
        "optimizer",
        _load_whole(lambda sd: sd["param_groups"][0].update(distclip=[1, 2])),
        TypeError,
        r"^a clipper state_dict must be a dict, got list$",
    ),
    Bad(
        "load-state-dict-not-a-dict",
        "optimizer",
        lambda opt: opt.load_state_dict([opt.state_dict()]),
        TypeError,
        r"^the optimizer state_dict must be a dict \(what optimizer\.state_dict\(\) returns\), "
        r"got list$",
    ),
    Bad(
        "load-optimizer-part-mismatch",
        "optimizer",
        _load_whole(lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))),
        ValueError,
        r"^loaded state dict has a different number of parameter groups$",
    ),
    Bad(
        "load-format-version-bool",
        "optimizer",
        _load_mutated(_set("format_version", True)),
        ValueError,
        r"format_version True is not supported",
    ),
    Bad(
        "load-num-skipped-negative",
        "optimizer",
        _load_mutated(_set("num_skipped", torch.tensor(-1))),
        ValueError,
        r"^num_skipped must be a 0-dim integer tensor >= 0, got -1$",
    ),
    Bad(
        "load-num-clipped-on-meta",
        "optimizer",
        _load_mutated(_set("num_clipped", torch.zeros((), dtype=torch.long, device="meta"))),
        ValueError,
        r"^num_clipped is on the meta device",
    ),
    # --- optimizer.load_state_dict through attach's hooks
    Bad(
        "attached-load-state-of-another-method",
        "attached",
        _load_from(_state_dict_of_method("zclip", warmup_steps=WARMUP)),
        ValueError,
        r"^the state_dict was saved by method 'zclip' but this clipper is 'autoclip'",
    ),
    Bad(
        "attached-load-window-values-wrong-shape",
        "attached",
        _load_mutated(_set_window("values", torch.zeros(WINDOW, 2))),
        ValueError,
        r"^window 'values' must be a floating-point tensor of shape \(5,\)",
    ),
    Bad(
        "attached-load-state-dict-not-a-dict",
        "attached",
        lambda opt: opt.load_state_dict([opt.state_dict()]),
        TypeError,
        r"^the optimizer state_dict must be a dict \(what optimizer\.state_dict\(\) returns\), "
        r"got list$",
    ),
    # --- clipper.load_state_dict
    Bad(
        "clipper-load-not-a-dict",
        "autoclip",
        lambda clipper: clipper.load_state_dict(None),
        TypeError,
        r"^a clipper state_dict must be a dict, got NoneType$",
    ),
    Bad(
        "clipper-load-format-version-missing",
        "autoclip",
        _clipper_load_mutated(_drop("format_version")),
        ValueError,
        r"^clipper state format_version None is not supported; this distclip reads versions "
        r"1 to 1$",
    ),
    Bad(
        "clipper-load-window-num-seen-float",
        "autoclip",
        _clipper_load_mutated(lambda sd: sd["state"]["window"].update(num_seen=torch.tensor(2.0))),
        ValueError,
        r"^window 'num_seen' must be a 0-dim integer tensor >= 0, got dtype torch\.float32$",
    ),
    Bad(
        "zclip-load-state-of-autoclip",
        "zclip",
        lambda clipper: clipper.load_state_dict(TARGETS["autoclip"]().state_dict()),
        ValueError,
        r"^the state_dict was saved by method 'autoclip' but this clipper is 'zclip'",
    ),
    Bad(
        "zclip-load-warmup-of-another-size",
        "zclip",
        _clipper_load_mutated(_set_zclip("warmup_norms", torch.zeros(WARMUP + 1))),
        ValueError,
        r"^a zclip state needs 'warmup_norms' as a tensor of shape \(3,\) \(warmup_steps=3\)",
    ),
    Bad(
        "zclip-load-mean-integer-dtype",
        "zclip",
        _clipper_load_mutated(_set_zclip("mean", torch.tensor(1))),
        ValueError,
        r"^zclip 'mean' must be a floating-point tensor, got torch\.int64$",
    ),
    Bad(
        "zclip-load-num-seen-bool",
        "zclip",
        _clipper_load_mutated(_set_zclip("num_seen", torch.tensor(True))),
        ValueError,
        r"^zclip 'num_seen' must be an integer tensor, got torch\.bool$",
    ),
    Bad(
        "zclip-load-var-negative",
        "zclip",
        _clipper_load_mutated(_set_zclip("var", torch.tensor(-1.0))),
        ValueError,
        r"^zclip 'var' must be >= 0, got -1\.0$",
    ),
    Bad(
        "zclip-load-mean-nan",
        "zclip",
        _clipper_load_mutated(_set_zclip("mean", torch.tensor(math.nan))),
        ValueError,
        r"^a zclip state must hold finite numbers .*'mean', 'var'",
    ),
    Bad(
        "clipper-load-num-steps-bool",
        "autoclip",
        _clipper_load_mutated(_set("num_steps", True)),
        ValueError,
        r"^num_steps must be an int >= 0, got True$",
    ),
    Bad(
        "clipper-load-num-skipped-bool",
        "autoclip",
        _clipper_load_mutated(_set("num_skipped", torch.tensor(True))),
        ValueError,
        r"^num_skipped must be a 0-dim integer tensor >= 0, got dtype torch\.bool$",
    ),
]


def _params(table: list[Bad]) -> list[Any]:
    ids = [row.id for row in table]
    assert len(ids) == len(set(ids)), "row ids must be unique"
    return [pytest.param(row, id=row.id) for row in table]


def test_the_table_covers_every_entry_point() -> None:
    assert len(TABLE) >= 30
    targets = {row.target for row in TABLE}
    assert targets == set(TARGETS)
    assert {row.error for row in TABLE} == {TypeError, ValueError}


@pytest.mark.parametrize("row", _params(TABLE))
def test_bad_input_is_refused_before_anything_changes(row: Bad) -> None:
    target = TARGETS[row.target]()
    before = _snapshot(target)
    with pytest.raises(row.error, match=row.match):
        row.call(target)
    _assert_same(before, _snapshot(target), row.id)


def test_attach_that_fails_leaves_no_hook_behind() -> None:
    """A refused attach registers nothing: the optimizer still steps unclipped."""
    opt = _trained_plain()
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        distclip.attach(opt, window=0)
    assert not hasattr(opt, "_distclip")
    handle = distclip.attach(opt, window=WINDOW)  # a later, valid attach works
    handle.remove()


# ------------------------------------------------------------------ checkpoints
_ALLOWED_LEAVES = (Tensor, int, float, str, bool, type(None))


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"non-string key {key!r}"
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("autoclip", {"q": 0.3, "window": 4, "max_norm": 50.0}),
        ("zclip", {"warmup_steps": 3}),
        ("quadratic_stoch_autoclip", {"q": 0.5, "window": 3, "seed": 7}),
        ("norm", {"max_norm": 0.5}),
    ],
)
@pytest.mark.parametrize("via", ["class", "attach"])
def test_checkpoint_loads_with_weights_only_and_resumes_exactly(
    tmp_path: pathlib.Path, method: str, options: dict[str, Any], via: str
) -> None:
    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = _model(seed)
        if via == "class":
            cls = distclip.ClippedOptimizer(SGD, method=method, **options)
            return model, cls(model.parameters(), lr=0.05, momentum=0.9)
        opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
        distclip.attach(opt, method=method, **options)
        return model, opt

    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 3, generator=gen) * (20.0 if i % 5 == 4 else 1.0) for i in range(14)]

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor) -> Tensor:
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        stats = distclip.get_clipper(opt).last_stats
        assert stats is not None
        return stats.threshold.clone()

    model, opt = build(0)
    for x in batches[:7]:
        step(model, opt, x)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)

    saved = opt.state_dict()
    for leaf in _leaves(_entry(saved)):
        assert isinstance(leaf, _ALLOWED_LEAVES), f"{type(leaf).__name__} in the clipper state"

    checkpoint = torch.load(path, weights_only=True)
    resumed_model, resumed = build(1)  # other initial weights: all must come from the file
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    _assert_same(copy.deepcopy(saved), copy.deepcopy(resumed.state_dict()), "resumed")
    for x in batches[7:]:
        assert torch.equal(step(model, opt, x), step(resumed_model, resumed, x))
    for mine, theirs in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    _assert_same(copy.deepcopy(opt.state_dict()), copy.deepcopy(resumed.state_dict()), "end")


def test_window_state_of_another_float_precision_is_cast_not_refused() -> None:
    """As torch's optimizers cast floating-point state to the parameter's dtype."""
    clipper = TARGETS["autoclip"]()
    state = copy.deepcopy(clipper.state_dict())
    values = state["state"]["window"]["values"]
    state["state"]["window"]["values"] = values.to(torch.float64)
    clipper.load_state_dict(state)
    assert clipper.window.values.dtype == torch.float32
    assert torch.equal(clipper.window.values, values)
    too_large = torch.full((WINDOW,), 1e300, dtype=torch.float64)  # inf in float32
    state["state"]["window"]["values"] = too_large
    with pytest.raises(ValueError, match=r"NaN or inf among its valid entries \(in torch\.float32"):
        clipper.load_state_dict(state)
    assert torch.equal(clipper.window.values, values)


def _torch_load_calls(tree: ast.AST) -> Iterator[ast.Call]:
    """Calls of ``torch.load`` / ``torch.serialization.load``, under any imported alias."""
    aliases = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization")
        for alias in node.names
        if alias.name == "load"
    }
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name in ("torch.load", "torch.serialization.load") or name in aliases:
            yield node


def test_distclip_never_unpickles_arbitrary_objects() -> None:
    """distclip reads no checkpoint file itself; any torch.load must pass weights_only=True."""
    package = pathlib.Path(distclip.__file__).parent
    unsafe = []
    for source in sorted(package.rglob("*.py")):
        text = source.read_text(encoding="utf-8")
        assert "import pickle" not in text, source
        assert "from pickle" not in text, source
        for call in _torch_load_calls(ast.parse(text)):
            safe = any(
                kw.arg == "weights_only"
                and isinstance(kw.value, ast.Constant)
                and kw.value.value is True
                for kw in call.keywords
            )
            if not safe:
                unsafe.append(f"{source.relative_to(package)}:{call.lineno}")
    assert not unsafe, f"torch.load without weights_only=True at {unsafe}"


def test_the_snapshot_sees_a_load_that_went_ahead() -> None:
    """The table's 'nothing changed' check is not vacuous: a load that happens shows."""
    opt = _trained_optimizer()
    before = _snapshot(opt)
    state_dict = copy.deepcopy(opt.state_dict())
    _entry(state_dict)["state"]["window"]["values"][0] += 1.0  # only the window differs
    opt.load_state_dict(state_dict)
    with pytest.raises(AssertionError, match=r"\['window'\]\['values'\]: tensor bits changed"):
        _assert_same(before, _snapshot(opt))
    opt.load_state_dict(_poisoned(copy.deepcopy(opt.state_dict())))  # only the optimizer's part
    with pytest.raises(AssertionError, match=r"\['momentum_buffer'\]: tensor bits changed"):
        _assert_same(before, _snapshot(opt))
