"""Single-process training loop: AdamW, warmup + cosine schedule, gradient clipping, periodic logs.

Writes ``OUT/metrics.jsonl`` (one JSON object per logged step and per evaluation), ``OUT/recipe.yaml`` (the
resolved config) and ``OUT/model.safetensors``. The DeepSpeed engine, BPE data pipeline, TensorBoard and
resumable checkpoints come with their own issues; this loop is the one they extend.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from tqdm import tqdm

from moe.config import Recipe
from moe.data import ByteBatches, stdlib_corpus
from moe.model import MoEModel
from routing import Router

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    val_loss: float
    tokens_per_s: float
    wall_s: float
    out_dir: Path


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr · min_lr_ratio`` at the last step."""
    t = recipe.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No decay on norms and 1-D parameters (nanoGPT convention); matrices and expert tensors decay.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: MoEModel, data: ByteBatches, batch_size: int, batches: int, device: torch.device) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)  # the same validation windows every time
    total = 0.0
    for _ in range(batches):
        x, y = data.batch("val", batch_size, gen)
        total += model(x.to(device), y.to(device)).loss.item()
    model.train()
    return total / batches


def train(recipe: Recipe, out_dir: str | Path, *, progress: bool = True, corpus_bytes: int = 4_000_000) -> TrainResult:
    """Train ``recipe`` on the embedded default corpus and write logs and the final weights to ``out_dir``."""
    t = recipe.train
    if recipe.model.vocab_size < 256:
        raise ValueError(f"model.vocab_size must be >= 256 for the byte-level corpus, got {recipe.model.vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    torch.manual_seed(t.seed)
    device = _device(t.device)
    data = ByteBatches(stdlib_corpus(corpus_bytes), t.seq_len)
    model = MoEModel(recipe.model).to(device)
    opt = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(t.seed)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    log.info("model: %.2fM parameters, %.2fM active per token", model.num_parameters() / 1e6,
             model.num_parameters(active=True) / 1e6)

    metrics = (out / "metrics.jsonl").open("w")
    tokens_per_step = t.micro_batch_size * t.seq_len
    start = time.perf_counter()
    bar = tqdm(range(t.steps), desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    loss_val = float("nan")
    for step in bar:
        step_start = time.perf_counter()
        lr = lr_at(step, recipe)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = data.batch("train", t.micro_batch_size, gen)
        result = model(x.to(device), y.to(device))
        (result.loss + result.aux_loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        for router in routers:
            router.on_optimizer_step()
        loss_val = result.loss.item()
        if not math.isfinite(loss_val):
            raise RuntimeError(f"non-finite loss {loss_val} at step {step + 1}")
        step_s = time.perf_counter() - step_start
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            record = {"step": step + 1, "loss": loss_val, "aux_loss": result.aux_loss.item(), "lr": lr,
                      "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_step / step_s}
            for i, r in enumerate(result.routings):
                record[f"moe{i}/dropped_fraction"] = r.stats["dropped_fraction"].item()
                record[f"moe{i}/max_load_ratio"] = r.stats["max_load_ratio"].item()
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.1e}")
    wall = time.perf_counter() - start
    val_loss = evaluate(model, data, t.micro_batch_size, 8, device)
    metrics.write(json.dumps({"step": t.steps, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}) + "\n")
    metrics.close()

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if recipe.model.tie_word_embeddings:
        state.pop("lm_head.weight")  # shares storage with the embedding
    save_file(state, str(out / "model.safetensors"))
    return TrainResult(steps=t.steps, final_loss=loss_val, val_loss=val_loss,
                       tokens_per_s=t.steps * tokens_per_step / wall, wall_s=wall, out_dir=out)
