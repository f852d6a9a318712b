"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"; docs/routers.md#hash).

Shape legend: T tokens, D model width, E experts, V vocabulary, N hash functions, A assignments.

The expert of token ``t`` is a fixed function of its *input token id*, ``i_t = H[v_t]``, never of the hidden
state. There are no learned parameters and no losses; each expert gets gradient only from its own tokens. The
table ``H`` (``table``, int64 ``[N, V]``) is a buffer, so it is saved in every checkpoint and a reloaded model
routes identically; it is built from a private generator, never from the global RNG, so every rank builds the
same table.

Hash functions (``router.options.hash_function``):

* ``random``: ``H[v] ~ Uniform{0..E-1}`` i.i.d., drawn with Python's ``random.Random(seed)`` exactly as the ParlAI
  reference (``random.seed(42)``, then ``randrange(E)`` for every id in order), so seed 42 gives its table.
* ``balanced``: greedy longest-processing-time (LPT) on token frequencies of the training data: visit tokens by
  decreasing count (ties: lower id first) and give each to the bucket with the least mass so far (ties: lower
  bucket). Bound: the heaviest bucket is at most ``mean + max single-token count``. Tokens with count 0 carry no
  mass and are spread round-robin. Counts come from ``router.options.token_counts_path`` (a JSON list of V
  numbers) or ``HashRouter.fit_balanced(counts_V)``; until then the table holds -1 and ``forward`` raises.
* ``token_id``: ``H[v] = v mod E``.

MultiHash (``num_hashes = N > 1``, random tables only, rows 1..N-1 continue the same generator): the paper
describes N hashes each selecting one *segment* of the hidden units of an expert, so that compute equals one
expert. Our experts are whole SwiGLU FFNs behind a flat assignment list, so a token is instead sent to the
distinct experts ``{H_s[v_t]}`` with weight ``(number of hashes that chose e) / N``: the output is the average
of N expert outputs (scale of one expert), N = 1 and N identical hashes both reduce to plain hashing, and the
compute is up to N experts per token, not one.

Capacity: dropless by default (recommended: batch frequencies differ from the corpus); with
``moe.capacity_factor`` set, ``C = max(min_capacity, ceil(cf·N·T/E))`` with rank-major, token-order priority,
as for top-k.

Inference: identical to training, deterministic and causal (only the current token id is used).
"""

from __future__ import annotations

import heapq
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from moe.routing.base import Router, Routing, router_dtype, routing_stats
from moe.routing.capacity import capacity_keep_mask, expert_capacity

HashFunction = Literal["random", "balanced", "token_id"]
HASH_FUNCTIONS = ("random", "balanced", "token_id")


@dataclass(kw_only=True)
class Options:
    """``router.options`` of ``hash``.

    Attributes:
        vocab_size: V, the size of the token id -> expert table; must equal ``model.vocab_size`` (required: the
            router is built from the MoE config, which does not know the vocabulary).
        hash_function: random | balanced | token_id.
        num_hashes: N; MultiHash when > 1 (random only).
        seed: seed of the random table (42 as the ParlAI reference).
        token_counts_path: balanced only: a JSON file holding a list of V token counts of the training data.
    """

    vocab_size: int | None = None
    hash_function: HashFunction = "random"
    num_hashes: int = 1
    seed: int = 42
    token_counts_path: str | None = None

    def __post_init__(self) -> None:
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"router.options.vocab_size must be >= 1, got {self.vocab_size}")
        if self.hash_function not in HASH_FUNCTIONS:
            raise ValueError(f"router.options.hash_function must be one of {', '.join(HASH_FUNCTIONS)}, "
                             f"got {self.hash_function!r}")
        if self.num_hashes < 1:
            raise ValueError(f"router.options.num_hashes must be >= 1, got {self.num_hashes}")
        if self.num_hashes > 1 and self.hash_function != "random":
            raise ValueError(f"router.options.num_hashes > 1 (MultiHash) needs hash_function 'random', "
                             f"got {self.hash_function!r}")
        if self.seed < 0:
            raise ValueError(f"router.options.seed must be >= 0, got {self.seed}")
        if self.token_counts_path is not None and self.hash_function != "balanced":
            raise ValueError("router.options.token_counts_path is only used by hash_function 'balanced', "
                             f"got {self.hash_function!r}")


def random_hash_table(vocab_size: int, num_experts: int, num_hashes: int = 1, seed: int = 42) -> torch.Tensor:
    """(N, V) int64, i.i.d. uniform experts from ``random.Random(seed)`` (row 0 = the ParlAI reference table)."""
    rng = random.Random(seed)  # private: independent of, and harmless to, the global RNG states
    rows = [[rng.randrange(num_experts) for _ in range(vocab_size)] for _ in range(num_hashes)]
    return torch.tensor(rows, dtype=torch.int64).view(num_hashes, vocab_size)


def balanced_hash_table(counts_V: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(V,) int64 table from greedy longest-processing-time on the token counts (module docstring).

    Args:
        counts_V: (V,) non-negative token frequencies.
        num_experts: E.
    """
    counts = [float(c) for c in counts_V.tolist()]
    if any(not c >= 0 for c in counts):  # also catches NaN
        raise ValueError("balanced hashing: token counts must be finite and >= 0")
    table = [0] * len(counts)
    order = sorted(range(len(counts)), key=lambda v: (-counts[v], v))
    heap = [(0.0, e) for e in range(num_experts)]  # (mass so far, bucket): the lightest, then the lowest index
    unseen = 0
    for v in order:
        if counts[v] == 0:  # no mass to balance: spread evenly rather than piling onto the lightest bucket
            table[v] = unseen % num_experts
            unseen += 1
            continue
        mass, e = heapq.heappop(heap)
        table[v] = e
        heapq.heappush(heap, (mass + counts[v], e))
    return torch.tensor(table, dtype=torch.int64)


