"""Data: corpus sources, the tokenizer, tokenised and packed blocks cached on disk, and a resumable sampler.

    corpus (datasets.Dataset of documents) -> tokenizer (BPE trained or loaded) -> datasets.map tokenise
    -> pack into (seq_len + 1)-token blocks, train / validation split by document -> cache -> BlockSampler
"""

from moe.data.pipeline import PreparedData, prepare_data
from moe.data.sampler import BlockSampler

__all__ = ["BlockSampler", "PreparedData", "prepare_data"]
