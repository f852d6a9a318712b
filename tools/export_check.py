"""Train a small model with every router, export it to every engine, and measure each export against our model.

    flock /tmp/moe-heavy.lock .venv/bin/python -m moe.tools.export_check [--steps 40] [--json FILE] [--cases ...]

Each case (a router and a configuration) trains ``recipes/tiny.yaml`` shrunk (``SMALL``) for ``--steps`` optimizer
steps on the embedded corpus (``moe train``, in a process of its own), so routers carry trained state (sigmoid
biases, expert-choice thresholds, hash tables), then:

- ``moe export --format hf``: the layout (native, or remote code and why); in ``transformers`` (fp32, loaded with
  ``trust_remote_code`` for remote code) the largest |logit difference| from our model on ``TEXT``; whether 24
  greedy tokens from transformers' ``generate()`` (KV cache) equal ``moe generate``'s; whether ``AutoTokenizer``
  encodes ``TEXTS`` as our tokenizer does.
- ``moe export --format gguf``: the llama.cpp architecture, or the one-line refusal; when ``llama_cpp`` imports,
  the largest |logit difference| relative to the largest |logit| (KV cache in fp32), whether the argmax agrees at
  every position, whether greedy decoding through llama.cpp's KV cache equals ``moe generate``, and whether
  llama.cpp tokenises ``TEXTS`` as we do.

Prints a markdown table (``docs/export.md``) and writes the records as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

SMALL = ["model.vocab_size=512", "model.hidden_size=64", "model.num_layers=3", "model.num_heads=4",
         "model.num_kv_heads=2", "model.intermediate_size=128", "model.max_position_embeddings=128",
         "model.moe.num_experts=4", "model.moe.expert_hidden_size=64", "data.max_chars=200000",
         "train.micro_batch_size=8", "train.seq_len=64", "train.warmup_steps=4", "train.eval_every=0",
         "train.save_every=0", "train.log_every=10"]
R = "model.moe.router"
# name: (what it shows, recipe overrides)
CASES = {
    "topk": ("Mixtral: renormalised top-2", []),
    "topk_no_renorm_dense_first": ("softmax-then-top-k, first layer dense", [f"{R}.renormalize=false",
                                                                          "model.moe.first_dense_layers=1"]),
    "topk_qk_norm": ("qk_norm", ["model.qk_norm=true"]),
    "topk_gated_shared": ("gated shared expert, not renormalised", [
        f"{R}.renormalize=false", "model.moe.num_shared_experts=1", "model.moe.shared_expert_gate=true"]),
    "topk_eval_capacity": ("eval capacity factor 1.0", ["model.moe.eval_capacity_factor=1.0"]),
    "switch": ("top-1, capacity 1.25 in training", [f"{R}.name=switch", f"{R}.top_k=1", f"{R}.renormalize=false",
                                                    "model.moe.capacity_factor=1.25"]),
    "gshard": ("top-2, random second expert in training, all at inference", [f"{R}.name=gshard",
                                                                             "model.moe.capacity_factor=2.0"]),
    "gshard_threshold": ("second expert kept above 0.2 at inference", [
        f"{R}.name=gshard", f"{R}.options.second_policy_eval=threshold"]),
    "sigmoid": ("selection bias, 2 groups of 2, shared expert, first layer dense", [
        f"{R}.name=sigmoid", f"{R}.options.n_groups=2", f"{R}.options.topk_groups=1", "model.moe.num_shared_experts=1",
        "model.moe.first_dense_layers=1"]),
    "sigmoid_dots1": ("qk_norm and biases on q/k/v/o", [f"{R}.name=sigmoid", "model.qk_norm=true",
                                                        "model.attention_bias=true"]),
    "sigmoid_groups_no_bias": ("group limit without the selection bias", [
        f"{R}.name=sigmoid", f"{R}.options.n_groups=2", f"{R}.options.topk_groups=1",
        f"{R}.options.loss_free_bias=false"]),
    "grin_layernorm": ("LayerNorm (PhiMoE)", [f"{R}.name=grin", "model.norm=layernorm", f"{R}.aux_loss_coef=0.001"]),
    "grin": ("RMSNorm", [f"{R}.name=grin", f"{R}.aux_loss_coef=0.001"]),
    "expert_choice_threshold": ("causal inference (thresholds)", [
        f"{R}.name=expert_choice", f"{R}.options.allow_causal_leak=true", f"{R}.options.eval_routing=threshold"]),
    "expert_choice_top_c": ("training rule at inference (not causal)", [
        f"{R}.name=expert_choice", f"{R}.options.allow_causal_leak=true"]),
    "hash": ("random table", [f"{R}.name=hash"]),
    "adaptive": ("threshold 0.1", [f"{R}.name=adaptive"]),
    "top_p": ("threshold 0.4, entropy loss", [f"{R}.name=top_p"]),
}
TEXT = ('def load(path):\n    """Read a JSON file."""\n    with open(path, encoding="utf-8") as f:\n'
        '        return json.load(f)\n')
TEXTS = (TEXT, "  x = [1, 2, 3]  # héllo ✓\n\n\tend <|endoftext|>", "ünïcödé — ελληνικά 中文")


class Tok:
    """The run's tokenizer.json with ``moe generate``'s interface (``encode(text) -> ids``)."""

    def __init__(self, run: Path) -> None:
        from moe.data.tokenizer import load_tokenizer

        self._tok = load_tokenizer(run)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids


@torch.no_grad()
def generate(model, prompt: list[int], n: int, eos: list[int] = ()) -> list[int]:
    """Greedy decoding through our KV cache: the prompt, then one token at a time (what ``moe generate --greedy``
    does; its module is an entry point, which a tool may not import)."""
    cache = model.new_cache()
    logits = model(torch.tensor([prompt]), cache=cache).logits[0, -1]
    out: list[int] = []
    while len(out) < n:
        out.append(int(logits.argmax()))
        if out[-1] in eos:
            break
        logits = model(torch.tensor([[out[-1]]]), cache=cache).logits[0, -1]
    return out


def check_hf(run: Path, out: Path, model, tok) -> dict:
    import transformers

    from moe.hf.config_map import REMOTE
    from moe.hf.export_hf import export_hf

    r = export_hf(run, out)
    remote = r.layout == REMOTE
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=remote).eval()
    ids = tok.encode(TEXT)
    with torch.no_grad():
        diff = (model(torch.tensor([ids])).logits - hf(input_ids=torch.tensor([ids])).logits).abs().max().item()
    prompt = ids[:12]
    eos = json.loads((out / "generation_config.json").read_text()).get("eos_token_id")
    ours = generate(model, prompt, 24, [] if eos is None else [eos] if isinstance(eos, int) else eos)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    auto = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=remote)
    same_tokens = all(auto(t)["input_ids"] == tok.encode(t) for t in TEXTS)
    return {"layout": r.layout, "why_remote": r.why_remote, "hf_max_abs_diff": diff, "hf_greedy_equal": ours == theirs,
            "autotokenizer_equal": same_tokens}


def check_gguf(run: Path, out: Path, model, tok) -> dict:
    from moe.hf.export_hf import export_hf

    try:
        r = export_hf(run, out, format="gguf")
    except ValueError as e:
        return {"gguf": None, "gguf_refusal": str(e)}
    record = {"gguf": r.layout}
    try:
        import llama_cpp
    except ImportError:
        return record
    llm = llama_cpp.Llama(model_path=str(r.out_dir), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                          n_threads=1, type_k=0, type_v=0, flash_attn=False)  # type 0: an fp32 KV cache
    try:
        ids = tok.encode(TEXT)
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].numpy()
        record["llama_cpp_max_rel_diff"] = float(np.abs(ours - theirs).max() / np.abs(ours).max())
        record["llama_cpp_argmax_equal"] = bool((ours.argmax(-1) == theirs.argmax(-1)).all())
        record["llama_cpp_tokens_equal"] = all(llm.tokenize(t.encode(), add_bos=False, special=True) == tok.encode(t)
                                               for t in TEXTS)
        prompt = ids[:12]
        llm.reset()
        llm.eval(prompt)
        greedy = []
        for _ in range(24):
            greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([greedy[-1]])
        record["llama_cpp_greedy_equal"] = greedy == generate(model, prompt, 24)
    finally:
        llm.close()
    return record


def run_case(name: str, overrides: list[str], steps: int, root: Path, cache: Path) -> dict:
    from moe.rundir import load_run_model

    run = root / name / "run"
    subprocess.run([sys.executable, "-m", "moe", "train", "tiny", "--out", str(run), "--no-progress", *SMALL,
                    f"train.steps={steps}", f"data.cache_dir={cache}", *overrides], check=True)
    model, tok = load_run_model(run), Tok(run)
    record = {"case": name, **check_hf(run, root / name / "hf", model, tok)}
    record.update(check_gguf(run, root / name / "model.gguf", model, tok))
    return record


def table(records: list[dict]) -> str:
    def yes(v):
        return "—" if v is None else ("yes" if v else "**no**")

    lines = ["| router | configuration | transformers layout | max \\|Δlogit\\| (transformers) "
             "| greedy = moe generate "
             "| AutoTokenizer = ours | llama.cpp (GGUF) | max \\|Δlogit\\| / max \\|logit\\| (llama.cpp) | argmax, "
             "greedy, tokens = ours |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        router = r["case"].split("_")[0] if not r["case"].startswith(("expert_choice", "top_p")) else \
            ("expert_choice" if r["case"].startswith("expert") else "top_p")
        layout = f"`{r['layout']}`" + (" (remote code)" if r["why_remote"] else " (native)")
        refusal = (r.get("gguf_refusal") or "").removeprefix("cannot export as GGUF: ")
        gguf = f"`{r['gguf']}`" if r["gguf"] else f"refused: {refusal}"
        rel = f"{r['llama_cpp_max_rel_diff']:.1e}" if "llama_cpp_max_rel_diff" in r else "—"
        flags = " / ".join(yes(r.get(k)) for k in ("llama_cpp_argmax_equal", "llama_cpp_greedy_equal",
                                                     "llama_cpp_tokens_equal")) if r["gguf"] else "—"
        lines.append(f"| {router} | {r['description']} | {layout} | {r['hf_max_abs_diff']:.1e} | "
                     f"{yes(r['hf_greedy_equal'])} | {yes(r['autotokenizer_equal'])} | {gguf} | {rel} | {flags} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per case (default: 40)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--work", help="keep the runs and exports here (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        records = []
        for name in args.cases:
            description, overrides = CASES[name]
            records.append({**run_case(name, overrides, args.steps, root, root / "cache"), "description": description})
            print(json.dumps(records[-1]), flush=True)
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    try:
        import llama_cpp

        versions["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    print(table(records))
    print("versions:", json.dumps(versions))
    if args.json:
        records_json = {"versions": versions, "steps": args.steps, "records": records}
        Path(args.json).write_text(json.dumps(records_json, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
