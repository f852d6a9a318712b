"""Tokenizers: a byte-level BPE trained on the corpus with ``tokenizers``, or a ``tokenizer.json`` loaded.

The end-of-text token separates documents in packed blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"


def train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (256 byte symbols, ``EOS``, then merges)."""
    if vocab_size < 257:
        raise ValueError(f"model.vocab_size must be >= 257 to train a byte-level BPE (256 bytes + EOS), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path, setting: str | None = "data.tokenizer") -> Tokenizer:
    """A ``tokenizer.json`` file, or a folder holding one (e.g. a Hugging Face model folder). The one loader of
    tokenizer files (training data and ``moe generate``); ``setting`` names where the path came from in errors."""
    prefix = f"{setting}: " if setting else ""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{prefix}{path} does not exist (expected a tokenizer.json or a folder with one)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for malformed files
        raise ValueError(f"{prefix}{path} is not a valid tokenizer.json ({' '.join(str(e).split())[:200]})") from None


def eos_id(tok: Tokenizer) -> int:
    """The id that ends a document: our EOS, else a known end token of the tokenizer, else -1 (none)."""
    for name in (EOS, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>"):
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    return -1
