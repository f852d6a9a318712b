"""The ``moe`` command line.

    moe train RECIPE [--out DIR] [--max-steps N] [--seed S] [--resume] [--init MODEL_DIR] [dotted.key=value ...]

    moe import HF_DIR OUT_DIR                      a Hugging Face folder -> a run directory
    moe export RUN_DIR OUT_DIR [--format hf]       a run directory -> a Hugging Face folder
    moe generate MODEL --prompt TEXT [--max-new-tokens N] [--greedy] [--temperature T] [--seed S]

Bad input (a malformed recipe, an unknown key, an impossible value) ends with a one-line ``error:`` message
and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import math
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
    result = train(recipe, args.out, resume=args.resume, init=args.init, progress=not args.no_progress)
    out = result.out_dir
    print(
        f"\ndone: {result.steps} steps in {result.wall_s:.1f} s, {result.tokens_per_s:,.0f} tokens/s\n"
        f"  final train loss {result.final_loss:.4f}, validation loss {result.val_loss:.4f} "
        f"(perplexity {math.exp(min(result.val_loss, 50)):.2f})\n"
        f"  logs:        {out / 'metrics.jsonl'}\n"
        f"  checkpoints: {out / 'checkpoints'} (continue with --resume)\n"
        f"  weights:     {out / 'model.safetensors'} (config {out / 'recipe.yaml'})\n"
        f"  TensorBoard: .venv/bin/tensorboard --logdir {out / 'tensorboard'}\n"
        f"  sample:      .venv/bin/moe generate {out} --prompt 'def ' --max-new-tokens 64"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from moe.hf.import_hf import import_hf

    r = import_hf(args.hf_dir, args.out_dir)
    kind = "dense" if r.config.moe is None else f"MoE, {r.config.moe.num_experts} experts"
    print(f"imported {r.model_type} ({kind}, {r.num_parameters / 1e6:.2f}M parameters) into {r.out_dir}\n"
          f"  copied: {', '.join(r.copied) or 'no tokenizer files'}\n"
          f"  sample: moe generate {r.out_dir} --prompt 'Hello' --greedy")
    return 0


def _export(args: argparse.Namespace) -> int:
    from moe.hf.export_hf import export_hf

    r = export_hf(args.run_dir, args.out_dir, args.format)
    print(f"exported {args.run_dir} as {r.layout} to {r.out_dir}"
          f"{' (with ' + ', '.join(r.copied) + ')' if r.copied else ''}\n"
          f"  load: transformers.AutoModelForCausalLM.from_pretrained({str(r.out_dir)!r})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from moe.generate import generate_text

    result = generate_text(args.model, args.prompt, args.max_new_tokens, greedy=args.greedy,
                           temperature=args.temperature, seed=args.seed)
    print(result.text)
    return 0


def _add_model_io_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="convert a Hugging Face model folder into a run directory")
    p.add_argument("hf_dir", help="folder with config.json and *.safetensors (llama, mistral, qwen2, qwen3, "
                                  "mixtral, qwen2_moe, qwen3_moe)")
    p.add_argument("out_dir", help="run directory to write (recipe.yaml + model.safetensors)")
    p.set_defaults(func=_import)
    p = sub.add_parser("export", help="write a run directory as a Hugging Face model folder")
    p.add_argument("run_dir", help="run directory (recipe.yaml + model.safetensors)")
    p.add_argument("out_dir", help="folder to write (config.json + model.safetensors)")
    p.add_argument("--format", default="hf", choices=["hf"], help="output format (default: hf)")
    p.set_defaults(func=_export)
    p = sub.add_parser("generate", help="continue a prompt with a run directory or a Hugging Face folder")
    p.add_argument("model", help="run directory or Hugging Face folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.set_defaults(func=_generate)


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
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--init", default=None, metavar="MODEL_DIR",
                   help="start from these weights (a run, `moe import` or `moe upcycle` output)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
    _add_model_io_commands(sub)
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
    elif extra:  # only train takes dotted overrides
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
