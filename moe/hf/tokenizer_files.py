"""The tokenizer an export carries, so that ``AutoTokenizer`` (and llama.cpp) tokenise exactly as training did.

Shape legend: V vocabulary.

A run directory holds the ``tokenizer.json`` it trained with (``moe train`` writes it; ``moe import`` copies the
source folder's), or none: the byte-level runs, whose ids are the UTF-8 bytes (``moe.generate.ByteTokenizer``).
An export writes:

    tokenizer.json          the run's, or a byte-level BPE with no merges whose ids are the bytes (V >= 256)
    tokenizer_config.json   the run's when it has one (an imported model's own); else ``PreTrainedTokenizerFast``
                            over tokenizer.json as it is. Without a class, ``AutoTokenizer`` picks the layout's
                            family tokenizer (Qwen2-MoE: ``Qwen2Tokenizer``), which replaces our pre-tokenizer
                            and splits text differently. For ``qwen2`` and ``phimoe`` transformers 5 ignores the
                            class and forces the family tokenizer unless the config has an ``auto_map``: these
                            folders get one, naming ``tokenization_moe_train.MoETrainTokenizerFast`` (copied
                            beside it), so that AutoTokenizer reads tokenizer.json as it is with or without
                            ``trust_remote_code``.
    generation_config.json  the run's, else bos/eos/pad from the tokenizer (eos = its end-of-text token, pad = eos,
                            no bos: training never prepends one), so generation stops where documents ended.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# Model types whose family tokenizer transformers 5 forces (its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS).
FORCED_FAMILY_TOKENIZER = ("qwen2", "phimoe")
TOKENIZER_CODE = "tokenization_moe_train.py"
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")  # as moe.data.tokenizer.eos_id
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of byte-level BPE (``tokenizers``' ByteLevel)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def byte_level_tokenizer():
    """A ``tokenizers.Tokenizer`` whose ids are the UTF-8 bytes of the text: byte-level BPE without merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_run_tokenizer(run: Path, vocab_size: int):
    """The run's ``tokenizers.Tokenizer``: its tokenizer.json, else the byte-level one (None when V < 256)."""
    from moe.data.tokenizer import load_tokenizer

    path = run / "tokenizer.json"
    if path.is_file():
        return load_tokenizer(path, setting=None)
    return byte_level_tokenizer() if vocab_size >= 256 else None


def special_tokens(tok) -> dict[str, str | None]:
    """bos/eos/pad token strings of a tokenizer that is ours or came with an imported model."""
    vocab = tok.get_vocab()
    eos = next((n for n in EOS_NAMES if n in vocab), None)
    bos = next((n for n in BOS_NAMES if n in vocab), None)
    return {"bos_token": bos, "eos_token": eos, "pad_token": eos}


def special_token_ids(run: Path, tok) -> dict[str, Any]:
    """bos/eos/pad ids: the run's ``generation_config.json``, else the tokenizer's (explicit nulls: without them
    transformers would fill in the family's defaults, e.g. Llama's eos 2, and stop at that id)."""
    ids: dict[str, Any] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    path = run / "generation_config.json"
    if path.is_file():
        try:
            gen = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        ids.update({k: gen[k] for k in ids if isinstance(gen, dict) and k in gen})
        return ids
    if tok is not None:
        names = special_tokens(tok)
        ids.update({f"{k}_id": tok.token_to_id(v) for k, v in names.items() if v is not None})
    return ids


def write_tokenizer_files(out: Path, tok, ids: dict[str, Any], max_length: int, model_type: str) -> list[str]:
    """The tokenizer files that ``out`` lacks (the run's own were copied there first): tokenizer.json,
    tokenizer_config.json (and the tokenizer class for ``FORCED_FAMILY_TOKENIZER``), generation_config.json
    (module docstring); returns the names written."""
    if tok is None:
        return []
    written = []
    if not (out / "tokenizer.json").is_file():
        tok.save(str(out / "tokenizer.json"))
        written.append("tokenizer.json")
    if not (out / "tokenizer_config.json").is_file():
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_tokens(tok), "unk_token": None,
                  "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "model_max_length": max_length}
        if model_type in FORCED_FAMILY_TOKENIZER:
            config["auto_map"] = {"AutoTokenizer": [None, "tokenization_moe_train.MoETrainTokenizerFast"]}
            shutil.copyfile(Path(__file__).parent / "remote_code" / TOKENIZER_CODE, out / TOKENIZER_CODE)
            written.append(TOKENIZER_CODE)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        written.append("tokenizer_config.json")
    if not (out / "generation_config.json").is_file():
        (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
        written.append("generation_config.json")
    return written
