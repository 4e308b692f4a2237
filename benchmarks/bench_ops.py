"""Count what one clipped step asks of the host: a CPU proxy of its cost on a GPU.

Run from the repository root in the project's environment (no GPU needed)::

    .venv/bin/python benchmarks/bench_ops.py                   # 50 and 200 tensors
    .venv/bin/python benchmarks/bench_ops.py --tensors 50,200 --out benchmarks/results/bench_ops.md

For every method and entry point (an optimizer class with fused AdamW, ``attach`` on a
fused AdamW, a standalone ``clip_()``, and the functional drop-ins called again and
again on the same parameters), one step after two warm-up steps runs under the
``TorchDispatchMode`` of ``tests/support/op_probe.py``, which counts host reads
(``aten._local_scalar_dense``), tensors built from host data (``aten.lift_fresh``: a
blocking host-to-device copy on a GPU) and the other aten ops (each at most one kernel
launch; view ops, which launch nothing, apart). The reference row is torch's
``clip_grad_norm_`` followed by the same fused AdamW step. Counts are exact and
repeatable (no timing).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import distclip  # noqa: E402
from tests.support.methods import CLIPPING_OPTIONS  # noqa: E402
from tests.support.op_probe import StepCounts, probe  # noqa: E402


def _model(num_tensors: int, width: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(width, width) for _ in range(num_tensors // 2)]
    return torch.nn.Sequential(*layers)


def _fill(model: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * (1.0 + step % 3)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


def _count(model: torch.nn.Module, step_fn: Callable[[], Any]) -> StepCounts:
    for step in range(2):
        _fill(model, step)
        step_fn()
    _fill(model, 2)
    return probe(step_fn)


def _variants(num_tensors: int) -> list[tuple[str, str, Callable[[], StepCounts]]]:
    def torch_reference() -> StepCounts:
        model = _model(num_tensors)
        opt = _adamw(model.parameters())

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()

        return _count(model, step)

    def functional(name: str) -> Callable[[], StepCounts]:
        def run() -> StepCounts:
            model = _model(num_tensors)
            params = list(model.parameters())
            if name == "get_total_norm":
                return _count(model, lambda: distclip.get_total_norm(params))
            return _count(model, lambda: distclip.clip_grad_norm_(params, 0.1))

        return run

    def entry(method: str, how: str) -> Callable[[], StepCounts]:
        options = CLIPPING_OPTIONS[method]

        def run() -> StepCounts:
            model = _model(num_tensors)
            if how == "class":
                cls = distclip.ClippedOptimizer(torch.optim.AdamW, method, **options)
                opt = cls(model.parameters(), lr=1e-3, fused=True)
                return _count(model, opt.step)
            if how == "attach":
                opt = _adamw(model.parameters())
                distclip.attach(opt, method, **options)
                return _count(model, opt.step)
            clipper = distclip.make_clipper(method, model.parameters(), **options)
            return _count(model, clipper.clip_)

        return run

    rows: list[tuple[str, str, Callable[[], StepCounts]]] = [
        ("torch clip_grad_norm_ + fused AdamW", "-", torch_reference),
        ("get_total_norm", "functional", functional("get_total_norm")),
        ("clip_grad_norm_", "functional", functional("clip_grad_norm_")),
    ]
    for method in CLIPPING_OPTIONS:
        if method == "auto_clip":  # an alias of autoclip
            continue
        for how in ("class", "attach", "clip_"):
            rows.append((method, how, entry(method, how)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", default="50,200", help="comma-separated tensor counts")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    sizes = [int(n) for n in args.tensors.split(",")]
    torch.set_num_threads(1)
    header = "| method | entry point | " + " | ".join(
        f"{n} tensors: host reads / host data / ops (views)" for n in sizes
    )
    lines = [
        f"torch {torch.__version__}, distclip {distclip.__version__}; counts per step "
        "(the third step), fused AdamW where an optimizer steps.",
        "",
        header + " |",
        "|---|---|" + "---:|" * len(sizes),
    ]
    by_size = {n: _variants(n) for n in sizes}
    for index, (name, how, _) in enumerate(by_size[sizes[0]]):
        cells = []
        for n in sizes:
            counts = by_size[n][index][2]()
            cells.append(
                f"{counts.host_reads} / {counts.host_data} / {counts.ops} ({counts.views})"
            )
        lines.append(f"| {name} | {how} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
