"""The benchmark tools run and write their JSON (timings themselves are not tested)."""

import json

import pytest
import torch

from moe.cli import main

SMALL = ["model.vocab_size=320", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
         "model.num_kv_heads=1", "model.moe.num_experts=4", "model.moe.expert_hidden_size=16",
         "data.max_chars=60000", "train.micro_batch_size=2", "train.seq_len=16"]


def test_bench_train_reports_tokens_per_second(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--recipes", "recipes/tiny.yaml", "--ep", "1", "--steps", "3",
                 "--peak-tflops", "1", "--json", str(out), *SMALL, f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    (record,) = json.loads(out.read_text())["records"]
    assert record["expert_parallel_size"] == 1 and record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1


def test_bench_train_runs_every_expert_parallel_size_at_every_zero_stage(monkeypatch, capsys):
    """The commands, not the runs: EP 1 through ``moe train``, EP 2 through the DeepSpeed launcher, each stage."""
    import subprocess

    import moe.tools.bench_train as bench

    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "error: not run in this test")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    assert main(["bench", "train", "--recipes", "recipes/tiny.yaml", "--ep", "1", "2", "--zero", "0", "2"]) == 1
    shown = [(c[c.index("--num_gpus") + 1] if "--num_gpus" in c else "1", c[-1] if "--num_gpus" not in c else c[-2])
             for c in commands]
    assert shown == [("1", "parallel.zero_stage=0"), ("1", "parallel.zero_stage=2"),
                     ("2", "parallel.zero_stage=0"), ("2", "parallel.zero_stage=2")]
    assert all(c[-1] == "parallel.expert_parallel_size=2" for c in commands[2:])
    out = capsys.readouterr().out
    assert "EP 2  ZeRO 2  error: error: not run in this test" in out


def test_bench_train_without_zero_uses_each_recipes_own_stage(monkeypatch, capsys):
    """recipes/gpu.yaml sets ZeRO 1 and tiny.yaml none: without --zero each runs at its own stage."""
    import subprocess

    import moe.tools.bench_train as bench

    commands = []
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: commands.append(cmd) or subprocess.CompletedProcess(
        cmd, 1, "", "error: not run in this test"))
    assert main(["bench", "train", "--recipes", "recipes/gpu.yaml", "recipes/tiny.yaml", "--ep", "1"]) == 1
    assert [c[-1] for c in commands] == ["parallel.zero_stage=1", "parallel.zero_stage=0"]
    assert "recipes/gpu.yaml         EP 1  ZeRO 1" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--zero", "3"], "--zero 3: valid stages are 0 1 2"),
    (["--zero", "one"], "argument --zero: invalid int value: 'one'"),
    (["--ep", "0"], "--ep 0: expert-parallel sizes are positive integers"),
    (["parallel.zero_stage=1"], "parallel.zero_stage=1: set by --ep and --zero for each run"),
    (["--steps", "2"], "--steps must be >= 3"),
    (["--recipes", "recipes/none.yaml"], "recipe recipes/none.yaml does not exist"),
])
def test_bench_train_bad_input_is_a_one_line_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "train", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: moe bench train: ") and message in err and err.count("\n") == 1, err


def test_bench_layer_quick_case_records_every_implementation(tmp_path, monkeypatch):
    import moe.tools.bench_layer as bench

    monkeypatch.setattr(bench, "CASES", [bench.Case("tiny", 64, 32, 4, 2, 16)])
    monkeypatch.setattr(bench, "QUICK", ["tiny"])

    def no_deepspeed(*args):  # it would initialise torch.distributed inside the test process
        raise RuntimeError("not in tests")

    monkeypatch.setattr(bench, "deepspeed_moe", no_deepspeed)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1048576")  # allocator settings change timings: the JSON says them
    out = tmp_path / "layer.json"
    assert main(["bench", "layer", "--quick", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["env"]["MALLOC_TOP_PAD_"] == "1048576"
    records = result["records"]
    impls = {r["impl"] for r in records}
    assert {"dense-swiglu", "ours-reference", "ours-torch", "ours-auto", "hf-mixtral-eager"} <= impls
    assert all(r["ratio_vs_dense"] > 0 for r in records if r["impl"].startswith("ours"))
    assert [r["error"] for r in records if r["impl"] == "deepspeed-moe"] == ["RuntimeError: not in tests"]
    if not torch.cuda.is_available():  # a peer that cannot run here is a record with its reason
        assert [r["error"] for r in records if r["impl"] == "megablocks-dmoe"] == [
            "RuntimeError: MegaBlocks' dMoE needs a CUDA device"]


def test_bench_layer_times_only_the_named_implementations(tmp_path, monkeypatch, capsys):
    import moe.tools.bench_layer as bench

    monkeypatch.setattr(bench, "CASES", [bench.Case("tiny", 64, 32, 4, 2, 16)])
    out = tmp_path / "layer.json"
    assert main(["bench", "layer", "--impls", "ours-tiled", "--repeats", "1", "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    assert record["impl"] == "ours-tiled" and record["median_ms"] > 0 and "ratio_vs_dense" not in record
    assert "tiny" in capsys.readouterr().out


def test_bench_layer_unknown_implementation_is_a_one_line_error(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "layer", "--impls", "tutel-moe"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown implementation tutel-moe; valid: dense-swiglu" in err and "Traceback" not in err
