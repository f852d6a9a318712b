"""``moe upcycle SRC OUT``: read a dense model folder, upcycle it, write a Hugging Face MoE folder.

SRC is a Hugging Face dense folder (Llama, Mistral, Qwen2, Qwen3) or one of our dense run directories. OUT is
a Hugging Face folder in the native layout the result matches (Mixtral for top-k with renormalisation on every
layer; Qwen2-MoE / Qwen3-MoE otherwise, see ``moe.hf.config_map``), with SRC's tokenizer files and an
``upcycle_report.json`` (per layer: scale, whether the method is exact here, max |MoE − dense| on probes).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moe.checkpoint import model_state
from moe.config import MoEConfig, RouterConfig
from moe.hf.export_hf import export_hf
from moe.rundir import build_model, copy_side_files, write_run
from moe.hf.import_hf import read_model_folder
from moe.model import MoEModel
from moe.upcycle.build import target_moe_config, upcycle_with_report
from moe.upcycle.options import parse_method_options
from moe.upcycle.report import UpcycleReport


def read_dense(src: str | Path) -> MoEModel:
    """The dense model of a run directory or a Hugging Face folder (fp32, eval mode)."""
    cfg, state = read_model_folder(src, str(src))
    if cfg.moe is not None:
        raise ValueError(f"{src}: already an MoE model ({cfg.moe.num_experts} experts); upcycling needs a dense one")
    return build_model(cfg, state)


def parse_layers(text: str | None):
    """``all`` | ``every_other`` | ``0,2,4`` -> the ``layers`` argument of ``upcycle`` (None: all)."""
    if text is None or text == "all":
        return None if text is None else "all"
    if text == "every_other":
        return text
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected all, every_other or a comma-separated list like 0,2,4") from None


@dataclass
class UpcycleFolderResult:
    layout: str
    out_dir: Path
    report: UpcycleReport
    copied: list[str]


def upcycle_folder(src: str | Path, out: str | Path, *, num_experts: int, top_k: int, method: str, seed: int = 0,
                   layers: str | None = None, renormalize: bool = True,
                   options: list[str] | tuple[str, ...] = ()) -> UpcycleFolderResult:
    """Upcycle the dense model in ``src`` and write it to ``out`` as a Hugging Face MoE folder."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: the output folder must differ from the source")
    opts = parse_method_options(method, list(options))
    dense = read_dense(src)
    base = MoEConfig(num_experts=num_experts, router=RouterConfig(top_k=top_k, renormalize=renormalize))
    moe_cfg = target_moe_config(dense.cfg, method, num_experts=num_experts, top_k=top_k,
                                layers=parse_layers(layers), base=base, **opts)
    model, report = upcycle_with_report(dense, moe_cfg, method, seed=seed, **opts)
    with tempfile.TemporaryDirectory() as tmp:
        write_run(tmp, model.cfg, model_state(model))
        copy_side_files(src, tmp)
        result = export_hf(tmp, out)
    (out / "upcycle_report.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return UpcycleFolderResult(layout=result.layout, out_dir=out, report=report, copied=result.copied)
