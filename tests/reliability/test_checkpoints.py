"""Damaged checkpoints: every file of a checkpoint, flipped, truncated or deleted, is refused naming the file;
a damaged manifest or ``latest`` marker too; ``--resume`` falls back to the newest intact checkpoint and says so.

(tests/moe/test_trainer.py covers a damaged ``model.safetensors`` end to end; these cover the other files, the
manifest, the marker, and the case where nothing intact is left.)
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from moe.checkpoint import CHECKPOINT_FILES, load_checkpoint, resume_checkpoint, save_checkpoint, verify_checkpoint
from moe.cli import main
from tests.reliability.common import RECIPE, small, step_losses


def _model_and_optimizer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).square().sum().backward()
    opt.step()  # the optimizer has state to save
    return model, opt


@pytest.fixture
def root(tmp_path):
    """Two checkpoints, steps 1 and 2; ``latest`` names step 2."""
    root = tmp_path / "checkpoints"
    model, opt = _model_and_optimizer()
    save_checkpoint(root, 1, model, opt, keep=5)
    save_checkpoint(root, 2, model, opt, keep=5)
    return root


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        path.write_bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0x01]) + data[len(data) // 2 + 1:])
    elif how == "truncate":
        path.write_bytes(data[: len(data) - 7])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_damaged_file_is_refused_naming_it(root, name, how):
    folder = root / "step_00000002"
    _damage(folder / name, how)
    expected = {"flip": "does not match its SHA-256", "truncate": "is truncated", "delete": "is missing"}[how]
    with pytest.raises(ValueError, match=f"file {name} {expected}") as err:
        verify_checkpoint(folder)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
    model, opt = _model_and_optimizer(seed=1)
    with pytest.raises(ValueError, match=name):
        load_checkpoint(folder, model, opt)
    assert resume_checkpoint(root) == root / "step_00000001"  # the older one is intact


@pytest.mark.parametrize("damage,message", [
    ("delete", "has no manifest.json"),
    ("truncate", "manifest.json is corrupt"),
    ("not_a_mapping", "manifest.json is corrupt"),
    ("bad_entry", "manifest.json is corrupt (entry 'state.json')"),
    ("path_outside", "manifest.json is corrupt (entry '../step_00000001/state.json')"),
    ("emptied", "file model.safetensors is not listed in manifest.json"),
])
def test_damaged_manifest_is_refused(root, damage, message):
    folder = root / "step_00000002"
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    if damage in ("delete", "truncate"):
        _damage(path, damage)
    elif damage == "not_a_mapping":
        path.write_text("[]")
    elif damage == "bad_entry":
        path.write_text(json.dumps({**manifest, "state.json": {"sha": "x"}}))
    elif damage == "path_outside":
        path.write_text(json.dumps({**manifest, "../step_00000001/state.json": manifest["state.json"]}))
    else:  # valid JSON listing nothing: the files would load unverified
        path.write_text("{}")
    model, opt = _model_and_optimizer(seed=1)
    with pytest.raises(ValueError) as err:
        load_checkpoint(folder, model, opt)
    assert str(err.value).startswith(f"checkpoint {folder}") and message in str(err.value)


def test_latest_naming_a_missing_folder_falls_back(root, caplog):
    (root / "latest").write_text("step_00000009")
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(root) == root / "step_00000002"
    assert "step_00000009 has no manifest.json" in caplog.text
    assert "resuming from" in caplog.text and "step_00000002, the newest intact checkpoint" in caplog.text


def test_latest_naming_a_path_outside_the_folder_is_ignored(root, tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "checkpoints").mkdir(parents=True)
    model, opt = _model_and_optimizer()
    save_checkpoint(elsewhere / "checkpoints", 7, model, opt, keep=1)  # intact, but not this run's
    (root / "latest").write_text("../elsewhere/checkpoints/step_00000007")
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(root) == root / "step_00000002"
    assert "not a checkpoint of this folder; ignoring it" in caplog.text


def test_resume_through_the_cli_falls_back_and_says_so(tmp_path, data_cache, capsys, caplog):
    """Damage the newest checkpoint's optimizer state: ``--resume`` warns, resumes from the older one, and the
    re-trained steps are bit-identical; with every checkpoint damaged it stops with one ``error:`` line."""
    out = tmp_path / "run"
    args = ["train", RECIPE, "--out", str(out), "--no-progress",
            *small(data_cache, "train.steps=4", "train.save_every=2", "train.keep_checkpoints=3")]
    assert main(args) == 0
    before = step_losses(out)
    _damage(out / "checkpoints" / "step_00000004" / "optimizer.pt", "flip")
    with caplog.at_level(logging.INFO):
        assert main([*args, "--resume"]) == 0
    assert "file optimizer.pt does not match its SHA-256" in caplog.text
    assert "step_00000002, the newest intact checkpoint" in caplog.text
    assert step_losses(out) == before

    for folder in (out / "checkpoints").glob("step_*"):
        _damage(folder / "rng.safetensors", "truncate")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no intact checkpoint under {out / 'checkpoints'}: all 2 are damaged")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000004"]


def test_a_save_removes_the_temporary_folders_of_interrupted_saves(root):
    leftover = root / ".step_00000003.abc123"  # what a crash during a save leaves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    model, opt = _model_and_optimizer()
    save_checkpoint(root, 3, model, opt, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]
