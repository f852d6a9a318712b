"""Plot and compare training runs: training and validation loss against steps, tokens and FLOPs, and expert
load over time, as one PNG; ``--table`` prints a Markdown summary of each run and ``--json`` writes it. Runs
given one ``--label`` (the seeds of one setting) share a colour, and the table adds their mean ± std.

    moe plot RUN [RUN ...] --out FILE.png [--x steps tokens flops] [--label NAME ...] [--offset STEPS ...]
             [--smooth N] [--title TEXT] [--heatmap] [--table] [--json FILE]

A RUN is a run directory of ``moe train`` (``recipe.yaml`` and ``metrics.jsonl``). Tokens are the ``tokens``
field of the training records, or steps × the recipe's tokens per step (one process) for runs that predate it;
FLOPs are tokens × ``moe.model.flops_per_token`` of the recipe's model (6 × active parameters + attention).
``--offset N`` shifts a run N steps (and the tokens of N of its steps) to the right: a run that continued
another's weights with ``--init`` then starts where its parent stopped. ``--heatmap`` draws, instead of the
curves, each MoE run's share of assignments per expert over time (one panel per run, layers stacked).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

AXES = {"steps": "optimizer steps", "tokens": "training tokens", "flops": "training FLOPs"}


@dataclass
class Run:
    """One run directory's metrics, read once."""

    path: Path
    label: str
    offset: int
    tokens_per_step: int
    flops_per_token: float
    train: list[dict] = field(default_factory=list)  # training records, in step order
    val: list[dict] = field(default_factory=list)  # evaluation records, in step order
    is_moe: bool = False
    _tokens_at: dict | None = None  # step -> tokens, from the training records that carry them

    def x(self, records: list[dict], axis: str) -> list[float]:
        """The ``axis`` coordinate of each record, shifted by the run's offset."""
        steps = [r["step"] + self.offset for r in records]
        if axis == "steps":
            return steps
        tokens = [self._tokens(r) for r in records]
        return tokens if axis == "tokens" else [t * self.flops_per_token for t in tokens]

    def _tokens(self, record: dict) -> float:
        if self._tokens_at is None:
            self._tokens_at = {r["step"]: r["tokens"] for r in self.train if "tokens" in r}
        base = self._tokens_at.get(record["step"], record["step"] * self.tokens_per_step)
        return base + self.offset * self.tokens_per_step

    def layer_keys(self, suffix: str) -> list[str]:
        keys = {k for r in self.train for k in r if k.startswith("moe/layer") and k.endswith("/" + suffix)}
        return sorted(keys, key=lambda k: int(k.split("/")[1].removeprefix("layer")))


def _fail(message: str) -> None:
    raise ValueError(message)


def read_run(path: Path, label: str, offset: int) -> Run:
    """Read ``path`` (a run directory); ``ValueError`` naming the problem when it is not a usable one."""
    from moe.config import Recipe
    from moe.config_io import from_dict, load_yaml

    if not path.is_dir():
        _fail(f"{path} is not a directory; give run directories of `moe train` (recipe.yaml + metrics.jsonl)")
    metrics, recipe_path = path / "metrics.jsonl", path / "recipe.yaml"
    for needed in (metrics, recipe_path):
        if not needed.is_file():
            _fail(f"{path} is not a run directory: {needed.name} is missing")
    recipe = from_dict(Recipe, load_yaml(recipe_path))
    run = Run(path, label, offset, 0, 0.0, is_moe=recipe.model.moe is not None)
    t = recipe.train
    run.tokens_per_step = t.micro_batch_size * t.grad_accum_steps * t.seq_len
    run.flops_per_token = _flops_per_token(recipe)
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(f"{metrics}:{n} is not JSON ({e.msg})")
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            _fail(f"{metrics}:{n} has no integer 'step'; expected records written by `moe train`")
        if "val_loss" in record:
            run.val.append(record)
        elif "loss" in record:
            run.train.append(record)
    if not run.train and not run.val:
        _fail(f"{metrics} holds no training or validation records")
    return run


