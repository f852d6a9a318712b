"""``moe generate`` and the library under it: tokenizer choice, greedy parity with transformers for a Hugging Face
folder given directly, sampling through the cache equal to sampling without it, stopping, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from moe.cli import main
from moe.generate import ByteTokenizer, FileTokenizer, folder_tokenizer, generate, generate_text, load_model
from moe.model import MoEModel
from tests.moe.hf.helpers import VOCAB, hf_greedy, make_run, randomize_, tiny_config


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids == list("héllo ✓".encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == "héllo ✓"
    assert tok.decode([104, 300, 105]) == "h\ufffdi"  # an id beyond a byte has no text


def test_tokenizer_json_is_used_when_present(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert isinstance(folder_tokenizer(tmp_path), ByteTokenizer)
    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = folder_tokenizer(tmp_path)
    assert isinstance(loaded, FileTokenizer) and loaded.encode("hello world zzz") == [0, 1, 2]
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer.json"):
        folder_tokenizer(tmp_path)


def _model(**kw) -> MoEModel:
    return randomize_(MoEModel(tiny_config(moe={}, **kw))).eval()


def test_sampling_through_the_cache_equals_sampling_the_full_sequence():
    model = _model()
    prompt, n, temperature = [1, 2, 3], 12, 1.5
    got = generate(model, prompt, n, temperature=temperature, seed=7)
    gen = torch.Generator().manual_seed(7)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):  # no cache: the whole sequence every step
            probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1] / temperature, dim=-1)
            ids.append(int(torch.multinomial(probs, 1, generator=gen)))
    assert got == ids[len(prompt):]
    assert generate(model, prompt, n, temperature=temperature, seed=8) != got
    assert generate(model, prompt, n, temperature=0.0) == generate(model, prompt, n, greedy=True)


def test_stops_at_eos_and_validates():
    model = _model()
    free = generate(model, [5, 6], 8, greedy=True)
    stop = free[3]
    assert generate(model, [5, 6], 8, greedy=True, eos_token_ids=[stop]) == free[: free.index(stop) + 1]
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], 4)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        generate(model, [1] * 60, 5)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, [VOCAB], 1)
    assert model.training is False


def test_hugging_face_folder_directly_matches_transformers_generate(tmp_path):
    import transformers
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=20, eos_token_id=None)
    hf = randomize_(transformers.Qwen2MoeForCausalLM(cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    prompt = [7, 8, 9, 10]
    assert generate(load_model(tmp_path / "hf"), prompt, 12, greedy=True) == hf_greedy(hf, prompt, 12)


def test_cli_generate_import_export(tmp_path, capsys):
    cfg = tiny_config(moe={}, vocab_size=256)
    model, _ = make_run(tmp_path / "run", cfg)
    assert main(["generate", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "6", "--greedy"]) == 0
    expected = ByteTokenizer().decode(list(b"def ") + generate(model, list(b"def "), 6, greedy=True))
    assert capsys.readouterr().out == expected + "\n"

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "exported" in capsys.readouterr().out and json.loads((tmp_path / "hf" / "config.json").read_text())
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert "imported mixtral (MoE, 4 experts" in capsys.readouterr().out
    sampled = generate_text(tmp_path / "back", "def ", 6, temperature=0.8, seed=3)
    assert sampled.text.startswith("def ") and len(sampled.new_ids) == 6
    assert sampled.new_ids == generate(model, list(b"def "), 6, temperature=0.8, seed=3)
