"""Training checkpoints of the single-process trainer: model, optimizer, RNG, step, and a ``latest`` marker.

    OUT/checkpoints/step_00000100/{model.safetensors, optimizer.pt, rng.safetensors, state.json, manifest.json}
    OUT/checkpoints/latest            (the name of the newest complete checkpoint, written last)

A checkpoint is written into a temporary folder and renamed into place; ``latest`` is replaced atomically
after that, so a crash during a save leaves the previous checkpoint as the one to resume from. Every file's
SHA-256 is in ``manifest.json`` and is verified before loading: a flipped byte, a truncated or a missing file
is refused naming the file, and ``resume_checkpoint`` falls back to the newest intact checkpoint. Loading
never unpickles: safetensors, and ``torch.load(weights_only=True)`` for the optimizer state.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

# What ``save_checkpoint`` writes besides the manifest, and ``load_checkpoint`` reads.
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "rng.safetensors", "state.json")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors, without the LM head when it is tied to the embedding."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(getattr(model, "cfg", None), "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def one_line(e: BaseException, limit: int = 200) -> str:
    """The message of ``e`` on one line, at most ``limit`` characters (for one-line errors)."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
        raise ValueError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


def load_model_state(model: torch.nn.Module, path: Path) -> None:
    """Load ``model.safetensors`` into ``model``, strictly (missing or unexpected names are errors)."""
    state = load_safetensors(path)
    tied = getattr(getattr(model, "cfg", None), "tie_word_embeddings", False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


# -- primitives shared by both engines (this module's one-process checkpoints, DeepSpeed's in
#    moe.parallel.deepspeed.checkpoint): folder names, the ``latest`` marker, pruning, RNG state, messages.

LATEST = "latest"


def step_dir_name(step: int) -> str:
    """The folder of the checkpoint taken after optimizer step ``step``: ``step_00000100``."""
    return f"step_{step:08d}"


def step_dirs(root: Path) -> list[Path]:
    """The checkpoint folders under ``root``, oldest first."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name))


def publish_latest(root: Path, name: str) -> None:
    """Point ``root / latest`` at checkpoint ``name``, atomically: written last, after the checkpoint is whole."""
    marker_tmp = root / ".latest.tmp"
    marker_tmp.write_text(name)
    os.replace(marker_tmp, root / LATEST)


def read_latest(root: Path) -> str | None:
    """The checkpoint name ``root / latest`` holds, or None when there is no (readable) marker."""
    try:
        return (root / LATEST).read_text(errors="replace").strip() if (root / LATEST).is_file() else None
    except OSError:
        return None


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints under ``root``."""
    for old in step_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def intact_note(root: Path) -> str:
    """What is left to resume from after a failed save under ``root``, for the one-line error."""
    previous = read_latest(root)
    return f"the previous checkpoint {root / previous} is intact" if previous else "no earlier checkpoint"


def rng_state(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The CPU generator's state, and ``device``'s when it is a CUDA device (None: the current CUDA device if
    any)."""
    state = {"torch": torch.get_rng_state()}
    if device is None and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    elif device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
    """Set the generators ``rng_state`` saved (the CUDA one only where there is a CUDA device)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and (device.type == "cuda" if device is not None else torch.cuda.is_available()):
        torch.cuda.set_rng_state(state["cuda"], *([device] if device is not None else []))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def verify_checkpoint(folder: Path, required: tuple[str, ...] = ()) -> None:
    """``ValueError`` naming the first missing, truncated or altered file of checkpoint ``folder``, or the first
    of ``required`` (the files a loader will read) that the manifest does not list: an unlisted file would be
    loaded unverified."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"checkpoint {folder} has no manifest.json (incomplete or not a checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"checkpoint {folder}: manifest.json is corrupt") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"checkpoint {folder}: manifest.json is corrupt (not a mapping of file names)")
    for name in required:
        if name not in manifest:
            raise ValueError(f"checkpoint {folder}: file {name} is not listed in manifest.json (cannot verify it)")
    for name, entry in manifest.items():
        well_formed = (isinstance(entry, dict) and type(entry.get("bytes")) is int
                       and isinstance(entry.get("sha256"), str))
        if not well_formed or "/" in name or name in ("", ".", ".."):  # names are plain files of the folder
            raise ValueError(f"checkpoint {folder}: manifest.json is corrupt (entry {name!r})")
        path = folder / name
        if not path.is_file():
            raise ValueError(f"checkpoint {folder}: file {name} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise ValueError(f"checkpoint {folder}: file {name} is truncated or extended "
                             f"({path.stat().st_size} bytes, expected {entry['bytes']})")
        if _sha256(path) != entry["sha256"]:
            raise ValueError(f"checkpoint {folder}: file {name} does not match its SHA-256 (corrupted)")


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    keep: int) -> Path:
    """Write checkpoint ``step`` under ``root``, point ``latest`` at it, and keep the newest ``keep``.

    A failed write (disk full, no permission) raises ``RuntimeError`` naming the folder and the reason, after
    removing the partial temporary folder; the checkpoint ``latest`` names stays in force and intact.
    """
    name = step_dir_name(step)
    final = root / name
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
        save_file(model_state(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file(rng_state(), str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        publish_latest(root, name)
    except OSError as e:
        raise RuntimeError(
            f"could not write checkpoint {final}: {e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)}"
            f"{', ' + str(e.filename) if e.filename else ''}); {intact_note(root)}"
        ) from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    # Temporary folders of saves that a crash interrupted (nothing else writes ``.step_*`` here).
    for stale in root.glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    prune(root, keep)
    return final


# The file of non-expert weights that DeepSpeed writes into every checkpoint (``moe.parallel.deepspeed.checkpoint``);
# the one-process checkpoints of this module never hold it.
DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"


def written_by_deepspeed(root: Path) -> bool:
    """Whether a resume under ``root`` starts from a DeepSpeed checkpoint: ``resume_checkpoint``'s first candidate
    that exists (nothing is verified or loaded here)."""
    folder = next((c for c in _resume_candidates(root, warn=False) if c.is_dir()), None)
    return folder is not None and (folder / DEEPSPEED_MODEL_FILE).is_file()


def _resume_candidates(root: Path, *, warn: bool) -> list[Path]:
    """The checkpoints a resume tries, in order: the one ``latest`` names, then the others, newest first."""
    candidates = step_dirs(root)[::-1] if root.is_dir() else []
    name = read_latest(root)
    if name is not None:
        if re.fullmatch(r"step_\d+", name):  # never a path out of ``root``
            named = root / name
            candidates = [named] + [c for c in candidates if c != named]
        elif warn:
            log.warning("%s names %r, not a checkpoint of this folder; ignoring it", root / LATEST, name[:100])
    return candidates


def resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names if intact, else the newest intact one (saying
    so), else None when there is none at all. Damaged checkpoints are reported and skipped, never deleted."""
    candidates = _resume_candidates(root, warn=True)
    for i, path in enumerate(candidates):
        try:
            verify_checkpoint(path)
        except ValueError as e:
            log.warning("%s; trying an older checkpoint", e)
            continue
        if i > 0:
            log.warning("resuming from %s, the newest intact checkpoint", path)
        return path
    if candidates:
        raise ValueError(f"no intact checkpoint under {root}: all {len(candidates)} are damaged (see the warnings)")
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore model, optimizer and RNG from ``path`` after verifying it; returns the step it was saved after."""
    verify_checkpoint(path, required=CHECKPOINT_FILES)
    load_model_state(model, path / "model.safetensors")
    try:
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path / 'optimizer.pt'} cannot be loaded safely ({str(e).splitlines()[0][:200]})") from None
    optimizer.load_state_dict(opt_state)
    restore_rng(load_file(str(path / "rng.safetensors")))
    return int(json.loads((path / "state.json").read_text())["step"])
