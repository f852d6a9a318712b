"""Evaluate finished runs on their whole validation set (or its first N batches): one loss per run, the same
numbers for every run of one data setting, however many batches the run's own evaluations used.

    python -m moe.tools.evaluate RUN [RUN ...] [--batches N] [--json FILE]

A RUN is a run directory of ``moe train`` (``recipe.yaml``, ``tokenizer.json``, ``model.safetensors``). Its
validation blocks are rebuilt from its recipe's data settings and tokenizer (from the data cache when they are
there), with the split seed the run used (``data.split_seed``, else ``train.seed``), and the loss is the mean of
the per-batch mean losses over batches of ``train.micro_batch_size`` sequences, as ``moe train`` evaluates.
Models are evaluated in ``eval()`` mode on the CPU in fp32 (expert choice then routes with its eval rule).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def evaluate_run(run_dir: Path, batches: int | None) -> dict:
    """The validation loss of one run directory over ``batches`` batches (None: all of them)."""
    import torch

    from moe.config_io import from_dict
    from moe.data import prepare_data
    from moe.data.sampler import fixed_batches
    from moe.rundir import build_model, read_run

    recipe, state = read_run(run_dir)
    tokenizer = run_dir / "tokenizer.json"
    if not tokenizer.is_file():
        raise ValueError(f"{run_dir}: tokenizer.json is missing; give run directories of `moe train`")
    data_cfg = from_dict(type(recipe.data), {**recipe.to_dict()["data"], "tokenizer": str(tokenizer)})
    t = recipe.train
    data = prepare_data(data_cfg, vocab_size=recipe.model.vocab_size, seq_len=t.seq_len, seed=recipe.split_seed,
                        progress=False)
    n_blocks = len(data.val_blocks)
    max_batches = batches if batches is not None else -(-n_blocks // t.micro_batch_size)
    val = fixed_batches(data.val_blocks, t.micro_batch_size, max_batches)
    model = build_model(recipe.model, state)
    model.eval()
    start, total = time.perf_counter(), 0.0
    with torch.no_grad():
        for x, y in val:
            total += model(x, y).loss.item()
    return {"run": str(run_dir), "val_loss": total / len(val), "batches": len(val),
            "tokens": sum(int(x.numel()) for x, _ in val), "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe.tools.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories of `moe train`")
    parser.add_argument("--batches", type=int, default=None, help="first N validation batches (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    try:
        if args.batches is not None and args.batches < 1:
            raise ValueError(f"--batches must be >= 1, got {args.batches}")
        if args.json is not None and not args.json.parent.is_dir():
            raise ValueError(f"--json {args.json}: folder {args.json.parent} does not exist")
        for run in args.runs:
            if not run.is_dir():
                raise ValueError(f"{run} is not a directory; give run directories of `moe train`")
        rows = []
        print("| run | validation loss | batches | tokens |\n|---|---|---|---|")
        for run in args.runs:
            row = evaluate_run(run, args.batches)
            rows.append(row)
            print(f"| {run} | {row['val_loss']:.4f} | {row['batches']} | {row['tokens']:,} |", flush=True)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
