"""What ``moe train`` checks before it writes anything into a run directory, and how ``--init`` merges settings.

- ``check_out_dir``: a directory that already holds something is continued (``--resume``) or started over
  (``--overwrite``, only when everything in it is a run's), never silently mixed with a new run.
- ``check_resume``: the recipe of a resumed run against the one the run was started with: the architecture and
  the data (what the tokens are) must be the same; training settings may change, and are listed.
- ``merge_init``: with ``--init MODEL``, the architecture is the model's and the training-only settings (router
  losses and their coefficients, jitter, capacity, backend) are the recipe's and the command line's; a
  command-line architecture setting that contradicts the model is an error.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from moe.config import ModelConfig, Recipe
from moe.config_io import from_dict, to_dict

# What ``moe train`` writes into a run directory; ``--overwrite`` deletes only these.
RUN_ENTRIES = ("recipe.yaml", "tokenizer.json", "metrics.jsonl", "model.safetensors", "checkpoints", "tensorboard")
# Model settings that shape training, not the function the model computes: ``--init`` takes them from the recipe
# and a resume may change them. Every other ``model`` field is architecture.
TRAINING_ONLY_MODEL_FIELDS = (
    "initializer_range",
    "moe.router.aux_loss_coef",
    "moe.router.lb_f_normalization",
    "moe.router.z_loss_coef",
    "moe.router.init_std",
    "moe.router.jitter",
    "moe.router.jitter_eps",
    "moe.capacity_factor",
    "moe.eval_capacity_factor",
    "moe.min_capacity",
    "moe.backend",
)
# Data settings that decide the tokens a run trains and evaluates on: a resume must keep them.
DATA_FIELDS = ("source", "format", "text_field", "hub_config", "hub_split", "max_chars", "tokenizer", "val_fraction")


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    """Dotted keys -> leaf values (``moe.router.top_k``); a None section is one leaf."""
    if isinstance(value, dict) and value:
        out = {}
        for key, sub in value.items():
            out.update(_flat(sub, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}


def _show(value: Any) -> str:
    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def architecture(cfg: ModelConfig | None) -> dict[str, Any]:
    """The architecture fields of a model config, dotted (``hidden_size``, ``moe.router.top_k``, ...)."""
    flat = _flat(to_dict(cfg) if cfg is not None else None, "")
    return {k: v for k, v in flat.items() if k not in TRAINING_ONLY_MODEL_FIELDS}


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> list[str]:
    """Whether ``moe train`` may use ``out``; returns the entries ``--overwrite`` will delete (none otherwise).

    Raises:
        ValueError: ``out`` is a file; it holds something and neither ``--resume`` nor ``--overwrite`` was given;
            both were given; ``--overwrite`` and it holds files that are not a run's.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    if not out.exists():
        return []
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory (it is created if missing)")
    entries = sorted(p.name for p in out.iterdir())
    if not entries or resume:
        return []
    if not overwrite:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise ValueError(f"--out {out} already holds a run ({shown}); continue it with --resume, start over with "
                         "--overwrite (deletes that run), or give another --out")
    foreign = [e for e in entries if e not in RUN_ENTRIES]
    if foreign:
        raise ValueError(f"--overwrite: {out} holds files that `moe train` did not write ({', '.join(foreign[:4])}); "
                         "refusing to delete them: give an empty or new --out")
    return entries


