"""The trainer: exact resume, gradient accumulation, metrics and TensorBoard output, --init."""

import json
import shutil

import pytest

from moe.config import load_recipe
from moe.trainer import lr_at, train

SMALL = ["model.vocab_size=320", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
         "model.num_kv_heads=1", "model.moe.num_experts=4", "model.moe.expert_hidden_size=16",
         "data.max_chars=60000", "train.micro_batch_size=2", "train.seq_len=16", "train.warmup_steps=2",
         "train.eval_batches=2", "train.log_every=2"]


def recipe(tmp_path, *extra):
    return load_recipe("recipes/tiny.yaml", SMALL + [f"data.cache_dir={tmp_path / 'cache'}", *extra])


def losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    full = tmp_path / "full"
    train(recipe(tmp_path, "train.steps=6", "train.save_every=3"), full, progress=False)
    crashed = tmp_path / "crashed"
    train(recipe(tmp_path, "train.steps=6", "train.save_every=3"), crashed, progress=False)
    # Simulate a crash after step 5: step 6's checkpoint never happened, metrics went one step too far.
    ckpts = crashed / "checkpoints"
    shutil.rmtree(ckpts / "step_00000006")
    (ckpts / "latest").write_text("step_00000003")
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l)["step"] <= 5) + "\n")
    train(recipe(tmp_path, "train.steps=6", "train.save_every=3"), crashed, resume=True, progress=False)
    a, b = losses(full), losses(crashed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # no step logged twice
    assert a == b  # bit-identical, every step


def test_gradient_accumulation_equals_the_larger_micro_batch(tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    train(recipe(tmp_path, "train.steps=2", "train.micro_batch_size=4"), one, progress=False)
    train(recipe(tmp_path, "train.steps=2", "train.micro_batch_size=2", "train.grad_accum_steps=2"), two,
          progress=False)
    la, lb = losses(one), losses(two)
    assert la[1] == pytest.approx(lb[1], rel=1e-5) and la[2] == pytest.approx(lb[2], rel=1e-4)


def test_metrics_tensorboard_and_router_stats(tmp_path):
    out = tmp_path / "run"
    result = train(recipe(tmp_path, "train.steps=4", "train.eval_every=2", "train.peak_tflops=1.0"), out,
                   progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"loss", "lr", "tokens_per_s", "grad_norm", "aux_loss", "mfu"} <= set(r)
        assert r["tokens"] == r["step"] * 2 * 16  # micro_batch_size × seq_len per step
    logged = steps[1]
    for layer in range(2):
        for key in ("aux/load_balancing", "dropped_fraction", "router_entropy", "max_load_ratio"):
            assert f"moe/layer{layer}/{key}" in logged
        assert logged[f"moe/layer{layer}/experts_per_token"] == pytest.approx(2.0)  # dropless top-2
        load = logged[f"moe/layer{layer}/load"]  # each expert's share of the layer's assignments
        assert len(load) == 4 and sum(load) == pytest.approx(1.0, abs=1e-5)
        assert max(load) / (sum(load) / 4) == pytest.approx(logged[f"moe/layer{layer}/max_load_ratio"], rel=1e-4)
    assert "moe/layer0/load" not in steps[0]  # only at log steps
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert result.val_loss == records[-1]["val_loss"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()


def test_split_seed_fixes_the_validation_documents_across_seeds(tmp_path):
    blocks = tmp_path / "cache" / "blocks"
    train(recipe(tmp_path, "train.steps=1", "train.seed=0"), tmp_path / "a", progress=False)
    train(recipe(tmp_path, "train.steps=1", "train.seed=1", "data.split_seed=0"), tmp_path / "b", progress=False)
    assert len(list(blocks.iterdir())) == 1  # the same split, so the same cached blocks
    train(recipe(tmp_path, "train.steps=1", "train.seed=1"), tmp_path / "c", progress=False)
    assert len(list(blocks.iterdir())) == 2  # by default each seed holds out other documents


def test_data_start_step_continues_the_data_stream(tmp_path, monkeypatch):
    from moe.data import BlockSampler

    seen = []
    real_batch = BlockSampler.batch
    monkeypatch.setattr(BlockSampler, "batch", lambda self, i: seen.append(i) or real_batch(self, i))
    train(recipe(tmp_path, "train.steps=2", "train.grad_accum_steps=2", "train.data_start_step=3"), tmp_path / "a",
          progress=False)
    assert seen == [6, 7, 8, 9]  # micro-batches of optimizer steps 3 and 4 of the stream


def test_init_continues_from_a_model_folder(tmp_path):
    first = tmp_path / "first"
    train(recipe(tmp_path, "train.steps=2"), first, progress=False)
    second = tmp_path / "second"
    # a recipe with a different model section: --init's model wins, the data and train settings stay
    train(recipe(tmp_path, "train.steps=1", "model.hidden_size=64"), second, init=first, progress=False)
    assert "hidden_size: 32" in (second / "recipe.yaml").read_text()
    with pytest.raises(ValueError, match="expected a model folder: a run directory"):
        train(recipe(tmp_path, "train.steps=1"), tmp_path / "x", init=tmp_path / "nowhere", progress=False)


def test_lr_schedule_warmup_then_cosine():
    r = load_recipe("recipes/tiny.yaml", ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0",
                                          "train.min_lr_ratio=0.1"])
    assert lr_at(0, r) == pytest.approx(0.1) and lr_at(9, r) == pytest.approx(1.0)
    assert lr_at(10, r) == pytest.approx(1.0) and lr_at(100, r) == pytest.approx(0.1)
    assert all(lr_at(s, r) >= lr_at(s + 1, r) for s in range(10, 100))


def test_resume_without_checkpoint_starts_fresh(tmp_path, caplog):
    out = tmp_path / "run"
    train(recipe(tmp_path, "train.steps=1"), out, resume=True, progress=False)
    assert "no checkpoint" in caplog.text


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_checkpoint_is_refused_and_resume_falls_back(tmp_path, caplog, damage):
    from moe.checkpoint import verify_checkpoint

    run = tmp_path / "run"
    train(recipe(tmp_path, "train.steps=4", "train.save_every=2", "train.keep_checkpoints=3"), run, progress=False)
    before = losses(run)
    newest = run / "checkpoints" / "step_00000004"
    target = newest / "model.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    else:
        target.unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        verify_checkpoint(newest)
    train(recipe(tmp_path, "train.steps=4", "train.save_every=2", "train.keep_checkpoints=3"), run, resume=True,
          progress=False)
    assert "resuming from" in caplog.text and "step_00000002" in caplog.text
    assert losses(run) == before  # steps 3-4 retrained from step 2, bit-identical


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_loss_is_skipped_or_stops(tmp_path, monkeypatch, caplog, policy):
    from moe import trainer as train_module
    from moe.model import MoEModel

    real_forward = MoEModel.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2 and self.training:  # the second training step's loss is NaN
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MoEModel, "forward", poisoned)
    out = tmp_path / "run"
    if policy == "stop":
        with pytest.raises(train_module.NonFiniteError, match="step 2: non-finite loss nan"):
            train(recipe(tmp_path, "train.steps=3", "train.on_nonfinite=stop"), out, progress=False)
        return
    train(recipe(tmp_path, "train.steps=3"), out, progress=False)
    assert "optimizer step skipped" in caplog.text and "router stats per MoE layer" in caplog.text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
