"""Corpus -> tokenizer -> tokenised, packed blocks, cached on disk by content and settings.

Documents are split into train and validation by a seeded draw per document (never a document in both),
tokenised with ``datasets.map`` in batches, joined with the end-of-text token and cut into blocks of
``seq_len + 1`` tokens (inputs and next-token targets) at stride ``seq_len``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from tokenizers import Tokenizer

from moe.config import DataConfig
from moe.data.corpus import load_corpus
from moe.data.tokenizer import eos_id, load_tokenizer, train_bpe

log = logging.getLogger(__name__)
_FORMAT_VERSION = 1


@dataclass
class PreparedData:
    train_blocks: np.ndarray  # (N_train, S + 1)
    val_blocks: np.ndarray  # (N_val, S + 1)
    tokenizer: Tokenizer
    tokenizer_path: Path
    cache_dir: Path

    @property
    def train_tokens(self) -> int:
        return int(self.train_blocks.shape[0] * (self.train_blocks.shape[1] - 1))


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOE_CACHE") or Path.home() / ".cache" / "moe-train")


def _corpus_hash(ds: datasets.Dataset) -> str:
    h = hashlib.sha256()
    for batch in ds.iter(batch_size=1000):
        for text in batch["text"]:
            h.update(text.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
    return h.hexdigest()


def _atomic_write_dir(final: Path, write) -> None:
    """Write into a temporary sibling, then rename: a crash never leaves a half-written cache entry."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        write(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same entry first
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer(cfg: DataConfig, corpus: datasets.Dataset, corpus_hash: str, vocab_size: int, cache: Path) -> Path:
    if cfg.tokenizer is not None:
        path = Path(cfg.tokenizer).expanduser()
        path = path / "tokenizer.json" if path.is_dir() else path
        load_tokenizer(path)  # validates
        return path
    final = cache / "tokenizers" / f"bpe-{vocab_size}-{corpus_hash[:20]}"
    if not (final / "tokenizer.json").is_file():
        log.info("training a byte-level BPE tokenizer of %d tokens on the corpus", vocab_size)

        def write(tmp: Path) -> None:
            texts = (text for batch in corpus.iter(batch_size=1000) for text in batch["text"])
            train_bpe(texts, vocab_size).save(str(tmp / "tokenizer.json"))

        _atomic_write_dir(final, write)
    return final / "tokenizer.json"


def _pack(ids_lists: list[list[int]], seq_len: int, dtype) -> np.ndarray:
    flat = np.fromiter((t for ids in ids_lists for t in ids), dtype=np.int64)
    n = (len(flat) - 1) // seq_len if len(flat) > seq_len else 0
    if n == 0:
        return np.zeros((0, seq_len + 1), dtype=dtype)
    index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return flat[index].astype(dtype)


def prepare_data(cfg: DataConfig, *, vocab_size: int, seq_len: int, seed: int = 0, progress: bool = True) -> PreparedData:
    """Load, tokenise, pack and cache the corpus of ``cfg`` for a model of ``vocab_size`` tokens.

    Args:
        cfg: the data section of the recipe.
        vocab_size: the model's vocabulary; a trained BPE gets this size, a loaded tokenizer must fit in it.
        seq_len: S.
        seed: seeds the train/validation split of documents.
    """
    if not progress:
        datasets.disable_progress_bars()
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    corpus = load_corpus(cfg, cache / "datasets")
    corpus_hash = _corpus_hash(corpus)
    tok_path = _tokenizer(cfg, corpus, corpus_hash, vocab_size, cache)
    tok = load_tokenizer(tok_path)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(
            f"data.tokenizer {tok_path} has {tok.get_vocab_size()} tokens but model.vocab_size is {vocab_size}; "
            f"set model.vocab_size >= {tok.get_vocab_size()}"
        )
    tok_hash = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps([_FORMAT_VERSION, corpus_hash, tok_hash, seq_len, cfg.val_fraction, seed])
                         .encode()).hexdigest()[:24]
    final = cache / "blocks" / key
    if not (final / "meta.json").is_file():
        eos = eos_id(tok)
        dtype = np.uint16 if vocab_size <= 65535 else np.int32

        def encode(batch):
            encodings = tok.encode_batch(batch["text"], add_special_tokens=False)
            return {"ids": [e.ids + ([eos] if eos >= 0 else []) for e in encodings]}

        tokenized = corpus.map(encode, batched=True, batch_size=256, remove_columns=["text"], desc="tokenize")
        is_val = np.random.default_rng(seed).random(len(tokenized)) < cfg.val_fraction
        if len(tokenized) >= 2:  # at least one document on each side
            is_val[0], is_val[-1] = False, is_val[-1] or not is_val.any()
        ids = tokenized["ids"]
        train = _pack([d for d, v in zip(ids, is_val) if not v], seq_len, dtype)
        val = _pack([d for d, v in zip(ids, is_val) if v], seq_len, dtype)
        if len(train) == 0 or len(val) == 0:
            raise ValueError(
                f"data.source: the corpus gives {len(train)} training and {len(val)} validation blocks of "
                f"{seq_len + 1} tokens; use more text, a larger data.val_fraction, or a smaller train.seq_len"
            )

        def write(tmp: Path) -> None:
            np.save(tmp / "train.npy", train)
            np.save(tmp / "val.npy", val)
            (tmp / "meta.json").write_text(json.dumps({"train_blocks": len(train), "val_blocks": len(val),
                                                        "seq_len": seq_len, "tokenizer": str(tok_path)}))

        _atomic_write_dir(final, write)
        log.info("packed %d training and %d validation blocks of %d tokens into %s", len(train), len(val),
                 seq_len + 1, final)
    train_blocks = np.load(final / "train.npy", mmap_mode="r")
    val_blocks = np.load(final / "val.npy", mmap_mode="r")
    return PreparedData(train_blocks, val_blocks, tok, tok_path, final)