def clear_run(out: Path, entries: list[str]) -> None:
    """Delete the run entries ``check_out_dir`` found (``--overwrite``)."""
    for name in entries:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def check_resume(out: Path, recipe: Recipe) -> list[str]:
    """Compare ``recipe`` with the one ``out`` was started with (``out/recipe.yaml``); returns one line per
    training or parallel setting that changed (allowed, to be reported).

    Raises:
        ValueError: one line naming every architecture or data setting that differs, and what each was.
    """
    saved_path = out / "recipe.yaml"
    if not saved_path.is_file():
        return []
    try:
        saved = from_dict(Recipe, yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume: {saved_path} is not a readable recipe ({' '.join(str(e).split())[:200]})") from None
    old, new = architecture(saved.model), architecture(recipe.model)
    fixed = [f"model.{k}: {_show(old.get(k))} in the run, {_show(new.get(k))} now"
             for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    fixed += [f"data.{k}: {_show(getattr(saved.data, k))} in the run, {_show(getattr(recipe.data, k))} now"
              for k in DATA_FIELDS if getattr(saved.data, k) != getattr(recipe.data, k)]
    if fixed:
        raise ValueError(f"--resume: the recipe differs from the run's ({saved_path}) in what cannot change: "
                         + "; ".join(fixed) + ". Resume with the run's settings, or start a new run in another --out")
    changed = []
    for section in ("train", "parallel"):
        a, b = _flat(to_dict(getattr(saved, section)), section), _flat(to_dict(getattr(recipe, section)), section)
        changed += [f"{k}: {_show(a.get(k))} -> {_show(b.get(k))}" for k in sorted(a) if a.get(k) != b.get(k)]
    new_model = _flat(to_dict(recipe.model), "")
    old_model = _flat(to_dict(saved.model), "")
    changed += [f"model.{k}: {_show(old_model.get(k))} -> {_show(new_model.get(k))}"
                for k in TRAINING_ONLY_MODEL_FIELDS if old_model.get(k) != new_model.get(k)]
    return changed


def merge_init(recipe: Recipe, init_cfg: ModelConfig, overrides: list[str] | tuple[str, ...], where: str
               ) -> tuple[Recipe, list[str]]:
    """The recipe of a run that starts from the model ``init_cfg``: its architecture, the recipe's training-only
    model settings (where the model has the section they belong to), and everything outside ``model`` as the
    recipe has it. Returns the recipe and lines saying what came from where.

    Raises:
        ValueError: a command-line override of an architecture setting that differs from the model's.
    """
    mine, theirs = architecture(init_cfg), architecture(recipe.model)
    conflicts, seen = [], set()
    for text in overrides:
        name = text.partition("=")[0].strip().removeprefix("model.")
        if not text.startswith("model.") or name in TRAINING_ONLY_MODEL_FIELDS or name in seen:
            continue
        seen.add(name)
        if _section(mine, name) != _section(theirs, name):
            conflicts.append(f"model.{name}={_show(_value(theirs, name))} (the model has {_show(_value(mine, name))})")
    if conflicts:
        raise ValueError(f"{where}: the architecture comes from the model, and these overrides contradict it: "
                         + "; ".join(conflicts) + ". Drop them, or train from scratch without --init")
    merged = to_dict(init_cfg)
    recipe_flat = _flat(to_dict(recipe.model), "")
    taken = []
    for key in TRAINING_ONLY_MODEL_FIELDS:
        parts = key.split(".")
        section = merged
        for part in parts[:-1]:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or key not in recipe_flat:
            continue
        if section.get(parts[-1]) != recipe_flat[key]:
            taken.append(f"model.{key}={_show(recipe_flat[key])}")
        section[parts[-1]] = recipe_flat[key]
    data = recipe.to_dict()
    data["model"] = merged
    notes = [f"{where}: architecture from the model ({_summary(init_cfg)}); the recipe's architecture is not used",
             f"{where}: training settings from the recipe and the command line"
             + (f", differing from the model's folder: {', '.join(taken)}" if taken else "")]
    return from_dict(Recipe, data), notes


def _section(flat: dict[str, Any], name: str) -> dict[str, Any]:
    """The dotted keys of ``flat`` at or under ``name``."""
    return {k: v for k, v in flat.items() if k == name or k.startswith(name + ".")}


def _value(flat: dict[str, Any], name: str) -> Any:
    """What ``flat`` holds at ``name``: a leaf, or the section under it as a mapping (for messages)."""
    sub = _section(flat, name)
    return sub[name] if name in sub else {k[len(name) + 1:]: v for k, v in sub.items()} or None


def _summary(cfg: ModelConfig) -> str:
    moe = cfg.moe
    ffn = ("dense" if moe is None else
           f"{moe.num_experts} experts of width {moe.expert_hidden_size}, {moe.router.name} top-{moe.router.top_k}")
    return f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, {ffn}"
