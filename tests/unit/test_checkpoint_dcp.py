"""The clipper's state through torch.distributed.checkpoint (get/set_state_dict, save/load)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import distclip

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(8, 5, generator=gen),
            torch.randn(8, 2, generator=gen) * (1 + 10 * (i % 5 == 0)),
        )
        for i in range(steps)
    ]


def _train(model, opt, batches):  # type: ignore[no-untyped-def]
    out = []
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        out.append(torch.stack([opt.last_clip.threshold, opt.last_clip.clip_coef]).clone())
    return out


@pytest.mark.parametrize(
    ("make_opt", "label"),
    [
        (
            lambda m: distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.3, window=6)(
                m.parameters(), lr=0.05
            ),
            "sgd",
        ),
        (
            lambda m: distclip.ClippedOptimizer(torch.optim.SGD, method="zclip", warmup_steps=3)(
                m.parameters(), lr=0.05
            ),
            "zclip",
        ),
        (
            lambda m: distclip.ClippedOptimizer(
                torch.optim.SGD, method="quadratic_stoch_autoclip", q=0.3, window=5, seed=4
            )(m.parameters(), lr=0.05, momentum=0.9),
            "stoch-autoclip",
        ),
        (
            lambda m: distclip.ClippedOptimizer(
                torch.optim.SGD, method="linear_stoch_norm", max_norm=0.5, seed=4
            )(m.parameters(), lr=0.05),
            "stoch-norm",
        ),
        (
            lambda m: distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.3, window=6)(
                m.parameters(), lr=1e-2, fused=True
            ),
            "adamw",
        ),
        (lambda m: _attached(torch.optim.Adam(m.parameters(), lr=1e-2)), "attached"),
    ],
)
def test_dcp_round_trip_resumes_exactly(tmp_path: Path, make_opt, label: str) -> None:  # type: ignore[no-untyped-def]
    batches = _batches(20)
    model = _model()
    opt = make_opt(model)
    _train(model, opt, batches[:8])
    opt.zero_grad(set_to_none=True)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / label))
    expected = _train(model, opt, batches[8:])

    model2 = _model(seed=11)
    opt2 = make_opt(model2)
    # DCP initialises a fresh optimizer's state with a fake step; it must not enter the window.
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    assert optim_sd2["param_groups"][0]["distclip"]["num_steps"] == 0
    state = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(state, checkpoint_id=str(tmp_path / label))
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    got = _train(model2, opt2, batches[8:])
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def _attached(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    distclip.attach(opt, q=0.3, window=6)
    return opt


def test_dcp_fake_step_does_not_touch_the_window() -> None:
    model = _model()
    opt = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.3, window=4)(
        model.parameters(), lr=0.05
    )
    for _ in range(3):
        get_state_dict(model, opt)  # SGD without momentum has no state: DCP fake-steps every time
    assert int(opt.clipper.window.num_seen) == 0
    assert opt.clipper.num_steps == 0
    assert all(p.grad is None for p in model.parameters())
