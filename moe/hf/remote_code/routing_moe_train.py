"""Inference routing of the moe-train routers, for ``modeling_moe_train.py`` (needs only torch).

Shape legend: T tokens, E experts, K slots per token, A assignments, N hash functions, V vocabulary.

Each router maps one MoE layer's router logits (or its token ids, for ``hash``) to a flat list of assignments
``(token_A, expert_A, weight_A)``: token ``token_A[a]`` is computed by expert ``expert_A[a]`` and its output
weighted by ``weight_A[a]``. This is exactly what the router of the same name in moe-train does in ``eval()``
mode (the settings come resolved from ``config.json``'s ``moe_routing``); the training-only parts (noise,
sampling, auxiliary losses, load counters) are left out.

NOTE: ``expert_choice`` with ``eval_routing: top_c`` and every router with an eval capacity factor route the
tokens of one forward call together: scoring a whole sequence and decoding it one token at a time through the
KV cache are then different functions (both are what moe-train computes).
"""

from __future__ import annotations

import math

import torch


def topk_indices(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """(T, k) indices of the k largest scores per row, ties broken towards the lower index."""
    return torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices[:, :k]


def first_argmax(scores_TE: torch.Tensor) -> torch.Tensor:
    """(T,) index of each row's maximum, ties broken towards the lower index."""
    E = scores_TE.shape[-1]
    is_max_TE = scores_TE == scores_TE.max(dim=-1, keepdim=True).values
    index_TE = torch.arange(E, device=scores_TE.device).expand_as(scores_TE)
    return torch.where(is_max_TE, index_TE, E).min(dim=-1).values


def expert_capacity(capacity_factor: float, top_k: int, num_tokens: int, num_experts: int, min_capacity: int) -> int:
    """``C = max(min_capacity, ceil(cf · k · T / E))``."""
    return max(min_capacity, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


def capacity_keep_mask(indices_TK: torch.Tensor, num_buckets: int, capacity: int) -> torch.Tensor:
    """(T, K) bool: the assignments within their expert's ``capacity``, all first choices before any second
    (rank-major), earlier tokens first within a rank."""
    T, K = indices_TK.shape
    flat_A = indices_TK.t().reshape(-1)
    order_A = torch.argsort(flat_A, stable=True)
    counts = torch.bincount(flat_A, minlength=num_buckets)
    starts = torch.cumsum(counts, 0) - counts
    position_sorted = torch.arange(flat_A.numel(), device=flat_A.device) - starts[flat_A[order_A]]
    position_A = torch.empty_like(position_sorted)
    position_A[order_A] = position_sorted
    return (position_A < capacity).reshape(K, T).t()


def token_choice(indices_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int,
                 capacity_factor: float | None, min_capacity: int, renormalize_after_drop: bool = False):
    """Assignments of a token-choice decision (``-1``: an empty slot), after capacity (None: dropless)."""
    T, K = indices_TK.shape
    valid_TK = indices_TK >= 0
    keep_TK = valid_TK
    if capacity_factor is not None:
        capacity = expert_capacity(capacity_factor, K, T, num_experts, min_capacity)
        bucketed_TK = torch.where(valid_TK, indices_TK, num_experts)  # empty slots take no real expert's slot
        keep_TK = capacity_keep_mask(bucketed_TK, num_experts + 1, capacity) & valid_TK
    if renormalize_after_drop:
        kept_TK = torch.where(keep_TK, weights_TK, torch.zeros_like(weights_TK))
        denom_T1 = kept_TK.sum(-1, keepdim=True)
        weights_TK = kept_TK / torch.where(denom_T1 > 0, denom_T1, torch.ones_like(denom_T1))
    token_TK = torch.arange(T, device=indices_TK.device).unsqueeze(1).expand(T, K)
    return token_TK[keep_TK], indices_TK[keep_TK], weights_TK[keep_TK]


def mean_k_capacity_factor(capacity_factor: float | None, indices_TK: torch.Tensor) -> float | None:
    """Variable-k routers size the capacity by the mean experts per token, not by the slot width K."""
    if capacity_factor is None:
        return None
    T, K = indices_TK.shape
    requested = int((indices_TK >= 0).sum())
    return capacity_factor * requested / max(T * K, 1)


def route_topk(logits_TE, r):
    probs_TE = torch.softmax(logits_TE, dim=-1)
    indices_TK = topk_indices(logits_TE, r["top_k"])
    if r["renormalize"]:
        weights_TK = torch.softmax(logits_TE.gather(1, indices_TK), dim=-1)
    else:
        weights_TK = probs_TE.gather(1, indices_TK)
    return token_choice(indices_TK, weights_TK, logits_TE.shape[1], r["capacity_factor"], r["min_capacity"])


def route_gshard(logits_TE, r):
    indices_TK = topk_indices(logits_TE, 2)
    if r["normalize_before_policy"]:
        gates_TK = torch.softmax(logits_TE.gather(1, indices_TK), dim=-1)
    else:
        gates_TK = torch.softmax(logits_TE, dim=-1).gather(1, indices_TK)
    policy = r["second_policy"]
    if policy == "all":
        keep2_T = torch.ones_like(gates_TK[:, 1], dtype=torch.bool)
    elif policy == "none":
        keep2_T = torch.zeros_like(gates_TK[:, 1], dtype=torch.bool)
    elif policy == "threshold":
        keep2_T = gates_TK[:, 1] > r["second_threshold"]
    else:
        raise ValueError(f"gshard second_policy {policy!r} is not deterministic at inference")
    indices_TK = torch.stack([indices_TK[:, 0], torch.where(keep2_T, indices_TK[:, 1], -1)], dim=1)
    return token_choice(indices_TK, gates_TK, logits_TE.shape[1], r["capacity_factor"], r["min_capacity"],
                        renormalize_after_drop=not r["normalize_before_policy"])


def route_sigmoid(logits_TE, r, bias_E):
    T, E = logits_TE.shape
    scores_TE = torch.sigmoid(logits_TE)
    sel_TE = scores_TE
    if bias_E is not None:
        sel_TE = sel_TE + bias_E.to(logits_TE.dtype)  # the bias chooses, it never weighs
    G = r["n_groups"]
    if G > 1:
        sel_TGM = sel_TE.view(T, G, E // G)
        if bias_E is not None:
            group_TG = sel_TGM.topk(2, dim=-1).values.sum(-1)
        else:
            group_TG = sel_TGM.amax(dim=-1)
        groups_TK = topk_indices(group_TG, r["topk_groups"])
        keep_TG = torch.zeros(T, G, dtype=torch.bool, device=logits_TE.device).scatter_(1, groups_TK, True)
        sel_TE = sel_TGM.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)
    indices_TK = topk_indices(sel_TE, r["top_k"])
    weights_TK = scores_TE.gather(1, indices_TK)
    if r["renormalize"]:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    weights_TK = r["route_scale"] * weights_TK
    return token_choice(indices_TK, weights_TK, E, r["capacity_factor"], r["min_capacity"])


def route_adaptive(logits_TE, r):
    probs_TE = torch.softmax(logits_TE, dim=-1)
    top2_TK = topk_indices(logits_TE, 2)
    p_TK = probs_TE.gather(1, top2_TK)
    single_T = (p_TK[:, 0] - p_TK[:, 1]) >= r["threshold"]
    pair_w_TK = torch.softmax(logits_TE.gather(1, top2_TK), dim=-1)
    if r["single_expert_weight"] == "gshard":
        single_w_T = pair_w_TK[:, 0]
    elif r["single_expert_weight"] == "raw":
        single_w_T = p_TK[:, 0]
    else:
        single_w_T = torch.ones_like(pair_w_TK[:, 0])
    first_T = torch.where(single_T, single_w_T, pair_w_TK[:, 0])
    second_T = torch.where(single_T, torch.zeros_like(pair_w_TK[:, 1]), pair_w_TK[:, 1])
    weights_TK = torch.stack([first_T, second_T], dim=1)
    second_slot = torch.arange(2, device=logits_TE.device) == 1
    indices_TK = torch.where(single_T.unsqueeze(1) & second_slot, torch.full_like(top2_TK, -1), top2_TK)
    return token_choice(indices_TK, weights_TK, logits_TE.shape[1],
                        mean_k_capacity_factor(r["capacity_factor"], indices_TK), r["min_capacity"])


def route_top_p(logits_TE, r):
    probs_TE = torch.softmax(logits_TE, dim=-1)
    K = r["max_experts"]
    sorted_TE, order_TE = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    cum_TE = sorted_TE.cumsum(dim=-1)
    below_TE = cum_TE <= r["threshold"] if r["boundary"] == "strict" else cum_TE < r["threshold"]
    count_T1 = (below_TE.sum(dim=-1, keepdim=True) + 1).clamp(max=K)
    slot_K = torch.arange(K, device=logits_TE.device)
    indices_TK = torch.where(slot_K < count_T1, order_TE[:, :K], torch.full_like(order_TE[:, :K], -1))
    weights_TK = probs_TE.gather(1, indices_TK.clamp(min=0))
    return token_choice(indices_TK, weights_TK, logits_TE.shape[1],
                        mean_k_capacity_factor(r["capacity_factor"], indices_TK), r["min_capacity"])


def route_grin(logits_TE, r):
    """SparseMixer-v2 at inference: K masked top-1 steps, each weight the masked softmax of its argmax."""
    z_TE = logits_TE
    available_TE = torch.ones_like(z_TE, dtype=torch.bool)
    eps = r["eps"]
    experts, weights = [], []
    for _ in range(r["top_k"]):
        zmax_T1 = z_TE.masked_fill(~available_TE, float("-inf")).max(dim=-1, keepdim=True).values
        keep_TE = available_TE & ((zmax_T1 - z_TE) <= 2 * eps * torch.maximum(z_TE.abs(), zmax_T1))
        masked_TE = z_TE.masked_fill(~keep_TE, float("-inf"))
        pi_TE = torch.softmax(masked_TE, dim=-1)
        chosen_T = first_argmax(masked_TE)
        available_TE = available_TE.scatter(1, chosen_T.unsqueeze(1), False)
        experts.append(chosen_T)
        weights.append(pi_TE.gather(1, chosen_T.unsqueeze(1)).squeeze(1))
    return token_choice(torch.stack(experts, dim=1), torch.stack(weights, dim=1), logits_TE.shape[1], None, 0)


def route_expert_choice(logits_TE, r, threshold_E, seq_len: int):
    T, E = logits_TE.shape
    probs_TE = torch.softmax(logits_TE, dim=-1)
    if r["eval_routing"] == "threshold":
        token_A, expert_A = torch.nonzero(probs_TE >= threshold_E.to(probs_TE.dtype), as_tuple=True)
        return token_A, expert_A, probs_TE[token_A, expert_A]
    G, N = (T // seq_len, seq_len) if r["group"] == "sequence" and T else (1, T)
    if N == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=logits_TE.device)
        return empty, empty, probs_TE.new_zeros(0)
    c = int(r["capacity_factor"] * N / E + 0.5)
    C = min(N, max(1, r["min_capacity"], c))
    probs_GEN = probs_TE.view(G, N, E).transpose(1, 2)
    token_GEC = torch.sort(probs_GEN, dim=-1, descending=True, stable=True).indices[..., :C]
    gate_GEC = probs_GEN.gather(-1, token_GEC)
    offset_G11 = (torch.arange(G, device=logits_TE.device) * N).view(G, 1, 1)
    token_A = (token_GEC + offset_G11).reshape(-1)
    expert_A = torch.arange(E, device=logits_TE.device).view(1, E, 1).expand(G, E, C).reshape(-1)
    return token_A, expert_A, gate_GEC.reshape(-1)


def route_hash(token_ids_T, r, table_NV, dtype):
    T = token_ids_T.shape[0]
    N = table_NV.shape[0]
    E = r["num_experts"]
    experts_TN = table_NV[:, token_ids_T.to(torch.int64)].t()
    if N == 1:
        first_TN = torch.ones_like(experts_TN, dtype=torch.bool)
        weight_TN = torch.ones(T, 1, dtype=dtype, device=token_ids_T.device)
    else:
        same_TNN = experts_TN.unsqueeze(2) == experts_TN.unsqueeze(1)
        earlier_NN = torch.ones(N, N, dtype=torch.bool, device=experts_TN.device).tril(-1)
        first_TN = ~(same_TNN & earlier_NN).any(-1)
        weight_TN = same_TNN.sum(-1).to(dtype) / N
    keep_TN = first_TN
    if r["capacity_factor"] is not None:
        capacity = expert_capacity(r["capacity_factor"], N, T, E, r["min_capacity"])
        keep_TN = first_TN & capacity_keep_mask(torch.where(first_TN, experts_TN, E), E + 1, capacity)
    token_TN = torch.arange(T, device=experts_TN.device).unsqueeze(1).expand(T, N)
    return token_TN[keep_TN], experts_TN[keep_TN], weight_TN[keep_TN]


LOGIT_ROUTERS = {"topk": route_topk, "switch": route_topk, "gshard": route_gshard, "adaptive": route_adaptive,
                 "top_p": route_top_p, "grin": route_grin}
