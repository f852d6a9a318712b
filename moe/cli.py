"""The ``moe`` command line.

    moe train RECIPE [--out DIR] [--max-steps N] [--seed S] [dotted.key=value ...]

Bad input (a malformed recipe, an unknown key, an impossible value) ends with a one-line ``error:`` message
and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from moe.config import load_recipe


def _train(args: argparse.Namespace) -> int:
    from moe.train import train

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.steps={args.max_steps}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    recipe = load_recipe(args.recipe, overrides)
    result = train(recipe, args.out, progress=not args.no_progress)
    print(
        f"\ndone: {result.steps} steps in {result.wall_s:.1f} s, {result.tokens_per_s:,.0f} tokens/s\n"
        f"  final train loss {result.final_loss:.4f}, validation loss {result.val_loss:.4f}\n"
        f"  metrics: {result.out_dir / 'metrics.jsonl'}\n"
        f"  weights: {result.out_dir / 'model.safetensors'} (config: {result.out_dir / 'recipe.yaml'})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description="Mixture-of-Experts training system")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model from a YAML recipe")
    p.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.moe.num_experts=4")
    p.add_argument("--out", default="runs/tiny", help="output directory (default: runs/tiny)")
    p.add_argument("--max-steps", type=int, default=None, help="override train.steps")
    p.add_argument("--seed", type=int, default=None, help="override train.seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after the options: collect every leftover "key=value" word.
    args, extra = parser.parse_known_args(argv)
    bad = [word for word in extra if word.startswith("-") or "=" not in word]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
