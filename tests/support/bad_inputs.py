"""The table of bad inputs: every entry point refuses each with a typed error, before any change.

Two kinds of rows:

* :data:`OPTIONS`: a method and options that every entry point taking method options
  must refuse (:data:`ENTRY_POINTS`: ``ClippedOptimizer``, ``AutoClippedOptimizer`` for
  AutoClip's options, ``attach``, ``make_clipper``, the DeepSpeed config's section and
  ``distclip.deepspeed.initialize``, ``distclip.hf.attach``,
  ``distclip.accelerate.attach``, ``distclip.lightning.DistClipCallback``). ``match``
  is the message after the entry point's own prefix (the DeepSpeed section names
  itself), anchored at its start; a row may give an entry point its own message
  (``messages``) or run on some entry points only (``only``: the limits of DeepSpeed's
  section). ``method=None`` leaves the method out: each entry point's default
  (``autoclip``).
* :data:`CALLS`: one call on a target (see ``tests.support.targets``) that must raise
  ``error`` with a message matching ``match``: parameters, optimizer classes, state
  dicts loaded into optimizers and clippers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import distclip
from tests.support import internals
from tests.support.targets import (
    TARGETS,
    WARMUP,
    WINDOW,
    clipper_load_mutated,
    consumed,
    cpu_and_meta,
    frozen,
    load_from,
    load_mutated,
    load_whole,
    trained_optimizer,
)

#: Every entry point that takes a method and its options.
ENTRY_POINTS = (
    "ClippedOptimizer",
    "AutoClippedOptimizer",
    "attach",
    "make_clipper",
    "deepspeed.section",
    "deepspeed.initialize",
    "hf.attach",
    "accelerate.attach",
    "lightning.DistClipCallback",
)
#: The entry points that read the ``"distclip"`` section of a DeepSpeed config.
DEEPSPEED = frozenset({"deepspeed.section", "deepspeed.initialize"})

METHODS = (
    "agc, auto_clip, autoclip, coordinate_wise, layer_wise, linear_stoch_autoclip, "
    "linear_stoch_norm, norm, quadratic_stoch_autoclip, quadratic_stoch_norm, value, zclip"
)
COMMON = "norm_type, nonfinite, eps, foreach, check_every, check_first_step"
POSITIVE = r"must be a positive finite number"
SECTION_NOT_A_DICT = (
    r"the DeepSpeed config's 'distclip' section must be a dict \(a JSON object\) such as "
    r'\{"method": "autoclip", "q": 0\.1, "window": 200\}, got'
)
NORM_TYPE = r"norm_type must be a real number p \(0, negative, inf and -inf included\) or a string such as 'inf'"


@dataclass(frozen=True)
class BadOptions:
    """A method and options every entry point must refuse."""

    id: str
    method: str | None
    options: dict[str, Any]
    error: type[Exception]
    match: str
    #: Entry point -> its own ``(error, match)`` for this row.
    messages: dict[str, tuple[type[Exception], str]] = field(default_factory=dict)
    #: The entry points the row runs on (``None``: all of them).
    only: frozenset[str] | None = None
    #: The DeepSpeed section itself when it is not ``{"method": ..., **options}``.
    section: Any = None
    #: Whether ``match`` follows the entry point's prefix (False: the whole message).
    prefixed: bool = True

    def applies_to(self, entry: str) -> bool:
        """Whether the row runs on ``entry``."""
        if self.only is not None and entry not in self.only:
            return False
        return entry != "AutoClippedOptimizer" or self.method in (None, "autoclip")

    def expected(self, entry: str) -> tuple[type[Exception], str]:
        """The error type and message pattern of ``entry`` (without its prefix)."""
        return self.messages.get(entry, (self.error, self.match))


def _o(
    id: str,
    method: str | None,
    options: dict[str, Any],
    error: type[Exception],
    match: str,
    **kw: Any,
) -> BadOptions:
    return BadOptions(id, method, options, error, match, **kw)


_V, _T = ValueError, TypeError

# fmt: off
OPTIONS: list[BadOptions] = [
    # --- AutoClip's options (the default method)
    _o("q-above-range", None, {"q": 1.5}, _V, r"q must be in \[0, 1\], got 1\.5$"),
    _o("q-below-range", None, {"q": -0.1}, _V, r"q must be in \[0, 1\], got -0\.1$"),
    _o("q-nan", None, {"q": math.nan}, _V, r"q must be in \[0, 1\], got nan$"),
    _o("q-string", None, {"q": "0.1"}, _T, r"q must be a real number in \[0, 1\], got '0\.1'$"),
    _o("q-bool", None, {"q": True}, _T, r"q must be a real number in \[0, 1\], got True$"),
    _o("window-zero", None, {"window": 0}, _V, r"window must be an integer >= 1, got 0$"),
    _o("window-negative", "autoclip", {"window": -5}, _V, r"window must be an integer >= 1, got -5$"),
    _o("window-float", None, {"window": 2.5}, _T, r"window must be an integer >= 1, got 2\.5$"),
    _o("window-integral-float", None, {"window": 200.0}, _T, r"window must be an integer >= 1, got 200\.0$"),
    _o("window-bool", None, {"window": True}, _T, r"window must be an integer >= 1, got True$"),
    _o("max-norm-zero", None, {"max_norm": 0.0}, _V, rf"max_norm {POSITIVE} or None \(0 < max_norm < inf\), got 0\.0$"),
    _o("max-norm-negative", None, {"max_norm": -1.0}, _V, rf"max_norm {POSITIVE} or None \(0 < max_norm < inf\), got -1\.0$"),
    _o("max-norm-negative-int", "autoclip", {"max_norm": -1}, _V, rf"max_norm {POSITIVE} or None \(0 < max_norm < inf\), got -1$"),
    _o("max-norm-inf", None, {"max_norm": math.inf}, _V, rf"max_norm {POSITIVE} or None \(0 < max_norm < inf\), got inf$"),
    _o("max-norm-nan", None, {"max_norm": math.nan}, _V, rf"max_norm {POSITIVE} or None \(0 < max_norm < inf\), got nan$"),
    _o("max-norm-string", None, {"max_norm": "5"}, _T, rf"max_norm {POSITIVE} or None, got '5'$"),
    _o("max-norm-tensor", None, {"max_norm": torch.tensor(1.0)}, _T, rf"max_norm {POSITIVE} or None, got tensor\(1\.\)$"),
    _o("min-norm-zero", None, {"min_norm": 0}, _V, rf"min_norm {POSITIVE} or None \(0 < min_norm < inf\), got 0$"),
    _o("min-norm-above-max-norm", None, {"max_norm": 2.0, "min_norm": 3.0}, _V, r"min_norm must not exceed max_norm, got min_norm=3\.0 > max_norm=2\.0$"),
    _o("unknown-option", None, {"quantile": 0.1}, _T, rf"method 'autoclip' got unknown option\(s\) 'quantile'; valid options: {COMMON}, q, window, max_norm, min_norm$"),
    _o("unknown-options", "autoclip", {"history_length": 10, "clip": 1}, _T, r"method 'autoclip' got unknown option\(s\) 'clip', 'history_length'; valid options: "),
    # --- options every method takes
    _o("norm-type-nan", None, {"norm_type": math.nan}, _V, rf"{NORM_TYPE}; NaN is not a norm type, got nan$"),
    _o("norm-type-string", None, {"norm_type": "fro"}, _V, rf"{NORM_TYPE}, got 'fro'$"),
    _o("norm-type-none", None, {"norm_type": None}, _T, rf"{NORM_TYPE}, got None$"),
    _o("norm-type-bool", None, {"norm_type": True}, _T, rf"{NORM_TYPE}, got True$"),
    _o("nonfinite-unknown", None, {"nonfinite": "ignore"}, _V, r"nonfinite must be one of 'skip', 'error'; got 'ignore'$"),
    _o("nonfinite-bool", None, {"nonfinite": False}, _T, r"nonfinite must be a string, one of 'skip', 'error'; got False$"),
    _o("eps-negative", "norm", {"eps": -1e-6}, _V, r"eps must be a finite number >= 0 \(0 <= eps < inf\), got -1e-06$"),
    _o("eps-negative-autoclip", None, {"eps": -1e-6}, _V, r"eps must be a finite number >= 0 \(0 <= eps < inf\), got -1e-06$"),
    _o("eps-string", "norm", {"eps": "1e-6"}, _T, r"eps must be a finite number >= 0 \(a real number\), got '1e-6'$"),
    _o("foreach-int", None, {"foreach": 1}, _T, r"foreach must be True, False or None, got 1$"),
    _o("check-every-negative", None, {"check_every": -1}, _V, r"check_every must be an integer >= 0, got -1$"),
    # --- the method
    _o("method-unknown", "autoclipp", {}, _V, rf"unknown clipping method 'autoclipp'; valid methods: {METHODS}$"),
    _o(
        "method-not-a-string", 3, {}, _T, rf"method must be a string, one of: {METHODS}; got 3$",  # type: ignore[arg-type]
        messages={
            "deepspeed.section": (_T, r"method must be a string, got 3$"),
            "deepspeed.initialize": (_T, r"method must be a string, got 3$"),
            "accelerate.attach": (_T, r"method must be a string such as 'autoclip', got 3$"),
            "hf.attach": (_T, r"method must be a string such as 'autoclip', got 3$"),
        },
    ),
    # --- the other methods' options
    _o("norm-option-of-another-method", "norm", {"q": 0.5}, _T, rf"method 'norm' got unknown option\(s\) 'q'; valid options: {COMMON}, max_norm$"),
    _o("norm-max-norm-none", "norm", {"max_norm": None}, _T, rf"max_norm {POSITIVE}, got None$"),
    _o("norm-max-norm-zero", "norm", {"max_norm": 0}, _V, rf"max_norm {POSITIVE} \(0 < max_norm < inf\), got 0$"),
    _o("zclip-alpha-one", "zclip", {"alpha": 1.0}, _V, r"alpha must be in \(0, 1\), got 1\.0$"),
    _o("zclip-mode-unknown", "zclip", {"mode": "clip"}, _V, r"mode must be one of 'adaptive_scaling', 'mean'; got 'clip'$"),
    _o("zclip-mode-int", "zclip", {"mode": 1}, _T, r"mode must be a string, one of 'adaptive_scaling', 'mean'; got 1$"),
    _o("zclip-z-thresh-zero", "zclip", {"z_thresh": 0}, _V, rf"z_thresh {POSITIVE} \(0 < z_thresh < inf\), got 0$"),
    _o("zclip-warmup-zero", "zclip", {"warmup_steps": 0}, _V, r"warmup_steps must be an integer >= 1, got 0$"),
    _o("zclip-option-of-another-method", "zclip", {"window": 10}, _T, rf"method 'zclip' got unknown option\(s\) 'window'; valid options: {COMMON}, alpha, z_thresh, warmup_steps, max_norm, mode$"),
    _o("stochastic-beta-zero", "linear_stoch_norm", {"beta": 0.0}, _V, r"beta must be in \(0, 1\] \(0 would never clip\), got 0\.0$"),
    _o("stochastic-beta-above-one", "quadratic_stoch_norm", {"beta": 1.5}, _V, r"beta must be in \(0, 1\] \(0 would never clip\), got 1\.5$"),
    _o("stochastic-beta-string", "linear_stoch_autoclip", {"beta": "0.5"}, _T, r"beta must be a real number in \(0, 1\], got '0\.5'$"),
    _o("stochastic-seed-negative", "quadratic_stoch_autoclip", {"seed": -1}, _V, r"seed must be an integer >= 0, got -1$"),
    _o("stochastic-seed-negative-norm", "linear_stoch_norm", {"seed": -1}, _V, r"seed must be an integer >= 0, got -1$"),
    _o("stochastic-q-above-range", "quadratic_stoch_autoclip", {"q": 2}, _V, r"q must be in \[0, 1\], got 2$"),
    _o("agc-clip-factor-zero", "agc", {"clip_factor": 0}, _V, rf"clip_factor {POSITIVE} \(0 < clip_factor < inf\), got 0$"),
    _o("agc-clip-factor-negative", "agc", {"clip_factor": -1.0}, _V, rf"clip_factor {POSITIVE} \(0 < clip_factor < inf\), got -1\.0$"),
    _o("agc-option-of-another-method", "agc", {"q": 0.1}, _T, rf"method 'agc' got unknown option\(s\) 'q'; valid options: {COMMON}, clip_factor$"),
    _o("value-clip-value-zero", "value", {"clip_value": 0}, _V, rf"clip_value {POSITIVE} \(0 < clip_value < inf\), got 0$"),
    _o("value-option-of-another-method", "value", {"max_norm": 1.0}, _T, rf"method 'value' got unknown option\(s\) 'max_norm'; valid options: {COMMON}, clip_value$"),
    _o("coordinate-wise-clip-value-negative", "coordinate_wise", {"clip_value": -1.0}, _V, rf"clip_value {POSITIVE} \(0 < clip_value < inf\), got -1\.0$"),
    _o("layer-wise-max-norm-inf", "layer_wise", {"max_norm": math.inf}, _V, rf"max_norm {POSITIVE} \(0 < max_norm < inf\), got inf$"),
    _o("layer-wise-max-norm-zero", "layer_wise", {"max_norm": 0.0}, _V, rf"max_norm {POSITIVE} \(0 < max_norm < inf\), got 0\.0$"),
    # --- what only DeepSpeed's section refuses: its shape, DeepSpeed's L2 norm and eps
    _o("section-list", None, {}, _T, rf"{SECTION_NOT_A_DICT} list \['autoclip'\]$", only=DEEPSPEED, section=["autoclip"], prefixed=False),
    _o("section-string", None, {}, _T, rf"{SECTION_NOT_A_DICT} str 'autoclip'$", only=DEEPSPEED, section="autoclip", prefixed=False),
    _o("section-int", None, {}, _T, rf"{SECTION_NOT_A_DICT} int 3$", only=DEEPSPEED, section=3, prefixed=False),
    _o("section-norm-type-1", None, {"norm_type": 1.0}, _V, r"norm_type must be 2 under DeepSpeed \(DeepSpeed computes the L2 norm\), got 1\.0$", only=DEEPSPEED),
    _o("section-layer-wise-norm-type-1", "layer_wise", {"max_norm": 1.0, "norm_type": 1.0}, _V, r"norm_type must be 2 under DeepSpeed", only=DEEPSPEED),
    _o("section-value-norm-type-1", "value", {"norm_type": 1.0}, _V, r"norm_type must be 2 under DeepSpeed", only=DEEPSPEED),
    _o("section-eps", None, {"eps": 1e-8}, _V, r"eps must be 1e-06 under DeepSpeed \(DeepSpeed's clip coefficient .* has it built in\), got 1e-08$", only=DEEPSPEED),
]
# fmt: on


# ------------------------------------------------------------------ one-call rows
@dataclass(frozen=True)
class BadCall:
    """``call(target)`` must raise ``error`` with a message matching ``match``, changing nothing."""

    id: str
    target: str
    call: Callable[[Any], object]
    error: type[Exception]
    match: str


SGD = torch.optim.SGD


def _params() -> Any:
    from tests.support.targets import TARGET_PROBLEM

    return TARGET_PROBLEM.model().parameters()


def _of_method(method: str, **options: Any) -> Callable[[], torch.optim.Optimizer]:
    return lambda: trained_optimizer(distclip.ClippedOptimizer(SGD, method=method, **options))


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], object]:
    return lambda d: d.update({key: value})


def _drop(key: str) -> Callable[[dict[str, Any]], object]:
    return lambda d: d.pop(key)


def _set_window(key: str, value: Any) -> Callable[[dict[str, Any]], object]:
    return lambda entry: entry["state"]["window"].update({key: value})


def _set_zclip(key: str, value: Any) -> Callable[[dict[str, Any]], object]:
    return lambda entry: entry["state"].update({key: value})


_ALREADY = r"this optimizer already clips its gradients with distclip; remove the first clipper"
_NOT_A_DICT = (
    r"the optimizer state_dict must be a dict \(what optimizer\.state_dict\(\) returns\), got list$"
)
_ITERABLE = r"params must be an iterable of tensors or of param-group dicts, got"
_WINDOW_VALUES = r"window 'values' must be a floating-point tensor of shape \(5,\)"

# fmt: off
CALLS: list[BadCall] = [
    # --- the factories' optimizer class
    BadCall("optimizer-cls-instance", "plain", lambda opt: distclip.AutoClippedOptimizer(opt), _T, r"^optimizer_cls must be a subclass of torch\.optim\.Optimizer, got SGD \("),
    BadCall("optimizer-cls-module-class", "none", lambda _: distclip.AutoClippedOptimizer(torch.nn.Linear), _T, r"^optimizer_cls must be a subclass of torch\.optim\.Optimizer"),
    BadCall("optimizer-cls-object", "none", lambda _: distclip.AutoClippedOptimizer(object), _T, r"^optimizer_cls must be a subclass of torch\.optim\.Optimizer"),  # type: ignore[arg-type]
    BadCall("optimizer-cls-string", "none", lambda _: distclip.AutoClippedOptimizer("SGD"), _T, r"^optimizer_cls must be a subclass of torch\.optim\.Optimizer"),  # type: ignore[arg-type]
    BadCall("optimizer-cls-already-clips", "none", lambda _: distclip.AutoClippedOptimizer(distclip.AutoClippedOptimizer(SGD)), _V, r"^AutoClippedSGD already clips its gradients; pass its base class SGD instead$"),
    # --- the constructed optimizer, with bad parameters
    BadCall("optimizer-consumed-generator", "none", lambda _: distclip.AutoClippedOptimizer(SGD)(consumed(), lr=0.1), _V, r"^optimizer got an empty parameter list$"),
    BadCall("optimizer-params-do-not-require-grad", "none", lambda _: distclip.AutoClippedOptimizer(SGD)(frozen(), lr=0.1), _V, r"^none of the 2 parameters requires grad, .*set requires_grad=True"),
    BadCall("optimizer-cpu-and-meta-params", "none", lambda _: distclip.AutoClippedOptimizer(SGD)(cpu_and_meta(), lr=0.1), _V, r"^parameter 1 of 2 \(shape \(2, 3\)\) is on the meta device: it holds no data"),
    BadCall("optimizer-single-tensor", "none", lambda _: distclip.AutoClippedOptimizer(SGD)(torch.zeros(2, requires_grad=True), lr=0.1), _T, r"params argument given to the optimizer should be an iterable of Tensors or dicts"),
    BadCall("optimizer-model-not-a-module", "none", lambda _: distclip.AutoClippedOptimizer(SGD)(_params(), lr=0.1, model="m"), _T, r"^model must be a torch\.nn\.Module, got str$"),
    # --- attach(optimizer, ...)
    BadCall("attach-not-an-optimizer", "none", lambda _: distclip.attach(torch.nn.Linear(2, 2)), _T, r"^optimizer must be a torch\.optim\.Optimizer or a wrapper exposing one as \.optimizer, got Linear$"),  # type: ignore[arg-type]
    BadCall("attach-twice", "attached", lambda opt: distclip.attach(opt, method="norm"), _V, rf"^{_ALREADY}"),
    BadCall("attach-to-a-clipped-optimizer", "optimizer", lambda opt: distclip.attach(opt), _V, r"^this optimizer \(AutoClippedSGD\) already clips its gradients: it was built by distclip\.ClippedOptimizer"),
    BadCall("attach-params-do-not-require-grad", "none", lambda _: distclip.attach(SGD(frozen(), lr=0.1)), _V, r"^none of the 2 parameters requires grad"),
    BadCall("attach-cpu-and-meta-params", "none", lambda _: distclip.attach(SGD(cpu_and_meta(), lr=0.1)), _V, r"^parameter 1 of 2 \(shape \(2, 3\)\) is on the meta device"),
    # --- make_clipper and the clipper classes
    BadCall("make-clipper-consumed-generator", "none", lambda _: distclip.make_clipper("autoclip", consumed()), _V, r"^params is empty: .*generator such as model\.parameters\(\) already consumed"),
    BadCall("make-clipper-cpu-and-meta-params", "none", lambda _: distclip.make_clipper("autoclip", cpu_and_meta()), _V, r"meta device"),
    BadCall("clipper-consumed-generator", "none", lambda _: distclip.AutoClip(consumed()), _V, r"^params is empty: .*generator"),
    BadCall("clipper-single-tensor", "none", lambda _: distclip.AutoClip(torch.zeros(2, requires_grad=True)), _T, rf"^{_ITERABLE} a single Tensor"),
    BadCall("clipper-single-tensor-no-grad", "none", lambda _: distclip.AutoClip(torch.zeros(2)), _T, rf"^{_ITERABLE} a single Tensor"),
    BadCall("clipper-params-hold-a-string", "none", lambda _: distclip.NormClip(["w"]), _T, r"^params must hold tensors, got str$"),  # type: ignore[list-item]
    BadCall("autoclip-params-hold-a-string", "none", lambda _: distclip.AutoClip(["w"]), _T, r"^params must hold tensors, got str$"),  # type: ignore[list-item]
    BadCall("clipper-params-none", "none", lambda _: distclip.AutoClip(None), _T, rf"^{_ITERABLE} NoneType"),  # type: ignore[arg-type]
    BadCall("clipper-param-group-without-params", "none", lambda _: distclip.AutoClip([{"lr": 0.1}]), _V, r"^a param-group dict needs a 'params' entry"),
    BadCall("clipper-from-config-of-another-method", "none", lambda _: distclip.NormClip.from_config(_params(), internals.config_class("autoclip")()), _T, r"^NormClip needs a NormClipConfig, got AutoClipConfig$"),
    BadCall("clipper-class-option-out-of-range", "none", lambda _: distclip.clippers.ZClip(_params(), warmup_steps=0), _V, r"^warmup_steps must be an integer >= 1, got 0$"),
    BadCall("window-size-zero", "none", lambda _: internals.NormWindow(0), _V, r"^window size must be an integer >= 1, got 0$"),
    # --- optimizer.load_state_dict with a bad clipper entry (ClippedOptimizer)
    BadCall("load-state-of-another-method", "optimizer", load_from(_of_method("norm")), _V, r"^the state_dict was saved by method 'norm' but this clipper is 'autoclip'; build the clipper with method='norm'"),
    BadCall("load-state-of-another-window-size", "optimizer", load_from(lambda: trained_optimizer(distclip.AutoClippedOptimizer(SGD, window=7))), _V, r"^the saved window holds 7 norms but this clipper's window is 5; build the clipper with window=7"),
    BadCall("load-format-version-too-new", "optimizer", load_mutated(_set("format_version", 99)), _V, r"^clipper state format_version 99 is not supported; this distclip reads versions 1 to 1$"),
    BadCall("load-format-version-bool", "optimizer", load_mutated(_set("format_version", True)), _V, r"format_version True is not supported"),
    BadCall("load-window-values-wrong-shape", "optimizer", load_mutated(_set_window("values", torch.zeros(7))), _V, rf"^{_WINDOW_VALUES}, got a torch\.float32 tensor of shape \(7,\)$"),
    BadCall("load-window-values-shorter", "optimizer", load_mutated(_set_window("values", torch.zeros(3))), _V, rf"^{_WINDOW_VALUES}, got a torch\.float32 tensor of shape \(3,\)$"),
    BadCall("load-window-values-integer-dtype", "optimizer", load_mutated(_set_window("values", torch.zeros(WINDOW, dtype=torch.int32))), _V, rf"^{_WINDOW_VALUES}, got a torch\.int32 tensor"),
    BadCall("load-window-num-seen-bool", "optimizer", load_mutated(_set_window("num_seen", torch.tensor(True))), _V, r"^window 'num_seen' must be a 0-dim integer tensor >= 0, got dtype torch\.bool$"),
    BadCall("load-window-num-seen-negative", "optimizer", load_mutated(_set_window("num_seen", torch.tensor(-1))), _V, r"^window 'num_seen' must be a 0-dim integer tensor >= 0, got -1$"),
    BadCall("load-window-values-nan", "optimizer", load_mutated(_set_window("values", torch.tensor([1.0, math.nan, 2.0, 3.0, 4.0]))), _V, r"^window 'values' holds a NaN or inf among its valid entries"),
    BadCall("load-window-values-on-meta", "optimizer", load_mutated(_set_window("values", torch.zeros(WINDOW, device="meta"))), _V, r"^window 'values' is on the meta device and holds no data"),
    BadCall("load-window-size-not-int", "optimizer", load_mutated(_set_window("size", float(WINDOW))), _V, r"^the saved window 'size' must be an int >= 1, got 5\.0$"),
    BadCall("load-num-steps-negative", "optimizer", load_mutated(_set("num_steps", -3)), _V, r"^num_steps must be an int >= 0, got -3$"),
    BadCall("load-num-skipped-negative", "optimizer", load_mutated(_set("num_skipped", torch.tensor(-1))), _V, r"^num_skipped must be a 0-dim integer tensor >= 0, got -1$"),
    BadCall("load-num-skipped-float", "optimizer", load_mutated(_set("num_skipped", 0.5)), _V, r"^num_skipped must be a 0-dim integer tensor"),
    BadCall("load-num-clipped-on-meta", "optimizer", load_mutated(_set("num_clipped", torch.zeros((), dtype=torch.long, device="meta"))), _V, r"^num_clipped is on the meta device"),
    BadCall("load-missing-num-clipped", "optimizer", load_mutated(_drop("num_clipped")), _V, r"^num_clipped must be a 0-dim integer tensor"),
    BadCall("load-missing-window", "optimizer", load_mutated(lambda entry: entry["state"].pop("window")), _V, r"^an autoclip state must hold a 'window' dict, got None$"),
    BadCall("load-missing-window-values", "optimizer", load_mutated(lambda entry: entry["state"]["window"].pop("values")), _V, r"^the window state misses 'values'"),
    BadCall("load-missing-state", "optimizer", load_mutated(_drop("state")), _V, r"^the method state must be a dict, got NoneType$"),
    BadCall("load-state-not-a-dict", "optimizer", load_mutated(_set("state", [])), _V, r"^the method state must be a dict, got list$"),
    BadCall("load-clipper-entry-not-a-dict", "optimizer", load_whole(lambda sd: sd["param_groups"][0].update(distclip=[1, 2])), _T, r"^a clipper state_dict must be a dict, got list$"),
    BadCall("load-state-dict-not-a-dict", "optimizer", lambda opt: opt.load_state_dict([opt.state_dict()]), _T, rf"^{_NOT_A_DICT}"),
    BadCall("load-optimizer-part-mismatch", "optimizer", load_whole(lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))), _V, r"^loaded state dict has a different number of parameter groups$"),
    # --- optimizer.load_state_dict through attach's hooks
    BadCall("attached-load-state-of-another-method", "attached", load_from(_of_method("zclip", warmup_steps=WARMUP)), _V, r"^the state_dict was saved by method 'zclip' but this clipper is 'autoclip'"),
    BadCall("attached-load-window-values-wrong-shape", "attached", load_mutated(_set_window("values", torch.zeros(WINDOW, 2))), _V, rf"^{_WINDOW_VALUES}"),
    BadCall("attached-load-state-dict-not-a-dict", "attached", lambda opt: opt.load_state_dict([opt.state_dict()]), _T, rf"^{_NOT_A_DICT}"),
    # --- clipper.load_state_dict
    BadCall("clipper-load-not-a-dict", "autoclip", lambda clipper: clipper.load_state_dict(None), _T, r"^a clipper state_dict must be a dict, got NoneType$"),
    BadCall("clipper-load-format-version-missing", "autoclip", clipper_load_mutated(_drop("format_version")), _V, r"^clipper state format_version None is not supported; this distclip reads versions 1 to 1$"),
    BadCall("clipper-load-window-num-seen-float", "autoclip", clipper_load_mutated(lambda sd: sd["state"]["window"].update(num_seen=torch.tensor(2.0))), _V, r"^window 'num_seen' must be a 0-dim integer tensor >= 0, got dtype torch\.float32$"),
    BadCall("clipper-load-num-steps-bool", "autoclip", clipper_load_mutated(_set("num_steps", True)), _V, r"^num_steps must be an int >= 0, got True$"),
    BadCall("clipper-load-num-skipped-bool", "autoclip", clipper_load_mutated(_set("num_skipped", torch.tensor(True))), _V, r"^num_skipped must be a 0-dim integer tensor >= 0, got dtype torch\.bool$"),
    BadCall("zclip-load-state-of-autoclip", "zclip", lambda clipper: clipper.load_state_dict(TARGETS["autoclip"]().state_dict()), _V, r"^the state_dict was saved by method 'autoclip' but this clipper is 'zclip'"),
    BadCall("zclip-load-warmup-of-another-size", "zclip", clipper_load_mutated(_set_zclip("warmup_norms", torch.zeros(WARMUP + 1))), _V, r"^a zclip state needs 'warmup_norms' as a tensor of shape \(3,\) \(warmup_steps=3\)"),
    BadCall("zclip-load-mean-integer-dtype", "zclip", clipper_load_mutated(_set_zclip("mean", torch.tensor(1))), _V, r"^zclip 'mean' must be a floating-point tensor, got torch\.int64$"),
    BadCall("zclip-load-num-seen-bool", "zclip", clipper_load_mutated(_set_zclip("num_seen", torch.tensor(True))), _V, r"^zclip 'num_seen' must be an integer tensor, got torch\.bool$"),
    BadCall("zclip-load-var-negative", "zclip", clipper_load_mutated(_set_zclip("var", torch.tensor(-1.0))), _V, r"^zclip 'var' must be >= 0, got -1\.0$"),
    BadCall("zclip-load-mean-nan", "zclip", clipper_load_mutated(_set_zclip("mean", torch.tensor(math.nan))), _V, r"^a zclip state must hold finite numbers .*'mean', 'var'"),
]
# fmt: on
