"""The ``moe`` command as a user types it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from moe.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_train_end_to_end_through_the_cli(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "moe", "train", "recipes/tiny.yaml", "--out", str(out), "--max-steps", "4",
           "--no-progress", "model.num_layers=2", "model.vocab_size=512", "train.micro_batch_size=4",
           "train.seq_len=32", "data.max_chars=100000", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "validation loss" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in steps)
    assert "val_loss" in records[-1]
    weights = load_file(out / "model.safetensors")
    assert weights["layers.0.mlp.experts.w_gate_up_ED2F"].shape == (8, 128, 512)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert "tensorboard --logdir" in proc.stdout and "moe generate" in proc.stdout
    assert "num_layers: 2" in (out / "recipe.yaml").read_text()


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "recipes/none.yaml"], "error: recipe recipes/none.yaml does not exist"),
        (["train", "recipes/tiny.yaml", "model.moe.router.name=magic"], "error: unknown router 'magic'"),
        (["train", "recipes/tiny.yaml", "model.moe.num_experts=0"], "error: moe.num_experts must be >= 1, got 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, args, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err
