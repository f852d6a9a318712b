"""Sampling from a model with the KV cache: ``moe generate MODEL --prompt TEXT``.

Shape legend: V vocab; ids are plain lists of ints (one sequence; batch 1).

MODEL is one of our run directories (``recipe.yaml`` + ``model.safetensors``) or a Hugging Face folder, which is
imported in memory (``moe.hf.read_hf_model``). Text becomes ids in one place, ``folder_tokenizer``: the folder's
``tokenizer.json`` when it has one (``tokenizers.Tokenizer.from_file``), else UTF-8 bytes, the tokenizer of the
byte-level runs. Generation stops after ``max_new_tokens`` or at an end-of-sequence id from the folder's
``generation_config.json`` (or ``config.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from moe.data.tokenizer import load_tokenizer
from moe.model import MoEModel


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Ids are the UTF-8 bytes of the text (vocab 256): what the byte-level runs were trained on."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Ids beyond a byte (a vocab larger than 256) have no text: they show as U+FFFD, as broken UTF-8 does.
        return b"".join(bytes([i]) if 0 <= i < 256 else b"\xff" for i in ids).decode("utf-8", errors="replace")


class FileTokenizer:
    """A ``tokenizer.json`` (BPE, Unigram, ...) through the ``tokenizers`` library."""

    def __init__(self, path: Path) -> None:
        self._tok = load_tokenizer(path, setting=None)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def folder_tokenizer(model_dir: str | Path) -> Tokenizer:
    """How text becomes ids for the model in ``model_dir``: its ``tokenizer.json`` if present, else UTF-8 bytes."""
    path = Path(model_dir) / "tokenizer.json"
    return FileTokenizer(path) if path.is_file() else ByteTokenizer()


def eos_token_ids(model_dir: str | Path) -> list[int]:
    """End-of-sequence ids from ``generation_config.json``, else ``config.json``; [] when neither names one."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (ValueError, AttributeError):
            raise ValueError(f"{path}: not a JSON object") from None
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []


def load_model(path: str | Path) -> MoEModel:
    """The model of a run directory or of a Hugging Face folder (imported in memory), fp32, in eval mode."""
    from moe.hf.import_hf import read_hf_model
    from moe.rundir import build_model, is_run_dir, load_run_model

    path = Path(path)
    if is_run_dir(path):
        return load_run_model(path)
    if (path / "config.json").is_file():
        cfg, state, _ = read_hf_model(path)
        return build_model(cfg, state)
    raise ValueError(f"{path}: neither a run directory (recipe.yaml + model.safetensors) "
                     "nor a Hugging Face folder (config.json + weights)")


@torch.no_grad()
def generate(model: MoEModel, prompt_ids: Sequence[int], max_new_tokens: int, *, greedy: bool = False,
             temperature: float = 1.0, seed: int = 0, eos_token_ids: Iterable[int] = ()) -> list[int]:
    """New token ids after ``prompt_ids``: greedy (argmax, as ``transformers``' ``do_sample=False``) or sampled
    from ``softmax(logits / temperature)`` with a generator seeded by ``seed``.

    Args:
        model: the model; put in eval mode for the call.
        prompt_ids: at least one id.
        max_new_tokens: the most ids to generate (fewer when an end-of-sequence id comes first; it is included).
        greedy: argmax instead of sampling (also what ``temperature == 0`` means).
        temperature: > 0 when sampling.
        seed: seed of the sampling generator.
        eos_token_ids: ids that end the generation.
    Returns:
        the generated ids (without the prompt).
    """
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty (it encodes to no tokens)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    greedy = greedy or temperature == 0
    limit = model.cfg.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's max_position_embeddings ({limit})")
    vocab = model.cfg.vocab_size
    if not all(0 <= i < vocab for i in prompt_ids):
        raise ValueError(f"the prompt has token ids outside the model's vocabulary (vocab_size {vocab})")
    eos = set(eos_token_ids)
    device = model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache()
        logits_V = model(torch.tensor([list(prompt_ids)], device=device), cache=cache).logits[0, -1]
        out: list[int] = []
        while len(out) < max_new_tokens:
            if greedy:
                nxt = int(logits_V.argmax())
            else:
                probs_V = torch.softmax(logits_V.float() / temperature, dim=-1)
                nxt = int(torch.multinomial(probs_V, 1, generator=gen))
            out.append(nxt)
            if nxt in eos or len(out) == max_new_tokens:
                break
            logits_V = model(torch.tensor([[nxt]], device=device), cache=cache).logits[0, -1]
        return out
    finally:
        model.train(was_training)


@dataclass
class Generation:
    text: str  # prompt and continuation, decoded together
    prompt_ids: list[int]
    new_ids: list[int]


def generate_text(model_path: str | Path, prompt: str, max_new_tokens: int = 64, *, greedy: bool = False,
                  temperature: float = 1.0, seed: int = 0) -> Generation:
    """``moe generate``: load the model and tokenizer of ``model_path``, continue ``prompt``."""
    model = load_model(model_path)
    tokenizer = folder_tokenizer(model_path)
    if isinstance(tokenizer, ByteTokenizer) and model.cfg.vocab_size < 256:
        raise ValueError(f"{model_path}: no tokenizer.json, and byte-level ids need vocab_size >= 256 "
                         f"(the model has {model.cfg.vocab_size})")
    prompt_ids = tokenizer.encode(prompt)
    new_ids = generate(model, prompt_ids, max_new_tokens, greedy=greedy, temperature=temperature, seed=seed,
                       eos_token_ids=eos_token_ids(model_path))
    return Generation(text=tokenizer.decode(prompt_ids + new_ids), prompt_ids=prompt_ids, new_ids=new_ids)
