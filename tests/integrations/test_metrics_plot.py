"""The per-step record as JSON lines (``distclip.MetricsWriter``) and its plot (``distclip.plot``).

The lines are checked against the documented schema and against the records the
clipper produced (themselves checked against the slow reference in
``tests/unit/test_wrappers_frameworks.py``); the plot is checked through its artists
(the data it draws) and through the PNG read back (size, not blank, the clipped-step
markers present exactly when steps were clipped).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import distclip
from distclip import ClipStats
from distclip.plot import LOG_SCALE_SPAN, main, plot_metrics, save_plot
from tests.support.internals import RECORD_FIELDS
from tests.support.internals import metrics as metrics_module

ROOT = Path(__file__).resolve().parents[2]
#: The clipped-step marker's colour in distclip.plot, as RGB in [0, 1].
CLIPPED_RGB = (0xD6 / 255, 0x27 / 255, 0x28 / 255)


def _train(
    path: Path | None,
    method: str = "autoclip",
    *,
    steps: int = 40,
    nan_step: int | None = 17,
    spiky: bool = True,
    every: int = 1,
    **options: Any,
) -> tuple[list[dict[str, Any]], distclip.MetricsWriter | None]:
    """Train a tiny model; return every step's ``as_record()`` (and the writer, if any)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    cls = distclip.ClippedOptimizer(torch.optim.SGD, method, **options)
    optimizer = cls(model.parameters(), lr=0.01)
    writer = distclip.MetricsWriter(path, every=every) if path is not None else None
    records = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(16, 6, generator=gen)
        scale = 300.0 if spiky and step % 9 == 4 else 1.0
        y = torch.randn(16, 1, generator=gen) * scale
        if step == nan_step:
            y[0] = math.nan
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        records.append(optimizer.last_clip.as_record())
        if writer is not None:
            writer.write(optimizer.last_clip)
    if writer is not None:
        writer.close()
    return records, writer


def _strict(value: str) -> Any:
    raise AssertionError(f"{value} in a metrics line: not strict JSON")


def _null_if_nonfinite(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }


# -------------------------------------------------------------------- the lines
@pytest.mark.parametrize(
    ("method", "options"),
    [("autoclip", {"q": 0.3, "window": 8}), ("zclip", {"warmup_steps": 5}), ("value", {})],
)
def test_lines_follow_the_documented_schema(
    tmp_path: Path, method: str, options: dict[str, Any]
) -> None:
    path = tmp_path / "m.jsonl"
    before = time.time()
    records, _ = _train(path, method, **options)
    lines = path.read_text().splitlines()
    assert len(lines) == len(records)
    assert (*RECORD_FIELDS, "time") == distclip.METRICS_FIELDS
    last_time = before
    for text, record in zip(lines, records, strict=True):
        line = json.loads(text, parse_constant=_strict)
        assert list(line) == list(distclip.METRICS_FIELDS)
        assert type(line["step"]) is int
        for key in ("total_norm", "threshold"):
            assert line[key] is None or type(line[key]) is float
        assert type(line["clip_coef"]) is float
        assert 0.0 <= line["clip_coef"] <= 1.0
        assert line["clipped"] in (True, False, None)
        assert line["skipped"] in (True, False)
        assert last_time <= line["time"] <= time.time()
        last_time = line["time"]
        assert {k: line[k] for k in RECORD_FIELDS} == _null_if_nonfinite(record)
    by_step = {line["step"]: line for line in map(json.loads, lines)}
    assert by_step[18]["skipped"] is True  # the NaN step (0-based 17): the norm is null
    assert by_step[18]["total_norm"] is None
    if method == "zclip":  # no spike in its warm-up: nothing bounds the gradients
        assert by_step[1]["threshold"] is None
    if method == "value":  # the clamp cannot tell whether it changed anything
        assert all(line["clipped"] is None for line in by_step.values())
    else:
        assert any(line["clipped"] for line in by_step.values())
    assert distclip.read_metrics(path) == [json.loads(t) for t in lines]


