"""Reading one of our run directories for export, shared by both formats (``export_hf``, ``gguf_export``).

Every check runs before anything is written: the request (format, folders), then the weights (router state that
cannot run at inference, one weight dtype), and the tokenizer (no more tokens than the model has ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe.config import ModelConfig, load_recipe
from moe.hf.remote import check_runnable
from moe.hf.tokenizer_files import load_run_tokenizer
from moe.rundir import RECIPE, is_run_dir, read_run

FORMATS = ("hf", "gguf")
FP32_BUFFERS = ("router.e_score_correction_bias",)


@dataclass
class ExportResult:
    layout: str  # a transformers model_type (REMOTE for remote code) or a llama.cpp architecture
    out_dir: Path  # the folder, or the .gguf file
    copied: list[str]  # the tokenizer / generation / code files written beside the weights
    why_remote: str | None = None  # why no native layout expresses the model (remote code only)


def check_tokenizer(tok, vocab_size: int, where: Path) -> None:
    """A tokenizer with ids the embedding lacks would make an export that fails on some inputs."""
    if tok is not None and tok.get_vocab_size() > vocab_size:
        raise ValueError(f"{where}: {tok.get_vocab_size()} tokens, but the model's vocab_size is {vocab_size}; the "
                         f"tokenizer must not have more tokens than the model (ids >= {vocab_size} have no embedding)")


def read_for_export(run_dir: str | Path, out: Path, fmt: str):
    """The run directory and its model config, after checking the request (format, folders)."""
    run = Path(run_dir)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not is_run_dir(run):
        raise ValueError(f"{run}: not a run directory (no {RECIPE}; `moe train` and `moe import` write them)")
    if out.resolve() == run.resolve():
        raise ValueError(f"{out}: the export folder must differ from the run directory")
    return run, load_recipe(run / RECIPE).model


def read_weights(run: Path, cfg: ModelConfig):
    """The checked config, state, tokenizer (or None) and weight dtype of a run, before anything is written."""
    recipe, state = read_run(run)
    check_runnable(recipe.model, state)
    tok = load_run_tokenizer(run, cfg.vocab_size)
    check_tokenizer(tok, cfg.vocab_size, run / "tokenizer.json")
    # Router buffers that our routers keep in fp32 whatever the model's dtype do not count.
    dtypes = {t.dtype for name, t in state.items() if t.is_floating_point() and not name.endswith(FP32_BUFFERS)}
    if len(dtypes) != 1:
        raise ValueError(f"{run}: weights mix dtypes {sorted(str(d) for d in dtypes)}; export needs one")
    return recipe.model, state, tok, str(dtypes.pop()).removeprefix("torch.")
