"""``moe export RUN_DIR OUT_DIR --format hf``: one of our run directories -> a Hugging Face folder that
``transformers.AutoModelForCausalLM.from_pretrained`` loads as a native model (no ``trust_remote_code``).

    .venv/bin/python -m moe export runs/tiny exports/tiny-hf --format hf

The folder holds ``config.json``, ``model.safetensors`` (per-expert tensor names, as ``save_pretrained`` writes
them, in the run's dtype) and the run's tokenizer / generation files when it has them. Which layout a model gets,
and which models are refused and why, is ``moe.hf.config_map.export_layout`` (its module docstring has the table).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from moe.config import load_recipe
from moe.hf.config_map import export_layout, hf_config_dict
from moe.rundir import RECIPE, copy_side_files, is_run_dir, read_run
from moe.hf.weights import to_hf_state_dict

log = logging.getLogger(__name__)
FORMATS = ("hf",)


def _special_token_ids(run: Path) -> dict[str, int | list[int] | None]:
    """bos/eos/pad ids from the run's ``generation_config.json``; explicitly null without one, or transformers
    would fill in the family's defaults (Llama and Mixtral: bos 1, eos 2) and stop generating at id 2."""
    ids: dict[str, int | list[int] | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    path = run / "generation_config.json"
    if path.is_file():
        try:
            gen = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        ids.update({k: gen[k] for k in ids if isinstance(gen, dict) and k in gen})
    return ids


def _check_tokenizer(path: Path, vocab_size: int) -> None:
    """A tokenizer with ids the embedding lacks would make an exported folder that fails on some inputs."""
    if not path.is_file():
        return
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size()
    except Exception:  # tokenizers raises its own Exception type; a file it cannot read is copied as it is
        return
    if size > vocab_size:
        raise ValueError(f"{path}: {size} tokens, but the model's vocab_size is {vocab_size}; the tokenizer must "
                         f"not have more tokens than the model (ids >= {vocab_size} have no embedding)")


@dataclass
class ExportResult:
    layout: str
    out_dir: Path
    copied: list[str]


def export_hf(run_dir: str | Path, out_dir: str | Path, format: str = "hf") -> ExportResult:
    """Write the model of ``run_dir`` to ``out_dir`` in the native Hugging Face layout it matches.

    Returns:
        the layout (a transformers ``model_type``), the folder, the copied tokenizer / generation files.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    run, out = Path(run_dir), Path(out_dir)
    if not is_run_dir(run):
        raise ValueError(f"{run}: not a run directory (no {RECIPE}; `moe train` and `moe import` write them)")
    if out.resolve() == run.resolve():
        raise ValueError(f"{out}: the export folder must differ from the run directory")
    layout = export_layout(load_recipe(run / RECIPE).model)  # refuse before reading the weights
    recipe, state = read_run(run)
    cfg = recipe.model
    _check_tokenizer(run / "tokenizer.json", cfg.vocab_size)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"{run}: weights mix dtypes {sorted(str(d) for d in dtypes)}; export needs one")
    dtype = str(dtypes.pop()).removeprefix("torch.")
    hf_state = to_hf_state_dict(state, cfg, layout)
    if cfg.tie_word_embeddings:
        hf_state.pop("lm_head.weight", None)  # transformers re-ties it to the embedding
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config_dict(cfg, layout, dtype)
    config.update(_special_token_ids(run))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = copy_side_files(run, out)
    log.debug("exported %s as %s to %s", run, layout, out)
    return ExportResult(layout=layout, out_dir=out, copied=copied)
