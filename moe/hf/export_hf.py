"""``moe export RUN_DIR OUT [--format hf|gguf]``: one of our run directories -> a model for inference engines.

    .venv/bin/python -m moe export runs/tiny exports/tiny-hf                    # transformers, vLLM, SGLang
    .venv/bin/python -m moe export runs/tiny exports/tiny.gguf --format gguf    # llama.cpp

``hf`` writes a Hugging Face folder: ``config.json``, ``model.safetensors`` (per-expert tensor names, as
``save_pretrained`` writes them, in the run's dtype) and the tokenizer files (``moe.hf.tokenizer_files``). The layout
is the native one that expresses the model exactly, else self-contained remote code (``moe.hf.remote``); which
and why is ``moe.hf.config_map``. ``gguf`` writes one GGUF file for llama.cpp (``moe.hf.gguf_export``) where one of
its architectures expresses the model, and refuses, in one line, what none does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from moe.config import load_recipe
from moe.hf.config_map import REMOTE, NotNative, export_layout, hf_config_dict, native_layout
from moe.hf.remote import check_runnable, copy_remote_code, remote_config_dict
from moe.hf.tokenizer_files import load_run_tokenizer, special_token_ids, write_tokenizer_files
from moe.hf.weights import to_hf_state_dict
from moe.rundir import RECIPE, copy_side_files, is_run_dir, read_run

log = logging.getLogger(__name__)
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


def read_weights(run: Path, cfg):
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


def export_hf(run_dir: str | Path, out_dir: str | Path, format: str = "hf") -> ExportResult:
    """Write the model of ``run_dir`` to ``out_dir`` for inference (``format``: hf or gguf).

    Returns:
        the layout (a transformers ``model_type`` or a llama.cpp architecture), where it went, the side files.
    """
    out = Path(out_dir)
    run, cfg = read_for_export(run_dir, out, format)
    if format == "gguf":
        from moe.hf.gguf_export import export_gguf

        return export_gguf(run, out)
    layout = export_layout(cfg)  # refuse before reading the weights
    why_remote = None
    if layout == REMOTE:
        try:
            native_layout(cfg)
        except NotNative as e:
            why_remote = str(e)
    cfg, state, tok, dtype = read_weights(run, cfg)
    hf_state = to_hf_state_dict(state, cfg, layout)
    if cfg.tie_word_embeddings:
        hf_state.pop("lm_head.weight", None)  # transformers re-ties it to the embedding
    config = remote_config_dict(cfg, dtype) if layout == REMOTE else hf_config_dict(cfg, layout, dtype)
    ids = special_token_ids(run, tok)
    config.update(ids)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = copy_side_files(run, out)
    copied += [n for n in write_tokenizer_files(out, tok, ids, cfg.max_position_embeddings, layout) if n not in copied]
    if layout == REMOTE:
        copied += copy_remote_code(out)
    log.debug("exported %s as %s to %s", run, layout, out)
    return ExportResult(layout=layout, out_dir=out, copied=copied, why_remote=why_remote)
