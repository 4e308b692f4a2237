"""Draw a JSON-lines metrics file: the norm, the threshold, the clipped and skipped steps.

::

    python -m distclip.plot METRICS.jsonl -o clipping.png

The file is what :class:`distclip.MetricsWriter` writes (the launch scripts'
``--metrics``; the schema is in :mod:`distclip.integrations.metrics`). The upper panel
shows the global gradient norm before clipping and the threshold over the steps, the
clipped steps marked on the norm and the skipped (NaN/inf) steps as vertical lines;
its y axis is logarithmic when the values span two decades or more. The lower panel
shows the factor the gradients were multiplied by.

Needs matplotlib (``pip install 'distclip[plot]'``), imported when a plot is drawn, not
by ``import distclip``. Drawing uses matplotlib's Agg canvas directly: no pyplot, no
change to the caller's backend.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distclip._checks import is_int
from distclip.integrations.metrics import read_metrics

__all__ = ["LOG_SCALE_SPAN", "main", "plot_metrics", "save_plot"]

#: The y axis is logarithmic when max / min of the positive values is at least this.
LOG_SCALE_SPAN = 100.0

_COLORS = {
    "total_norm": "#1f77b4",
    "threshold": "#ff7f0e",
    "clipped": "#d62728",
    "skipped": "#7f7f7f",
    "clip_coef": "#2ca02c",
}


def _import_matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("distclip.plot needs matplotlib: pip install 'distclip[plot]'") from err
    return Figure


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def plot_metrics(
    records: Sequence[dict[str, Any]], *, title: str | None = None, dpi: int = 100
) -> Any:
    """A matplotlib ``Figure`` of ``records`` (as :func:`distclip.read_metrics` returns them).

    Artists carry labels tests and users can find: the lines ``total_norm``,
    ``threshold`` and ``clip_coef``, the markers ``clipped`` and the vertical lines
    ``skipped`` (one collection).

    Raises:
        ValueError: ``records`` is empty.
        ImportError: matplotlib is not installed.
    """
    if not records:
        raise ValueError("records is empty: there is nothing to plot")
    figure_cls = _import_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    steps = [int(r["step"]) for r in records]
    norms = [_float(r["total_norm"]) for r in records]
    thresholds = [_float(r["threshold"]) for r in records]
    coefs = [_float(r["clip_coef"]) for r in records]
    clipped = [s for s, r in zip(steps, records, strict=True) if r.get("clipped") is True]
    clipped_norms = [n for n, r in zip(norms, records, strict=True) if r.get("clipped") is True]
    skipped = [s for s, r in zip(steps, records, strict=True) if r.get("skipped") is True]
    reported = any(r.get("clipped") is not None for r in records)

    fig = figure_cls(figsize=(10, 6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    dense = len(steps) > 300  # thinner lines and smaller markers, so the lines stay visible
    top.plot(
        steps,
        norms,
        color=_COLORS["total_norm"],
        linewidth=0.6 if dense else 0.9,
        label="total_norm",
    )
    top.plot(
        clipped,
        clipped_norms,
        linestyle="none",
        marker="o",
        markersize=1.8 if dense else 3.5,
        color=_COLORS["clipped"],
        label="clipped",
    )
    top.plot(
        steps, thresholds, color=_COLORS["threshold"], linewidth=1.6, label="threshold", zorder=3
    )
    if skipped:
        top.vlines(
            skipped,
            0.0,
            1.0,
            transform=top.get_xaxis_transform(),  # x in data, y across the whole axes
            colors=_COLORS["skipped"],
            linestyles="dashed",
            linewidth=1.0,
            label="skipped",
        )
    positive = [v for v in (*norms, *thresholds) if math.isfinite(v) and v > 0]
    if positive and max(positive) / min(positive) >= LOG_SCALE_SPAN:
        top.set_yscale("log")
    top.set_ylabel("global gradient norm" + (" (log scale)" if top.get_yscale() == "log" else ""))
    top.grid(True, which="major", alpha=0.3)
    names = {
        "total_norm": "norm before clipping",
        "threshold": "threshold",
        "clipped": f"clipped ({len(clipped)} of {len(steps)} steps)"
        if reported
        else "clipped (not reported by this method)",
        "skipped": f"skipped: NaN/inf norm ({len(skipped)})",
    }
    handles, labels = top.get_legend_handles_labels()
    top.legend(handles, [names.get(label, label) for label in labels], loc="upper right")

    bottom.plot(steps, coefs, color=_COLORS["clip_coef"], linewidth=0.9, label="clip_coef")
    bottom.set_ylim(0.0, 1.05)
    bottom.set_ylabel("clip factor")
    bottom.set_xlabel("step")
    bottom.grid(True, which="major", alpha=0.3)
    summary = f"{len(steps)} logged steps, {len(clipped)} clipped, {len(skipped)} skipped"
    top.set_title(f"{title}: {summary}" if title else f"distclip: {summary}")
    return fig


def save_plot(
    metrics_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Read ``metrics_path``, draw it (:func:`plot_metrics`) and save a PNG at ``output``.

    The image is ``10 x 6`` inches at ``dpi`` (1000 x 600 pixels by default).

    Raises:
        FileNotFoundError: ``metrics_path`` does not exist.
        ValueError: ``metrics_path`` is empty or malformed (see :func:`distclip.read_metrics`);
            ``dpi`` < 1.
        ImportError: matplotlib is not installed.
    """
    if not is_int(dpi) or dpi < 1:
        raise ValueError(f"dpi must be an int >= 1, got {dpi!r}")
    records = read_metrics(metrics_path)
    fig = plot_metrics(records, title=title, dpi=dpi)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python -m distclip.plot METRICS.jsonl -o clipping.png``."""
    parser = argparse.ArgumentParser(
        prog="python -m distclip.plot",
        description="Draw a distclip metrics file (JSON lines): norm, threshold, clipped "
        "and skipped steps.",
    )
    parser.add_argument("metrics", help="the JSON-lines file (distclip.MetricsWriter's)")
    parser.add_argument(
        "-o", "--output", default="clipping.png", help="the PNG to write (default: %(default)s)"
    )
    parser.add_argument("--title", default=None, help="title of the plot")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch (default: 100)")
    args = parser.parse_args(argv)
    try:
        out = save_plot(args.metrics, args.output, title=args.title, dpi=args.dpi)
    except (OSError, ValueError, ImportError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
