"""Training metrics: router statistics accumulated over micro-batches, JSON lines and TensorBoard output.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from moe.routing.base import Routing

log = logging.getLogger(__name__)


class RouterStats:
    """Per-layer router statistics summed over the micro-batches of one optimizer step.

    Loads are summed (so a step's load is that of all its tokens); losses, dropped fraction and entropy are
    averaged over micro-batches; each layer keeps its own numbers (never pooled across layers).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.micro_batches = 0
        self.load: list[torch.Tensor] = []
        self.sums: list[dict[str, float]] = []
        self.experts_per_token: list[float] = []  # per layer, summed over micro-batches (assignments / tokens)

    def add(self, routings: list[Routing]) -> None:
        if not self.load:
            self.load = [torch.zeros_like(r.tokens_per_expert, dtype=torch.float64, device="cpu") for r in routings]
            self.sums = [{} for _ in routings]
            self.experts_per_token = [0.0 for _ in routings]
        self.micro_batches += 1
        for i, r in enumerate(routings):
            self.load[i] += r.tokens_per_expert.detach().double().cpu()
            if "experts_per_token" in r.stats:
                self.experts_per_token[i] += float(r.stats["experts_per_token"])
            sums = self.sums[i]
            for name, value in r.losses.items():
                sums[f"aux/{name}"] = sums.get(f"aux/{name}", 0.0) + float(value.detach())
            for name in ("dropped_fraction", "router_entropy"):
                if name in r.stats:
                    sums[name] = sums.get(name, 0.0) + float(r.stats[name])

    def per_layer(self) -> list[dict[str, float]]:
        """Per MoE layer: averaged losses and stats, ``max_load_ratio`` of the summed load and the mean number of
        experts that computed each token (``experts_per_token``: k for dropless top-k, less when tokens drop)."""
        out = []
        for load, sums, per_token in zip(self.load, self.sums, self.experts_per_token):
            layer = {k: v / max(self.micro_batches, 1) for k, v in sums.items()}
            layer["max_load_ratio"] = float(load.max() / load.mean().clamp(min=1e-9))
            layer["experts_per_token"] = per_token / max(self.micro_batches, 1)  # computed assignments / tokens
            out.append(layer)
        return out

    def load_matrix(self) -> torch.Tensor:
        """(L, E) fraction of each layer's assignments that went to each expert."""
        if not self.load:
            return torch.zeros(0, 0)
        m = torch.stack(self.load)
        return m / m.sum(dim=1, keepdim=True).clamp(min=1)

    def token_share_matrix(self) -> torch.Tensor:
        """(L, E) fraction of each layer's tokens that each expert computed: ``load_matrix()`` × the layer's
        experts per token. 1 for an expert that every token of the step went to, whatever top-k is."""
        share_LE = self.load_matrix()
        if share_LE.numel() == 0:
            return share_LE
        per_token_L = torch.tensor(self.experts_per_token, dtype=share_LE.dtype) / max(self.micro_batches, 1)
        return share_LE * per_token_L[:, None]


class _StreakWatch:
    """Counts, per (layer, expert), the consecutive steps on which a condition held; ``update`` returns the pairs
    whose streak reached ``patience`` for the first time (each pair is reported once)."""

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.streak: torch.Tensor | None = None  # (L, E)
        self.warned: set[tuple[int, int]] = set()

    def _update(self, holds_LE: torch.Tensor) -> list[tuple[int, int]]:
        if self.streak is None or self.streak.shape != holds_LE.shape:
            self.streak = torch.zeros(holds_LE.shape, dtype=torch.long)
        self.streak = torch.where(holds_LE, self.streak + 1, torch.zeros_like(self.streak))
        new = [(l, e) for l, e in (self.streak >= self.patience).nonzero().tolist() if (l, e) not in self.warned]
        self.warned.update(new)
        return new


class DeadExpertWatch(_StreakWatch):
    """Warns once per (layer, expert) that has had no tokens for ``patience`` consecutive steps."""

    def update(self, load_LE: torch.Tensor, step: int) -> None:
        if load_LE.numel() == 0:
            return
        for layer, expert in self._update(load_LE <= 0):
            log.warning("step %d: expert %d of MoE layer %d has received no tokens for %d steps",
                        step, expert, layer, int(self.streak[layer, expert]))


class RouterCollapseWatch(_StreakWatch):
    """Warns once per (layer, expert) that has computed more than ``threshold`` of its layer's tokens for
    ``patience`` consecutive steps: the router sends (almost) everything to that expert, so the layer acts as
    one dense FFN and the other experts barely learn (the self-reinforcing imbalance of "Outrageously Large
    Neural Networks", §4, that load-balancing losses exist to prevent). Layers whose balanced share (experts
    per token / E) is already at or above ``threshold`` are never flagged: every expert sees most tokens there
    by design.

    ``update`` takes ``RouterStats.token_share_matrix()``: shares of tokens, not of assignments, so that one
    expert of a top-2 layer that every token picks counts as 1.0 (its share of the assignments is only 0.5).
    """

    def __init__(self, patience: int, threshold: float = 0.9) -> None:
        super().__init__(patience)
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold

    def update(self, token_share_LE: torch.Tensor, step: int) -> None:
        if token_share_LE.numel() == 0:
            return
        E = token_share_LE.shape[1]
        balanced_L = token_share_LE.sum(dim=1) / E  # the share of each expert under perfect balance
        over_LE = (token_share_LE > self.threshold) & (balanced_L < self.threshold)[:, None]
        for layer, expert in self._update(over_LE):
            log.warning("step %d: router collapse in MoE layer %d: expert %d has computed %.0f%% of the "
                        "layer's tokens for %d steps (threshold %.0f%%); consider a larger "
                        "model.moe.router.aux_loss_coef or a lower train.lr", step, layer, expert,
                        100 * float(token_share_LE[layer, expert]), int(self.streak[layer, expert]),
                        100 * self.threshold)


class MetricsWriter:
    """``metrics.jsonl`` (appended, one object per record) and TensorBoard event files in ``out_dir``.

    Args:
        out_dir: the run directory.
        tensorboard: write TensorBoard events too.
        purge_step: a resumed run's first step: TensorBoard drops the events a crashed run wrote from there on,
            so no step appears twice.
    """

    def __init__(self, out_dir: Path, *, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.jsonl = (out_dir / "metrics.jsonl").open("a")
        self.tb = None
        self.history: list[tuple[int, torch.Tensor]] = []  # (step, (L, E) load) at every logged step
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def router_images(self, load_LE: torch.Tensor, step: int, *, figures: bool = True) -> None:
        """Per-layer load histograms; with ``figures`` (drawing them takes a fraction of a second each, so the
        trainer asks at evaluations) a labelled layers × experts heatmap of this step (``moe/load_heatmap``) and
        per layer the load of every expert over the steps logged so far (``moe/layer{i}/load_over_steps``)."""
        if self.tb is None or load_LE.numel() == 0:
            return
        E = load_LE.shape[1]
        self.history.append((step, load_LE.clone()))
        for layer, row in enumerate(load_LE):
            # one histogram sample per expert, weighted by its share: the distribution of tokens over experts
            self.tb.add_histogram(f"moe/layer{layer}/expert_load", torch.arange(E).repeat_interleave(
                (row * 1000).round().long()), step, bins=E)
        if not figures:
            return
        from moe.load_figures import load_heatmap, load_over_steps

        self.tb.add_image("moe/load_heatmap", load_heatmap(load_LE, step), step, dataformats="HWC")
        steps = [s for s, _ in self.history]
        for layer in range(load_LE.shape[0]):
            over = torch.stack([m[layer] for _, m in self.history])
            self.tb.add_image(f"moe/layer{layer}/load_over_steps", load_over_steps(steps, over, layer), step,
                              dataformats="HWC")

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
