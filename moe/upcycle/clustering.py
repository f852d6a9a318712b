"""Balanced partitions of the FFN's neurons for LLaMA-MoE expert construction (docs/routers.md#neuron-split).

Shape legend: F neurons (rows to partition), D row width, E parts, M = F/E members per part.

``clustering`` is size-constrained k-means: every cluster has exactly M members. The reference
(``pjlab-sys4nlp/llama-moe``) solves each assignment step exactly as a min-cost flow through the
``k-means-constrained`` package. NOTE: we solve it approximately with a vectorised greedy: each unassigned
row proposes to its nearest cluster that still has room, and every cluster accepts its nearest proposers up
to its remaining room; at most E rounds. Sizes are exact; the cost can be slightly above the optimum.
"""

from __future__ import annotations

import torch


def random_partition(num_neurons: int, num_parts: int, generator: torch.Generator) -> torch.Tensor:
    """Labels ``[0..E-1]`` each repeated M times, shuffled (the reference's ``random`` split).

    Returns:
        (E, M) int64, row e the sorted neuron indices of part e.
    """
    F, E = num_neurons, num_parts
    assert F % E == 0, "callers check divisibility"
    labels_F = torch.arange(E).repeat_interleave(F // E)[torch.randperm(F, generator=generator)]
    return parts_from_labels(labels_F, E)


def parts_from_labels(labels_F: torch.Tensor, num_parts: int) -> torch.Tensor:
    """(F,) labels with exactly M of each -> (E, M) sorted indices per part."""
    order_F = torch.sort(labels_F.cpu(), stable=True).indices  # grouped by label, ascending index within
    return order_F.view(num_parts, -1)


def balanced_assign(cost_FE: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each of F rows to one of E clusters, exactly ``size`` rows each, greedily by cost.

    Args:
        cost_FE: (F, E) cost of putting row f in cluster e (lower is better). F must equal E·size.
        size: M.
    Returns:
        (F,) int64 labels.
    """
    F, E = cost_FE.shape
    labels_F = torch.full((F,), -1, dtype=torch.long)
    room_E = torch.full((E,), size, dtype=torch.long)
    cost_FE = cost_FE.detach().cpu()
    while True:
        open_rows = (labels_F < 0).nonzero().flatten()
        if open_rows.numel() == 0:
            return labels_F
        cost = cost_FE[open_rows].masked_fill((room_E == 0)[None, :], float("inf"))
        best_cost, best = cost.min(dim=1)
        # Order proposals by (cluster, cost): rank within a cluster = position - start of its segment.
        order = torch.argsort(best_cost, stable=True)
        order = order[torch.argsort(best[order], stable=True)]
        cluster = best[order]
        counts = torch.bincount(cluster, minlength=E)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel()) - starts[cluster]
        accept = rank < room_E[cluster]
        labels_F[open_rows[order[accept]]] = cluster[accept]
        room_E -= torch.bincount(cluster[accept], minlength=E)


def _cost(x_FD: torch.Tensor, centroids_ED: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cos":
        return -(x_FD @ centroids_ED.T)  # rows and centroids are unit vectors
    return torch.cdist(x_FD, centroids_ED).pow(2)


def balanced_kmeans(
    x_FD: torch.Tensor, num_clusters: int, *, metric: str = "l2", max_iter: int = 500,
    generator: torch.Generator,
) -> torch.Tensor:
    """Size-constrained k-means on the L2-normalised rows of ``x_FD`` (k-means++ seeding).

    Args:
        x_FD: (F, D) rows to cluster; F must be a multiple of ``num_clusters``.
        num_clusters: E.
        metric: ``l2`` (squared distance, mean centroids) or ``cos`` (cosine, normalised mean centroids).
        max_iter: bound on the assign / update rounds; stops earlier when the labels stop changing.
        generator: CPU generator for the seeding.
    Returns:
        (F,) int64 labels, each of ``0..E-1`` exactly F/E times.
    """
    F, E = x_FD.shape[0], num_clusters
    assert F % E == 0, "callers check divisibility"
    # NOTE: clustering in float64 on the CPU: F·E distances are cheap and ties from low precision are not.
    x = torch.nn.functional.normalize(x_FD.detach().to("cpu", torch.float64), dim=1)
    # k-means++: the first centroid uniformly, then each next one with probability proportional to d².
    picks = [int(torch.randint(F, (1,), generator=generator))]
    d2_F = torch.cdist(x, x[picks]).pow(2).min(dim=1).values
    for _ in range(1, E):
        weights = d2_F if d2_F.sum() > 0 else torch.ones(F, dtype=x.dtype)
        picks.append(int(torch.multinomial(weights, 1, generator=generator)))
        d2_F = torch.minimum(d2_F, torch.cdist(x, x[picks[-1:]]).pow(2).squeeze(1))
    centroids = x[picks].clone()
    labels = None
    for _ in range(max_iter):
        new = balanced_assign(_cost(x, centroids, metric), F // E)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centroids = torch.zeros(E, x.shape[1], dtype=x.dtype).index_add_(0, labels, x) / (F // E)
        if metric == "cos":
            centroids = torch.nn.functional.normalize(centroids, dim=1)
    assert labels is not None
    return labels
