"""The tokenizer of a moe-train export, exactly as its ``tokenizer.json`` says (pre-tokenizer included).

transformers 5 builds its own family tokenizer for some model types (``qwen2``, ``phimoe``), replacing the
pre-tokenizer of ``tokenizer.json`` with the family's; ``tokenizer_config.json``'s ``auto_map`` names this class
so that ``AutoTokenizer`` keeps the file's (with ``trust_remote_code=True`` it loads this class, without it the
generic fast tokenizer: both read ``tokenizer.json`` as it is).
"""

from transformers import PreTrainedTokenizerFast


class MoETrainTokenizerFast(PreTrainedTokenizerFast):
    """``PreTrainedTokenizerFast`` over ``tokenizer.json``, unchanged."""
