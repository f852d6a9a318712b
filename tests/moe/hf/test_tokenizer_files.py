"""The tokenizer an export carries: AutoTokenizer reproduces training's tokenisation (also for the model types whose
family tokenizer transformers 5 forces), byte-level runs get a byte tokenizer, eos/pad come from the tokenizer."""

from __future__ import annotations

import json

import pytest

from moe.generate import ByteTokenizer, eos_token_ids
from moe.hf.export_hf import export_hf
from moe.hf.tokenizer_files import FORCED_FAMILY_TOKENIZER, byte_level_tokenizer
from tests.moe.hf.helpers import TEXTS, TOK_VOCAB, assert_same_tokenizer, make_run, tiny_config

import transformers  # a test dependency: a missing one fails, it does not skip


def test_byte_level_tokenizer_ids_are_the_utf8_bytes():
    tok, ours = byte_level_tokenizer(), ByteTokenizer()
    for text in TEXTS + ("\x00\xff é \t\r\n",):
        assert tok.encode(text).ids == ours.encode(text)
        assert tok.decode(ours.encode(text)) == text
    assert tok.get_vocab_size() == 256


def test_a_byte_level_run_exports_a_tokenizer_that_autotokenizer_reads_as_bytes(tmp_path):
    make_run(tmp_path / "run", tiny_config(vocab_size=260, moe={}))
    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(result.copied)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ByteTokenizer().encode(text)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] is None and eos_token_ids(tmp_path / "hf") == []  # bytes have no end-of-text


@pytest.mark.parametrize("layout,kw", [("qwen2", {"qkv_bias": True}),
                                       ("phimoe", {"norm": "layernorm", "moe": {}, "router": {"name": "grin"}})])
def test_forced_family_tokenizers_read_our_tokenizer_json_as_it_is(layout, kw, tmp_path):
    assert layout in FORCED_FAMILY_TOKENIZER
    make_run(tmp_path / "run", tiny_config(vocab_size=TOK_VOCAB, **kw))
    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert result.layout == layout and "tokenization_moe_train.py" in result.copied
    assert_same_tokenizer(tmp_path / "hf", tmp_path / "run")  # without trust_remote_code
    assert_same_tokenizer(tmp_path / "hf", tmp_path / "run", trust_remote_code=True)


def test_end_of_text_becomes_eos_and_pad_and_generation_stops_there(tmp_path):
    make_run(tmp_path / "run", tiny_config(vocab_size=TOK_VOCAB, moe={}))
    export_hf(tmp_path / "run", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (None, 0, 0)
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in tokenizer_config
    assert tokenizer_config["eos_token"] == tokenizer_config["pad_token"] == "<|endoftext|>"
    assert eos_token_ids(tmp_path / "hf") == [0]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.eos_token_id == 0 and theirs.bos_token is None and theirs("x")["input_ids"] == theirs.encode("x")


def test_an_imported_models_own_tokenizer_files_are_kept(tmp_path):
    make_run(tmp_path / "run", tiny_config(vocab_size=TOK_VOCAB, qkv_bias=True))
    own = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "chat_template": "{{x}}"}
    (tmp_path / "run" / "tokenizer_config.json").write_text(json.dumps(own))
    (tmp_path / "run" / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text()) == own
    assert "tokenization_moe_train.py" not in result.copied
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == [0, 5]
