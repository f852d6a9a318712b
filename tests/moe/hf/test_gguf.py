"""``moe export --format gguf`` without llama.cpp: the file read back with ``gguf``'s reader.

Every tensor maps back, bit for bit, to our weights (llama's q/k rotary permutation undone, glm4moe's zero padding
and zero bias, qwen2moe's untied output); the hyper-parameters carry the semantics llama.cpp reads; the tokenizer is
ours. Refusals are one line and leave no file. ``test_gguf_llama_cpp.py`` runs the same files in llama.cpp.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe.cli import main
from moe.hf.export_hf import export_hf
from moe.hf.gguf_arch import gguf_arch
from tests.moe.hf.gguf_cases import GGUF_CASES, GGUF_REFUSED
from tests.moe.hf.helpers import TOK_VOCAB, bpe_tokenizer_json, make_run, tiny_config

import gguf  # an install requirement: a missing one fails, it does not skip


def _read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {}
    for name, field in reader.fields.items():
        if not field.types:
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            parts = [field.parts[i] for i in field.data]
            fields[name] = [bytes(p).decode() if field.types[-1] == gguf.GGUFValueType.STRING else p.tolist()[0]
                            for p in parts]
        elif field.types[0] == gguf.GGUFValueType.STRING:
            fields[name] = bytes(field.parts[-1]).decode()
        else:
            fields[name] = field.parts[-1].tolist()[0]
    # ggml shapes are numpy's reversed: the reader's arrays come in numpy order.
    tensors = {t.name: np.array(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}
    return fields, tensors


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _ours_from_gguf(cfg, arch: str, tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Our state dict rebuilt from the GGUF tensors: the inverse of ``moe.hf.gguf_export.gguf_tensors``."""
    t = {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
    out = {"embed_tokens.weight": t.pop("token_embd.weight"), "norm.weight": t.pop("output_norm.weight")}
    if "output.weight" in t:
        head = t.pop("output.weight")
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = head
        else:
            assert arch == "qwen2moe" and torch.equal(head, out["embed_tokens.weight"])
    m = cfg.moe
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "post_attention_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.router",
             "ffn_gate_inp_shexp": "mlp.shared_expert_gate", "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
             "ffn_up_shexp": "mlp.shared_experts.up_proj", "ffn_down_shexp": "mlp.shared_experts.down_proj"}
    for name in sorted(t):
        _, i, rest = name.split(".", 2)
        key, kind = rest.rsplit(".", 1)
        value = t[name]
        if key in ("attn_q", "attn_k") and arch == "llama":
            value = torch.from_numpy(_unpermute(value.numpy(), cfg.num_heads if key == "attn_q" else cfg.num_kv_heads))
        if key in names:
            out[f"layers.{i}.{names[key]}.{kind}"] = value
    for i in (i for i in range(cfg.num_layers) if m is not None and m.is_moe_layer(i)):
        b = f"blk.{i}."
        gate, up = t[b + "ffn_gate_exps.weight"], t[b + "ffn_up_exps.weight"]  # [E, F, D]
        out[f"layers.{i}.mlp.experts.w_gate_up_ED2F"] = torch.cat((gate, up), dim=1).transpose(1, 2)
        out[f"layers.{i}.mlp.experts.w_down_EFD"] = t[b + "ffn_down_exps.weight"].transpose(1, 2)
        gate_w = out.get(f"layers.{i}.mlp.shared_expert_gate.weight")
        if gate_w is not None:
            out[f"layers.{i}.mlp.shared_expert_gate.weight"] = gate_w.reshape(1, -1)
        if arch == "glm4moe":
            bias = t[b + "exp_probs_b.bias"]
            if m.router.name == "sigmoid" and m.router.router_options().loss_free_bias:
                out[f"layers.{i}.mlp.router.e_score_correction_bias"] = bias
            else:
                assert not bias.any()
            W = m.shared_hidden_size
            for proj, dim in (("gate", 0), ("up", 0), ("down", 1)):
                full = out.pop(f"layers.{i}.mlp.shared_experts.{proj}_proj.weight")
                kept, pad = full.split([W, full.shape[dim] - W], dim=dim)
                assert not pad.any()
                if W:
                    out[f"layers.{i}.mlp.shared_experts.{proj}_proj.weight"] = kept
    return out


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_holds_our_weights_hyperparameters_and_tokenizer(case, tmp_path):
    arch, kw = GGUF_CASES[case]
    cfg = tiny_config(**{"vocab_size": TOK_VOCAB, **kw})
    _, state = make_run(tmp_path / "run", cfg)
    assert gguf_arch(cfg) == arch
    result = export_hf(tmp_path / "run", tmp_path / "model.gguf", format="gguf")
    assert result.layout == arch and result.out_dir == tmp_path / "model.gguf"
    fields, tensors = _read(result.out_dir)
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == cfg.num_layers
    assert fields[f"{arch}.attention.head_count_kv"] == cfg.num_kv_heads
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope_theta)

    back = _ours_from_gguf(cfg, arch, tensors)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        assert torch.equal(back[name], value.float()), name

    m = cfg.moe
    if m is not None:
        assert fields[f"{arch}.expert_count"] == m.num_experts
    if arch == "glm4moe":
        sigmoid = m.router.name == "sigmoid"
        assert fields["glm4moe.expert_gating_func"] == (2 if sigmoid else 1)
        assert bool(fields["glm4moe.expert_weights_norm"]) == m.router.renormalize
        assert fields["glm4moe.leading_dense_block_count"] == m.first_dense_layers
        assert fields["glm4moe.expert_weights_scale"] == pytest.approx(1.7 if case.startswith("sigmoid_glm4moe_g")
                                                                        else 2.5 if sigmoid else 1.0)
        assert fields.get("glm4moe.expert_group_count") == (2 if "groups" in case else None)

    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.add_bos_token"] is False
    if cfg.vocab_size == TOK_VOCAB:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(bpe_tokenizer_json())
        assert tokens == [tok.id_to_token(i) for i in range(TOK_VOCAB)]
        assert fields["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|endoftext|>")
    else:  # the byte tokenizer: the 256 byte symbols, then padding
        assert tokens[256:] == [f"[PAD{i}]" for i in range(256, cfg.vocab_size)]


@pytest.mark.parametrize("case", list(GGUF_REFUSED))
def test_gguf_refuses_what_llama_cpp_cannot_express(case, tmp_path):
    kw, message = GGUF_REFUSED[case]
    make_run(tmp_path / "run", tiny_config(**kw))
    with pytest.raises(ValueError, match="cannot export") as err:
        export_hf(tmp_path / "run", tmp_path / "out" / "model.gguf", format="gguf")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_gguf_refuses_a_tokenizer_llama_cpp_would_split_differently(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    make_run(tmp_path / "run", tiny_config(vocab_size=TOK_VOCAB))
    tok = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "run" / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a byte-level BPE with the GPT-2 pre-tokenizer"):
        export_hf(tmp_path / "run", tmp_path / "m.gguf", format="gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_cli_gguf_export_and_refusal(tmp_path, capsys):
    make_run(tmp_path / "run", tiny_config(vocab_size=TOK_VOCAB, moe={}))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "gguf"]) == 0
    assert "as llama to" in capsys.readouterr().out and (tmp_path / "out" / "model.gguf").is_file()
    make_run(tmp_path / "hash", tiny_config(moe={}, router={"name": "hash"}))
    assert main(["export", str(tmp_path / "hash"), str(tmp_path / "h.gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot export as GGUF: router hash") and "\n" not in err