def token_id_hash_table(vocab_size: int, num_experts: int) -> torch.Tensor:
    """(V,) int64, ``v mod E``."""
    return torch.arange(vocab_size, dtype=torch.int64) % num_experts


class HashRouter(Router):
    """Routes each token by a fixed table of its input token id (module docstring). No parameters, no losses.

    Args:
        num_experts: E.
        vocab_size: V.
        hash_function: random | balanced | token_id.
        num_hashes: N (MultiHash when > 1; random only).
        seed: seed of the random table.
        token_counts: balanced only: (V,) token counts to fit the table now (else call ``fit_balanced``).
        capacity_factor: None for dropless; else the training capacity factor.
        eval_capacity_factor: capacity factor in ``eval()`` mode (None: dropless).
        min_capacity: lower bound on the slots per expert.
    """

    Options = Options

    def __init__(
        self,
        *,
        num_experts: int,
        vocab_size: int,
        hash_function: HashFunction = "random",
        num_hashes: int = 1,
        seed: int = 42,
        token_counts: torch.Tensor | None = None,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
    ) -> None:
        super().__init__()
        Options(vocab_size=vocab_size, hash_function=hash_function, num_hashes=num_hashes, seed=seed)  # validates
        if num_experts < 1:
            raise ValueError(f"hash router: num_experts must be >= 1, got {num_experts}")
        if token_counts is not None and hash_function != "balanced":
            raise ValueError(f"hash router: token_counts are only used by hash_function 'balanced', "
                             f"got {hash_function!r}")
        self.num_experts = num_experts
        self.vocab_size = vocab_size
        self.hash_function = hash_function
        self.num_hashes = num_hashes
        self.top_k = num_hashes  # the most experts a token can get (read by MoEModel.num_parameters(active=True))
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        if hash_function == "random":
            table_NV = random_hash_table(vocab_size, num_experts, num_hashes, seed)
        elif hash_function == "token_id":
            table_NV = token_id_hash_table(vocab_size, num_experts).view(1, vocab_size)
        else:
            table_NV = torch.full((1, vocab_size), -1, dtype=torch.int64)  # -1: not fitted yet
        # NOTE: a persistent buffer, so the table travels with every checkpoint: regenerating it at load time
        # would silently reroute every token if the generator, seed or tokenizer differed (docs/routers.md#hash).
        self.register_buffer("table", table_NV)
        if token_counts is not None:
            self.fit_balanced(token_counts)

    @classmethod
    def from_config(cls, moe_cfg, hidden_size: int) -> "HashRouter":
        rc = moe_cfg.router
        if rc.jitter != "none":
            raise ValueError(f"hash routing has no router logits to perturb; set router.jitter to 'none', "
                             f"got {rc.jitter!r}")
        opts: Options = rc.router_options()
        if opts.vocab_size is None:
            raise ValueError("hash routing needs the vocabulary size to build its token id -> expert table: set "
                             "router.options.vocab_size to model.vocab_size")
        counts = None if opts.token_counts_path is None else load_token_counts(opts.token_counts_path, opts.vocab_size)
        # NOTE: top_k, renormalize, aux_loss_coef and z_loss_coef do not apply: there are no router probabilities.
        return cls(
            num_experts=moe_cfg.num_experts,
            vocab_size=opts.vocab_size,
            hash_function=opts.hash_function,
            num_hashes=opts.num_hashes,
            seed=opts.seed,
            token_counts=counts,
            capacity_factor=moe_cfg.capacity_factor,
            eval_capacity_factor=moe_cfg.eval_capacity_factor,
            min_capacity=moe_cfg.min_capacity,
        )

    @torch.no_grad()
    def fit_balanced(self, counts_V: torch.Tensor) -> None:
        """Fit the balanced table to (V,) token counts of the training data (LPT; module docstring)."""
        if self.hash_function != "balanced":
            raise ValueError(f"fit_balanced: this router hashes with {self.hash_function!r}, not 'balanced'")
        counts_V = torch.as_tensor(counts_V)
        if counts_V.shape != (self.vocab_size,):
            raise ValueError(f"fit_balanced: expected {self.vocab_size} token counts, got shape {tuple(counts_V.shape)}")
        self.table.copy_(balanced_hash_table(counts_V, self.num_experts).view(1, -1))

    _UNFITTED = ("balanced hashing: the table has not been fitted; set router.options.token_counts_path (a JSON "
                 "list of the training data's token counts, one per vocabulary entry), or start from a checkpoint "
                 "that holds the table (--init or --resume)")

    def check_ready(self) -> None:
        if bool((self.table < 0).any()):
            raise ValueError(self._UNFITTED)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                seq_len: int | None = None) -> Routing:
        T = x_TD.shape[0]
        E, N, V = self.num_experts, self.num_hashes, self.vocab_size
        if token_ids_T is None:
            raise ValueError("hash routing needs the input token ids (token_ids_T); the model passes them to "
                             "every MoE layer")
        if token_ids_T.shape != (T,):
            raise ValueError(f"hash routing: token_ids_T must have shape ({T},), got {tuple(token_ids_T.shape)}")
        with torch.no_grad():
            ids_T = token_ids_T.to(device=self.table.device, dtype=torch.int64)
            if T and (int(ids_T.min()) < 0 or int(ids_T.max()) >= V):
                raise ValueError(f"hash routing: token ids must lie in [0, {V}) (router.options.vocab_size), got "
                                 f"[{int(ids_T.min())}, {int(ids_T.max())}]")
            experts_TN = self.table[:, ids_T].t()  # (T, N)
            if T and int(experts_TN.min()) < 0:
                raise RuntimeError(self._UNFITTED + " (in Python: HashRouter.fit_balanced(counts))")
            if N == 1:
                first_TN = torch.ones_like(experts_TN, dtype=torch.bool)
                weight_TN = torch.ones(T, 1, dtype=router_dtype(x_TD), device=x_TD.device)
            else:
                # A token sent twice to one expert is sent once, with weight (hashes that chose it) / N.
                same_TNN = experts_TN.unsqueeze(2) == experts_TN.unsqueeze(1)
                earlier_NN = torch.ones(N, N, dtype=torch.bool, device=experts_TN.device).tril(-1)
                first_TN = ~(same_TNN & earlier_NN).any(-1)
                weight_TN = same_TNN.sum(-1).to(router_dtype(x_TD)) / N
            requested = int(first_TN.sum())
            cf = self.capacity_factor if self.training else self.eval_capacity_factor
            keep_TN = first_TN
            if cf is not None:
                capacity = expert_capacity(cf, N, T, E, self.min_capacity)
                # Repeated slots go to a dummy expert E, so they take no place in the real experts' queues.
                keep_TN = first_TN & capacity_keep_mask(torch.where(first_TN, experts_TN, E), E + 1, capacity)
            token_TN = torch.arange(T, device=experts_TN.device).unsqueeze(1).expand(T, N)
            token_A, expert_A, weight_A = token_TN[keep_TN], experts_TN[keep_TN], weight_TN[keep_TN]
            tokens_per_expert_E = torch.bincount(expert_A, minlength=E)
            stats = routing_stats(None, tokens_per_expert_E, T, dropped=requested - token_A.numel(),
                                  requested=requested)
        return Routing(token_index=token_A.to(x_TD.device), expert_index=expert_A.to(x_TD.device),
                       weight=weight_A.to(x_TD.device), tokens_per_expert=tokens_per_expert_E.to(x_TD.device),
                       losses={}, stats=stats)


def load_token_counts(path: str | Path, vocab_size: int) -> torch.Tensor:
    """Read a JSON list of ``vocab_size`` non-negative token counts (``router.options.token_counts_path``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"router.options.token_counts_path: cannot read a JSON list of counts from {path}: {e}") from None
    if not isinstance(data, list) or len(data) != vocab_size or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0 for c in data):
        raise ValueError(f"router.options.token_counts_path: {path} must hold a JSON list of {vocab_size} "
                         "non-negative numbers (router.options.vocab_size)")
    return torch.tensor(data, dtype=torch.float64)
