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
from pathlib import Path

from safetensors.torch import save_file

from moe.hf.config_map import REMOTE, NotNative, export_layout, hf_config_dict, native_layout
from moe.hf.export_run import ExportResult, read_for_export, read_weights
from moe.hf.remote import copy_remote_code, remote_config_dict
from moe.hf.tokenizer_files import special_token_ids, write_tokenizer_files
from moe.hf.weights import to_hf_state_dict
from moe.rundir import copy_side_files

log = logging.getLogger(__name__)


def export_hf(run_dir: str | Path, out_dir: str | Path, format: str = "hf") -> ExportResult:
    """Write the model of ``run_dir`` to ``out_dir`` for inference (``format``: hf or gguf).

    Returns:
        the layout (a transformers ``model_type`` or a llama.cpp architecture), where it went, the side files.
    """
    out = Path(out_dir)
    run, cfg = read_for_export(run_dir, out, format)
    if format == "gguf":
        from moe.hf.gguf_export import export_gguf  # imports the gguf package

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
