"""A sampler whose batch at step s is a pure function of (seed, s): training resumes at any step exactly.

Shape legend: B batch, S sequence (blocks hold S + 1 tokens: inputs and shifted targets).
"""

from __future__ import annotations

import numpy as np
import torch


class BlockSampler:
    """Batches of blocks in a fresh seeded permutation per epoch.

    Args:
        blocks: (N, S + 1) integer array (may be a memory map).
        batch_size: B.
        seed: permutation seed.
    """

    def __init__(self, blocks: np.ndarray, batch_size: int, seed: int) -> None:
        if len(blocks) == 0:
            raise ValueError("no training blocks: the corpus is shorter than one sequence (lower train.seq_len)")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, S) for the 0-based optimizer step ``step`` (micro-batch index)."""
        n = len(self.blocks)
        flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        idx = np.array([self._permutation(int(i // n))[i % n] for i in flat])
        window = torch.from_numpy(np.asarray(self.blocks[idx]).astype(np.int64))
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def fixed_batches(blocks: np.ndarray, batch_size: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``max_batches`` batches of ``blocks`` in order: the same validation set every evaluation."""
    out = []
    for start in range(0, min(len(blocks), batch_size * max_batches), batch_size):
        window = torch.from_numpy(np.asarray(blocks[start : start + batch_size]).astype(np.int64))
        out.append((window[:, :-1].contiguous(), window[:, 1:].contiguous()))
    return out
