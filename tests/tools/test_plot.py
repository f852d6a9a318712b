"""``moe plot`` (tools/plot.py) on tiny synthetic run directories: the PNG, the summary numbers, the x axes,
and one-line errors for bad input."""

import json

import pytest
import torch
import yaml

from moe.cli import main
from moe.config import load_recipe
from moe.model import MoEModel, flops_per_token

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["model.vocab_size=320", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
         "model.num_kv_heads=1", "model.moe.num_experts=4", "model.moe.expert_hidden_size=16",
         "train.micro_batch_size=2", "train.seq_len=16"]


def make_run(path, *, moe=True, steps=20, with_tokens=True, loads=None):
    """A run directory with a resolved recipe and metrics like `moe train` writes: a training record per step
    (router stats every 5 steps for an MoE), an evaluation every 10. ``loads``: per logged step, per layer,
    the share per expert (default: balanced)."""
    path.mkdir()
    recipe = load_recipe("recipes/tiny.yaml" if moe else "recipes/tiny-dense.yaml", SMALL if moe else SMALL[:-2])
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 6.0 - 0.1 * step, "tokens_per_s": 1000.0 + step}
        if with_tokens:
            record["tokens"] = 32 * step
        if moe and step % 5 == 0:
            logged = step // 5 - 1
            for layer in range(2):
                share = loads[logged][layer] if loads else [0.25] * 4
                record[f"moe/layer{layer}/max_load_ratio"] = 1.0 + 0.1 * layer
                record[f"moe/layer{layer}/dropped_fraction"] = 0.0
                record[f"moe/layer{layer}/load"] = share
        lines.append(json.dumps(record))
        if step % 10 == 0:
            lines.append(json.dumps({"step": step, "val_loss": 5.0 - 0.01 * step, "val_ppl": 1.0}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_plot_writes_a_png_and_the_summary_table(tmp_path, capsys):
    # expert 3 of layer 1 has no assignments in any logged step: dead; expert 0 of layer 0 only in the first
    loads = [[[0.25] * 4, [0.5, 0.25, 0.25, 0.0]]] + [[[0.0, 0.5, 0.25, 0.25], [0.5, 0.25, 0.25, 0.0]]] * 3
    moe = make_run(tmp_path / "moe", loads=loads)
    dense = make_run(tmp_path / "dense", moe=False)
    out, summary = tmp_path / "curves.png", tmp_path / "summary.json"
    assert main(["plot", str(moe), str(dense), "--out", str(out), "--label", "MoE", "--label", "dense",
                 "--table", "--json", str(summary), "--smooth", "3"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    table = capsys.readouterr().out
    # training loss: the mean of the last 10% of the records (steps 19 and 20: 4.1 and 4.0)
    assert "| MoE | 4.8000 | 4.0500 |" in table and "| dense | 4.8000 | 4.0500 |" in table
    result = json.loads(summary.read_text())
    moe_row, dense_row = result["runs"]
    assert result["groups"] == []  # no label given twice
    # max/mean load: mean over layers (1.0, 1.1) and the last logged records; dead: over the last 5 records
    assert moe_row["max_load_ratio"] == pytest.approx(1.05) and moe_row["dead_experts"] == 1
    assert moe_row["experts"] == 8 and moe_row["tokens_per_s"] == pytest.approx(1011.5)
    assert "max_load_ratio" not in dense_row and dense_row["val_step"] == 20


def test_runs_with_one_label_are_seeds_summarised_as_mean_and_std(tmp_path, capsys):
    runs = [make_run(tmp_path / f"s{i}", moe=False, steps=s) for i, s in enumerate((10, 20, 30))]
    summary = tmp_path / "summary.json"
    assert main(["plot", *map(str, runs), "--out", str(tmp_path / "x.png"), "--json", str(summary), "--table",
                 "--label", "dense", "--label", "dense", "--label", "other"]) == 0
    (group,) = json.loads(summary.read_text())["groups"]
    # final validation losses 4.9 and 4.8 (5.0 - 0.01·step); training losses (last record: 10% of 10 and of
    # 20 records is 1 and 2) 5.0 and 4.05 (6.0 - 0.1·step)
    assert group["run"] == "dense" and group["runs"] == 2
    assert group["val_loss"] == pytest.approx(4.85) and group["val_loss_std"] == pytest.approx(0.05 * 2 ** 0.5)
    assert group["train_loss"] == pytest.approx(4.525) and group["train_loss_std"] == pytest.approx(0.475 * 2 ** 0.5)
    assert "| dense | 2 | 4.8500 ± 0.0707 | 4.5250 ± 0.6718 |" in capsys.readouterr().out


def test_heatmap_of_expert_load(tmp_path):
    out = tmp_path / "load.png"
    assert main(["plot", str(make_run(tmp_path / "a")), str(make_run(tmp_path / "b")), "--heatmap",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("n", [1, 10, 11, 20])
def test_every_setting_gets_its_own_colour(n):
    from moe.tools.plot import distinct_colors

    assert len({str(c) for c in distinct_colors(n)}) == n


def test_heatmaps_of_many_runs_wrap_into_rows_of_four(tmp_path):
    import struct

    runs = [str(make_run(tmp_path / f"r{i}")) for i in range(5)]
    sizes = []
    for n in (4, 5):
        out = tmp_path / f"load{n}.png"
        assert main(["plot", *runs[:n], "--heatmap", "--out", str(out)]) == 0
        sizes.append(struct.unpack(">II", out.read_bytes()[16:24]))  # the PNG header's width and height
    (w4, h4), (w5, h5) = sizes
    assert w5 == w4 and h5 == 2 * h4  # a fifth run starts a second row; the width stays that of four panels


def test_x_axes_tokens_flops_and_offsets(tmp_path):
    from moe.tools.plot import read_run

    run = read_run(make_run(tmp_path / "a"), "a", offset=0)
    old = read_run(make_run(tmp_path / "old", with_tokens=False), "old", offset=3)  # no "tokens": steps × B·S
    recipe = load_recipe("recipes/tiny.yaml", SMALL)
    expected_fpt = flops_per_token(MoEModel(recipe.model), recipe.train.seq_len)
    assert run.flops_per_token == pytest.approx(expected_fpt)
    assert run.x(run.val, "steps") == [10, 20] and run.x(run.val, "tokens") == [320, 640]
    assert run.x(run.val, "flops") == pytest.approx([320 * expected_fpt, 640 * expected_fpt])
    assert old.x(old.val, "steps") == [13, 23] and old.x(old.val, "tokens") == [(10 + 3) * 32, (20 + 3) * 32]


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a directory; give run directories of `moe train`"),
    ("no_metrics", "is not a run directory: metrics.jsonl is missing"),
    ("bad_json", "metrics.jsonl:2 is not JSON"),
    ("no_step", "metrics.jsonl:1 has no integer 'step'"),
    ("empty", "holds no training or validation records"),
    ("labels", "--label given 1 times for 2 runs; give it once per run"),
    ("not_png", "expected a .png file name"),
    ("no_folder", "does not exist"),
    ("heatmap_dense", "--heatmap: none of the runs has per-expert loads"),
    ("bad_recipe", "not valid YAML"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, case, message):
    run = make_run(tmp_path / "run", moe=case != "heatmap_dense")
    metrics = run / "metrics.jsonl"
    other = make_run(tmp_path / "other")
    out = tmp_path / "x.png"
    extra = []
    if case == "missing":
        run = tmp_path / "nope"
    elif case == "no_metrics":
        metrics.unlink()
    elif case == "bad_json":
        metrics.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, \n')
    elif case == "no_step":
        metrics.write_text('{"loss": 1.0}\n')
    elif case == "empty":
        metrics.write_text("\n")
    elif case == "labels":
        extra = ["--label", "only-one"]
    elif case == "not_png":
        out = tmp_path / "x.jpg"
    elif case == "no_folder":
        out = tmp_path / "no" / "x.png"
    elif case == "heatmap_dense":
        other, extra = make_run(tmp_path / "dense2", moe=False), ["--heatmap"]
    elif case == "bad_recipe":
        (run / "recipe.yaml").write_text("model: [unclosed\n")
    assert main(["plot", str(run), str(other), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not out.exists()


def test_flops_per_token_on_meta_device_matches_a_built_model():
    from moe.tools.plot import _flops_per_token

    recipe = load_recipe("recipes/tiny.yaml", SMALL)
    torch.manual_seed(0)
    assert _flops_per_token(recipe) == flops_per_token(MoEModel(recipe.model), recipe.train.seq_len)
