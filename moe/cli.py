"""The ``moe`` command line.

    moe train RECIPE [--out DIR] [--max-steps N] [--seed S] [--resume] [--init MODEL_DIR] [dotted.key=value ...]
    deepspeed --num_gpus N --module moe.train RECIPE [same options]      several processes (DeepSpeed)

    moe import HF_DIR OUT_DIR                      a Hugging Face folder -> a run directory
    moe export RUN_DIR OUT [--format hf|gguf]      a run directory -> a Hugging Face folder or a GGUF file
    moe upcycle SRC OUT --num-experts E --top-k K --method M [...]   a dense model -> an MoE Hugging Face folder
    moe generate MODEL --prompt TEXT [--max-new-tokens N] [--greedy] [--temperature T] [--seed S]
    moe bench {layer,train} [...]                  benchmarks (``moe.tools.bench_layer``, ``moe.tools.bench_train``)
    moe plot RUN [RUN ...] --out FILE.png [--table]   loss curves and expert load of runs (moe.tools.plot)

Bad input (a malformed recipe, an unknown key, an impossible value) ends with a one-line ``error:`` message
and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import re
import sys

from moe.config import load_recipe


def _train(args: argparse.Namespace) -> int:
    from moe.config_io import resolve_recipe
    from moe.trainer import train

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.steps={args.max_steps}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    recipe = load_recipe(args.recipe, overrides)
    out = args.out or os.path.join("runs", resolve_recipe(args.recipe).stem)
    result = train(recipe, out, resume=args.resume, init=args.init, progress=not args.no_progress,
                   overwrite=args.overwrite, overrides=overrides)
    if result.rank != 0:  # one summary per run, from rank 0
        return 0
    out = result.out_dir
    ran = result.steps - result.start_step
    steps = (f"{ran} steps (steps {result.start_step + 1}-{result.steps}, resumed from step {result.start_step})"
             if result.start_step else f"{ran} steps")
    if result.mfu is not None:
        mfu = f"MFU {result.mfu:.1%}"
    elif result.peak_known:
        mfu = "MFU: no steps ran"
    else:
        mfu = "MFU: not computed, the device's peak is unknown (set train.peak_tflops=<its TFLOP/s>)"
    print(
        f"\ndone: {steps} in {result.wall_s:.1f} s, {result.tokens_per_s:,.0f} tokens/s; {mfu}\n"
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
          f"{' (with ' + ', '.join(r.copied) + ')' if r.copied else ''}")
    if args.format == "gguf":
        print(f"  load: llama_cpp.Llama({str(r.out_dir)!r}), or llama-cli -m {r.out_dir}")
    elif r.why_remote:
        print(f"  remote code ({r.why_remote})\n"
              f"  load: transformers.AutoModelForCausalLM.from_pretrained({str(r.out_dir)!r}, trust_remote_code=True)")
    else:
        print(f"  load: transformers.AutoModelForCausalLM.from_pretrained({str(r.out_dir)!r})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from moe.generate import generate_text

    result = generate_text(args.model, args.prompt, args.max_new_tokens, greedy=args.greedy,
                           temperature=args.temperature, seed=args.seed)
    print(result.text)
    return 0


def _upcycle(args: argparse.Namespace) -> int:
    from moe.upcycle.folder import upcycle_folder

    r = upcycle_folder(args.src, args.out, num_experts=args.num_experts, top_k=args.top_k, method=args.method,
                       seed=args.seed, layers=args.layers, renormalize=not args.no_renormalize, options=args.option)
    exact = all(layer.exact_expected for layer in r.report.layers)
    worst = max((layer.max_abs_error for layer in r.report.layers if layer.max_abs_error is not None), default=None)
    print(f"upcycled {args.src} with {args.method} into {r.out_dir} ({r.layout} layout, "
          f"{args.num_experts} experts, top-{args.top_k}, {len(r.report.layers)} MoE layers)\n"
          f"  function-preserving at init: {'yes' if exact else 'no (by design of this method/router)'}"
          f"{f'; max |MoE - dense| on probes {worst:.2e}' if worst is not None else ''}\n"
          f"  report: {r.out_dir / 'upcycle_report.json'}; tokenizer files: {', '.join(r.copied) or 'none'}\n"
          f"  continue training: moe train RECIPE --init {r.out_dir}")
    return 0


def _add_model_io_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="convert a Hugging Face model folder into a run directory")
    p.add_argument("hf_dir", help="folder with config.json and *.safetensors (llama, mistral, qwen2, qwen3, "
                                  "mixtral, qwen2_moe, qwen3_moe, glm4_moe, dots1, phimoe, moe_train)")
    p.add_argument("out_dir", help="run directory to write (recipe.yaml + model.safetensors)")
    p.set_defaults(func=_import)
    p = sub.add_parser("export", help="write a run directory as a Hugging Face model folder or a GGUF file")
    p.add_argument("run_dir", help="run directory (recipe.yaml + model.safetensors)")
    p.add_argument("out_dir", help="hf: folder to write (config.json + model.safetensors + tokenizer); gguf: the "
                                   ".gguf file (or a folder to hold model.gguf)")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf: transformers / vLLM / SGLang (default); gguf: llama.cpp")
    p.set_defaults(func=_export)
    p = sub.add_parser("generate", help="continue a prompt with a run directory or a Hugging Face folder")
    p.add_argument("model", help="run directory or Hugging Face folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--temperature", type=_finite_float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.set_defaults(func=_generate)
    p = sub.add_parser("upcycle", help="turn a dense model folder into an MoE Hugging Face folder")
    p.add_argument("src", help="dense Hugging Face folder (llama, mistral, qwen2, qwen3) or dense run directory")
    p.add_argument("out", help="Hugging Face folder to write")
    p.add_argument("--num-experts", "--experts", dest="num_experts", type=int, required=True, help="E")
    p.add_argument("--top-k", type=int, required=True, help="experts per token")
    p.add_argument("--method", required=True, help="copy | neuron-split | drop | granular (see docs/routers.md)")
    p.add_argument("--seed", type=int, default=0, help="seed of the router init and random splits (default 0)")
    p.add_argument("--layers", default=None, help="which FFNs become MoE: all (default) | every_other | 0,2,4")
    p.add_argument("--no-renormalize", action="store_true",
                   help="softmax-then-top-k router instead of Mixtral's top-k-then-softmax")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. ratio=0.5, granularity=2, split=clustering, noise_std=0.01)")
    p.set_defaults(func=_upcycle)


def _bench(args: argparse.Namespace) -> int:
    if args.what == "layer":
        from moe.tools.bench_layer import main as bench
    else:
        from moe.tools.bench_train import main as bench
    return bench(args.bench_args)


def _plot(args: argparse.Namespace) -> int:
    from moe.tools.plot import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description="Mixture-of-Experts training system")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="benchmarks: `moe bench layer [--json FILE] [--quick]`, `moe bench train`",
                       description="`moe bench layer --help` and `moe bench train --help` list each one's options")
    p.add_argument("what", choices=["layer", "train"],
                   help="layer: one MoE layer, forward + backward, against peers; train: tokens/s and MFU per EP size")
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="arguments of the benchmark (tools/bench_layer.py or tools/bench_train.py)")
    p.set_defaults(func=_bench)
    p = sub.add_parser("train", help="train a model from a YAML recipe")
    p.add_argument("recipe", help="a YAML recipe file (e.g. recipes/tiny.yaml) or a built-in recipe name (tiny, tiny-dense, small)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. model.moe.num_experts=4")
    p.add_argument("--out", default=None,
                   help="run directory (default: runs/<recipe name>); a directory that holds a run needs --resume "
                        "or --overwrite")
    p.add_argument("--max-steps", type=int, default=None, help="override train.steps")
    p.add_argument("--seed", type=int, default=None, help="override train.seed")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in --out, deleting the run there (only files `moe train` writes)")
    p.add_argument("--init", default=None, metavar="MODEL_DIR",
                   help="start from these weights (a run, `moe import` or `moe upcycle` output)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars: plain log lines every train.log_every steps (also when not on a terminal)")
    p.set_defaults(func=_train)
    _add_model_io_commands(sub)
    from moe.tools.plot import add_arguments as plot_arguments

    p = sub.add_parser("plot", help="plot runs: loss vs steps, tokens and FLOPs, expert load (PNG); --table")
    plot_arguments(p)
    p.set_defaults(func=_plot)
    for name, subparser in sub.choices.items():
        if name != "bench":  # bench hands everything after its benchmark's name to the benchmark
            # SUPPRESS: absent after the subcommand, it leaves the top-level --debug as it was.
            subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                   help="show tracebacks on errors")
    return parser


def _drop_local_rank(argv: list[str]) -> list[str]:
    """Without ``--local_rank=N`` (or ``--local_rank N``), which the DeepSpeed launcher appends; the rank comes
    from the ``LOCAL_RANK`` environment variable that it also sets."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--local_rank":
            skip = True
        elif not re.fullmatch(r"--local_rank=\d+", word):
            out.append(word)
    return out


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; an ``OSError`` as ``PATH: reason (ERRNO)``."""
    if isinstance(e, OSError) and e.strerror:
        name = errno.errorcode.get(e.errno, str(e.errno))
        text = f"{e.filename}: {e.strerror} ({name})" if e.filename else f"{e.strerror} ({name})"
    else:
        text = str(e)
    return " ".join(text.split())


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = _drop_local_rank(sys.argv[1:] if argv is None else list(argv))
    # Overrides may come before or after the options: collect every leftover "key=value" word.
    args, extra = parser.parse_known_args(argv)
    bad = [word for word in extra if word.startswith("-") or "=" not in word]
    if bad:
        hint = ("; overrides are dotted.key=value (e.g. model.moe.num_experts=4)"
                if args.command == "train" and any(not word.startswith("-") for word in bad) else "")
        parser.error(f"unrecognized arguments: {' '.join(bad)}{hint}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + extra
    elif extra:  # only train takes dotted overrides
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    rank = os.environ.get("RANK") or "0"  # set by the DeepSpeed launcher; rank 0 logs, the others warn
    tag = "" if rank == "0" else f"[rank {rank}] "
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(levelname)s {tag}%(name)s: %(message)s")
    if not args.debug:
        # DeepSpeed's own logger (stdout, its own handler) warns about accelerators and deprecations on every
        # rank; only its errors are shown unless --debug. A filter survives DeepSpeed's later set-up of it.
        logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as e:  # OSError: a missing, unwritable or full path
        if args.debug:
            raise
        # Bad input (ValueError) and failed checkpoint saves (RuntimeError) are decided alike on every rank:
        # rank 0 says it once. Anything else may be this rank's own (a path only it uses).
        if rank == "0" or isinstance(e, OSError):
            print(f"error: {tag}{_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
