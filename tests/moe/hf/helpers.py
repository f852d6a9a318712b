"""Tiny random models for the Hugging Face tests: our side (a run directory) and theirs (``save_pretrained``).

Weights are randomised with norms away from 1 and projections at std 0.15, so that a mis-mapped tensor cannot hide
behind an init of ones or zeros and routing is far from uniform (no near-ties between experts).
"""

from __future__ import annotations

import functools
import json
import textwrap
from pathlib import Path

import torch

from moe.config import ModelConfig, MoEConfig, RouterConfig
from moe.rundir import write_run
from moe.model import MoEModel

VOCAB = 97
TOK_VOCAB = 300  # models that carry a trained byte-level BPE tokenizer (tokenizer.json) have this vocabulary
# Text whose tokenisation the tests compare: code, runs of spaces, tabs, non-ASCII, digits, the special token.
TEXTS = ("def foo(x):\n    return x  + 1  # héllo ✓ 'll 123456\n\n\t end", "<|endoftext|>import json\r\n",
         " leading space, trailing space ", "ünïcödé — ελληνικά 中文 🙂")


def tiny_config(moe: dict | None = None, router: dict | None = None, **kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=48,
                max_position_embeddings=64, rope_theta=1234.0, rms_norm_eps=1e-6)
    base.update(kw)
    if moe is not None:
        r = RouterConfig(**{"top_k": 2, **(router or {})})
        base["moe"] = MoEConfig(num_experts=4, expert_hidden_size=24, router=r, **moe)
    else:
        base["moe"] = None
    return ModelConfig(**base)


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):  # the sigmoid router's selection bias: it must matter
                b.normal_(0.0, 0.3)
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.15)
    return module


@functools.lru_cache(maxsize=1)
def bpe_tokenizer_json() -> str:
    """A byte-level BPE of ``TOK_VOCAB`` tokens trained by ``moe.data.tokenizer.train_bpe`` (what ``moe train``
    writes) on two standard-library sources."""
    from moe.data.tokenizer import train_bpe

    text = Path(json.decoder.__file__).read_text(encoding="utf-8") + Path(textwrap.__file__).read_text(encoding="utf-8")
    return train_bpe(iter([text]), TOK_VOCAB).to_str()


def make_run(path: Path, cfg: ModelConfig, tokenizer: bool | None = None) -> tuple[MoEModel, dict[str, torch.Tensor]]:
    """A random ``MoEModel(cfg)`` saved as a run directory at ``path``; returns it and the saved state.

    ``tokenizer``: write the trained BPE's tokenizer.json (default: when the vocabulary is ``TOK_VOCAB``).
    """
    model = randomize_(MoEModel(cfg)).eval()
    for module in model.modules():  # expert-choice thresholds, as if estimated over one optimizer step
        if hasattr(module, "threshold_updates"):
            module.threshold.fill_(0.24)
            module.threshold_updates.fill_(1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    write_run(path, cfg, state)
    if tokenizer or (tokenizer is None and cfg.vocab_size == TOK_VOCAB):
        (path / "tokenizer.json").write_text(bpe_tokenizer_json(), encoding="utf-8")
    return model, state


def assert_same_tokenizer(folder: Path, run: Path, **kw) -> None:
    """``AutoTokenizer`` of an export encodes and decodes ``TEXTS`` exactly as the run's tokenizer.json does."""
    import transformers

    from moe.generate import folder_tokenizer

    ours = folder_tokenizer(run)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, **kw)
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, (type(theirs).__name__, text)
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, (a.shape, b.shape, a.dtype, b.dtype)
    assert a.abs().max() > 0.1  # not two near-zero tensors
    return (a - b).abs().max().item()


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy generation of ``n`` new tokens (no end-of-sequence stop)."""
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_export_in_transformers(case: str, ours: MoEModel, run: Path, folder: Path, *, remote: bool = False,
                                 atol: float = 1e-5):
    """The exported ``folder`` loaded by transformers (``remote``: with its own code) against ``ours``: every weight
    used, logits within ``atol``, greedy tokens equal ``moe generate``'s, and AutoTokenizer equal to ours.
    Returns the transformers model."""
    import transformers

    from moe.generate import eos_token_ids, generate, load_model

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True, **({"trust_remote_code": True} if remote else {}))
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(0, TOK_VOCAB, (2, 13))
    with torch.no_grad():
        diff = max_diff(ours(ids).logits, hf(input_ids=ids).logits)
    assert diff <= atol, f"{case}: max |ours - transformers| = {diff:.2e}"
    prompt = [3, 14, 15, 92, 65]
    ours_tokens = generate(load_model(run), prompt, 10, greedy=True, eos_token_ids=eos_token_ids(folder))
    assert ours_tokens == hf_greedy(hf, prompt, 10)
    assert_same_tokenizer(folder, run, **({"trust_remote_code": True} if remote else {}))
    return hf

