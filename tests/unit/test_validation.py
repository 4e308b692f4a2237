"""Every bad input raises a typed error naming the argument, before anything changes."""

from __future__ import annotations

import math

import pytest
import torch

import distclip

SGD = torch.optim.SGD


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"q": -0.1}, ValueError, r"q must be in \[0, 1\]"),
        ({"q": 1.5}, ValueError, r"q must be in \[0, 1\]"),
        ({"q": math.nan}, ValueError, r"q must be in \[0, 1\]"),
        ({"q": "0.1"}, TypeError, r"q must be a real number in \[0, 1\]"),
        ({"q": True}, TypeError, "q must be"),
        ({"window": 0}, ValueError, "window must be an integer >= 1"),
        ({"window": -5}, ValueError, "window must be an integer >= 1"),
        ({"window": 2.5}, TypeError, "window must be an integer >= 1"),
        ({"window": 200.0}, TypeError, "window must be an integer >= 1"),
        ({"window": True}, TypeError, "window must be an integer >= 1"),
        ({"max_norm": 0.0}, ValueError, "max_norm must be a positive finite number"),
        ({"max_norm": -1}, ValueError, "max_norm must be a positive finite number"),
        ({"max_norm": math.inf}, ValueError, "max_norm must be a positive finite number"),
        ({"max_norm": math.nan}, ValueError, "max_norm must be a positive finite number"),
        ({"max_norm": "5"}, TypeError, "max_norm must be a positive finite number"),
        ({"min_norm": 0}, ValueError, "min_norm must be a positive finite number"),
        ({"min_norm": 3.0, "max_norm": 2.0}, ValueError, "min_norm must not exceed max_norm"),
        ({"norm_type": math.nan}, ValueError, "NaN is not a norm type"),
        ({"norm_type": "fro"}, ValueError, "norm_type must be a real number"),
        ({"norm_type": None}, TypeError, "norm_type must be a real number"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite must be one of 'skip', 'error'"),
        ({"eps": -1e-6}, ValueError, "eps must be a finite number >= 0"),
        ({"foreach": 1}, TypeError, "foreach must be True, False or None"),
        ({"check_every": -1}, ValueError, "check_every must be an integer >= 0"),
        ({"quantile": 0.1}, TypeError, r"unknown option\(s\) 'quantile'; valid options: .*\bq\b"),
        (
            {"history_length": 10, "clip": 1},
            TypeError,
            r"unknown option\(s\) 'clip', 'history_length'",
        ),
    ],
)
def test_bad_autoclip_options(
    options: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        distclip.ClippedOptimizer(SGD, method="autoclip", **options)
    with pytest.raises(error, match=match):
        distclip.AutoClip([torch.zeros(1, requires_grad=True)], **options)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"max_norm": 0}, ValueError, "max_norm must be a positive finite number"),
        ({"max_norm": None}, TypeError, "max_norm must be a positive finite number"),
        ({"q": 0.5}, TypeError, r"method 'norm' got unknown option\(s\) 'q'"),
    ],
)
def test_bad_norm_options(options: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        distclip.ClippedOptimizer(SGD, method="norm", **options)


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown clipping method 'autoclipp'; valid methods: agc, auto_clip, autoclip, coordinate_wise, layer_wise",
    ):
        distclip.ClippedOptimizer(SGD, method="autoclipp")
    with pytest.raises(ValueError, match="unknown clipping method"):
        distclip.make_clipper("zclipp", [torch.zeros(1)])


@pytest.mark.parametrize(
    "bad", [torch.nn.Linear, object, "SGD", SGD([torch.zeros(1, requires_grad=True)], lr=0.1)]
)
def test_optimizer_cls_must_be_an_optimizer_class(bad: object) -> None:
    with pytest.raises(
        TypeError, match=r"optimizer_cls must be a subclass of torch\.optim\.Optimizer"
    ):
        distclip.AutoClippedOptimizer(bad)  # type: ignore[arg-type]


def test_clipping_a_clipped_class_twice_is_refused() -> None:
    cls = distclip.AutoClippedOptimizer(SGD)
    with pytest.raises(ValueError, match="already clips its gradients; pass its base class SGD"):
        distclip.AutoClippedOptimizer(cls)


def test_bad_params() -> None:
    params = (p for p in [torch.zeros(2, requires_grad=True)])
    list(params)
    with pytest.raises(ValueError, match=r"params is empty.*generator"):
        distclip.AutoClip(params)
    with pytest.raises(TypeError, match="single Tensor"):
        distclip.AutoClip(torch.zeros(2))
    with pytest.raises(TypeError, match="params must hold tensors, got str"):
        distclip.AutoClip(["w"])  # type: ignore[list-item]


def test_attach_needs_an_optimizer() -> None:
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        distclip.attach(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def _trained(cls, window: int = 5):  # type: ignore[no-untyped-def]
    model = torch.nn.Linear(3, 1)
    opt = cls(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    return opt


def _entry(state_dict):  # type: ignore[no-untyped-def]
    return state_dict["param_groups"][0]["distclip"]


@pytest.mark.parametrize(
    ("source", "error", "match"),
    [
        (
            lambda: _trained(distclip.AutoClippedOptimizer(SGD, window=7)).state_dict(),
            ValueError,
            "window=7",
        ),
        (
            lambda: _trained(distclip.ClippedOptimizer(SGD, method="norm")).state_dict(),
            ValueError,
            "saved by method 'norm'",
        ),
        (
            lambda: _with(lambda e: e.update(format_version=99)),
            ValueError,
            "format_version 99 is not supported",
        ),
        (
            lambda: _with(lambda e: e.update(num_steps=-3)),
            ValueError,
            "num_steps must be an int >= 0",
        ),
        (
            lambda: _with(lambda e: e["state"]["window"].update(values=torch.zeros(3))),
            ValueError,
            r"shape \(5,\)",
        ),
        (lambda: _with(lambda e: e.update(state=[])), ValueError, "method state must be a dict"),
        (
            lambda: _with(lambda e: e.update(num_skipped=0.5)),
            ValueError,
            "num_skipped must be a 0-dim integer tensor",
        ),
    ],
)
def test_bad_state_dict_is_refused_before_anything_loads(source, error, match) -> None:  # type: ignore[no-untyped-def]
    opt = _trained(distclip.AutoClippedOptimizer(SGD, window=5))
    before = {
        k: (v.clone() if isinstance(v, torch.Tensor) else v)
        for k, v in opt.clipper.window.state_dict().items()
    }
    lr_before = opt.param_groups[0]["lr"]
    bad = source()
    bad["param_groups"][0]["lr"] = 123.0
    with pytest.raises(error, match=match):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == lr_before  # the optimizer did not load either
    assert torch.equal(opt.clipper.window.values, before["values"])
    assert torch.equal(opt.clipper.window.num_seen, before["num_seen"])


def _with(mutate):  # type: ignore[no-untyped-def]
    state_dict = _trained(distclip.AutoClippedOptimizer(SGD, window=5)).state_dict()
    mutate(_entry(state_dict))
    return state_dict


def test_state_dict_without_clipper_state_keeps_the_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    opt = _trained(distclip.AutoClippedOptimizer(SGD, window=5))
    plain = SGD(torch.nn.Linear(3, 1).parameters(), lr=0.5)
    before = opt.clipper.window.values.clone()
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["lr"] == 0.5
    assert torch.equal(opt.clipper.window.values, before)
    assert "has no clipper state" in caplog.text
