"""What ``--resume`` lets DeepSpeed unpickle.

DeepSpeed loads its own checkpoint files with ``torch.load(weights_only=False)``, i.e. pickle, which runs whatever
code a forged file names. The manifest (SHA-256 of every file) catches a damaged checkpoint, but not a forgery:
whoever can write the folder can rewrite the manifest too. So every ``*.pt`` file of the checkpoint is also
disassembled without being run (``torch.serialization.get_unsafe_globals_in_checkpoint``), and resuming is
refused when one names a Python global outside torch's weights-only set (tensors, storages, ``OrderedDict``, ...)
and ``DEEPSPEED_PICKLE_GLOBALS`` (the three classes DeepSpeed's ZeRO files hold), or is not an archive that can
be disassembled (a legacy pickle, TorchScript, a pickle protocol above 2). NOTE: a file swapped between this
check and DeepSpeed's load is not caught (the folder must not be writable by others while a run resumes).
"""

from __future__ import annotations

from pathlib import Path

import torch

# The Python globals that DeepSpeed's own checkpoint files pickle beyond torch's weights-only set (which
# ``torch.serialization.get_unsafe_globals_in_checkpoint`` leaves out of its answer). Found by saving DeepSpeed
# 0.19.8 checkpoints with this engine at ZeRO 0, 1 and 2 (expert parallel 1 and 2; fp32) and with a bare
# DeepSpeed engine at ZeRO 0, 1, 2 in fp32 and bf16, and listing every file's globals: the model-state,
# per-expert and stage-0 optimizer files (``expp_rank_*``, also bf16's ``FP16_UnfusedOptimizer``) hold only
# tensors, storages, ``torch.Size`` and ``OrderedDict``; the ZeRO 1/2 optimizer files (``zero_pp_rank_*``,
# ``bf16_zero_pp_rank_*``) add these three. ``tests/reliability/test_deepspeed_safety.py`` re-derives the list.
# Under a full unpickler each of them can only be built, not made to run code: a class whose ``__init__`` sets
# attributes (LossScaler), an int Enum, a two-int dataclass; the names must match exactly (no dotted paths).
DEEPSPEED_PICKLE_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO 1/2: the (static) loss scaler, also in fp32/bf16
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO 1/2: the stage the partitions were written at
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO 1/2: where each parameter lies in a partition
})


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def check_pickled_files(folder: Path, shard: tuple[int, int] = (0, 1)) -> None:
    """Refuse a checkpoint whose pickled files could run code when DeepSpeed loads them; nothing is unpickled.

    Every ``*.pt`` file under ``folder`` (subfolders too: DeepSpeed's universal checkpoints keep them there) is
    disassembled by ``torch.serialization.get_unsafe_globals_in_checkpoint``; with ``shard=(i, n)`` only files
    ``i, i+n, ...`` of the sorted list (the ranks share the work).

    Raises:
        ValueError: one line naming the first offending file and what is wrong: a global outside torch's
            weights-only set and ``DEEPSPEED_PICKLE_GLOBALS``, a file that cannot be disassembled, or a torch
            without the inspection function (added in torch 2.5).
    """
    files = sorted(p for p in folder.rglob("*.pt") if not p.is_dir())[shard[0]::shard[1]]
    inspect = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if files and inspect is None:
        raise ValueError(f"{files[0]} cannot be loaded safely: torch {torch.__version__} lacks "
                         "torch.serialization.get_unsafe_globals_in_checkpoint (torch >= 2.5), which checks "
                         "DeepSpeed's pickled checkpoint files before they are loaded; upgrade torch to resume")
    for path in files:
        try:
            found = inspect(str(path))
        except Exception as e:  # not a torch.save zip archive, TorchScript, or opcodes it does not know
            raise ValueError(f"{path} cannot be loaded safely: it cannot be inspected without running it "
                             f"({first_line(e)}); DeepSpeed writes torch.save zip archives of pickle protocol 2"
                             ) from None
        unknown = sorted(set(found) - DEEPSPEED_PICKLE_GLOBALS)
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise ValueError(f"{path} cannot be loaded safely: it refers to the Python global {unknown[0]}{more}, "
                             "which DeepSpeed's checkpoint files do not use (a forged or foreign file?)")

