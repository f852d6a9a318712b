"""Pictures of expert load for TensorBoard: a labelled layers × experts heatmap of one step, and per layer, the
load of every expert over the steps logged so far (an expert that dies shows as a dark band from then on).

Shape legend: L MoE layers, E experts, N logged steps. Loads are shares of a layer's assignments (each row sums
to 1; balanced is 1/E). Drawn with matplotlib's object API (no pyplot, no display), returned as RGB arrays.
"""

from __future__ import annotations

import numpy as np
import torch


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _rgb(fig) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a drawn figure."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def load_heatmap(load_LE: torch.Tensor, step: int, layer_names: list[str] | None = None) -> np.ndarray:
    """Layers × experts at one step: colour = share of the layer's assignments, with a colour bar; the values
    (in % of the layer) are written in the cells when there are few enough experts to read them.

    Args:
        load_LE: (L, E) shares, each row summing to 1 (``RouterStats.load_matrix``).
        step: the optimizer step, for the title.
        layer_names: a label per row (default ``MoE layer i``).
    Returns:
        (H, W, 3) uint8 image.
    """
    L, E = load_LE.shape
    share = load_LE.double().numpy() * 100
    fig = _figure(min(2.5 + 0.45 * E, 16), 1.6 + 0.45 * L)
    ax = fig.add_subplot()
    balanced = 100 / E
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(share.max()), 2 * balanced))
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("% of the layer's assignments")
    bar.ax.axhline(balanced, color="white", linewidth=1.5)  # the balanced share
    ax.set_xlabel(f"expert (balanced: {balanced:.1f}% each, white line on the scale)")
    ax.set_ylabel("layer")
    ax.set_xticks(range(E), [str(e) for e in range(E)] if E <= 32 else None)
    if E > 32:
        ax.set_xticks(range(0, E, max(1, E // 16)))
    ax.set_yticks(range(L), layer_names or [f"MoE layer {i}" for i in range(L)])
    if E <= 16 and L <= 16:
        for i in range(L):
            for e in range(E):
                ax.text(e, i, f"{share[i, e]:.0f}", ha="center", va="center", fontsize=8,
                        color="black" if share[i, e] > 0.6 * image.get_clim()[1] else "white")
    ax.set_title(f"Expert load at step {step}")
    fig.tight_layout()
    return _rgb(fig)


def load_over_steps(steps: list[int], load_NE: torch.Tensor, layer: int) -> np.ndarray:
    """One layer's expert load over the logged steps: experts × steps, colour = share of the layer's
    assignments (% ), dead experts (no tokens) drawn dark red.

    Args:
        steps: the N logged steps.
        load_NE: (N, E) the layer's shares at those steps.
        layer: the layer's index, for the title.
    """
    N, E = load_NE.shape
    share = load_NE.double().numpy().T * 100  # (E, N)
    fig = _figure(8, 1.4 + min(0.22 * E, 8))
    ax = fig.add_subplot()
    balanced = 100 / E
    cmap = _dead_marked_cmap()
    image = ax.imshow(np.ma.masked_equal(share, 0.0), aspect="auto", cmap=cmap, interpolation="nearest",
                      vmin=0, vmax=max(float(share.max()), 2 * balanced),
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, E - 0.5, -0.5) if N > 1 else None)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("% of the layer's assignments")
    bar.ax.axhline(balanced, color="white", linewidth=1.5)
    dead = int((share[:, -1] == 0).sum())
    ax.set_title(f"MoE layer {layer}: expert load over steps"
                 + (f"\n{dead} expert{'s' if dead != 1 else ''} without tokens at step {steps[-1]} (dark red)"
                    if dead else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("expert")
    if E <= 32:
        ax.set_yticks(range(E))
    fig.tight_layout()
    return _rgb(fig)


def _dead_marked_cmap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#5a0000")  # masked cells: an expert that got no tokens
