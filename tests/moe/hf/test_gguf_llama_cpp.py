"""GGUF exports run in llama.cpp itself (``llama-cpp-python``; ``pip install -e .[llama]``, a ~10-minute build).

For every architecture export picks: logits of a random sequence within 1e-3 of the logit scale (KV cache in fp32;
measured <= 1.2e-6 relative), the same argmax at every position, the same tokens for our test texts, and greedy
decoding through llama.cpp's KV cache (prompt, then one token at a time) equal to ``moe generate``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe.generate import folder_tokenizer, generate
from moe.hf.export_hf import export_hf
from tests.moe.hf.gguf_cases import GGUF_CASES
from tests.moe.hf.helpers import TEXTS, TOK_VOCAB, make_run, tiny_config

llama_cpp = pytest.importorskip("llama_cpp")

REL_TOL = 1e-3
GGML_TYPE_F32 = 0


def run_in_llama_cpp(path, ids: list[int], prompt: list[int], new_tokens: int):
    """(logits of ``ids`` [S, V], llama.cpp's tokens of ``TEXTS``, greedy continuation of ``prompt``)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False)
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)])
        tokens = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in TEXTS]
        llm.reset()
        llm.eval(prompt)
        greedy = []
        for _ in range(new_tokens):
            greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([greedy[-1]])
        return logits, tokens, greedy
    finally:
        llm.close()


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_llama_cpp_computes_our_model(case, tmp_path):
    arch, kw = GGUF_CASES[case]
    cfg = tiny_config(**{"vocab_size": TOK_VOCAB, **kw})
    ours, _ = make_run(tmp_path / "run", cfg)
    result = export_hf(tmp_path / "run", tmp_path / "m.gguf", format="gguf")
    assert result.layout == arch
    tok = folder_tokenizer(tmp_path / "run")
    ids = torch.randint(0, cfg.vocab_size, (24,)).tolist()
    prompt = tok.encode("def foo(x):\n    return")
    logits, tokens, greedy = run_in_llama_cpp(result.out_dir, ids, prompt, 12)
    with torch.no_grad():
        want = ours(torch.tensor([ids])).logits[0].numpy()
    rel = np.abs(want - logits).max() / np.abs(want).max()
    assert rel <= REL_TOL, f"{case}: max |ours - llama.cpp| / max |ours| = {rel:.2e}"
    assert (want.argmax(-1) == logits.argmax(-1)).all()
    assert tokens == [tok.encode(t) for t in TEXTS]
    assert greedy == generate(ours, prompt, 12, greedy=True)