def test_only_due_steps_are_read_to_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    as_record = ClipStats.as_record

    def counted(self: ClipStats) -> dict[str, Any]:
        reads.append(self.step)
        return as_record(self)

    path = tmp_path / "m.jsonl"
    monkeypatch.setattr(ClipStats, "as_record", counted)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = distclip.AutoClippedOptimizer(torch.optim.SGD, window=4)(model.parameters(), lr=0.1)
    with distclip.MetricsWriter(path, every=3) as writer:
        assert writer.write(None) is None  # before the first step
        for _ in range(10):
            optimizer.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            optimizer.step()
            writer.write(optimizer.last_clip, lr=0.1, note="x")
    assert reads == [3, 6, 9]
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 6, 9]
    assert all(list(line)[-2:] == ["lr", "note"] for line in lines)
    assert writer.num_written == 3


def test_rank_append_and_bad_input(tmp_path: Path) -> None:
    stats = ClipStats(
        torch.tensor(2.0), torch.tensor(1.0), torch.tensor(0.5), torch.tensor(False), step=1
    )
    silent = distclip.MetricsWriter(tmp_path / "rank1.jsonl", rank=1)
    assert silent.write(stats) is None
    assert not (tmp_path / "rank1.jsonl").exists()

    path = tmp_path / "sub" / "m.jsonl"
    with distclip.MetricsWriter(path) as writer:
        writer.write(stats)
    with distclip.MetricsWriter(path, append=True) as writer:
        writer.write(stats)
    assert len(distclip.read_metrics(path)) == 2
    with distclip.MetricsWriter(path) as writer:  # replaces
        writer.write(stats)
    assert len(distclip.read_metrics(path)) == 1

    with pytest.raises(ValueError, match=r"every must be an int >= 1.*got 0"):
        distclip.MetricsWriter(path, every=0)
    with pytest.raises(TypeError, match=r"every must be an int"):
        distclip.MetricsWriter(path, every=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"path must be a str or os.PathLike"):
        distclip.MetricsWriter(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rank must be an int >= 0"):
        distclip.MetricsWriter(path, rank=-1)
    writer = distclip.MetricsWriter(path)
    with pytest.raises(ValueError, match=r"extra key 'threshold' is one of the schema's keys"):
        writer.write(stats, threshold=1.0)
    with pytest.raises(TypeError, match=r"extra value loss=Tensor must be"):
        writer.write(stats, loss=torch.tensor(1.0))
    assert set(metrics_module._FIELD_TYPES) == set(distclip.METRICS_FIELDS)


_GOOD = (
    '{"step": 1, "total_norm": 2.0, "threshold": 1.0, "clip_coef": 0.5, "clipped": true, '
    '"skipped": false, "time": 1.5}'
)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"holds no metrics records"),
        ("\n\n", r"holds no metrics records"),
        (_GOOD + "\n{not json\n", r"m\.jsonl:2: not a JSON line"),
        ("[1, 2]\n", r"m\.jsonl:1: expected a JSON object, got list"),
        ('{"step": 1}\n', r"m\.jsonl:1: missing key\(s\) \['total_norm'"),
        (_GOOD.replace('"step": 1', '"step": "1"') + "\n", r"step must be int, got '1'"),
        (_GOOD.replace('"skipped": false', '"skipped": 0') + "\n", r"skipped must be bool"),
        (_GOOD.replace('"step": 1', '"step": true') + "\n", r"step must be int, got True"),
        (_GOOD.replace("2.0", "NaN") + "\n", r"NaN is not JSON"),
    ],
)
def test_read_metrics_names_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        distclip.read_metrics(path)


def test_read_metrics_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        distclip.read_metrics(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------- the plot
def _line(fig: Any, label: str) -> Any:
    (line,) = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == label]
    return line


