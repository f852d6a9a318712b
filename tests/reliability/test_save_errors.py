"""A disk that fills up, or a checkpoint folder that cannot be written, during a save: one clear error naming
the folder and the reason, the partial folder removed, and the previous checkpoint intact and still ``latest``.

The faults are injected by monkeypatching the writers to raise ``OSError(ENOSPC)`` / ``OSError(EACCES)``
(after writing part of the file, as a full disk does). A real read-only folder (``chmod``) would not do here:
the tests run as root, whom permissions do not stop.
"""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

import pytest
import torch

import moe.checkpoint as checkpoint
from moe.checkpoint import resume_checkpoint, save_checkpoint, verify_checkpoint
from moe.cli import main
from tests.reliability.common import RECIPE, small, step_losses


def _disk_full_on(monkeypatch, call: int) -> None:
    """The ``call``-th safetensors write from now on writes half its bytes, then fails with ENOSPC."""
    real = checkpoint.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < call:
            return real(tensors, filename, *args, **kwargs)
        real(tensors, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(checkpoint, "save_file", save_file)


def _unwritable(monkeypatch, root: Path) -> None:
    """Creating the temporary folder under ``root`` fails as in a read-only folder (other folders work)."""
    real = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == root:
            raise PermissionError(errno.EACCES, "Permission denied", str(root / kwargs.get("prefix", "")))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(checkpoint.tempfile, "mkdtemp", mkdtemp)


@pytest.mark.parametrize("fault,reason", [
    ("model_write", "No space left on device (ENOSPC"),  # the first file of the save
    ("rng_write", "No space left on device (ENOSPC"),  # after model.safetensors and optimizer.pt
    ("unwritable", "Permission denied (EACCES"),
])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fault, reason):
    root = tmp_path / "checkpoints"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(root, 1, model, opt, keep=2)
    before = {p.name: p.read_bytes() for p in (root / "step_00000001").iterdir()}
    if fault == "unwritable":
        _unwritable(monkeypatch, root)
    else:
        _disk_full_on(monkeypatch, 1 if fault == "model_write" else 2)
    with pytest.raises(RuntimeError) as err:
        save_checkpoint(root, 2, model, opt, keep=2)
    message = str(err.value)
    assert message.startswith(f"could not write checkpoint {root / 'step_00000002'}: {reason}")
    assert message.endswith(f"the previous checkpoint {root / 'step_00000001'} is intact") and "\n" not in message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]  # no partial folder left
    assert (root / "latest").read_text() == "step_00000001"
    assert {p.name: p.read_bytes() for p in (root / "step_00000001").iterdir()} == before
    verify_checkpoint(root / "step_00000001")
    assert resume_checkpoint(root) == root / "step_00000001"


def test_disk_full_during_training_is_one_error_line_and_resume_continues(tmp_path, data_cache, monkeypatch,
                                                                          capsys):
    out = tmp_path / "run"
    args = ["train", RECIPE, "--out", str(out), "--no-progress",
            *small(data_cache, "train.steps=4", "train.save_every=2")]
    _disk_full_on(monkeypatch, 3)  # checkpoint 1 writes model + rng; the second one's model write fails
    assert main(args) == 2
    err = capsys.readouterr().err
    ckpts = out / "checkpoints"
    assert err.startswith(f"error: could not write checkpoint {ckpts / 'step_00000004'}: No space left on device")
    assert err.rstrip().endswith(f"the previous checkpoint {ckpts / 'step_00000002'} is intact")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002"]
    verify_checkpoint(ckpts / "step_00000002")

    monkeypatch.undo()  # space freed: --resume continues from step 2
    assert main([*args, "--resume"]) == 0
    assert [s for s, _ in step_losses(out)] == [1, 2, 3, 4]
    assert (ckpts / "latest").read_text() == "step_00000004"
