"""The training loop: AdamW, warmup + cosine schedule, gradient accumulation and clipping, bf16 autocast on
GPU, periodic evaluation and checkpoints, metrics to ``metrics.jsonl`` and TensorBoard.

A run directory holds: ``recipe.yaml`` (the resolved config), ``tokenizer.json``, ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/`` (resumable, see ``moe.checkpoint``) and the final ``model.safetensors``.

Several processes (``deepspeed --num_gpus N --module moe.train RECIPE ...``; ``build_engine`` then picks
``moe.parallel.deepspeed.engine.DeepSpeedEngine``): each optimizer step consumes a global batch of
``micro_batch_size × grad_accum_steps × world_size`` sequences, and rank r reads rows ``[r·B, (r+1)·B)`` of each
micro-batch's ``B × world_size`` block, so N processes see exactly the data of one process with an N times
larger ``micro_batch_size``. Logged losses are means over the ranks; only rank 0 writes files other than
checkpoints and shows progress; rank 0 prepares the data first while the others wait, then they read its cache.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from tqdm import tqdm

from moe.config import Recipe, uses_bf16
from moe.config_io import from_dict
from moe.data import BlockSampler, prepare_data
from moe.data.pipeline import default_cache_dir
from moe.data.sampler import fixed_batches
from moe.engine import Engine, build_engine
from moe.hf.config_map import export_notice
from moe.metrics import DeadExpertWatch, MetricsWriter, RouterCollapseWatch, RouterStats
from moe.model import MoEModel, flops_per_token
from moe.routing.base import Router
from moe.run_checks import check_out_dir, check_resume, clear_run, merge_init

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per device, for MFU when train.peak_tflops is not set.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


class NonFiniteError(RuntimeError):
    """The loss or gradient norm was not finite and the settings say to stop."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    val_loss: float
    tokens_per_s: float
    wall_s: float
    out_dir: Path
    rank: int = 0  # this process's rank: only rank 0 wrote the run directory's files
    start_step: int = 0  # the step a resumed run started from (0: a new run)
    mfu: float | None = None  # median model FLOPs utilisation of this run's steps, where the peak is known
    peak_known: bool = False  # whether the device's peak FLOP/s was known (train.peak_tflops or a known GPU)


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr · min_lr_ratio`` at the end."""
    t = recipe.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def _autocast(recipe: Recipe, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(recipe.train, device.type))


def _peak_flops(recipe: Recipe, device: torch.device) -> float | None:
    if recipe.train.peak_tflops is not None:
        return recipe.train.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def read_init(recipe: Recipe, init: Path, overrides: list[str] | tuple[str, ...] = ()
              ) -> tuple[Recipe, dict[str, torch.Tensor], list[str]]:
    """The model folder ``init`` (a run directory, or a Hugging Face folder such as ``moe upcycle``'s output): its
    architecture, the recipe's training settings (``moe.run_checks.merge_init``; ``overrides`` are the command
    line's, checked against the model), its tokenizer when the recipe names none, and its weights to start from.
    Returns the recipe, the weights and lines saying what came from where."""
    from moe.hf.import_hf import read_model_folder

    where = f"--init {init}"
    model_cfg, state = read_model_folder(init, where)
    recipe, notes = merge_init(recipe, model_cfg, overrides, where)
    if (init / "tokenizer.json").is_file() and recipe.data.tokenizer is None:
        data = recipe.to_dict()
        data["data"]["tokenizer"] = str(init / "tokenizer.json")
        recipe = from_dict(Recipe, data)
        notes.append(f"{where}: tokenizer {init / 'tokenizer.json'}")
    return recipe, state, notes


@torch.no_grad()
def evaluate(model: MoEModel, batches, device: torch.device, autocast, progress: bool = False) -> float:
    model.eval()
    total = 0.0
    for x, y in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False, dynamic_ncols=True):
        with autocast:
            total += model(x.to(device), y.to(device)).loss.item()
    model.train()
    return total / max(len(batches), 1)


def _shard_rows(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s share of ``n`` rows: ``n // world`` or one more, the first ranks taking the extra."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


@torch.no_grad()
def _evaluate(engine: Engine, batches, device: torch.device, autocast, progress: bool = False) -> float:
    """``evaluate`` over all ranks: each takes its rows of every batch; the mean over batches of each batch's
    mean loss, as one process computes it. Batches with fewer rows than ranks are left out."""
    if engine.world_size == 1:
        return evaluate(engine.model, batches, device, autocast, progress)
    W, r = engine.world_size, engine.rank
    batches = [b for b in batches if len(b[0]) >= W]
    sums = torch.zeros(len(batches), 2, dtype=torch.float64)  # per batch: Σ loss·rows, rows
    engine.model.eval()
    for i, (x, y) in enumerate(batches):
        rows = _shard_rows(len(x), r, W)
        with autocast:
            loss = engine.model(x[rows].to(device), y[rows].to(device)).loss.item()
        sums[i] = torch.tensor([loss * (rows.stop - rows.start), rows.stop - rows.start])
    engine.model.train()
    sums = engine.all_reduce_sum(sums)
    return float((sums[:, 0] / sums[:, 1]).mean()) if len(batches) else float("nan")


class _NoWriter:
    """The metrics writer of ranks other than 0."""

    def write(self, record: dict) -> None:
        pass

    def router_images(self, load_LE: torch.Tensor, step: int, *, figures: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _median_mfu(path: Path, after_step: int) -> float | None:
    """The median ``mfu`` of the training records after ``after_step`` in ``metrics.jsonl`` (None: none)."""
    values = sorted(r["mfu"] for r in map(json.loads, path.read_text().splitlines())
                    if "mfu" in r and r.get("step", 0) > after_step)
    return values[len(values) // 2] if values else None


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop records a crashed run wrote after its last checkpoint, so steps are not repeated."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def train(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, init: str | Path | None = None,
          progress: bool = True, overwrite: bool = False, overrides: list[str] | tuple[str, ...] = ()
          ) -> TrainResult:
    """Train ``recipe``, writing everything to ``out_dir``. See the module docstring for the layout.

    Nothing is written before every check has passed: ``out_dir`` empty or new (or ``resume``: the same
    architecture and data as the run in it; or ``overwrite``: it holds only a run, deleted then), the data
    prepared, the checkpoint loaded. ``overrides`` are the command line's dotted overrides, for ``init``'s
    check that they do not contradict the model.
    """
    out = Path(out_dir)
    to_clear = check_out_dir(out, resume=resume, overwrite=overwrite)
    init_state, notes = None, []
    if init is not None:
        recipe, init_state, notes = read_init(recipe, Path(init), overrides)
    changed = check_resume(out, recipe) if resume else []
    t = recipe.train
    torch.manual_seed(t.seed)
    model = MoEModel(recipe.model)
    if init_state is not None:
        model.load_state_dict(init_state, strict=not recipe.model.tie_word_embeddings)
    model.activation_checkpointing = t.activation_checkpointing
    # Counted before the engine may shard the experts over ranks.
    params, active, flops_tok = model.num_parameters(), model.num_parameters(active=True), flops_per_token(
        model, t.seq_len)
    engine: Engine = build_engine(model, recipe, resume_from=out / "checkpoints" if resume else None)
    W, rank, main = engine.world_size, engine.rank, engine.rank == 0
    device = engine.device
    autocast = _autocast(recipe, device)
    progress = progress and main
    bars = progress and sys.stderr.isatty()  # progress bars on a terminal; plain periodic lines otherwise
    if main:
        for line in notes:
            log.info("%s", line)
        if changed:
            log.info("--resume with changed settings: %s", "; ".join(changed))
        if t.warmup_steps >= t.steps:
            log.warning("train.warmup_steps (%d) >= train.steps (%d): the learning rate rises the whole run and "
                        "never reaches train.lr (%g), nor decays", t.warmup_steps, t.steps, t.lr)
        if (notice := export_notice(recipe.model)) is not None:
            log.warning("%s", notice)

    def prepare():
        return prepare_data(recipe.data, vocab_size=recipe.model.vocab_size, seq_len=t.seq_len, seed=recipe.split_seed,
                            progress=bars)

    # Rank 0 tokenises and caches; the others then read its cache (and never race it for the CPU).
    data = prepare() if main else None
    engine.barrier()
    if data is None:
        data = prepare()
    sampler = BlockSampler(data.train_blocks, t.micro_batch_size * W, t.seed)
    rows = _shard_rows(t.micro_batch_size * W, rank, W)
    val_batches = fixed_batches(data.val_blocks, t.micro_batch_size * W, t.eval_batches)
    routers = [m for m in model.modules() if isinstance(m, Router)]

    ckpt_root = out / "checkpoints"
    start = engine.resume(ckpt_root) if resume else 0
    if resume:
        log.info("resumed at step %d", start) if start else log.warning(
            "--resume: no checkpoint under %s, starting from step 0", ckpt_root)
    for router in routers:
        router.check_ready()
    # Every check has passed: from here on the run directory is written.
    if main:
        if to_clear:
            log.info("--overwrite: deleting the run in %s (%s)", out, ", ".join(to_clear))
            clear_run(out, to_clear)
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        shutil.copyfile(data.tokenizer_path, out / "tokenizer.json")
        if start == 0:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        else:
            _truncate_metrics(out / "metrics.jsonl", start)
    engine.barrier()
    if main:
        # matplotlib (TensorBoard's load pictures) keeps its font cache in MPLCONFIGDIR, by default under the home
        # folder: point it into our cache, so that a run writes only under --out and the cache.
        os.environ.setdefault("MPLCONFIGDIR", str(Path(recipe.data.cache_dir or default_cache_dir()) / "matplotlib"))
    writer = MetricsWriter(out, purge_step=start + 1 if start else None) if main else _NoWriter()
    stats, dead = RouterStats(), DeadExpertWatch(t.dead_expert_steps)
    collapse = RouterCollapseWatch(t.dead_expert_steps)
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * t.seq_len * W
    peak = _peak_flops(recipe, device)
    log.info("model: %.2fM parameters, %.2fM active per token; %d training tokens (%.1f epochs of this run)%s",
             params / 1e6, active / 1e6, data.train_tokens, t.steps * tokens_per_step / max(data.train_tokens, 1),
             f"; {W} ranks" if W > 1 else "")

    loss_val, val_loss, wall = float("nan"), float("nan"), 0.0
    skipped = consecutive_skips = 0
    bar = tqdm(range(start, t.steps), desc="train", unit="step", disable=not bars, dynamic_ncols=True,
               initial=start, total=t.steps)
    for step in bar:
        step_start = time.perf_counter()
        lr = lr_at(step, recipe)
        stats.reset()
        loss_sum = aux_sum = 0.0
        for micro in range(t.grad_accum_steps):
            x, y = sampler.batch((t.data_start_step + step) * t.grad_accum_steps + micro)
            x, y = x[rows], y[rows]
            with autocast:
                result = engine.model(x.to(device), y.to(device))
            engine.backward((result.loss + result.aux_loss) / t.grad_accum_steps)
            loss_sum += result.loss.item()
            aux_sum += result.aux_loss.item()
            stats.add(result.routings)
        if W > 1:  # means over the ranks (every rank had as many rows)
            loss_sum, aux_sum = (engine.all_reduce_sum(torch.tensor([loss_sum, aux_sum], dtype=torch.float64))
                                 / W).tolist()
            if stats.load:  # expert load over every rank's tokens
                stats.load = list(engine.all_reduce_sum(torch.stack(stats.load)).unbind(0))
        loss_val = loss_sum / t.grad_accum_steps
        grad_norm, stepped = engine.step(lr, skip=not math.isfinite(loss_val))
        if stepped:
            consecutive_skips = 0
        else:
            skipped += 1
            consecutive_skips += 1
            message = (f"step {step + 1}: non-finite loss {loss_val} or gradient norm {grad_norm}; "
                       f"router stats per MoE layer: {stats.per_layer()}")
            if t.on_nonfinite == "stop" or consecutive_skips > t.max_consecutive_skips:
                writer.close()
                raise NonFiniteError(message + (" (train.on_nonfinite=stop)" if t.on_nonfinite == "stop" else
                                                f" ({consecutive_skips} steps in a row: the run has diverged)"))
            log.warning("%s; optimizer step skipped (%d skipped so far)", message, skipped)
        for router in routers:
            router.on_optimizer_step(engine.all_reduce_sum if engine.world_size > 1 else None)
        step_s = time.perf_counter() - step_start
        wall += step_s
        record = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": loss_val,
                  "aux_loss": aux_sum / t.grad_accum_steps, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_step / step_s, "skipped_steps": skipped}
        if peak:
            record["mfu"] = flops_tok * tokens_per_step / step_s / (peak * W)
        load = stats.load_matrix()
        dead.update(load, step + 1)
        collapse.update(stats.token_share_matrix(), step + 1)
        last = step + 1 == t.steps
        evaluating = bool(t.eval_every and (step + 1) % t.eval_every == 0) or last
        if (step + 1) % t.log_every == 0 or last:
            for i, layer in enumerate(stats.per_layer()):
                record.update({f"moe/layer{i}/{k}": v for k, v in layer.items()})
                # This step's share of the layer's assignments per expert (``moe plot --heatmap``).
                record[f"moe/layer{i}/load"] = [round(v, 6) for v in load[i].tolist()]
            writer.router_images(load, step + 1, figures=evaluating)
            bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.1e}")
            if main and not bars:
                log.info("step %d/%d: loss %.4f, lr %.2e, %s tokens/s%s", step + 1, t.steps, loss_val, lr,
                         f"{tokens_per_step / step_s:,.0f}", f", {skipped} skipped" if skipped else "")
        writer.write(record)
        if evaluating:
            val_loss = _evaluate(engine, val_batches, device, autocast, bars)
            writer.write({"step": step + 1, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
            if main and not bars:
                log.info("step %d/%d: validation loss %.4f (perplexity %.2f)", step + 1, t.steps, val_loss,
                         math.exp(min(val_loss, 50)))
        if (t.save_every and (step + 1) % t.save_every == 0) or last:
            engine.save(ckpt_root, step + 1, t.keep_checkpoints)
    writer.close()
    if start >= t.steps:
        log.info("nothing to train: the checkpoint is already at step %d of %d", start, t.steps)
        val_loss = _evaluate(engine, val_batches, device, autocast, bars)
    state = engine.model_state()  # collective: the experts come from every rank
    if main:
        save_file(state, str(out / "model.safetensors"))
    run_steps = max(t.steps - start, 0)
    return TrainResult(steps=t.steps, final_loss=loss_val, val_loss=val_loss,
                       tokens_per_s=run_steps * tokens_per_step / wall if wall else 0.0, wall_s=wall, out_dir=out,
                       rank=rank, start_step=start, mfu=_median_mfu(out / "metrics.jsonl", start) if main else None,
                       peak_known=peak is not None)

