"""Export as self-contained remote code, for every model that no native layout expresses: every router's inference
form, and the model settings the native layouts lack. Each is checked in ``transformers`` itself
(``trust_remote_code=True``): logits equal ours (<= 1e-5), greedy ``generate()`` through transformers' KV cache
gives the tokens of ``moe generate``, ``AutoTokenizer`` tokenises as training did, ``moe import`` reads the folder
back bit for bit, with the same config. The folder's code imports nothing of this package.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
import torch

from moe.generate import eos_token_ids, generate, load_model
from moe.hf.config_map import REMOTE, export_layout
from moe.hf.export_hf import export_hf
from moe.hf.import_hf import import_hf
from moe.hf.remote import CODE_DIR, CODE_FILES
from moe.hf.router_view import options_resolved
from moe.rundir import read_run
from tests.moe.hf.helpers import TOK_VOCAB, check_export_in_transformers, make_run, tiny_config

import transformers  # a test dependency: a missing one fails, it does not skip

ATOL = 1e-5
EC = {"name": "expert_choice", "options": {"allow_causal_leak": True}}
# name: (tiny_config kwargs, what the remote-code reason names)
REMOTE_CASES = {
    "topk_eval_capacity": ({"moe": {"eval_capacity_factor": 1.0, "min_capacity": 1}}, "eval_capacity_factor"),
    "switch_eval_capacity": ({"moe": {"eval_capacity_factor": 2.0, "min_capacity": 0},
                              "router": {"name": "switch", "top_k": 1, "renormalize": False}}, "eval_capacity_factor"),
    "gshard_threshold_gated_shared": ({"moe": {"num_shared_experts": 1, "shared_expert_gate": True}, "router": {
        "name": "gshard", "options": {"second_policy_eval": "threshold", "second_threshold": 0.3}}}, "threshold"),
    "gshard_none_legacy": ({"moe": {}, "router": {"name": "gshard", "options": {"second_policy_eval": "none"}}},
                           "'none'"),
    "sigmoid_groups_without_bias": ({"moe": {}, "router": {"name": "sigmoid", "options": {
        "n_groups": 2, "topk_groups": 1, "loss_free_bias": False}}}, "without the selection bias"),
    "sigmoid_moe_every_2": ({"moe": {"moe_every": 2}, "router": {"name": "sigmoid"}}, "dense layers between"),
    "sigmoid_eval_capacity": ({"moe": {"eval_capacity_factor": 1.0}, "router": {"name": "sigmoid"}},
                              "eval_capacity_factor"),
    "expert_choice_top_c_sequence": ({"moe": {}, "router": {**EC, "options": {**EC["options"], "group": "sequence"}}},
                                     "experts choose"),
    "expert_choice_threshold": ({"moe": {"first_dense_layers": 1}, "router": {
        **EC, "options": {**EC["options"], "eval_routing": "threshold"}}}, "experts choose"),
    "hash_random": ({"moe": {}, "router": {"name": "hash"}}, "token id"),
    "hash_multi_capacity": ({"moe": {"eval_capacity_factor": 1.0}, "router": {
        "name": "hash", "options": {"num_hashes": 2, "seed": 3}}}, "token id"),
    "hash_token_id": ({"moe": {}, "router": {"name": "hash", "options": {"hash_function": "token_id"}}}, "token id"),
    "adaptive": ({"moe": {"num_shared_experts": 1}, "router": {"name": "adaptive", "options": {"threshold": 0.2}}},
                 "varying number"),
    "adaptive_capacity_raw": ({"moe": {"eval_capacity_factor": 1.5}, "router": {"name": "adaptive", "options": {
        "threshold": 0.3, "single_expert_weight": "raw"}}}, "varying number"),
    "top_p": ({"qk_norm": True, "moe": {}, "router": {"name": "top_p", "options": {"threshold": 0.5}}}, "varying"),
    "top_p_inclusive_capped": ({"moe": {"eval_capacity_factor": 1.5}, "router": {"name": "top_p", "options": {
        "threshold": 0.7, "boundary": "inclusive", "max_experts": 2}}}, "varying"),
    "grin_rmsnorm": ({"moe": {}, "router": {"name": "grin", "jitter_eps": 0.2}}, "RMSNorm"),
    "grin_top3_layernorm": ({"norm": "layernorm", "moe": {}, "router": {"name": "grin", "top_k": 3}}, "top_k 3"),
    "topk_layernorm": ({"norm": "layernorm", "moe": {"num_shared_experts": 1}}, "LayerNorm with router 'topk'"),
    "dense_layernorm": ({"norm": "layernorm", "tie_word_embeddings": True}, "LayerNorm"),
    "topk_qk_norm_shared": ({"qk_norm": True, "head_dim": 12, "moe": {"num_shared_experts": 1}}, "qk_norm with shared"),
    "topk_o_bias": ({"attention_bias": True, "moe": {}}, "o-projection bias"),
    "dense_qk_norm_qkv_bias": ({"qk_norm": True, "qkv_bias": True}, "qk_norm with q/k/v biases"),
}


@pytest.mark.parametrize("case", list(REMOTE_CASES))
def test_remote_code_matches_our_model(case, tmp_path):
    kw, reason = REMOTE_CASES[case]
    cfg = tiny_config(vocab_size=TOK_VOCAB, **kw)
    ours, state = make_run(tmp_path / "run", cfg)
    assert export_layout(cfg) == REMOTE
    result = export_hf(tmp_path / "run", tmp_path / "hf")
    assert result.layout == REMOTE and reason in result.why_remote, result.why_remote
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == REMOTE and config["auto_map"]["AutoModelForCausalLM"]
    assert all((tmp_path / "hf" / name).is_file() for name in CODE_FILES)

    check_export_in_transformers(case, ours, tmp_path / "run", tmp_path / "hf", remote=True, atol=ATOL)

    import_hf(tmp_path / "hf", tmp_path / "back")
    back_recipe, back = read_run(tmp_path / "back")
    assert back_recipe.model == options_resolved(cfg)
    assert sorted(back) == sorted(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    # moe generate reads the exported folder directly too.
    prompt = [3, 14, 15, 92, 65]
    assert generate(load_model(tmp_path / "hf"), prompt, 10, greedy=True) == generate(ours, prompt, 10, greedy=True)


def test_remote_code_imports_only_torch_and_transformers():
    allowed = {"__future__", "math", "torch", "transformers"}
    for name in CODE_FILES:
        tree = ast.parse((CODE_DIR / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed, (name, node.module)
            elif isinstance(node, ast.ImportFrom):
                assert f"{node.module}.py" in CODE_FILES, (name, node.module)
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in allowed for a in node.names), name


def test_remote_folder_loads_and_generates_where_this_package_cannot_be_imported(tmp_path):
    cfg = tiny_config(vocab_size=TOK_VOCAB, moe={}, router={"name": "hash"})
    ours, _ = make_run(tmp_path / "run", cfg)
    export_hf(tmp_path / "run", tmp_path / "hf")
    script = (
        "import sys, torch\n"
        "sys.modules['moe'] = None  # any import of this package fails\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=True).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=True)\n"
        "ids = t('def f(x):', return_tensors='pt')['input_ids']\n"
        "print(m.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    from moe.generate import folder_tokenizer

    prompt = folder_tokenizer(tmp_path / "run").encode("def f(x):")
    expected = generate(ours, prompt, 6, greedy=True, eos_token_ids=eos_token_ids(tmp_path / "hf"))
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected


def test_refused_what_no_engine_reproduces_and_weights_that_cannot_run(tmp_path):
    cfg = tiny_config(moe={}, router={"name": "gshard", "options": {"second_policy_eval": "random"}})
    make_run(tmp_path / "random", cfg)
    with pytest.raises(ValueError, match="cannot export: router gshard .* draws the second expert at random"):
        export_hf(tmp_path / "random", tmp_path / "hf")
    make_run(tmp_path / "hash", tiny_config(moe={}, router={"name": "hash", "options": {"hash_function": "balanced"}}))
    with pytest.raises(ValueError, match="balanced hash table was never fitted"):
        export_hf(tmp_path / "hash", tmp_path / "hf")
    cfg = tiny_config(moe={}, router={**EC, "options": {**EC["options"], "eval_routing": "threshold"}})
    _, state = make_run(tmp_path / "ec", cfg)
    from moe.rundir import write_run

    write_run(tmp_path / "ec", cfg, {k: torch.zeros_like(v) if k.endswith("threshold_updates") else v
                                     for k, v in state.items()})
    with pytest.raises(ValueError, match="thresholds were never estimated"):
        export_hf(tmp_path / "ec", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_remote_code_fills_the_cache_it_is_given_and_matches_full_scoring(tmp_path):
    cfg = tiny_config(vocab_size=TOK_VOCAB, moe={}, router={"name": "adaptive"})
    make_run(tmp_path / "run", cfg)
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                           dtype=torch.float32).eval()
    ids = torch.randint(0, TOK_VOCAB, (1, 9))
    cache = transformers.DynamicCache()
    with torch.no_grad():
        full = hf(input_ids=ids).logits
        first = hf(input_ids=ids[:, :6], cache=cache, use_cache=True)
        assert first.cache is cache and cache.get_seq_length() == 6  # filled, not replaced
        rest = [hf(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(6, 9)]
    torch.testing.assert_close(torch.cat([first.logits, *rest], dim=1), full, rtol=0, atol=1e-5)
