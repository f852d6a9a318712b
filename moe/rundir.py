"""Our run directories: ``recipe.yaml`` (the resolved ``Recipe``) + ``model.safetensors`` (the state dict, without
``lm_head.weight`` when it is tied to the embedding), as ``moe.trainer`` writes them, plus the tokenizer and
generation files that import copies in and export copies out.

Shape legend: V vocab, D model width.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from moe.config import ModelConfig, Recipe, TrainConfig, load_recipe
from moe.checkpoint import load_safetensors
from moe.model import MoEModel

RECIPE = "recipe.yaml"
WEIGHTS = "model.safetensors"
# Copied as they are between a run directory and a Hugging Face folder (whichever exist).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
              "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RECIPE).is_file()


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Parameter name -> shape of ``MoEModel(cfg)``, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = MoEModel(cfg)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> None:
    """One-line ``ValueError`` unless ``state`` has exactly the parameters of ``MoEModel(cfg)``, shapes included."""
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{where}: missing weight {missing[0]}{more} for the configured model")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{where}: unexpected weight {unexpected[0]}{more} for the configured model")
    for name, shape in shapes.items():
        if state[name].shape != shape:
            raise ValueError(f"{where}: weight {name} has shape {tuple(state[name].shape)}, "
                             f"the config expects {tuple(shape)}")


def read_run(run_dir: str | Path) -> tuple[Recipe, dict[str, torch.Tensor]]:
    """The recipe and the checked state dict of a run directory."""
    run = Path(run_dir)
    if not is_run_dir(run):
        raise ValueError(f"{run}: not a run directory (no {RECIPE})")
    recipe = load_recipe(run / RECIPE)
    if not (run / WEIGHTS).is_file():
        raise ValueError(f"{run / WEIGHTS}: weight file does not exist")
    state = load_safetensors(run / WEIGHTS)
    if recipe.model.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    check_state(state, recipe.model, str(run / WEIGHTS))
    return recipe, state


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> MoEModel:
    """``MoEModel(cfg)`` holding ``state`` (fp32 parameters; the stored dtype is upcast on copy), in eval mode."""
    model = MoEModel(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    assert not unexpected and set(missing) <= allowed, (missing, unexpected)  # check_state ran before
    return model.eval()


def load_run_model(run_dir: str | Path) -> MoEModel:
    recipe, state = read_run(run_dir)
    return build_model(recipe.model, state)


def write_run(out_dir: str | Path, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Path:
    """Write a run directory for ``cfg`` (default training settings, ``seq_len`` within the model's positions)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(model=cfg, train=TrainConfig(seq_len=min(TrainConfig().seq_len, cfg.max_position_embeddings)))
    (out / RECIPE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS))
    return out


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer / generation files that ``src`` has into ``dst``; returns their names."""
    copied = []
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
