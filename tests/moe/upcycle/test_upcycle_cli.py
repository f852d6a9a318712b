"""End to end, as a user types it: a `transformers` Llama saved with save_pretrained -> `moe upcycle --method
copy` -> logits equal the dense model's -> `moe train --init` a few steps -> `moe export` -> `transformers` loads
the result and generates."""

import json

import pytest
import torch
import transformers

from moe.cli import main


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return folder, model


def hf_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits, model


@pytest.mark.parametrize("method,extra,exact", [
    ("copy", [], True),
    ("drop", ["--option", "ratio=0.0"], True),
    ("granular", ["--option", "granularity=2"], True),
    ("drop", ["--option", "ratio=0.5"], False),
])
def test_upcycle_cli_writes_a_transformers_folder(tmp_path, dense_llama, capsys, method, extra, exact):
    src, dense = dense_llama
    out = tmp_path / "moe"
    k = 4 if method == "granular" else 2
    assert main(["upcycle", str(src), str(out), "--num-experts", "4", "--top-k", str(k), "--method", method,
                 *extra]) == 0
    assert "upcycled" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        want = dense(input_ids=ids).logits
    got, _ = hf_logits(out, ids)
    diff = (got - want).abs().max().item()
    assert (diff < 1e-4) if exact else (diff > 1e-3), diff
    report = json.loads((out / "upcycle_report.json").read_text())
    assert report


def test_bad_upcycle_input(tmp_path, dense_llama, capsys):
    src, _ = dense_llama
    assert main(["upcycle", str(src), str(tmp_path / "o"), "--num-experts", "4", "--top-k", "2",
                 "--method", "magic"]) == 2
    assert "copy, neuron-split, drop, granular" in capsys.readouterr().err
    assert main(["upcycle", str(tmp_path), str(tmp_path / "o"), "--num-experts", "4", "--top-k", "2",
                 "--method", "copy"]) == 2
    assert "expected a model folder" in capsys.readouterr().err


def test_upcycle_train_export_generate(tmp_path, dense_llama):
    src, _ = dense_llama
    moe_dir, run, exported = tmp_path / "moe", tmp_path / "run", tmp_path / "export"
    assert main(["upcycle", str(src), str(moe_dir), "--num-experts", "4", "--top-k", "2", "--method", "copy"]) == 0
    assert main(["train", "recipes/tiny.yaml", "--init", str(moe_dir), "--out", str(run), "--max-steps", "3",
                 "--no-progress", "train.micro_batch_size=2", "train.seq_len=32", "data.max_chars=60000",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.warmup_steps=1"]) == 0
    assert main(["export", str(run), str(exported)]) == 0
    ids = torch.randint(0, 320, (1, 5))
    _, model = hf_logits(exported, ids)
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    assert json.loads((exported / "config.json").read_text())["model_type"] == "mixtral"
