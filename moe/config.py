"""Config dataclasses: plain data, validated in ``__post_init__``, loaded from YAML recipes.

A recipe has two sections, ``model`` and ``train``. ``model.moe`` (absent or null for a dense model) holds
the MoE layer settings and ``model.moe.router`` the router's. Every field is documented where it is declared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moe.config_io import apply_overrides, from_dict, load_yaml, to_dict

EXPERT_BACKENDS = ("auto", "reference", "torch", "triton", "megablocks")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(kw_only=True)
class RouterConfig:
    """Token → expert assignment. ``name`` selects a class from the router registry (``routing.ROUTERS``)."""

    name: str = "topk"
    top_k: int = 2
    # Mixtral: divide the selected probabilities by their sum (ROUTERS.md §1.2). False is softmax-then-top-k (§1.1).
    renormalize: bool = True
    # Switch load-balancing loss α·E·Σ f·P, per layer (ROUTERS.md §0.4a).
    aux_loss_coef: float = 0.01
    lb_f_normalization: Literal["assignments", "first_choice", "tokens"] = "assignments"
    # Router z-loss β·mean(logsumexp²) (ROUTERS.md §0.4b); 0 disables it.
    z_loss_coef: float = 0.0
    init_std: float = 0.02
    # Training-only noise (ROUTERS.md §1.7): none | input_jitter (router input × U(1-ε, 1+ε); the experts
    # see the clean input) | logit_mult_jitter (logits × U(1-ε, 1+ε)) | gumbel (logits + Gumbel(0, 1)).
    jitter: Literal["none", "input_jitter", "logit_mult_jitter", "gumbel"] = "none"
    jitter_eps: float = 0.01
    # Settings of the named router beyond the common ones above (each router's ``Options`` dataclass).
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.top_k >= 1, f"router.top_k must be >= 1, got {self.top_k}")
        _require(self.aux_loss_coef >= 0, f"router.aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        _require(self.z_loss_coef >= 0, f"router.z_loss_coef must be >= 0, got {self.z_loss_coef}")
        _require(self.init_std >= 0, f"router.init_std must be >= 0, got {self.init_std}")
        _require(0 <= self.jitter_eps < 1, f"router.jitter_eps must be in [0, 1), got {self.jitter_eps}")
        # Validates the name against the registry (raises ValueError listing the valid names).
        from routing import router_class

        from_dict(router_class(self.name).Options, self.options, "router.options")

    def router_options(self) -> Any:
        """``options`` as the named router's ``Options`` dataclass."""
        from routing import router_class

        return from_dict(router_class(self.name).Options, self.options, "router.options")


@dataclass(kw_only=True)
class MoEConfig:
    """The MoE feed-forward: routed experts (SwiGLU), optional shared experts, which layers are MoE."""

    num_experts: int = 8
    expert_hidden_size: int = 256
    router: RouterConfig = field(default_factory=RouterConfig)
    # None = dropless (default). A number c gives each expert C = max(min_capacity, ceil(c·k·T/E)) slots.
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 4
    # Always-on experts added to the routed output (DeepSeek / Qwen-MoE style); their total width.
    num_shared_experts: int = 0
    shared_expert_hidden_size: int | None = None
    # Grouped-GEMM implementation: auto | reference | torch | triton | megablocks (see kernels/).
    backend: str = "auto"
    # Layer i is MoE iff i >= first_dense_layers and (i - first_dense_layers) % moe_every == 0.
    moe_every: int = 1
    first_dense_layers: int = 0

    def __post_init__(self) -> None:
        _require(self.num_experts >= 1, f"moe.num_experts must be >= 1, got {self.num_experts}")
        _require(
            1 <= self.router.top_k <= self.num_experts,
            f"moe.router.top_k must be between 1 and moe.num_experts={self.num_experts}, got {self.router.top_k}",
        )
        _require(self.expert_hidden_size >= 1, f"moe.expert_hidden_size must be >= 1, got {self.expert_hidden_size}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"moe.{name} must be > 0 or null (dropless), got {value}")
        _require(self.min_capacity >= 0, f"moe.min_capacity must be >= 0, got {self.min_capacity}")
        _require(self.num_shared_experts >= 0, f"moe.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        _require(
            self.shared_expert_hidden_size is None or self.shared_expert_hidden_size >= 1,
            f"moe.shared_expert_hidden_size must be >= 1 or null, got {self.shared_expert_hidden_size}",
        )
        _require(
            self.backend in EXPERT_BACKENDS,
            f"moe.backend: unknown backend {self.backend!r}; valid: {', '.join(EXPERT_BACKENDS)}",
        )
        _require(self.moe_every >= 1, f"moe.moe_every must be >= 1, got {self.moe_every}")
        _require(self.first_dense_layers >= 0, f"moe.first_dense_layers must be >= 0, got {self.first_dense_layers}")

    def is_moe_layer(self, index: int) -> bool:
        i = index - self.first_dense_layers
        return i >= 0 and i % self.moe_every == 0

    @property
    def shared_hidden_size(self) -> int:
        """Total width of the shared experts (0 when there are none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_expert_hidden_size or self.num_shared_experts * self.expert_hidden_size


@dataclass(kw_only=True)
class ModelConfig:
    """A Llama/Mixtral-family decoder. ``moe: null`` makes every feed-forward dense."""

    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    intermediate_size: int = 512  # dense feed-forward width
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    moe: MoEConfig | None = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            _require(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})",
        )
        if self.head_dim is None:
            _require(
                self.hidden_size % self.num_heads == 0,
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads}), "
                "or set model.head_dim",
            )
        _require(self.attention_head_dim % 2 == 0, f"model.head_dim must be even (rotary), got {self.attention_head_dim}")
        _require(self.max_position_embeddings >= 1, "model.max_position_embeddings must be >= 1")
        _require(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        _require(self.rms_norm_eps > 0, f"model.rms_norm_eps must be > 0, got {self.rms_norm_eps}")

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation settings for ``moe train``."""

    steps: int = 200
    micro_batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "seq_len", "log_every"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


@dataclass(kw_only=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _require(
            self.train.seq_len <= self.model.max_position_embeddings,
            f"train.seq_len ({self.train.seq_len}) exceeds model.max_position_embeddings "
            f"({self.model.max_position_embeddings})",
        )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    return from_dict(Recipe, data)
