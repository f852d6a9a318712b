"""Upcycling: turn a dense model's SwiGLU FFNs into Mixture-of-Experts layers (docs/routers.md#upcycling).

Shape legend: D model width, F dense FFN width, E (= N) experts, k top-k, M expert width, G granularity.

``upcycle(dense_model, moe_cfg, method, seed=..., layers=..., **options)`` returns a new ``MoEModel``. Every
tensor outside the converted FFNs (embeddings, attention, every norm including the pre-FFN norm that now
feeds router and experts, the head, the FFNs of layers left dense) is a bitwise copy of the dense model's.
Each expert tensor is fresh storage. The optimizer starts fresh: there is none in a model. Output scales
are folded into the expert weights (into the down projection unless a method says otherwise), so the
checkpoint needs no new config field and ``s · FFN_e(x)`` is exactly ``FFN_e`` with ``s · W_down``.

Methods (``UPCYCLE_METHODS``), their options (``moe.upcycle.options``) and when they are function-preserving
("exact": the upcycled model's logits equal the dense model's at init, up to rounding; assumes the topk
router, dropless, no jitter):

``copy`` - Sparse Upcycling (Komatsuzaki et al., ICLR 2023)
    Every expert is an identical copy of the dense FFN; router ``router_init`` (default ``normal``,
    N(0, init_std²)). Exact with top-k-then-softmax (``router.renormalize=True``): the weights sum
    to 1. With softmax-then-top-k the FFN output is scaled by the selected probability mass (about k/E).
    ``noise_std``/``noise_ratio`` add the Drop-Upcycling repository's "noise upcycling" baseline (off by default;
    not part of the recipe, and not exact).
``neuron-split`` - LLaMA-MoE neuron partitioning (Zhu et al. 2024)
    The F intermediate neurons are partitioned into E disjoint sets of F/E (``split=random``: a seeded balanced
    shuffle; ``split=clustering``: size-constrained k-means on the L2-normalised rows of W_up or W_gate,
    ``metric`` l2 or cos); expert e keeps gate/up rows and down columns of its set. Output scale ``scale``
    (default E/k, the released runs; a heuristic) on the down projection. Since the FFN is a sum over
    neurons, the experts sum to the dense FFN; the model is exact only for k = E with weights 1/E
    (``router_init=zero``) and ``scale=E``. For k < E nothing is exact.
``drop`` - Drop-Upcycling (Nakamura et al., ICLR 2025)
    Copies, then per expert floor(ratio·F) neurons (default ratio 0.5; one index set per expert, or one per
    matrix with ``independent_indices_per_matrix=True`` as the released script) are re-drawn from N(μ, σ²) of
    their dense matrix (statistics and draws in fp32 or wider). Router default ``uniform`` (std init_std).
    Exact only for ratio = 0 with renormalised top-k (it then equals ``copy`` with the same router_init).
``granular`` - NVIDIA "Upcycling LLMs into MoE" (He et al. 2024)
    Granularity G: expert width F/G, expert e = contiguous shard ``e mod G``; N % G must be 0. With
    ``virtual_groups`` (default) router rows are tied in groups of G (expert e uses row floor(e/G)). Weight
    scaling ``a`` (``scale``; default G for top-k-then-softmax, N·G/k for softmax-then-top-k) goes on the down
    projection (``scale_mode=down``, exact for every activation) or as a^(1/3) on gate, up and down
    (``scale_mode=megatron``, Megatron-Core parity; not exact for SiLU). With k a multiple of G: exact for
    top-k-then-softmax and any router (distinct group rows); for softmax-then-top-k the ratio MoE/dense is
    a·(Σ selected p)/G per token, exact (= 1) with a zero router. k not a multiple of G warns.

For a CLI: ``parse_method_options(method, ["ratio=0.5"])`` turns ``key=value`` strings into checked options,
``target_moe_config(dense_cfg, method, num_experts=..., top_k=..., layers=..., **options)`` derives the MoE
config (expert width, layer pattern), and ``upcycle_with_report`` also returns the conversion report
(per layer: scale, expected exactness, max |MoE − dense| on float64 probes).
"""

from moe.upcycle.build import (
    expert_width,
    layer_pattern,
    select_layers,
    target_moe_config,
    upcycle,
    upcycle_with_report,
)
from moe.upcycle.report import LayerReport, UpcycleReport, exact_expected
from moe.upcycle.options import (
    METHOD_OPTIONS,
    ROUTER_INITS,
    UPCYCLE_METHODS,
    CopyOptions,
    DropOptions,
    GranularOptions,
    NeuronSplitOptions,
    method_options,
    parse_method_options,
)

__all__ = [
    "METHOD_OPTIONS",
    "ROUTER_INITS",
    "UPCYCLE_METHODS",
    "CopyOptions",
    "DropOptions",
    "GranularOptions",
    "LayerReport",
    "NeuronSplitOptions",
    "UpcycleReport",
    "exact_expected",
    "expert_width",
    "layer_pattern",
    "method_options",
    "parse_method_options",
    "select_layers",
    "target_moe_config",
    "upcycle",
    "upcycle_with_report",
]
