"""The seed's AutoClippedOptimizer API and the instance API, against a manual reference."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import distclip
from tests.support.reference import SlowAutoClip, norm_of

FLAVOURS = [
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "fused": True}),
    (torch.optim.Adam, {"lr": 1e-2, "foreach": True}),
    (torch.optim.Adam, {"lr": 1e-2, "fused": True}),
    (torch.optim.AdamW, {"lr": 1e-2, "foreach": False}),
    (torch.optim.AdamW, {"lr": 1e-2, "foreach": True}),
    (torch.optim.AdamW, {"lr": 1e-2, "fused": True}),
]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batches(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        noise = torch.distributions.StudentT(1.2).sample((16, 1))
        out.append((x, x[:, :1] * 2 + noise))
    return out


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _reference_run(opt_cls, kwargs, batches, q=0.2, window=6):  # type: ignore[no-untyped-def]
    model = _model()
    opt = opt_cls(model.parameters(), **kwargs)
    clip = SlowAutoClip(q=q, window=window)
    thresholds = []
    for batch in batches:
        opt.zero_grad()
        _loss(model, batch).backward()
        grads = [p.grad for p in model.parameters()]
        tau, coef = clip.coefficient(norm_of(grads))
        for g in grads:
            g.mul_(coef)
        opt.step()
        thresholds.append(tau)
    return model, thresholds


@pytest.mark.parametrize(("opt_cls", "kwargs"), FLAVOURS)
def test_every_flavour_matches_manual_clipping(opt_cls, kwargs) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(123)
    batches = _batches(25)
    torch.manual_seed(123)
    reference, thresholds = _reference_run(opt_cls, kwargs, batches)
    model = _model()
    opt = distclip.AutoClippedOptimizer(opt_cls, q=0.2, window=6)(model.parameters(), **kwargs)
    assert isinstance(opt, opt_cls)
    clipped = 0
    for batch, tau in zip(batches, thresholds, strict=True):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
        assert float(opt.last_clip.threshold) == pytest.approx(tau, rel=1e-6)
        clipped += bool(opt.last_clip.clip_coef < 1)
    assert clipped > 0
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_class_is_a_cached_named_subclass() -> None:
    cls = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.1, window=200, max_norm=None)
    assert cls.__name__ == "AutoClippedAdamW"
    assert issubclass(cls, torch.optim.AdamW)
    assert cls is distclip.AutoClippedOptimizer(torch.optim.AdamW)
    assert cls is distclip.ClippedOptimizer(
        torch.optim.AdamW, method="autoclip", q=0.1, window=200, max_norm=None
    )
    assert cls is distclip.ClippedOptimizer(torch.optim.AdamW, method="auto_clip")
    assert cls is not distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.2)
    assert (
        distclip.ClippedOptimizer(torch.optim.SGD, method="norm", max_norm=1.0).__name__
        == "NormClippedSGD"
    )


def test_seed_methods_exist_and_mean_what_the_seed_says() -> None:
    model = _model()
    opt = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.5, window=3)(
        model.parameters(), lr=0.1
    )
    assert list(opt._main_params()) == list(model.parameters())
    _loss(model, _batches(1)[0]).backward()
    norm = opt._get_grad_norm()
    assert norm.shape == ()
    assert float(norm) == pytest.approx(norm_of([p.grad for p in model.parameters()]), rel=1e-6)
    assert int(opt.clipper.window.num_seen) == 0  # _get_grad_norm changes nothing
    stats = opt._autoclip_gradients()
    assert stats is not None
    assert int(opt.clipper.window.num_seen) == 1
    opt.reset()
    assert int(opt.clipper.window.num_seen) == 0


def test_closure_is_evaluated_before_clipping() -> None:
    model = _model()
    opt = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.5, window=3)(
        model.parameters(), lr=0.1
    )
    batch = _batches(1)[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    fresh = _model()
    _loss(fresh, batch).backward()
    expected = norm_of([p.grad for p in fresh.parameters()])
    assert float(opt.last_clip.total_norm) == pytest.approx(expected, rel=1e-6)


def test_scheduler_zero_grad_add_param_group_and_hooks() -> None:
    model = _model()
    extra = torch.nn.Parameter(torch.ones(3))
    opt = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.5, window=4)(
        model.parameters(), lr=0.1
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    for i, batch in enumerate(_batches(3)):
        opt.zero_grad()
        loss = _loss(model, batch)
        if i == 2:
            loss = loss + (extra * 10).sum()
        loss.backward()
        opt.step()
        sched.step()
        if i == 1:
            opt.add_param_group({"params": [extra], "lr": 0.1})
    assert calls == ["pre", "post"] * 3  # hooks run exactly once per step
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert any(p is extra for p in opt.clipper.params)
    grads = [p.grad for p in model.parameters()] + [extra.grad]
    pre_clip = float(opt.last_clip.total_norm)
    expected = norm_of([g / float(opt.last_clip.clip_coef) for g in grads])
    assert pre_clip == pytest.approx(expected, rel=1e-5)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def _train(opt, model, batches):  # type: ignore[no-untyped-def]
    thresholds = []
    for batch in batches:
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
        thresholds.append(opt.last_clip.threshold.clone())
    return thresholds


def test_pickle_and_deepcopy_keep_clipping_state() -> None:
    batches = _batches(12)
    model = _model()
    opt = distclip.AutoClippedOptimizer(torch.optim.Adam, q=0.3, window=5)(
        model.parameters(), lr=1e-2
    )
    _train(opt, model, batches[:6])
    for clone_fn in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        clone = clone_fn(opt)
        assert type(clone) is type(opt)
        assert torch.equal(clone.clipper.window.values, opt.clipper.window.values)
        assert clone.clipper.window.values is not opt.clipper.window.values
        clone_params = [p for g in clone.param_groups for p in g["params"]]
        assert clone.clipper.params == clone_params  # the clipper follows the copy's params
    both = copy.deepcopy((model, opt))
    expected = _train(opt, model, batches[6:])
    got = _train(both[1], both[0], batches[6:])
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_piecewise_copies_step_like_the_original() -> None:
    """A piecewise clipper keeps its reported level as a tensor made once per device:
    a pickled or deep-copied optimizer makes its own and steps exactly like the original."""
    batches = _batches(10)
    model = _model()
    opt = distclip.ClippedOptimizer(torch.optim.Adam, method="layer_wise", max_norm=0.05)(
        model.parameters(), lr=1e-2
    )
    first = _train(opt, model, batches[:4])
    assert all(torch.equal(t, torch.tensor(0.05, dtype=t.dtype)) for t in first)
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    expected = _train(opt, model, batches[4:])
    for clone_model, clone_opt in copies:
        got = _train(clone_opt, clone_model, batches[4:])
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
        assert all(
            torch.equal(a, b)
            for a, b in zip(model.parameters(), clone_model.parameters(), strict=True)
        )
    assert int(opt.clipper.num_clipped) > 0  # the level bites on these batches


def test_state_dict_round_trip_resumes_exactly() -> None:
    batches = _batches(20)
    model = _model()
    opt = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.2, window=7)(
        model.parameters(), lr=1e-2, fused=True
    )
    _train(opt, model, batches[:9])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    expected = _train(opt, model, batches[9:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = _model(seed=5)
    opt2 = distclip.AutoClippedOptimizer(torch.optim.AdamW, q=0.2, window=7)(
        model2.parameters(), lr=1e-2, fused=True
    )
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optim"])
    assert "distclip" not in opt2.param_groups[0]  # kept out of the live groups
    got = _train(opt2, model2, batches[9:])
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    for p, r in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, r)


def test_attach_to_an_existing_optimizer_matches_the_subclass() -> None:
    batches = _batches(15)
    model_a, model_b = _model(), _model()
    opt_a = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.2, window=5)(
        model_a.parameters(), lr=0.05, momentum=0.9
    )
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.05, momentum=0.9)
    handle = distclip.attach(opt_b, q=0.2, window=5)
    expected = _train(opt_a, model_a, batches)
    got = _train(opt_b, model_b, batches)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    state = opt_b.state_dict()
    assert state["param_groups"][0]["distclip"]["method"] == "autoclip"
    with pytest.raises(ValueError, match="already clips"):
        distclip.attach(opt_b)
    handle.remove()
    assert "distclip" not in opt_b.state_dict()["param_groups"][0]
    before = opt_b.last_clip
    _train(opt_b, model_b, batches[:1])
    assert opt_b.last_clip is before  # detached: no more clipping


def test_attach_with_closure_and_nonfinite_skip() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    distclip.attach(opt, q=0.5, window=3)
    batch = _batches(1)[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(opt.last_clip.total_norm) > 0
    assert isinstance(loss, torch.Tensor)
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    values = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    (_loss(model, batch) * float("nan")).backward()
    opt.step()
    assert bool(opt.last_clip.skipped)
    for p, v in zip(model.parameters(), values, strict=True):
        assert torch.equal(p.detach(), v)
        assert p.grad is not None  # gradients are put back after the skipped step
        for key, value in state[p].items():
            assert torch.equal(opt.state[p][key], value)


def test_standalone_clipper_in_a_custom_loop() -> None:
    batches = _batches(10)
    model_a, model_b = _model(), _model()
    opt_a = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.3, window=4)(
        model_a.parameters(), lr=0.05
    )
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.05)
    clipper = distclip.make_clipper("autoclip", model_b.parameters(), q=0.3, window=4)
    expected = _train(opt_a, model_a, batches)
    got = []
    for batch in batches:
        opt_b.zero_grad()
        _loss(model_b, batch).backward()
        stats = clipper.clip_()
        opt_b.step()
        got.append(stats.threshold)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert clipper.state_dict()["num_steps"] == 10


@pytest.mark.parametrize(("opt_cls", "kwargs"), FLAVOURS)
def test_skipped_first_step_leaves_no_optimizer_state(opt_cls, kwargs) -> None:  # type: ignore[no-untyped-def]
    """A NaN first step must not leave state behind (fused SGD would keep empty_like momentum)."""
    batches = _batches(6)
    model, reference = _model(), _model()
    opt = distclip.AutoClippedOptimizer(opt_cls, q=0.2, window=6)(model.parameters(), **kwargs)
    ref_opt = distclip.AutoClippedOptimizer(opt_cls, q=0.2, window=6)(
        reference.parameters(), **kwargs
    )
    opt.zero_grad()
    (_loss(model, batches[0]) * float("nan")).backward()
    opt.step()
    assert bool(opt.last_clip.skipped)
    for p in model.parameters():
        assert not any(
            isinstance(v, torch.Tensor) and v.numel() > 1 for v in opt.state.get(p, {}).values()
        )
    expected = _train(ref_opt, reference, batches[1:])
    got = _train(opt, model, batches[1:])
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, r)


def test_get_clipper_gives_typed_access() -> None:
    model = _model()
    opt = distclip.AutoClippedOptimizer(torch.optim.SGD, q=0.5, window=3)(
        model.parameters(), lr=0.1
    )
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not clip with distclip"):
        distclip.get_clipper(plain)
    handle = distclip.attach(plain, q=0.5, window=3)
    assert distclip.get_clipper(plain) is handle.clipper
    assert distclip.get_clipper(opt) is opt.clipper
    _train(opt, model, _batches(2))
    assert distclip.get_clipper(opt).last_stats is opt.last_clip
