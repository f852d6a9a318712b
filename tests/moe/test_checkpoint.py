"""``moe.checkpoint.written_by_deepspeed``: which engine a resume needs, read from the folder names alone."""

from __future__ import annotations

from moe.checkpoint import DEEPSPEED_MODEL_FILE, written_by_deepspeed


def _folder(root, step, deepspeed):
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / (DEEPSPEED_MODEL_FILE if deepspeed else "model.safetensors")).write_bytes(b"x")
    (folder / "state.json").write_text("{}")


def test_the_checkpoint_latest_names_decides(tmp_path):
    _folder(tmp_path, 2, deepspeed=True)
    _folder(tmp_path, 4, deepspeed=False)
    (tmp_path / "latest").write_text("step_00000002")
    assert written_by_deepspeed(tmp_path)
    (tmp_path / "latest").write_text("step_00000004")
    assert not written_by_deepspeed(tmp_path)


def test_without_a_usable_latest_the_newest_folder_decides(tmp_path):
    _folder(tmp_path, 2, deepspeed=False)
    _folder(tmp_path, 10, deepspeed=True)
    assert written_by_deepspeed(tmp_path)  # no marker: step 10 is the newest (numeric order, zero-padded)
    for marker in ("step_00000099", "../step_00000002", "garbage"):  # a missing folder, a path out, not a name
        (tmp_path / "latest").write_text(marker)
        assert written_by_deepspeed(tmp_path), marker


def test_no_checkpoint_at_all(tmp_path):
    assert not written_by_deepspeed(tmp_path / "missing")
    assert not written_by_deepspeed(tmp_path)
    (tmp_path / "latest").write_text("step_00000002")
    assert not written_by_deepspeed(tmp_path)