def test_plot_draws_the_records(tmp_path: Path) -> None:
    records, _ = _train(tmp_path / "m.jsonl", q=0.3, window=8)
    lines = distclip.read_metrics(tmp_path / "m.jsonl")
    fig = plot_metrics(lines, title="run")
    top = fig.axes[0]
    steps = [r["step"] for r in records]

    def nan_for_none(key: str) -> list[float]:
        return [math.nan if r[key] is None else r[key] for r in map(_null_if_nonfinite, records)]

    norm = _line(fig, "total_norm")
    assert list(norm.get_xdata()) == steps
    assert norm.get_ydata() == pytest.approx(nan_for_none("total_norm"), nan_ok=True)
    assert _line(fig, "threshold").get_ydata() == pytest.approx(nan_for_none("threshold"))
    assert _line(fig, "clip_coef").get_ydata() == pytest.approx([r["clip_coef"] for r in records])
    clipped = _line(fig, "clipped")
    assert list(clipped.get_xdata()) == [r["step"] for r in records if r["clipped"]]
    (skipped,) = [c for c in top.collections if c.get_label() == "skipped"]
    assert [seg[0][0] for seg in skipped.get_segments()] == [18]
    # Norms from below 1 to the spikes (x300): more than two decades, so log scale.
    finite = [r["total_norm"] for r in records if math.isfinite(r["total_norm"])]
    assert max(finite) / min(finite) > LOG_SCALE_SPAN
    assert top.get_yscale() == "log"
    n_clipped = sum(bool(r["clipped"]) for r in records)
    assert top.get_title() == f"run: {len(records)} logged steps, {n_clipped} clipped, 1 skipped"

    _train(tmp_path / "calm.jsonl", "norm", spiky=False, nan_step=None, max_norm=10.0)
    fig = plot_metrics(distclip.read_metrics(tmp_path / "calm.jsonl"))
    assert fig.axes[0].get_yscale() == "linear"
    assert list(_line(fig, "clipped").get_xdata()) == []
    assert not [c for c in fig.axes[0].collections if c.get_label() == "skipped"]
    with pytest.raises(ValueError, match=r"records is empty"):
        plot_metrics([])


def _pixels_near(image: Any, rgb: tuple[float, float, float], tol: float = 0.06) -> int:
    import numpy as np

    diff = np.abs(image[..., :3] - np.asarray(rgb)).max(axis=-1)
    return int((diff < tol).sum())


def test_plot_command_writes_a_png_that_shows_the_data(tmp_path: Path) -> None:
    from matplotlib.image import imread

    _train(tmp_path / "spiky.jsonl", q=0.3, window=8)
    _train(tmp_path / "calm.jsonl", "norm", spiky=False, nan_step=None, max_norm=10.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    check_lazy = (
        "import sys, distclip, distclip.plot; "
        "assert 'matplotlib' not in sys.modules, 'imported by distclip.plot'"
    )
    subprocess.run([sys.executable, "-c", check_lazy], check=True, env=env, timeout=120)
    out = subprocess.run(
        [sys.executable, "-m", "distclip.plot", str(tmp_path / "spiky.jsonl"), "-o",
         str(tmp_path / "spiky.png")],
        check=True, env=env, timeout=120, capture_output=True, text=True,
    )  # fmt: skip
    assert out.stdout.strip() == f"wrote {tmp_path / 'spiky.png'}"
    assert (
        main([str(tmp_path / "calm.jsonl"), "-o", str(tmp_path / "calm.png"), "--dpi", "50"]) == 0
    )

    spiky, calm = imread(tmp_path / "spiky.png"), imread(tmp_path / "calm.png")
    assert spiky.shape[:2] == (600, 1000)  # 10 x 6 inches at 100 dpi
    assert calm.shape[:2] == (300, 500)
    for image in (spiky, calm):
        assert image[..., :3].std() > 0.05  # not blank
        assert (image[..., :3] > 0.95).all(axis=-1).mean() > 0.5  # a white background
    # The clipped markers: many on the spiky run; on the calm run only the legend's one.
    legend_marker = _pixels_near(calm, CLIPPED_RGB)
    assert _pixels_near(spiky, CLIPPED_RGB) > legend_marker * 4 + 100


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file"), ("", "holds no metrics records"), ("{\n", ":1: not a JSON line")],
)
def test_plot_command_reports_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "m.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "-o", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m distclip.plot: error: ")
    assert message in err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match=r"dpi must be an int >= 1"):
        save_plot(path, tmp_path / "x.png", dpi=0)


# ---------------------------------------------------------------- the launch script
def test_the_demo_writes_metrics_that_plot(tmp_path: Path) -> None:
    path = tmp_path / "demo.jsonl"
    subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train_demo.py"), "--steps", "30", "--nan-step",
         "12", "--window", "8", "--log-every", "10", "--metrics", str(path)],
        check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180,
        capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    lines = distclip.read_metrics(path)
    assert [line["step"] for line in lines] == list(range(1, 31))
    assert [line["step"] for line in lines if line["skipped"]] == [13]
    assert lines[12]["total_norm"] is None
    assert all(line["threshold"] > 0 for line in lines)
    assert save_plot(path, tmp_path / "demo.png") == tmp_path / "demo.png"
