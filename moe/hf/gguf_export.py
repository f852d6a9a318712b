"""``moe export RUN OUT --format gguf``: one GGUF file for llama.cpp, written with the ``gguf`` package.

Shape legend: V vocabulary, D model width, L layers, E experts, F expert hidden width, W shared width, H heads,
G key/value heads, Hd head width.

The architecture and its settings come from ``moe.hf.gguf_arch`` (which refuses, in one line, what llama.cpp cannot
express). Tensors are written in fp32 under llama.cpp's names; a GGUF tensor of ggml shape ``{a, b, c}`` is the
numpy array ``[c, b, a]``, so our ``[out, in]`` linear weights go as they are and the experts as
``[E, F, D]`` (gate, up) and ``[E, D, F]`` (down). The tokenizer is the run's byte-level BPE (or the byte
tokenizer of runs without one) as llama.cpp's ``gpt2`` model with the ``gpt-2`` pre-tokenizer, the regex our
``tokenizers`` ByteLevel pre-tokenizer uses; ids the model has beyond the tokenizer's are padding tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from moe.config import ModelConfig, load_recipe
from moe.hf.export_run import ExportResult, read_weights
from moe.hf.gguf_arch import GGUFPlan, gguf_plan
from moe.hf.tokenizer_files import special_token_ids
from moe.rundir import RECIPE

log = logging.getLogger(__name__)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def _permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias) from the rotate-half rotary layout (ours, transformers') to llama.cpp's
    ``llama`` layout, which rotates interleaved pairs: ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor], plan: GGUFPlan) -> dict[str, np.ndarray]:
    """Our state dict under llama.cpp's tensor names and shapes for ``plan``."""
    out: dict[str, np.ndarray] = {"token_embd.weight": _f32(state["embed_tokens.weight"]),
                                  "output_norm.weight": _f32(state["norm.weight"])}
    if "lm_head.weight" in state:
        out["output.weight"] = _f32(state["lm_head.weight"])
    elif plan.arch == "qwen2moe":  # its output layer is never tied
        out["output.weight"] = out["token_embd.weight"].copy()
    m = cfg.moe
    ffn_norm = "post_attention_norm" if plan.arch == "glm4moe" else "ffn_norm"
    for i in range(cfg.num_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = _f32(state[p + "input_layernorm.weight"])
        out[b + f"{ffn_norm}.weight"] = _f32(state[p + "post_attention_layernorm.weight"])
        for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                             ("o_proj", "attn_output")):
            for kind in ("weight", "bias"):
                t = state.get(f"{p}self_attn.{ours}.{kind}")
                if t is None:
                    continue
                if plan.arch == "llama" and ours in ("q_proj", "k_proj"):
                    t = _permute_rotary(t, cfg.num_heads if ours == "q_proj" else cfg.num_kv_heads)
                out[f"{b}{theirs}.{kind}"] = _f32(t)
        for ours, theirs in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
            if f"{p}self_attn.{ours}.weight" in state:
                out[f"{b}{theirs}.weight"] = _f32(state[f"{p}self_attn.{ours}.weight"])
        if m is None or not m.is_moe_layer(i):
            for proj in ("gate", "up", "down"):
                out[f"{b}ffn_{proj}.weight"] = _f32(state[f"{p}mlp.{proj}_proj.weight"])
            continue
        _moe_tensors(out, cfg, state, plan, p + "mlp.", b)
    return out


