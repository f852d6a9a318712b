"""Config dataclasses: plain data, validated in ``__post_init__``, loaded from YAML recipes.

A recipe has four sections, ``model``, ``data``, ``train`` and ``parallel``. ``model.moe`` (absent or null for a
dense model) holds the MoE layer settings and ``model.moe.router`` the router's. Every field is documented where
it is declared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from moe.kernels.backends import BACKENDS
from moe.config_io import apply_overrides, from_dict, load_yaml, require as _require, to_dict

EXPERT_BACKENDS = ("auto", *BACKENDS)


@dataclass(kw_only=True)
class RouterConfig:
    """Token → expert assignment. ``name`` selects a class from the router registry (``moe.routing.registry.ROUTERS``)."""

    name: str = "topk"
    top_k: int = 2
    # Mixtral: divide the selected probabilities by their sum (docs/routers.md#topk). False is softmax-then-top-k.
    renormalize: bool = True
    # Switch load-balancing loss α·E·Σ f·P, per layer (docs/routers.md#load-balancing), and how its f is normalised.
    # null: the named router's own default (topk 0.01 / "assignments", gshard "first_choice", sigmoid 0 —
    # it balances with its bias —, grin 0.001; see each router's docstring).
    aux_loss_coef: float | None = None
    lb_f_normalization: Literal["assignments", "first_choice", "tokens"] | None = None
    # Router z-loss β·mean(logsumexp²) (docs/routers.md#z-loss); 0 disables it.
    z_loss_coef: float = 0.0
    init_std: float = 0.02
    # Training-only noise (docs/routers.md#jitter): none | input_jitter (router input × U(1-ε, 1+ε); the experts
    # see the clean input) | logit_mult_jitter (logits × U(1-ε, 1+ε)) | gumbel (logits + Gumbel(0, 1)).
    jitter: Literal["none", "input_jitter", "logit_mult_jitter", "gumbel"] = "none"
    jitter_eps: float = 0.01
    # Settings of the named router beyond the common ones above (each router's ``Options`` dataclass).
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.top_k >= 1, f"router.top_k must be >= 1, got {self.top_k}")
        _require(self.aux_loss_coef is None or self.aux_loss_coef >= 0,
                 f"router.aux_loss_coef must be >= 0 or null, got {self.aux_loss_coef}")
        _require(self.z_loss_coef >= 0, f"router.z_loss_coef must be >= 0, got {self.z_loss_coef}")
        _require(self.init_std >= 0, f"router.init_std must be >= 0, got {self.init_std}")
        _require(0 <= self.jitter_eps < 1, f"router.jitter_eps must be in [0, 1), got {self.jitter_eps}")
        # Validates the name against the registry (raises ValueError listing the valid names).
        from moe.routing.registry import router_class

        options_cls = router_class(self.name).Options
        if self.options and not dataclasses.fields(options_cls):
            raise ValueError(f"unknown key router.options.{sorted(self.options)[0]}: the {self.name} router takes "
                             "no options")
        from_dict(options_cls, self.options, "router.options")

    def router_options(self) -> Any:
        """``options`` as the named router's ``Options`` dataclass."""
        from moe.routing.registry import router_class

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
    # Qwen2-MoE: scale the shared experts' output by sigmoid(x · w) with a learned w [1, D]. Needs shared experts.
    shared_expert_gate: bool = False

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
        _require(
            not self.shared_expert_gate or self.num_shared_experts >= 1,
            "moe.shared_expert_gate needs shared experts (moe.num_shared_experts >= 1)",
        )

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
    rms_norm_eps: float = 1e-5  # the epsilon of the layer norms, whichever ``norm`` is
    # The layer norms (before attention, before the feed-forward, before the LM head): rmsnorm (Llama, Mixtral,
    # Qwen) | layernorm (with a bias; PhiMoE). The per-head q/k norms of ``qk_norm`` are RMSNorms either way.
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    attention_bias: bool = False
    # Qwen2: biases on the q/k/v projections only (o has none); attention_bias puts them on all four (Llama).
    qkv_bias: bool = False
    # Qwen3: RMSNorm over each head's query and key (weights [Hd]) before the rotary embedding.
    qk_norm: bool = False
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
        _require(self.norm in ("rmsnorm", "layernorm"), f"model.norm must be rmsnorm or layernorm, got {self.norm!r}")
        if self.moe is not None and "vocab_size" in {f.name for f in fields(self.moe.router.router_options())}:
            # Routers that look tokens up by id (hash) need the vocabulary: it is the model's.
            given = self.moe.router.options.get("vocab_size")
            _require(given in (None, self.vocab_size), f"moe.router.options.vocab_size ({given}) must equal "
                     f"model.vocab_size ({self.vocab_size}); leave it out to use the model's")
            self.moe.router.options["vocab_size"] = self.vocab_size

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass(kw_only=True)
class DataConfig:
    """Where the text comes from and how it becomes token blocks (``moe/data/``)."""

    # null: the embedded default corpus (the running Python's standard library sources). ``python:NAME,...``:
    # the .py sources of installed packages (``stdlib`` or e.g. ``torch``: python:stdlib,torch). Otherwise a
    # local file, directory or glob (.txt/.md/.py text, .json/.jsonl, .parquet), or a ``datasets`` Hub name.
    source: str | None = None
    format: Literal["auto", "text", "json", "parquet", "hub"] = "auto"
    text_field: str = "text"
    hub_config: str | None = None
    hub_split: str = "train"
    # Upper bound on the characters read (the default corpus is cut here; other sources stop at the
    # first document past it). null reads everything.
    max_chars: int | None = 4_000_000
    # null: train a byte-level BPE of model.vocab_size tokens on the corpus. Else a tokenizer.json path.
    tokenizer: str | None = None
    val_fraction: float = 0.02
    # Seeds the train/validation split of the documents; null: train.seed. Set it to compare seeds of a run on
    # the same validation set (each train.seed otherwise holds out other documents).
    split_seed: int | None = None
    # null: $MOE_CACHE or ~/.cache/moe-train. Tokenised blocks are cached there by content and settings.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _require(0 < self.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        _require(self.max_chars is None or self.max_chars > 0, f"data.max_chars must be > 0 or null, got {self.max_chars}")
        _require(bool(self.text_field), "data.text_field must not be empty")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation, evaluation, logging and checkpoint settings for ``moe train``."""

    steps: int = 200  # optimizer steps
    micro_batch_size: int = 8  # sequences per forward pass
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    activation_checkpointing: bool = False
    # Read the training data from this optimizer step's batch on: a run that continues another's weights with
    # ``--init`` after N steps sets N, and sees the data that run would have seen next, never its first N steps.
    data_start_step: int = 0
    # Peak dense FLOP/s of one device in TFLOP/s for the MFU figure; null: known GPUs only, no MFU on CPU.
    peak_tflops: float | None = None
    # Warn when an expert of a layer has received no tokens for this many consecutive steps, or has taken over
    # 90% of the layer's tokens for this many (router collapse).
    dead_expert_steps: int = 50
    # A non-finite loss or gradient norm: skip the optimizer step and count it, or stop the run.
    on_nonfinite: Literal["skip", "stop"] = "skip"
    # Stop anyway after this many consecutive skipped steps (the run has diverged).
    max_consecutive_skips: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum_steps", "seq_len", "log_every", "eval_batches",
                     "keep_checkpoints", "dead_expert_steps", "max_consecutive_skips"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup_steps", "data_start_step"):
            _require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _require(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        _require(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        _require(self.peak_tflops is None or self.peak_tflops > 0, "train.peak_tflops must be > 0 or null")


def uses_bf16(train: TrainConfig, device_type: str) -> bool:
    """Whether a run computes in bf16 on a device of this type (``"cpu"``, ``"cuda"``): ``train.dtype`` bfloat16,
    or auto on CUDA. The one rule of both engines: the trainer's autocast, and DeepSpeed's bf16 mode on CUDA."""
    return train.dtype == "bfloat16" or (train.dtype == "auto" and device_type == "cuda")


@dataclass(kw_only=True)
class ParallelConfig:
    """How a run is spread over processes (``parallel/``). One process needs none of it."""

    # Experts are split over groups of this many ranks; the world size must be a multiple of it.
    expert_parallel_size: int = 1
    # DeepSpeed ZeRO stage for multi-process runs: 0, 1 or 2 (stage 3 is refused with MoE layers).
    zero_stage: int = 0
    # A DeepSpeed JSON config of the user's; its keys override the ones generated from this recipe.
    deepspeed_config: str | None = None

    def __post_init__(self) -> None:
        _require(self.expert_parallel_size >= 1,
                 f"parallel.expert_parallel_size must be >= 1, got {self.expert_parallel_size}")
        _require(self.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass(kw_only=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        _require(
            self.train.seq_len <= self.model.max_position_embeddings,
            f"train.seq_len ({self.train.seq_len}) exceeds model.max_position_embeddings "
            f"({self.model.max_position_embeddings})",
        )
        ep = self.parallel.expert_parallel_size
        _require(
            ep == 1 or (self.model.moe is not None and self.model.moe.num_experts % ep == 0),
            f"parallel.expert_parallel_size ({ep}) must divide model.moe.num_experts "
            f"({self.model.moe.num_experts if self.model.moe else 'dense model: use 1'})",
        )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @property
    def split_seed(self) -> int:
        """The seed of the train/validation split: ``data.split_seed``, else ``train.seed``."""
        return self.train.seed if self.data.split_seed is None else self.data.split_seed


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    return from_dict(Recipe, data)
