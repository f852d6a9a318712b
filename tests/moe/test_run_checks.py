"""Run directories as a user meets them through ``moe train``: a default --out per recipe, --overwrite, resuming
with changed training settings, --init taking the architecture from the model and training settings from the
recipe, a summary that tells what ran, plain progress lines, and TensorBoard after a resume. (The refusals are
rows of tests/reliability/test_bad_input_table.py, which also checks that they leave every file as it was.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from moe.cli import main
from moe.config import load_recipe
from moe.run_checks import TRAINING_ONLY_MODEL_FIELDS, architecture, check_resume, merge_init

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.vocab_size=320", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
         "model.num_kv_heads=1", "model.moe.num_experts=4", "model.moe.expert_hidden_size=16",
         "data.max_chars=60000", "train.micro_batch_size=2", "train.seq_len=16", "train.warmup_steps=2",
         "train.eval_batches=2", "train.log_every=2", "train.eval_every=0"]


def _argv(cache: Path, *extra: str) -> list[str]:
    return [*SMALL, f"data.cache_dir={cache}", "--no-progress", *extra]


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_default_out_is_named_after_the_recipe(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "tiny-dense", "--max-steps", "2", *_argv(tmp_path / "cache", "model.moe=null")]) == 0
    assert _steps(tmp_path / "runs" / "tiny-dense") == [1, 2]
    assert "runs/tiny-dense/metrics.jsonl" in capsys.readouterr().out


def test_overwrite_starts_over_and_nothing_of_the_old_run_remains(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(out), *_argv(tmp_path / "cache", "train.steps=4",
                                                             "train.save_every=1", "train.keep_checkpoints=5")]) == 0
    assert main(["train", "tiny", "--out", str(out), "--overwrite",
                 *_argv(tmp_path / "cache", "train.steps=2", "train.save_every=1", "train.keep_checkpoints=5")]) == 0
    assert _steps(out) == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert "steps: 2" in (out / "recipe.yaml").read_text()


def test_resume_with_more_steps_reports_what_changed_and_what_ran(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(out), *_argv(tmp_path / "cache", "train.steps=2")]) == 0
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        assert main(["train", "tiny", "--out", str(out), "--resume",
                     *_argv(tmp_path / "cache", "train.steps=4", "model.moe.router.aux_loss_coef=0.02")]) == 0
    assert _steps(out) == [1, 2, 3, 4]
    summary = capsys.readouterr().out
    assert "done: 2 steps (steps 3-4, resumed from step 2)" in summary
    assert "--resume with changed settings: train.steps: 2 -> 4; model.moe.router.aux_loss_coef: 0.01 -> 0.02" \
        in caplog.text


def test_check_resume_names_every_fixed_setting_that_differs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = load_recipe(ROOT / "recipes/tiny.yaml")
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved.to_dict()))
    changed = load_recipe(ROOT / "recipes/tiny.yaml", ["model.moe.num_experts=4", "data.max_chars=1000",
                                                      "model.moe.backend=reference"])
    with pytest.raises(ValueError) as e:
        check_resume(run, changed)
    assert "model.moe.num_experts: 8 in the run, 4 now" in str(e.value)
    assert "data.max_chars: 4000000 in the run, 1000 now" in str(e.value)
    assert "backend" not in str(e.value)  # training-only: may change
    assert check_resume(run, load_recipe(ROOT / "recipes/tiny.yaml", ["model.moe.backend=reference"])) == [
        "model.moe.backend: auto -> reference"]


def test_training_only_fields_exist_and_are_not_architecture():
    flat = architecture(load_recipe(ROOT / "recipes/tiny.yaml").model)
    assert "moe.router.top_k" in flat and "hidden_size" in flat
    assert not set(TRAINING_ONLY_MODEL_FIELDS) & set(flat)
    recipe = load_recipe(ROOT / "recipes/tiny.yaml")
    for name in TRAINING_ONLY_MODEL_FIELDS:  # every name is a real field of the tiny MoE's model config
        section = recipe.model
        for part in name.split("."):
            section = getattr(section, part)


def test_init_takes_architecture_from_the_model_and_training_settings_from_the_recipe(tmp_path, caplog):
    model = load_recipe(ROOT / "recipes/tiny.yaml", SMALL).model
    recipe = load_recipe(ROOT / "recipes/tiny.yaml", ["model.moe.router.aux_loss_coef=0.1", "model.moe.capacity_factor=2",
                                                      "model.hidden_size=256"])
    merged, notes = merge_init(recipe, model, ["model.moe.router.aux_loss_coef=0.1"], "--init X")
    assert merged.model.hidden_size == 32 and merged.model.moe.num_experts == 4  # the model's
    assert merged.model.moe.router.aux_loss_coef == 0.1 and merged.model.moe.capacity_factor == 2  # the recipe's
    assert merged.train == recipe.train and merged.data == recipe.data
    assert "architecture from the model (2 layers, hidden 32, vocab 320, 4 experts of width 16, topk top-2)" in notes[0]
    assert "model.moe.router.aux_loss_coef=0.1" in notes[1] and "model.moe.capacity_factor=2" in notes[1]
    # an override that agrees with the model is fine; one that contradicts it is refused
    merge_init(load_recipe(ROOT / "recipes/tiny.yaml", ["model.hidden_size=32"]), model, ["model.hidden_size=32"],
               "--init X")
    with pytest.raises(ValueError, match=r"model.moe=null \(the model has "):
        merge_init(load_recipe(ROOT / "recipes/tiny.yaml", ["model.moe=null"]), model, ["model.moe=null"], "--init X")


def test_init_through_the_cli_keeps_command_line_training_settings(tmp_path, caplog):
    parent = tmp_path / "parent"
    assert main(["train", "tiny", "--out", str(parent), *_argv(tmp_path / "cache", "train.steps=1")]) == 0
    child = tmp_path / "child"
    with caplog.at_level(logging.INFO):
        assert main(["train", "tiny", "--out", str(child), "--init", str(parent),
                     *_argv(tmp_path / "cache", "train.steps=1", "model.moe.router.aux_loss_coef=0.1")]) == 0
    saved = yaml.safe_load((child / "recipe.yaml").read_text())
    assert saved["model"]["moe"]["router"]["aux_loss_coef"] == 0.1 and saved["model"]["hidden_size"] == 32
    assert f"--init {parent}: architecture from the model" in caplog.text
    assert "model.moe.router.aux_loss_coef=0.1" in caplog.text


def test_plain_progress_lines_and_the_mfu_note(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["train", "tiny", "--out", str(out), *_argv(tmp_path / "cache", "train.steps=4",
                                                                 "train.eval_every=2")]) == 0
    assert "step 2/4: loss " in caplog.text and "step 4/4: validation loss " in caplog.text
    assert "MFU: not computed, the device's peak is unknown (set train.peak_tflops=" in capsys.readouterr().out


def test_warmup_longer_than_the_run_is_said(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert main(["train", "tiny", "--out", str(tmp_path / "run"),
                     *_argv(tmp_path / "cache", "train.steps=2", "train.warmup_steps=5")]) == 0
    assert "train.warmup_steps (5) >= train.steps (2): the learning rate rises the whole run" in caplog.text


def test_tensorboard_after_a_resume_has_each_step_once_and_the_load_pictures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    base = _argv(tmp_path / "cache", "train.save_every=2", "train.eval_every=2", "train.log_every=1")
    assert main(["train", "tiny", "--out", str(out), *base, "train.steps=4"]) == 0
    # a crash after step 3: the checkpoint of step 4 never happened, but its events did
    ckpts = out / "checkpoints"
    (ckpts / "latest").write_text("step_00000002")
    import shutil

    shutil.rmtree(ckpts / "step_00000004")
    assert main(["train", "tiny", "--out", str(out), "--resume", *base, "train.steps=4"]) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    tags = events.Tags()["images"]
    assert "moe/load_heatmap" in tags and "moe/layer0/load_over_steps" in tags and "moe/layer1/load_over_steps" in tags
    heat = events.Images("moe/load_heatmap")
    assert [e.step for e in heat] == [2, 4] and heat[-1].width > 300 and heat[-1].height > 100
