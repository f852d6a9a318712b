"""The embedded default corpus and a byte-level batch sampler.

With no data named, training reads the source text of the running Python's standard library: every machine
has it, so the main job runs offline. Tokens are bytes (vocabulary 256) until the BPE pipeline lands.

Shape legend: B batch, S sequence.
"""

from __future__ import annotations

import logging
import sysconfig
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def stdlib_corpus(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the standard library's ``.py`` sources, in sorted path order (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    chunks, total = [], 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = b"\n".join(chunks)[:max_bytes]
    if not corpus:
        raise ValueError(f"the standard library at {root} has no readable .py files; name a data source instead")
    log.info("default corpus: %d bytes from %d files under %s", len(corpus), len(chunks), root)
    return corpus


class ByteBatches:
    """Random windows of a byte corpus, split into train and validation by position.

    Args:
        corpus: the text as bytes.
        seq_len: S.
        val_fraction: the tail of the corpus held out for validation.
    """

    def __init__(self, corpus: bytes, seq_len: int, val_fraction: float = 0.05) -> None:
        tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        n_val = max(int(len(tokens) * val_fraction), seq_len + 1)
        if len(tokens) - n_val < seq_len + 1:
            raise ValueError(f"corpus of {len(tokens)} tokens is too small for seq_len {seq_len}")
        self.train_tokens, self.val_tokens = tokens[:-n_val], tokens[-n_val:]
        self.seq_len = seq_len

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, S)."""
        tokens = self.train_tokens if split == "train" else self.val_tokens
        S = self.seq_len
        starts = torch.randint(0, len(tokens) - S - 1, (batch_size,), generator=generator)
        idx_BS = starts[:, None] + torch.arange(S + 1)[None, :]
        window = tokens[idx_BS]
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()
