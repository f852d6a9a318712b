"""``python -m moe.tools.evaluate``: the validation loss of finished runs, equal to the trainer's own."""

import json

import pytest

from moe.config import load_recipe
from moe.tools.evaluate import main
from moe.trainer import train

SMALL = ["model.vocab_size=320", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
         "model.num_kv_heads=1", "model.moe.num_experts=4", "model.moe.expert_hidden_size=16",
         "data.max_chars=60000", "train.micro_batch_size=2", "train.seq_len=16", "train.warmup_steps=2",
         "train.steps=3", "train.eval_every=0", "train.log_every=1"]


def test_equals_the_trainers_validation_loss_and_covers_the_whole_set(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = load_recipe("recipes/tiny.yaml", SMALL + [f"data.cache_dir={tmp_path / 'cache'}", "train.seed=1",
                                                       "train.eval_batches=2", "data.split_seed=0",
                                                       "data.val_fraction=0.3"])
    result = train(recipe, run, progress=False)
    out = tmp_path / "eval.json"
    assert main([str(run), "--batches", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["val_loss"] == pytest.approx(result.val_loss, rel=1e-6) and row["batches"] == 2
    assert row["tokens"] == 2 * 2 * 16
    assert main([str(run), "--json", str(out)]) == 0  # all of it: more batches than the run evaluated
    (row,) = json.loads(out.read_text())
    assert row["batches"] > 2 and f"| {run} | {row['val_loss']:.4f} |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nope"], "is not a directory"),
    (["{tmp}", "--batches", "0"], "--batches must be >= 1"),
    (["{tmp}"], "not a run directory (no recipe.yaml)"),
    (["{tmp}", "--json", "{tmp}/no/x.json"], "folder"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, args, message):
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