def _moe_tensors(out: dict[str, np.ndarray], cfg: ModelConfig, state: dict[str, torch.Tensor], plan: GGUFPlan,
                 p: str, b: str) -> None:
    m = cfg.moe
    assert m is not None
    F, D = m.expert_hidden_size, cfg.hidden_size
    gate_up = state[p + "experts.w_gate_up_ED2F"]  # [E, D, 2F]
    out[b + "ffn_gate_inp.weight"] = _f32(state[p + "router.weight"])  # [E, D]
    out[b + "ffn_gate_exps.weight"] = _f32(gate_up[:, :, :F].transpose(1, 2))  # [E, F, D]
    out[b + "ffn_up_exps.weight"] = _f32(gate_up[:, :, F:].transpose(1, 2))
    out[b + "ffn_down_exps.weight"] = _f32(state[p + "experts.w_down_EFD"].transpose(1, 2))  # [E, D, F]
    shared = {proj: state.get(f"{p}shared_experts.{proj}_proj.weight") for proj in ("gate", "up", "down")}
    if plan.arch == "glm4moe":
        bias = state.get(p + "router.e_score_correction_bias")
        out[b + "exp_probs_b.bias"] = _f32(bias if bias is not None else torch.zeros(m.num_experts))
        # n·F shared units, the padding all zero (silu(0)·0 = 0 exactly); a zero expert of width F when none.
        W = m.shared_hidden_size
        units = max(-(-W // F), 1) * F
        like = gate_up.new_zeros(0)
        gate = shared["gate"] if W else like.new_zeros(0, D)
        up = shared["up"] if W else like.new_zeros(0, D)
        down = shared["down"] if W else like.new_zeros(D, 0)
        shared = {"gate": torch.cat((gate, gate.new_zeros(units - W, D))),
                  "up": torch.cat((up, up.new_zeros(units - W, D))),
                  "down": torch.cat((down, down.new_zeros(D, units - W)), dim=1)}
    if plan.arch == "qwen2moe":
        out[b + "ffn_gate_inp_shexp.weight"] = _f32(state[p + "shared_expert_gate.weight"].reshape(D))
    if shared["gate"] is not None:
        for proj in ("gate", "up", "down"):
            out[f"{b}ffn_{proj}_shexp.weight"] = _f32(shared[proj])


def _hyperparameters(w, cfg: ModelConfig, plan: GGUFPlan, name: str) -> None:
    import gguf

    m = cfg.moe
    moe = plan.top_k > 0
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    # llama's MoE reads its expert width here; everything else its dense layers' width.
    w.add_feed_forward_length(m.expert_hidden_size if moe and plan.arch == "llama" else cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.attention_head_dim)
    w.add_value_length(cfg.attention_head_dim)
    w.add_rope_dimension_count(cfg.attention_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if not moe:
        return
    assert m is not None
    w.add_expert_count(m.num_experts)
    w.add_expert_used_count(plan.top_k)
    w.add_expert_feed_forward_length(m.expert_hidden_size)
    if plan.arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(m.shared_hidden_size)
    if plan.arch == "glm4moe":
        w.add_expert_shared_count(max(-(-m.shared_hidden_size // m.expert_hidden_size), 1))
        w.add_leading_dense_block_count(plan.leading_dense)
        w.add_expert_weights_scale(plan.scale)
        w.add_expert_weights_norm(plan.renormalize)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if plan.gating == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        if plan.groups != (0, 0):
            w.add_expert_group_count(plan.groups[0])
            w.add_expert_group_used_count(plan.groups[1])


def gguf_vocabulary(tok, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of llama.cpp's ``gpt2`` BPE for a byte-level BPE with the GPT-2
    pre-tokenizer (the tokenizers moe train makes, and the byte tokenizer); ``ValueError`` for any other."""
    import gguf

    spec = json.loads(tok.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    byte_level = (model.get("type") == "BPE" and spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
                  and not pre.get("add_prefix_space") and pre.get("use_regex", True)
                  and not model.get("byte_fallback") and not model.get("continuing_subword_prefix")
                  and not model.get("end_of_word_suffix"))
    if not byte_level:
        raise ValueError(f"cannot export as GGUF: the run's tokenizer.json is not a byte-level BPE with the GPT-2 "
                         f"pre-tokenizer (model {model.get('type')!r}, pre-tokenizer {pre.get('type')!r}); GGUF export "
                         "writes the tokenizers moe train makes (llama.cpp's gpt2 model, pre-tokenizer gpt-2)")
    by_id = {i: s for s, i in tok.get_vocab(with_added_tokens=True).items()}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if i in special else
                             gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL))
        else:  # the model has more ids than the tokenizer: they never come out of tokenisation
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        # The byte tokenizer has none, but llama.cpp requires the key and gguf writes no empty array: one merge of
        # two 3-character symbols, which never form (with no other merge every symbol stays one character).
        merges = ["ĀĀĀ ĀĀĀ"]
    return tokens, types, merges


def _tokenizer(w, vocabulary: tuple[list[str], list[int], list[str]], ids: dict) -> None:
    tokens, types, merges = vocabulary
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        value = ids.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            add(int(value))
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def export_gguf(run: Path, out: Path):
    """Write ``run`` as one GGUF file: ``out`` when it ends in .gguf, else ``out/model.gguf``."""
    import gguf


    cfg = load_recipe(run / RECIPE).model
    plan = gguf_plan(cfg)  # refuse before reading the weights
    cfg, state, tok, _ = read_weights(run, cfg)
    if tok is None:
        raise ValueError(f"cannot export as GGUF: {run} has no tokenizer.json and vocab_size {cfg.vocab_size} < 256 "
                         "(llama.cpp needs a vocabulary; byte-level runs need at least the 256 bytes)")
    vocabulary = gguf_vocabulary(tok, cfg.vocab_size)
    tensors = gguf_tensors(cfg, state, plan)
    path = out if out.suffix == ".gguf" else out / "model.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), plan.arch)
    try:
        _hyperparameters(writer, cfg, plan, run.resolve().name)
        _tokenizer(writer, vocabulary, special_token_ids(run, tok))
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)
        raise
    writer.close()
    log.debug("exported %s as GGUF (%s) to %s", run, plan.arch, path)
    return ExportResult(layout=plan.arch, out_dir=path, copied=[])