def _flops_per_token(recipe) -> float:
    """``moe.model.flops_per_token`` of the recipe's model, built on the meta device (no memory, no init)."""
    import torch

    from moe.model import MoEModel, flops_per_token

    with torch.device("meta"):
        model = MoEModel(recipe.model)
    return flops_per_token(model, recipe.train.seq_len)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (the first points average what exists)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def summary(run: Run, last: int = 5) -> dict:
    """Final numbers of a run: validation loss, training loss (mean of the last 10% of the training records),
    median tokens/s, and for MoE runs the max/mean
    load, dropped fraction, router entropy and experts per token (means over layers and the last ``last``
    logged records) and the dead experts (layer-expert pairs with no assignment in any of the last ``last``
    logged loads)."""
    row: dict = {"run": run.label, "path": str(run.path)}
    if run.val:
        row["val_loss"] = run.val[-1]["val_loss"]
        row["val_step"] = run.val[-1]["step"] + run.offset
    if run.train:
        tail = run.train[-max(1, len(run.train) // 10):]  # never-seen tokens when no data repeats
        row["train_loss"] = statistics.fmean(r["loss"] for r in tail)
        rates = [r["tokens_per_s"] for r in run.train[2:] or run.train if "tokens_per_s" in r]
        if rates:
            row["tokens_per_s"] = statistics.median(rates)
    for name in ("max_load_ratio", "dropped_fraction", "router_entropy", "experts_per_token"):
        keys = run.layer_keys(name)
        tail = [r for r in run.train if keys and keys[0] in r][-last:]
        values = [r[k] for r in tail for k in keys if k in r]
        if values:
            row[name] = statistics.fmean(values)
    keys = run.layer_keys("load")
    tail = [r for r in run.train if keys and keys[0] in r][-last:]
    if tail:
        row["dead_experts"] = sum(1 for k in keys for e in range(len(tail[-1][k]))
                                  if all(r[k][e] == 0 for r in tail if k in r))
        row["experts"] = sum(len(tail[-1][k]) for k in keys)
    return row


def markdown_table(rows: list[dict]) -> str:
    columns = [("run", "run", "{}"), ("val_loss", "val loss", "{:.4f}"),
               ("train_loss", "train loss (last 10%)", "{:.4f}"),
               ("tokens_per_s", "tokens/s", "{:,.0f}"), ("experts_per_token", "experts/token", "{:.2f}"),
               ("max_load_ratio", "max/mean load", "{:.2f}"),
               ("dead_experts", "dead experts", "{}"), ("dropped_fraction", "dropped", "{:.3f}"),
               ("router_entropy", "router entropy", "{:.2f}")]
    columns = [c for c in columns if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            value = r.get(key)
            if key == "dead_experts" and value is not None:
                cells.append(f"{value} of {r['experts']}")
            else:
                cells.append("–" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_rows(rows: list[dict]) -> list[dict]:
    """Per label given to two or more runs (seeds of one setting): the number of runs and the mean and sample
    standard deviation of the final validation and training loss, and the mean tokens/s."""
    out = []
    for label in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == label]
        if len(group) < 2:
            continue
        row = {"run": label, "runs": len(group)}
        for key in ("val_loss", "train_loss", "tokens_per_s"):
            values = [r[key] for r in group if key in r]
            if len(values) == len(group):
                row[key] = statistics.fmean(values)
                row[key + "_std"] = statistics.stdev(values)
        out.append(row)
    return out


def group_table(groups: list[dict]) -> str:
    lines = ["| setting | runs | val loss (mean ± std) | train loss, last 10% (mean ± std) | tokens/s (mean) |",
             "|---|---|---|---|---|"]
    for g in groups:
        cells = [g["run"], str(g["runs"])]
        for key, fmt in (("val_loss", "{:.4f} ± {:.4f}"), ("train_loss", "{:.4f} ± {:.4f}")):
            cells.append(fmt.format(g[key], g[key + "_std"]) if key in g else "–")
        cells.append(f"{g['tokens_per_s']:,.0f}" if "tokens_per_s" in g else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[Run], axes: list[str], out: Path, smooth_window: int, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load_rows = any(r.layer_keys("max_load_ratio") for r in runs)
    nrows = 3 if load_rows else 2
    fig, grid = plt.subplots(nrows, len(axes), figsize=(5.2 * len(axes), 3.6 * nrows), squeeze=False)
    labels = list(dict.fromkeys(run.label for run in runs))  # runs with one label (seeds) share a colour
    colors = distinct_colors(len(labels))
    for i, run in enumerate(runs):
        color = colors[labels.index(run.label) % len(colors)]
        label = run.label if runs.index(next(r for r in runs if r.label == run.label)) == i else "_nolegend_"
        for col, axis in enumerate(axes):
            if run.train:
                grid[0][col].plot(run.x(run.train, axis), smooth([r["loss"] for r in run.train], smooth_window),
                                  color=color, label=label, lw=1.2)
            if run.val:
                grid[1][col].plot(run.x(run.val, axis), [r["val_loss"] for r in run.val], color=color,
                                  marker="o", ms=3, label=label, lw=1.2)
            keys = run.layer_keys("max_load_ratio")
            if load_rows and keys:
                logged = [r for r in run.train if keys[0] in r]
                grid[2][col].plot(run.x(logged, axis), smooth([statistics.fmean(r[k] for k in keys if k in r)
                                                               for r in logged], smooth_window),
                                  color=color, label=label, lw=1.2)
    names = ["training loss" + (f" (mean of {smooth_window} records)" if smooth_window > 1 else ""),
             "validation loss", "max/mean expert load (mean over layers)"]
    for row in range(nrows):
        for col, axis in enumerate(axes):
            ax = grid[row][col]
            ax.set_xlabel(AXES[axis])
            ax.set_ylabel(names[row])
            ax.grid(alpha=0.3)
            if axis != "steps":
                ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    _autoscale_losses(grid, runs, axes)
    grid[1][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _autoscale_losses(grid, runs: list[Run], axes: list[str]) -> None:
    """Loss axes from the lowest loss to the 90th percentile of the values: the first steps' losses (ln V and
    above) would otherwise flatten every later difference."""
    for row, key, records in ((0, "loss", "train"), (1, "val_loss", "val")):
        values = sorted(r[key] for run in runs for r in getattr(run, records) if math.isfinite(r[key]))
        if len(values) >= 2:
            low, high = values[0], values[int(0.9 * (len(values) - 1))]
            pad = 0.05 * (high - low or 1.0)
            for col in range(len(axes)):
                grid[row][col].set_ylim(low - pad, high + pad)


def distinct_colors(n: int) -> list:
    """``n`` colours, no two alike: matplotlib's cycle of 10, or its 20-colour table for more settings."""
    import matplotlib.pyplot as plt

    base = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return list(base[:n]) if n <= len(base) else [plt.get_cmap("tab20")(i % 20) for i in range(n)]


def plot_heatmaps(runs: list[Run], out: Path, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    moe_runs = [r for r in runs if r.layer_keys("load")]
    cols = min(len(moe_runs), 4)  # rows of at most four panels
    rows = -(-len(moe_runs) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax in grid.flat[len(moe_runs):]:
        ax.set_visible(False)
    panels = []
    for run in moe_runs:
        keys = run.layer_keys("load")
        logged = [r for r in run.train if all(k in r for k in keys)]
        E = len(logged[0][keys[0]])
        share = np.array([[v for k in keys for v in r[k]] for r in logged]).T  # (layers·E, logged steps)
        panels.append((run, keys, logged, E, share * E))
    top = max(float(load.max()) for *_, load in panels)  # one colour scale for every panel: colours compare
    for ax, (run, keys, logged, E, load) in zip(grid.flat, panels):
        steps = run.x(logged, "steps")
        image = ax.imshow(load, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=top,
                          extent=(steps[0], steps[-1], len(keys) * E - 0.5, -0.5))
        for layer in range(1, len(keys)):
            ax.axhline(layer * E - 0.5, color="white", lw=0.8)
        ax.set_title(run.label, fontsize=9)
        ax.set_xlabel(AXES["steps"])
        ax.set_ylabel(f"expert (layers stacked, {E} each)")
        fig.colorbar(image, ax=ax, label="share × E (1 = balanced)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _per_run(values: list, n: int, name: str, default) -> list:
    if not values:
        return [default] * n
    if len(values) != n:
        _fail(f"{name} given {len(values)} times for {n} runs; give it once per run, in the order of the runs")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``moe plot`` (also used by ``main``)."""
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories of `moe train`")
    parser.add_argument("--out", type=Path, required=True, help="the PNG file to write")
    parser.add_argument("--x", nargs="+", choices=list(AXES), default=list(AXES),
                        help="x axes, one column each (default: steps tokens flops)")
    parser.add_argument("--label", action="append", default=[], help="legend name, once per run (default: folder)")
    parser.add_argument("--offset", action="append", default=[], type=int,
                        help="steps to shift a run right, once per run (default 0)")
    parser.add_argument("--smooth", type=int, default=1, help="moving average over N training records (default 1)")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--heatmap", action="store_true", help="expert load heatmaps instead of curves")
    parser.add_argument("--table", action="store_true", help="print a Markdown summary table")
    parser.add_argument("--json", type=Path, default=None, help="write the summary rows as JSON")


def run(args: argparse.Namespace) -> int:
    """Read the runs, write the PNG (and the table / JSON). Bad input raises a one-line ``ValueError`` before
    any file is written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _fail("moe plot needs matplotlib, which is not installed: pip install 'moe-train[plot]'")
    if args.out.suffix.lower() != ".png":
        _fail(f"--out {args.out}: expected a .png file name")
    for path in (args.out, args.json):
        if path is not None and not path.parent.is_dir():
            _fail(f"{path}: folder {path.parent} does not exist")
    if args.smooth < 1:
        _fail(f"--smooth must be >= 1, got {args.smooth}")
    labels = _per_run(args.label, len(args.runs), "--label", None)
    offsets = _per_run(args.offset, len(args.runs), "--offset", 0)
    if any(o < 0 for o in offsets):
        _fail(f"--offset must be >= 0, got {min(offsets)}")
    runs = [read_run(path, label or path.name, offset) for path, label, offset in zip(args.runs, labels, offsets)]
    if args.heatmap and not any(r.layer_keys("load") for r in runs):
        _fail("--heatmap: none of the runs has per-expert loads (moe/layerN/load in metrics.jsonl); give MoE "
              "runs trained with this version")
    rows = [summary(r) for r in runs]
    if args.heatmap:
        plot_heatmaps(runs, args.out, args.title)
    else:
        plot_curves(runs, args.x, args.out, args.smooth, args.title)
    groups = group_rows(rows)
    if args.table:
        print(markdown_table(rows))
        if groups:
            print("\n" + group_table(groups))
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": rows, "groups": groups}, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe plot", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
