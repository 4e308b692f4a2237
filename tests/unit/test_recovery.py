"""A step that raised after distclip hid a NaN step's gradients, then a good step.

``attach``'s step pre-hook hides the gradients of a NaN/inf step from a non-fused
optimizer (it cannot bypass the update), and its post-hook puts them back. When the
optimizer's step raises in between, the post-hook never runs; the next step has new
gradients of its own. Putting the hidden (NaN) gradients back then would overwrite
them: the good step must update from its own gradients, exactly as a run that never
saw the failed step.
"""

from __future__ import annotations

import math

import pytest
import torch

import distclip


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def _backward(model: torch.nn.Module, seed: int, *, nan: bool = False) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=gen)
    loss = model(x).pow(2).mean() * (math.nan if nan else 1.0)
    loss.backward()


class _Failure(RuntimeError):
    pass


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_good_step_after_a_failed_nan_step_uses_its_own_gradients(momentum: float) -> None:
    model, twin = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=momentum)
    distclip.attach(opt, "autoclip", q=0.5, window=4)
    distclip.attach(ref, "autoclip", q=0.5, window=4)
    for seed in range(3):  # the same good steps on both
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            _backward(m, seed)
            o.step()

    # A NaN step whose update raises after distclip's pre-hook hid the gradients.
    def fail(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        raise _Failure("the optimizer's step failed")

    failing = opt.register_step_pre_hook(fail)
    opt.zero_grad(set_to_none=False)
    _backward(model, 99, nan=True)
    with pytest.raises(_Failure):
        opt.step()
    failing.remove()
    assert all(p.grad is None for p in model.parameters())  # hidden, never put back
    assert bool(distclip.get_clipper(opt).last_stats.skipped)  # type: ignore[union-attr]

    # The next steps: new gradients, the same as the twin's.
    for seed in range(3, 6):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            _backward(m, seed)
            o.step()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.isfinite(p).all()
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    thresholds = distclip.get_clipper(opt).last_stats.threshold  # type: ignore[union-attr]
    assert torch.equal(thresholds, distclip.get_clipper(ref).last_stats.threshold)  # type: ignore[union-attr]
    assert "found_inf" not in opt.__dict__
