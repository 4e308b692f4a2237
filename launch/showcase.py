"""distclip showcase: every clipping method against no clipping, on heavy-tailed gradients.

One small MLP learns a fixed random "teacher" network from synthetic data whose
targets carry heavy-tailed noise (Student-t with 2 degrees of freedom: infinite
variance) and, now and then, a whole batch of outliers. SGD with momentum at a
learning rate that suits the typical gradient is thrown off by the rare huge
gradients these produce; clipping keeps those steps in bounds.

Every run uses the same seed, the same initial weights and the same batches in the
same order; only the clipping method differs. Each method gets a fair, documented
setting: the fixed levels (``norm``, ``value``, ``layer_wise``, the stochastic norm
rules) come from a short unclipped pilot run (the median gradient norm it saw), the
adaptive methods use their published defaults. The held-out loss is measured without
noise, so it says how well the teacher itself is learnt.

Single process, CPU::

    bash launch/showcase.sh                        # all methods, writes docs/showcase/
    bash launch/showcase.sh --methods none norm autoclip zclip --out runs/showcase

Outputs: ``results.md`` (a table sorted by final held-out loss) and ``methods.png``
(held-out loss curves; gradient norm against threshold for a few methods).
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import distclip

IN_FEATURES = 16
HIDDEN = 64
BATCH_SIZE = 64
STUDENT_T_DF = 2  # degrees of freedom of the target noise: infinite variance
NOISE_SCALE = 0.3  # scale of the Student-t target noise
OUTLIER_PROB = 0.02  # chance that a whole batch gets outlier targets
OUTLIER_SCALE = 30.0  # how far outlier targets are pushed
HELD_OUT_SIZE = 2048
MOMENTUM = 0.9

#: Every method shown, in legend order ("none": plain SGD). ``coordinate_wise`` is the
#: same rule as ``value`` and ``auto_clip`` an alias of ``autoclip``: shown once each.
ALL_METHODS = (
    "none",
    "norm",
    "value",
    "layer_wise",
    "linear_stoch_norm",
    "quadratic_stoch_norm",
    "autoclip",
    "linear_stoch_autoclip",
    "quadratic_stoch_autoclip",
    "zclip",
    "agc",
)
#: Methods whose threshold is a global norm: their norm-vs-threshold traces are drawn.
TRACED = ("norm", "autoclip", "zclip")


# ---------------------------------------------------------------------------- task
def make_mlp(hidden: int = HIDDEN) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(IN_FEATURES, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, 1),
    )


@dataclass(frozen=True)
class Task:
    """All training batches (drawn once, so every method sees the same ones) and a
    noise-free held-out set."""

    x: Tensor  # (steps, batch, features)
    y: Tensor  # (steps, batch, 1)
    outlier_steps: Tensor  # indices of the outlier batches
    held_out: tuple[Tensor, Tensor]


def make_task(seed: int, steps: int) -> Task:
    """Batch ``step`` comes from a generator seeded by ``(seed, step)``: the data do not
    depend on ``--steps`` or on which methods run."""

    def generator(stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed * 1_000_003 + stream)

    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        teacher = make_mlp(hidden=32).requires_grad_(False)
    xs, ys, outliers = [], [], []
    with torch.no_grad():
        for step in range(steps):
            gen = generator(step + 1)
            x = torch.randn(BATCH_SIZE, IN_FEATURES, generator=gen)
            z, a, b = torch.randn(3, BATCH_SIZE, 1, generator=gen)
            student_t = z / ((a * a + b * b) / 2).sqrt()  # Student-t, 2 degrees of freedom
            y = teacher(x) + NOISE_SCALE * student_t
            if float(torch.rand((), generator=gen)) < OUTLIER_PROB:  # a batch of outliers
                y = y + OUTLIER_SCALE * torch.randn(BATCH_SIZE, 1, generator=gen)
                outliers.append(step)
            xs.append(x)
            ys.append(y)
        x_held = torch.randn(HELD_OUT_SIZE, IN_FEATURES, generator=generator(0))
        held_out = (x_held, teacher(x_held))
    return Task(
        torch.stack(xs), torch.stack(ys), torch.tensor(outliers, dtype=torch.long), held_out
    )


# ------------------------------------------------------------------------ training
@dataclass
class Run:
    """What one training run recorded (tensors while training, converted at the end)."""

    method: str
    options: dict[str, Any]
    train_loss: Tensor
    total_norm: Tensor
    threshold: Tensor
    clipped: Tensor
    eval_steps: Tensor
    eval_loss: Tensor
    wall_s: float


def train(
    method: str,
    options: dict[str, Any],
    init: nn.Module,
    task: Task,
    steps: int,
    lr: float,
    eval_every: int,
) -> Run:
    """Train a copy of ``init`` for ``steps`` with ``method`` ("none": plain SGD)."""
    model = copy.deepcopy(init)
    params = list(model.parameters())
    if method == "none":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    else:
        cls = distclip.ClippedOptimizer(torch.optim.SGD, method=method, **options)
        optimizer = cls(params, lr=lr, momentum=MOMENTUM)
    clip_value = options.get("clip_value") if method in ("value", "coordinate_wise") else None

    train_loss = torch.empty(steps)
    total_norm = torch.empty(steps)
    threshold = torch.full((steps,), math.inf)
    clipped = torch.zeros(steps, dtype=torch.bool)
    eval_steps = torch.arange(0, steps + 1, eval_every)
    eval_loss = torch.empty(len(eval_steps))
    x_held, y_held = task.held_out

    def evaluate(index: int) -> None:
        with torch.no_grad():
            eval_loss[index] = nn.functional.mse_loss(model(x_held), y_held)

    evaluate(0)
    start = time.perf_counter()
    for step in range(steps):
        loss = nn.functional.mse_loss(model(task.x[step]), task.y[step])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_value is not None:  # value clipping reports no coefficient: check here
            largest = torch.stack([p.grad.abs().amax() for p in params if p.grad is not None])
            clipped[step] = largest.amax() > clip_value
        if method == "none":
            total_norm[step] = nn.utils.get_total_norm([p.grad for p in params])
        optimizer.step()
        train_loss[step] = loss.detach()
        stats = getattr(optimizer, "last_clip", None)
        if stats is not None:  # 0-dim tensors: copied in place, no host read per step
            total_norm[step] = stats.total_norm
            threshold[step] = stats.threshold
            if clip_value is None:
                clipped[step] = stats.clip_coef < 1
        if (step + 1) % eval_every == 0:
            evaluate((step + 1) // eval_every)
    wall_s = time.perf_counter() - start
    return Run(
        method,
        options,
        train_loss,
        total_norm,
        threshold,
        clipped,
        eval_steps,
        eval_loss,
        wall_s,
    )


# ------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Pilot:
    """Levels measured by a short unclipped run: the median global gradient norm, the
    median largest per-tensor norm and the median largest gradient element."""

    norm: float
    tensor_norm: float
    element: float
    steps: int


def pilot(init: nn.Module, task: Task, steps: int, lr: float) -> Pilot:
    model = copy.deepcopy(init)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    norms, tensor_norms, elements = [], [], []
    for step in range(steps):
        loss = nn.functional.mse_loss(model(task.x[step]), task.y[step])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        per_tensor = torch.stack([torch.linalg.vector_norm(g) for g in grads])
        norms.append(torch.linalg.vector_norm(per_tensor))
        tensor_norms.append(per_tensor.amax())
        elements.append(torch.stack([g.abs().amax() for g in grads]).amax())
        optimizer.step()

    def median(values: list[Tensor]) -> float:
        return float(torch.stack(values).median())

    return Pilot(median(norms), median(tensor_norms), median(elements), steps)


def method_options(method: str, levels: Pilot, seed: int, agc_clip_factor: float) -> dict[str, Any]:
    """The documented setting of each method."""
    fixed = float(f"{levels.norm:.3g}")
    stochastic = {"beta": 0.5, "seed": seed}
    auto = {"q": 0.1, "window": 200}
    table: dict[str, Callable[[], dict[str, Any]]] = {
        "none": dict,
        "norm": lambda: {"max_norm": fixed},
        "value": lambda: {"clip_value": float(f"{levels.element:.3g}")},
        "coordinate_wise": lambda: {"clip_value": float(f"{levels.element:.3g}")},
        "layer_wise": lambda: {"max_norm": float(f"{levels.tensor_norm:.3g}")},
        "linear_stoch_norm": lambda: {"max_norm": fixed, **stochastic},
        "quadratic_stoch_norm": lambda: {"max_norm": fixed, **stochastic},
        "autoclip": lambda: dict(auto),
        "auto_clip": lambda: dict(auto),
        "linear_stoch_autoclip": lambda: {**auto, **stochastic},
        "quadratic_stoch_autoclip": lambda: {**auto, **stochastic},
        "zclip": lambda: {"alpha": 0.97, "z_thresh": 2.5, "warmup_steps": 25},
        "agc": lambda: {"clip_factor": agc_clip_factor},
    }
    return table[method]()


def format_options(options: dict[str, Any]) -> str:
    if not options:
        return "-"
    return ", ".join(
        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in options.items()
    )


# ------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Row:
    method: str
    options: str
    final: float
    best: float
    clipped_pct: float
    wall_s: float


def summarise(run: Run, last_evals: int) -> Row:
    evals = run.eval_loss.double()
    final = float(evals[-last_evals:].mean())
    best = float(evals.nan_to_num(math.inf).min())
    return Row(
        run.method,
        format_options(run.options),
        final,
        best,
        100.0 * float(run.clipped.double().mean()),
        run.wall_s,
    )


def markdown_table(rows: list[Row], last_evals: int, eval_every: int) -> str:
    header = (
        "| method | options | final held-out loss | best held-out loss | steps clipped | "
        "wall time |\n|---|---|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| `{r.method}` | {r.options} | {r.final:.4g} | {r.best:.4g} | "
        f"{r.clipped_pct:.1f}% | {r.wall_s:.1f} s |"
        for r in rows
    ]
    return (
        header
        + "\n".join(lines)
        + f"\n\nFinal: mean of the last {last_evals} held-out evaluations (every {eval_every} "
        "steps). Steps clipped: steps whose clip coefficient was < 1 (for `agc` some unit's, "
        "for `layer_wise` some tensor's; for `value` steps where some element exceeded the "
        "bound). AutoClip with q=0.1 clips about 90% of steps by design: its threshold is the "
        "10th percentile of the recent norms.\n"
    )


def sort_key(row: Row) -> tuple[bool, float]:
    return (not math.isfinite(row.final), row.final)


# -------------------------------------------------------------------------- figure
STYLES: dict[str, dict[str, Any]] = {
    "none": {"color": "black", "linewidth": 2.2, "linestyle": "-"},
    "norm": {"color": "tab:orange", "linestyle": "-"},
    "value": {"color": "tab:brown", "linestyle": "-"},
    "coordinate_wise": {"color": "tab:brown", "linestyle": ":"},
    "layer_wise": {"color": "tab:pink", "linestyle": "-"},
    "linear_stoch_norm": {"color": "tab:red", "linestyle": "--"},
    "quadratic_stoch_norm": {"color": "tab:red", "linestyle": ":"},
    "autoclip": {"color": "tab:blue", "linestyle": "-"},
    "auto_clip": {"color": "tab:blue", "linestyle": "-"},
    "linear_stoch_autoclip": {"color": "tab:cyan", "linestyle": "--"},
    "quadratic_stoch_autoclip": {"color": "tab:cyan", "linestyle": ":"},
    "zclip": {"color": "tab:green", "linestyle": "-"},
    "agc": {"color": "tab:purple", "linestyle": "-."},
}


def plot(runs: list[Run], rows: dict[str, Row], task: Task, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    traced = [run for run in runs if run.method in TRACED]
    ncols = max(len(traced), 1)
    fig = plt.figure(figsize=(13, 9.5 if traced else 5.8), layout="constrained")
    grid = fig.add_gridspec(2 if traced else 1, ncols, height_ratios=[1.4, 1] if traced else None)
    ax = fig.add_subplot(grid[0, :])
    order = sorted(runs, key=lambda run: sort_key(rows[run.method]))
    for run in order:
        style = {"linewidth": 1.3, **STYLES.get(run.method, {})}
        label = f"{run.method} ({rows[run.method].final:.3g})"
        ax.plot(run.eval_steps.numpy(), run.eval_loss.numpy(), label=label, **style)
    outliers = task.outlier_steps.numpy()
    ax.plot(
        outliers,
        np.zeros_like(outliers, dtype=float),
        "|",
        color="0.35",
        markersize=9,
        transform=ax.get_xaxis_transform(),  # x in data, y in axes units: a rug at the bottom
        label="outlier batch",
    )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out MSE (noise-free, log scale)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(
        title="held-out loss of every method (in brackets: final loss; best first)",
        fontsize=8.5,
        title_fontsize=9.5,
        ncol=4,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.01, 1.0, 0.2),
        mode="expand",
        borderaxespad=0,
    )

    first = None
    for col, run in enumerate(traced):
        tax = fig.add_subplot(grid[1, col], sharey=first)
        first = first or tax
        steps = np.arange(len(run.total_norm))
        tax.plot(steps, run.total_norm.numpy(), color="0.6", linewidth=0.5, label="pre-clip norm")
        thr = run.threshold.numpy().copy()
        thr[~np.isfinite(thr)] = np.nan  # zclip: no threshold between spikes
        color = STYLES[run.method]["color"]
        if run.method == "zclip":
            tax.plot(steps, thr, ".", color=color, markersize=3.5, label="threshold (on spikes)")
        else:
            tax.plot(steps, thr, color=color, linewidth=1.8, label="threshold")
        tax.set_yscale("log")
        tax.set_xlabel("step")
        if col == 0:
            tax.set_ylabel("global gradient norm (log scale)")
        tax.set_title(
            f"{run.method} ({rows[run.method].options}):\n"
            f"norm vs threshold, {rows[run.method].clipped_pct:.0f}% of steps clipped",
            fontsize=9.5,
        )
        tax.grid(True, which="major", alpha=0.3)
        tax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80)
    plt.close(fig)
    buffer.seek(0)
    # A 256-colour palette: a line plot loses nothing visible and the file shrinks ~3x.
    image = Image.open(buffer).convert("RGB").quantize(colors=256)
    image.save(path, optimize=True)


# ---------------------------------------------------------------------------- main
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=positive_int, default=3000, help="steps per method")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model and the data")
    parser.add_argument("--out", type=Path, default=Path("docs/showcase"), help="output folder")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(ALL_METHODS),
        metavar="METHOD",
        help=f"subset to run ('none' = plain SGD); choices: none, "
        f"{', '.join(distclip.available_methods())}",
    )
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    parser.add_argument("--pilot-steps", type=positive_int, default=200)
    parser.add_argument("--agc-clip-factor", type=float, default=0.02)
    parser.add_argument("--eval-every", type=positive_int, default=20)
    parser.add_argument(
        "--last-evals", type=positive_int, default=10, help="evaluations averaged as 'final'"
    )
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    valid = {"none", *distclip.available_methods()}
    unknown = [m for m in args.methods if m not in valid]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    task = make_task(args.seed, args.steps)
    torch.manual_seed(args.seed)
    init = make_mlp()
    levels = pilot(init, task, min(args.pilot_steps, args.steps), args.lr)
    description = (
        f"MLP {IN_FEATURES}-{HIDDEN}-{HIDDEN}-1 (tanh) regressing a random teacher MLP; targets "
        f"+ {NOISE_SCALE} x Student-t (df={STUDENT_T_DF}), a batch of outliers "
        f"(+{OUTLIER_SCALE:g} x N(0,1)) with probability {OUTLIER_PROB} per step "
        f"({len(task.outlier_steps)} of {args.steps} steps). SGD lr={args.lr}, "
        f"momentum={MOMENTUM}, batch {BATCH_SIZE}, {args.steps} steps, seed {args.seed}, "
        f"same initial weights and batches for every method."
    )
    print(f"distclip {distclip.__version__} showcase\n{description}", flush=True)
    print(
        f"pilot ({levels.steps} unclipped steps): median global norm {levels.norm:.3g}, "
        f"median largest tensor norm {levels.tensor_norm:.3g}, "
        f"median largest element {levels.element:.3g}",
        flush=True,
    )

    runs: list[Run] = []
    for method in dict.fromkeys(args.methods):
        options = method_options(method, levels, args.seed, args.agc_clip_factor)
        run = train(method, options, init, task, args.steps, args.lr, args.eval_every)
        runs.append(run)
        row = summarise(run, args.last_evals)
        print(
            f"  {method:<26} final {row.final:<10.4g} best {row.best:<10.4g} "
            f"clipped {row.clipped_pct:5.1f}%  {row.wall_s:5.1f} s",
            flush=True,
        )
    rows = {run.method: summarise(run, args.last_evals) for run in runs}
    ordered = sorted(rows.values(), key=sort_key)
    table = markdown_table(ordered, args.last_evals, args.eval_every)
    command = "bash launch/showcase.sh" + (f" {' '.join(sys.argv[1:])}" if sys.argv[1:] else "")
    levels_note = (
        f"Fixed levels from a {levels.steps}-step unclipped pilot run: `max_norm` of `norm` "
        f"and the stochastic norm rules = median global gradient norm ({levels.norm:.3g}); "
        f"`layer_wise` `max_norm` = median largest per-tensor norm ({levels.tensor_norm:.3g}); "
        f"`value` `clip_value` = median largest gradient element ({levels.element:.3g})."
    )
    markdown = (
        f"# distclip showcase: clipping methods on heavy-tailed gradients\n\n"
        f"{description}\n\n{levels_note}\n\n{table}\n"
        f"Reproduce: `{command}` (CPU, single process; see `launch/showcase.py`).\n\n"
        f"![methods](methods.png)\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(markdown)
    title = (
        f"distclip: clipping methods on a regression with heavy-tailed noise "
        f"(Student-t df={STUDENT_T_DF} + outlier batches), SGD lr={args.lr} momentum={MOMENTUM}"
    )
    plot(runs, rows, task, title, args.out / "methods.png")
    print("\n" + table)
    total = sum(run.wall_s for run in runs)
    print(
        f"wrote {args.out / 'results.md'} and {args.out / 'methods.png'} "
        f"(training {total:.0f} s in all)"
    )


if __name__ == "__main__":
    main()
