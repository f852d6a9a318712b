"""``DeepSpeedEngine``: the ``moe.engine.Engine`` of multi-process runs, on DeepSpeed (the one module that imports it).

Shape legend: W world size (= the data-parallel size: every rank reads its own data), P ranks per
expert-parallel group, E experts, X = E/P experts per rank.

    deepspeed --num_gpus 2 --module moe.train recipes/tiny.yaml parallel.expert_parallel_size=2

What it does, in order (``DeepSpeedEngine.__init__``):

1. joins the process group (already initialised: used as is; else ``deepspeed.init_distributed``: gloo on CPU,
   NCCL on CUDA) and validates ``parallel.expert_parallel_size`` against W and E;
2. creates DeepSpeed's expert groups (``deepspeed.utils.groups``, named ``ep_size_{P}``; the same ranks as
   ``moe.parallel.groups``) and shards the experts over them with ``apply_expert_parallel``, which tags expert
   parameters ``allreduce=False`` and ``group_name="ep_size_{P}"``: DeepSpeed reduces their gradients over the
   expert-data-parallel group only, divided by W (each rank's expert gradient already sums the contributions
   of every rank of its expert-parallel group, so dividing by W gives the mean over all W micro-batches);
3. hands DeepSpeed a thin wrapper of the model holding one ``_MoEMarker`` per MoE layer: DeepSpeed switches
   its MoE handling on only when it finds a ``deepspeed.moe.layer.MoE`` module (``runtime/engine.py``), and
   writes per-expert checkpoint files through those modules' ``state_dict``;
4. builds AdamW with DeepSpeed's MoE parameter groups (no weight decay on 1-D parameters, as
   ``moe.engine.param_groups``) and a DeepSpeed config generated from the recipe (``ds_config_from_recipe``)
   with the user's JSON (``parallel.deepspeed_config``) merged over it.

Gradient accumulation is the trainer's: DeepSpeed runs with ``managed_gradient_accumulation: false``, so
``backward`` only accumulates and ``step`` is the boundary (reduce, clip, update). The step is skipped on
every rank alike when any rank asks (a non-finite loss) or the global gradient norm is not finite.

NOTE (clipping at ZeRO stage 0): DeepSpeed's fp32 stage-0 clip (``runtime/utils.py`` ``clip_grad_norm_``)
averages the per-rank norms, which is not the global norm when ranks hold different experts. Here the norm is
exact instead: ``sqrt(|g_dense|² + Σ over the expert-parallel group |g_experts|²)``, and DeepSpeed is given
``gradient_clipping: 0`` for that path. ZeRO 1/2 compute the global norm themselves (summed over all ranks),
which is exact too.

Checkpoints (``save`` / ``resume``): ``engine.save_checkpoint`` writes ``OUT/checkpoints/step_XXXXXXXX/``:
``mp_rank_00_model_states.pt`` (the non-expert weights), ``layer_{L}_expert_{e}_mp_rank_00_model_states.pt``
(one file per MoE layer and global expert, whatever P was), ``expp_rank_{r}_mp_rank_00_optim_states.pt``
(stage 0) or ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` (ZeRO 1/2); we add ``rng_rank{r}.safetensors``,
``state.json`` (step and layout) and ``manifest.json`` (SHA-256 of every file), and DeepSpeed's ``latest``
marker is written last, atomically. Resume on the same layout is bit-exact. At ZeRO 0 (fp32) a checkpoint
also resumes at another P or W: DeepSpeed reads the per-expert files of this rank's experts, and AdamW's state
is re-sharded from every ``expp_rank`` file (``_resharded_optimizer_state``); ZeRO 1/2 partitions are not
re-sharded (refused).

Safety of ``resume``: DeepSpeed loads its own files with ``torch.load(weights_only=False)``, i.e. pickle, which
runs whatever code a forged file names. Two checks come first. The manifest (SHA-256 of every file) catches a
damaged checkpoint, but not a forgery: whoever can write the folder can rewrite the manifest too. So every
``*.pt`` file of the checkpoint is also disassembled without being run
(``torch.serialization.get_unsafe_globals_in_checkpoint``), and resuming is refused when one names a Python
global outside torch's weights-only set (tensors, storages, ``OrderedDict``, ...) and ``DEEPSPEED_PICKLE_GLOBALS``
(the three classes DeepSpeed's ZeRO files hold), or is not an archive that can be disassembled (a legacy pickle,
TorchScript, a pickle protocol above 2). NOTE: a file swapped between this check and DeepSpeed's load is not
caught (the folder must not be writable by others while a run resumes).

``save`` fails cleanly: a write that fails on any rank (disk full, no permission) raises the same one-line
``RuntimeError`` on every rank, after the partial step folder is removed; ``latest`` and the checkpoint it
names are untouched. The ranks agree after each phase of the save (``_agree``) and DeepSpeed's writes are
deferred on failure (``_DeferredWriteErrors``), so no rank is left waiting in a collective that a failed rank
skipped.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups as ds_groups
from safetensors.torch import load_file, save_file
from torch import nn

from moe.checkpoint import model_state, resume_checkpoint, write_manifest
from moe.config import Recipe
from moe.engine import param_groups
from moe.experts import Experts
from moe.layer import MoELayer
from moe.parallel.expert_parallel import apply_expert_parallel, expert_group_name, is_expert_param
from moe.parallel.groups import expert_parallel_layout

log = logging.getLogger(__name__)

_EXPERT_WEIGHTS = ("w_gate_up_ED2F", "w_down_EFD")
# The key pattern DeepSpeed's MoE checkpointing splits into per-expert files (runtime/engine.py).
_DS_EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts"
# Keys of the user's DeepSpeed JSON that the trainer owns (they come from the recipe).
_RECIPE_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "train_batch_size": "train.micro_batch_size × train.grad_accum_steps × world size",
    "optimizer": "train.lr, train.beta1, train.beta2, train.weight_decay (the trainer builds AdamW)",
    "scheduler": "train.lr, train.warmup_steps, train.min_lr_ratio (the trainer sets the learning rate)",
    "managed_gradient_accumulation": "nothing: the trainer accumulates gradients itself",
}


# The Python globals that DeepSpeed's own checkpoint files pickle beyond torch's weights-only set (which
# ``torch.serialization.get_unsafe_globals_in_checkpoint`` leaves out of its answer). Found by saving DeepSpeed
# 0.19.8 checkpoints with this engine at ZeRO 0, 1 and 2 (expert parallel 1 and 2; fp32) and with a bare
# DeepSpeed engine at ZeRO 0, 1, 2 in fp32 and bf16, and listing every file's globals: the model-state,
# per-expert and stage-0 optimizer files (``expp_rank_*``, also bf16's ``FP16_UnfusedOptimizer``) hold only
# tensors, storages, ``torch.Size`` and ``OrderedDict``; the ZeRO 1/2 optimizer files (``zero_pp_rank_*``,
# ``bf16_zero_pp_rank_*``) add these three. ``tests/reliability/test_deepspeed_safety.py`` re-derives the list.
# Under a full unpickler each of them can only be built, not made to run code: a class whose ``__init__`` sets
# attributes (LossScaler), an int Enum, a two-int dataclass; the names must match exactly (no dotted paths).
DEEPSPEED_PICKLE_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO 1/2: the (static) loss scaler, also in fp32/bf16
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO 1/2: the stage the partitions were written at
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO 1/2: where each parameter lies in a partition
})


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def check_pickled_files(folder: Path, shard: tuple[int, int] = (0, 1)) -> None:
    """Refuse a checkpoint whose pickled files could run code when DeepSpeed loads them; nothing is unpickled.

    Every ``*.pt`` file under ``folder`` (subfolders too: DeepSpeed's universal checkpoints keep them there) is
    disassembled by ``torch.serialization.get_unsafe_globals_in_checkpoint``; with ``shard=(i, n)`` only files
    ``i, i+n, ...`` of the sorted list (the ranks share the work).

    Raises:
        ValueError: one line naming the first offending file and what is wrong: a global outside torch's
            weights-only set and ``DEEPSPEED_PICKLE_GLOBALS``, a file that cannot be disassembled, or a torch
            without the inspection function (added in torch 2.5).
    """
    files = sorted(p for p in folder.rglob("*.pt") if not p.is_dir())[shard[0]::shard[1]]
    inspect = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if files and inspect is None:
        raise ValueError(f"{files[0]} cannot be loaded safely: torch {torch.__version__} lacks "
                         "torch.serialization.get_unsafe_globals_in_checkpoint (torch >= 2.5), which checks "
                         "DeepSpeed's pickled checkpoint files before they are loaded; upgrade torch to resume")
    for path in files:
        try:
            found = inspect(str(path))
        except Exception as e:  # not a torch.save zip archive, TorchScript, or opcodes it does not know
            raise ValueError(f"{path} cannot be loaded safely: it cannot be inspected without running it "
                             f"({_first_line(e)}); DeepSpeed writes torch.save zip archives of pickle protocol 2"
                             ) from None
        unknown = sorted(set(found) - DEEPSPEED_PICKLE_GLOBALS)
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise ValueError(f"{path} cannot be loaded safely: it refers to the Python global {unknown[0]}{more}, "
                             "which DeepSpeed's checkpoint files do not use (a forged or foreign file?)")


def _write_failure(e: BaseException, path: str | None = None) -> str:
    """Why a write failed, for the one-line error: ``reason (ERRNO, path)`` for an OSError."""
    if isinstance(e, OSError) and e.strerror:
        where = e.filename or path
        return f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)}{', ' + str(where) if where else ''})"
    # torch.save reports a full disk as a RuntimeError of its zip writer ("unexpected pos ..."), without errno
    return f"{type(e).__name__}: {_first_line(e)}{f' ({path})' if path else ''}"


def _attempt(write: Any) -> str | None:
    """Run ``write()``; why it failed (``_write_failure``), or None."""
    try:
        write()
    except Exception as e:
        return _write_failure(e)
    return None


class _DeferredWriteErrors:
    """Stands for DeepSpeed's checkpoint engine during ``save_checkpoint``: a write or folder creation that fails
    is recorded and this rank's later writes are skipped, instead of raising out of ``save_checkpoint``. A rank
    that left it early would skip its remaining collectives (its final barrier) and leave the others waiting
    there until the process-group timeout; the ranks agree on the outcome afterwards (``DeepSpeedEngine._agree``).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failure: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        if self.failure is None:
            try:
                self.inner.save(state_dict, path)
            except Exception as e:
                self.failure = _write_failure(e, path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        if self.failure is None:
            try:
                self.inner.makedirs(path, exist_ok=exist_ok)
            except Exception as e:
                self.failure = _write_failure(e, path)


def uses_bf16(recipe: Recipe, cuda: bool) -> bool:
    """Whether DeepSpeed should train in bf16: train.dtype resolves to bf16 and the run is on CUDA."""
    t = recipe.train
    on_cuda = cuda and t.device != "cpu"
    return on_cuda and (t.dtype == "bfloat16" or t.dtype == "auto")


def ds_config_from_recipe(recipe: Recipe, world_size: int, *, cuda: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed config of ``recipe`` on ``world_size`` ranks (before the user's JSON is merged over it).

    Args:
        recipe: the run's recipe (``train`` and ``parallel`` sections).
        world_size: W.
        cuda: whether the run is on CUDA (None: ``torch.cuda.is_available()``); bf16 only there.
    """
    t, p = recipe.train, recipe.parallel
    cuda = torch.cuda.is_available() if cuda is None else cuda
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage in (1, 2):
        # DeepSpeed's MoE support in ZeRO 1/2 asserts both (runtime/zero/stage_1_and_2.py _configure_moe_settings).
        zero.update(contiguous_gradients=True, reduce_scatter=True, overlap_comm=False)
    return {
        # Our optimizer is torch's AdamW with a veto in front of its step (_VetoableAdamW); ZeRO checks the
        # exact type against its list, and a subclass is not on it.
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": uses_bf16(recipe, cuda)},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def merge_config(base: dict[str, Any], user: dict[str, Any], path: str = "") -> dict[str, Any]:
    """``user`` over ``base``, nested dicts merged key by key. Raises ValueError on a key the recipe owns."""
    out = copy.deepcopy(base)
    for key, value in user.items():
        if not path and key in _RECIPE_OWNED and (key not in base or value != base[key]):
            raise ValueError(f"parallel.deepspeed_config: {key!r} comes from the recipe; set "
                             f"{_RECIPE_OWNED[key]} instead")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value, f"{path}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(recipe: Recipe, world_size: int, *, cuda: bool | None = None) -> dict[str, Any]:
    """The generated config with ``parallel.deepspeed_config`` merged over it, validated."""
    config = ds_config_from_recipe(recipe, world_size, cuda=cuda)
    path = recipe.parallel.deepspeed_config
    if path is not None:
        try:
            user = json.loads(Path(path).expanduser().read_text())
        except FileNotFoundError:
            raise ValueError(f"parallel.deepspeed_config: {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"parallel.deepspeed_config: {path} is not valid JSON ({e})") from None
        if not isinstance(user, dict):
            raise ValueError(f"parallel.deepspeed_config: {path} must hold a JSON object")
        config = merge_config(config, user)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if config.get("checkpoint", {}).get("checkpoint_serialization", True) is False:
        raise ValueError("parallel.deepspeed_config: checkpoint.checkpoint_serialization=false writes legacy "
                         "pickles, which cannot be inspected before --resume loads them; remove it")
    if config.get("fp16", {}).get("enabled", False):
        raise ValueError("parallel.deepspeed_config: fp16 is not supported; bf16 is used on CUDA (train.dtype)")
    return config


class _MoEMarker(MoE):
    """Stands for one of our MoE layers where DeepSpeed looks for ``deepspeed.moe.layer.MoE`` modules.

    DeepSpeed enables its MoE handling (expert gradient reduction, MoE checkpoint layout) only when the model
    contains such a module. This one is never called; it carries the attributes DeepSpeed reads
    (``num_experts``, ``num_local_experts``, ``ep_size``, ``expert_group_name``) and presents the layer's local
    experts, one entry per expert, under the key pattern DeepSpeed's checkpointing splits into per-expert
    files. ``MoE.__init__`` (which would build DeepSpeed's own gate and experts) is skipped on purpose.
    """

    def __init__(self, experts: Experts, num_experts: int, ep_size: int) -> None:
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = expert_group_name(ep_size)
        self._experts = (experts,)  # a tuple, so that the experts are not registered a second time

    @property
    def experts(self) -> Experts:
        return self._experts[0]

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, **_: Any) -> None:
        # The groups exist already (DeepSpeedEngine creates them); only their layout must be ours.
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel is not supported: the expert-parallel groups "
                             "are consecutive ranks (parallel/groups.py)")

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("_MoEMarker is a marker for DeepSpeed; the model's MoELayer does the work")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for name in _EXPERT_WEIGHTS:
            w = getattr(self.experts, name)
            w = w if keep_vars else w.detach()
            for j in range(w.shape[0]):  # local expert j; DeepSpeed renames it to the global index
                destination[f"{prefix}{_DS_EXPERT_PREFIX}.{j}.{name}"] = w[j]


class _DeepSpeedModule(nn.Module):
    """What DeepSpeed wraps: the model (``.model``) and one marker per MoE layer (``.moe``).

    Its state dict leaves the expert weights out of the ``model.`` keys: the markers carry them, one entry per
    expert, so that DeepSpeed writes them to per-expert files and not (rank 0's shard only) to the main file.
    """

    def __init__(self, model: nn.Module, markers: list[_MoEMarker]) -> None:
        super().__init__()
        self.model = model
        self.moe = nn.ModuleList(markers)
        self.expert_names = [n for n, p in model.named_parameters() if is_expert_param(p)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for name in self.expert_names:
            state.pop(f"{prefix}model.{name}", None)
        return state

    def load_checkpoint_state(self, src: dict[str, torch.Tensor], dst: nn.Module | None = None) -> None:
        """DeepSpeed's ``custom_load_fn``: ``src`` holds the ``model.`` keys and, under each marker, this rank's
        experts (DeepSpeed has already picked the per-expert files of this rank's global experts)."""
        src = dict(src)
        with torch.no_grad():
            for i, marker in enumerate(self.moe):
                for name in _EXPERT_WEIGHTS:
                    w = getattr(marker.experts, name)
                    keys = [f"moe.{i}.{_DS_EXPERT_PREFIX}.{j}.{name}" for j in range(w.shape[0])]
                    missing = [k for k in keys if k not in src]
                    if missing:
                        raise ValueError(f"checkpoint: expert weights missing for MoE layer {i}: {missing[:2]}")
                    w.copy_(torch.stack([src.pop(k) for k in keys]))
        prefix = "model."
        rest = {k[len(prefix):]: v for k, v in src.items() if k.startswith(prefix)}
        stray = [k for k in src if not k.startswith(prefix)]
        missing, unexpected = self.model.load_state_dict(rest, strict=False)
        missing = [m for m in missing if m not in self.expert_names]
        if missing or unexpected or stray:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected "
                             f"{(unexpected + stray)[:3]}")


class _VetoableAdamW(torch.optim.AdamW):
    """AdamW whose update the engine can veto at the last moment.

    DeepSpeed calls the client optimizer's ``step`` itself, inside ``engine.step()`` after it has reduced the
    gradients (and, under ZeRO, once per parameter group); ``before_step`` decides there whether the update
    happens (the agreed skip flag, the global gradient norm) and, on the stage-0 path, clips.
    """

    def __init__(self, params: list[dict], *, before_step, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._before_step = before_step

    def step(self, closure=None):  # noqa: D102
        if not self._before_step():
            return None
        return super().step(closure)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _world_and_device(recipe: Recipe) -> torch.device:
    """Join (or create) the default process group; returns this rank's device."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    on_cuda = accelerator.device_name() == "cuda"
    if recipe.train.device == "cuda" and not on_cuda:
        raise ValueError("train.device is 'cuda' but DeepSpeed found no CUDA device; use 'auto' or 'cpu'")
    if recipe.train.device == "cpu" and on_cuda:
        raise ValueError("train.device is 'cpu' but DeepSpeed runs on CUDA here; set DS_ACCELERATOR=cpu to "
                         "train on the CPU, or use train.device=auto")
    # NOTE: DeepSpeed insists on the launchers' environment variables (LOCAL_RANK at least; MPI discovery
    # without them). They are missing in two cases, both on one machine: a caller made the process group
    # itself (a test harness), or one process asked for DeepSpeed (parallel.zero_stage > 0) without a launcher.
    if dist.is_initialized():
        os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    elif "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", verbose=False)
    else:  # a caller (a test harness, torchrun code) made the group; DeepSpeed adopts it
        deepspeed.init_distributed(verbose=False)
    if not on_cuda:
        _release_shm_names()
    return torch.device(f"cuda:{local_rank}") if on_cuda else torch.device("cpu")


def _release_shm_names() -> None:
    """Unlink the /dev/shm segment DeepSpeed's CPU backend made for this rank.

    With every rank on one machine (the launcher sets ``LOCAL_SIZE``), DeepSpeed maps a 66 MB shared-memory
    segment per rank, ``deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}``
    (``ops/csrc/cpu/comm/shm.cpp``), and never unlinks it: every CPU run would leave 66 MB per rank in /dev/shm.
    Each rank maps all its peers' segments inside ``init_distributed``; after a barrier the names are no longer
    needed (the mappings stay valid), so each rank unlinks its own.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return
    dist.barrier()
    name = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}")
    name.unlink(missing_ok=True)


class DeepSpeedEngine:
    """The ``moe.engine.Engine`` of a DeepSpeed run (see the module docstring).

    Args:
        model: the full model (all E experts), built identically on every rank (same seed or same weights),
            on the CPU; it is sharded and moved to this rank's device here.
        recipe: the run's recipe.
    Raises:
        ValueError: a bad ``parallel.expert_parallel_size`` for the world size or E, ZeRO stage 3 with MoE
            layers, or a DeepSpeed JSON that conflicts with the recipe.
    """

    # NOTE: with bf16 at ZeRO 0, DeepSpeed's optimizer wrapper takes one zero-gradient step inside
    # deepspeed.initialize to create its states; this class default vetoes it (it would apply weight decay
    # before training starts). __init__ sets the per-step decision to None once the engine exists.
    _decision: bool | None = False

    def __init__(self, model: nn.Module, recipe: Recipe) -> None:
        t, p = recipe.train, recipe.parallel
        self.device = _world_and_device(recipe)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        config = load_config(recipe, self.world_size, cuda=self.device.type == "cuda")
        self.zero_stage = config["zero_optimization"].get("stage", 0)
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        if self.zero_stage == 3:
            raise ValueError("ZeRO stage 3 is not supported: DeepSpeed refuses its MoE layers under ZeRO-3 "
                             "(\"Native DeepSpeed MoE is not supported with ZeRO Stage 3\"), and dense models "
                             "are not wired for it here; use parallel.zero_stage=1 or 2")
        self.ep_size = p.expert_parallel_size
        self.ep_group = None
        if layers:
            # ValueErrors before any group exists, so every rank fails alike.
            expert_parallel_layout(self.world_size, self.ep_size, layers[0].num_experts)
            name = expert_group_name(self.ep_size)
            if name not in ds_groups._get_expert_parallel_group_dict():
                ds_groups._create_expert_and_data_parallel(self.ep_size)
            self.ep_group = ds_groups._get_expert_parallel_group(name)
            apply_expert_parallel(model, self.ep_group)
        elif self.ep_size > 1:
            raise ValueError("parallel.expert_parallel_size > 1 needs MoE layers (model.moe is null)")
        self.num_experts = layers[0].num_experts if layers else 0
        self.layers = layers
        model.to(self.device)
        self.module = _DeepSpeedModule(model, [_MoEMarker(l.experts, l.num_experts, self.ep_size) for l in layers])

        # Stage 0 in fp32 hands DeepSpeed the client optimizer as is: we clip there, exactly (module docstring).
        self.plain = self.zero_stage == 0 and not config.get("bf16", {}).get("enabled", False)
        self.grad_clip = float(config.get("gradient_clipping", 0.0) or 0.0)
        if self.plain:
            config["gradient_clipping"] = 0.0
        groups = [{**g, "name": name} for g, name in zip(param_groups(model, t.weight_decay), ("decay", "no_decay"))]
        if layers:
            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        groups = [g for g in groups if g["params"]]
        optimizer = _VetoableAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), before_step=self._before_step)
        if not log.isEnabledFor(logging.DEBUG):
            deepspeed.utils.logger.setLevel(logging.WARNING)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer,
                                                             config=config, dist_init_required=False)
        self.model = self.ds  # forward passes go through DeepSpeed's engine
        self._skip = False
        self._decision: bool | None = None
        self._norm = float("nan")
        log.info("DeepSpeed: %d ranks, expert parallel %d, ZeRO stage %d (%s)%s", self.world_size, self.ep_size,
                 self.zero_stage, type(self.ds.optimizer).__name__, ", bf16" if config["bf16"]["enabled"] else "")

    # -- training ---------------------------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer has divided by train.grad_accum_steps already.
        self.ds.backward(loss, scale_wrt_gas=False)

    def _expert_and_dense_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        params = [q for q in self.module.parameters() if q.grad is not None]
        return [q for q in params if is_expert_param(q)], [q for q in params if not is_expert_param(q)]

    @torch.no_grad()
    def _global_norm(self) -> torch.Tensor:
        """The 2-norm of the whole model's gradient (reduced gradients; experts summed over their EP group)."""
        experts, dense = self._expert_and_dense_params()
        sq = torch.zeros(2, dtype=torch.float32, device=self.device)
        if dense:
            sq[0] = torch.stack(torch._foreach_norm([q.grad for q in dense])).float().square().sum()
        if experts:
            sq[1] = torch.stack(torch._foreach_norm([q.grad for q in experts])).float().square().sum()
            dist.all_reduce(sq[1:], group=self.ep_group)  # every expert once: the EP group holds them all
        return sq.sum().sqrt()

    def _before_step(self) -> bool:
        if self._decision is not None:  # ZeRO calls the optimizer once per parameter group
            return self._decision
        if self.plain:
            norm = self._global_norm()
            self._norm = float(norm)
            ok = math.isfinite(self._norm) and not self._skip
            if ok and self.grad_clip > 0:
                coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_
                torch._foreach_mul_([q.grad for q in self.module.parameters() if q.grad is not None], coef)
            self._decision = ok
        else:
            self._decision = not self._skip  # DeepSpeed has checked the norm (ZeRO: overflow) and clipped
        return self._decision

    def step(self, lr: float, skip: bool = False) -> tuple[float, bool]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        flag = torch.tensor([1.0 if skip else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank's non-finite loss skips the step everywhere
        self._skip, self._decision, self._norm = bool(flag.item()), None, float("nan")
        self.ds.step()  # reduce, (ZeRO: norm, clip,) optimizer step through _before_step, zero the gradients
        stepped = bool(self._decision)
        if not self.plain:
            norm = self.ds.get_global_grad_norm()
            self._norm = float("nan") if norm is None else float(norm)
        self.ds.zero_grad()
        return self._norm, stepped

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to(self.device, copy=True)
        dist.all_reduce(out)
        return out.to(t.device)

    def barrier(self) -> None:
        dist.barrier()

    def model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state on rank 0 (experts gathered from their ranks), None elsewhere. Collective."""
        model = self.module.model
        full: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            for name in _EXPERT_WEIGHTS:
                w = getattr(layer.experts, name).detach().contiguous()
                parts = [torch.empty_like(w) for _ in range(self.ep_size)]
                dist.all_gather(parts, w, group=self.ep_group)
                full[(layer, name)] = torch.cat(parts).cpu()
        if self.rank != 0:
            return None
        state = model_state(model)
        names = {id(getattr(l.experts, n)): (l, n) for l in self.layers for n in _EXPERT_WEIGHTS}
        for key, q in model.named_parameters():
            if id(q) in names:
                state[key] = full[names[id(q)]]
        return state

    # -- checkpoints ------------------------------------------------------------------------------------------

    def _layout(self) -> dict[str, int]:
        return {"ep_size": self.ep_size, "world_size": self.world_size, "zero_stage": self.zero_stage,
                "num_experts": self.num_experts}

    def save(self, root: Path, step: int, keep: int) -> None:
        """Every rank calls this. ``latest`` is replaced last, so a crash leaves the previous one in force.

        Raises:
            RuntimeError: on every rank alike, when a write failed on any rank (disk full, no permission): one
                line naming the step folder, the reason (errno and file for an OSError) and the rank. The partial
                step folder is removed first; ``latest`` and the checkpoint it names are untouched.
        """
        tag = f"step_{step:08d}"
        folder = root / tag

        def prepare() -> None:
            root.mkdir(parents=True, exist_ok=True)
            if folder.exists():  # a partial save of a crashed run, or a rerun of this step after a resume
                shutil.rmtree(folder)

        self._agree(root, folder, _attempt(prepare) if self.rank == 0 else None)  # before anyone writes there
        writer = _DeferredWriteErrors(self.ds.checkpoint_engine)
        self.ds.checkpoint_engine = writer
        try:
            self.ds.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
        finally:
            self.ds.checkpoint_engine = writer.inner
        failure = writer.failure
        if failure is None:
            rng = {"torch": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            failure = _attempt(lambda: save_file(rng, str(folder / f"rng_rank{self.rank:05d}.safetensors")))
        self._agree(root, folder, failure)

        def finish() -> None:
            (folder / "state.json").write_text(json.dumps({"step": step, **self._layout()}))
            write_manifest(folder)
            marker_tmp = root / ".latest.tmp"
            marker_tmp.write_text(tag)
            os.replace(marker_tmp, root / "latest")  # DeepSpeed's marker, written last

        self._agree(root, folder, _attempt(finish) if self.rank == 0 else None)
        if self.rank == 0:
            for old in sorted(q for q in root.glob("step_*") if q.is_dir())[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def _agree(self, root: Path, folder: Path, failure: str | None) -> None:
        """Collective: every rank learns whether any rank's part of saving ``folder`` failed (``failure``: why,
        or None); if one did, the partial folder is removed and every rank raises the first rank's reason."""
        failures: list[str | None] = [None] * self.world_size
        dist.all_gather_object(failures, failure)
        failed = [(r, why) for r, why in enumerate(failures) if why is not None]
        if not failed:
            return
        if self.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                (root / ".latest.tmp").unlink(missing_ok=True)
        dist.barrier()  # removed before any rank reports
        try:
            previous = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
        except OSError:
            previous = None
        rank, why = failed[0]
        raise RuntimeError(f"could not write checkpoint {folder}: {why} on rank {rank}; "
                           + (f"the previous checkpoint {root / previous} is intact" if previous
                              else "no earlier checkpoint"))

    def resume(self, root: Path) -> int:
        """Load the newest intact checkpoint under ``root`` (rank 0 verifies the manifest, the ranks share the
        inspection of the pickled files, every rank loads); its step.

        Raises:
            ValueError: on every rank alike: no intact checkpoint, a pickled file that could run code
                (``check_pickled_files``), or a layout that cannot be resumed.
        """
        choice: list[Any] = [None]
        if self.rank == 0:
            try:
                path = resume_checkpoint(root) if root.is_dir() else None
                choice = [("ok", None if path is None else path.name)]
            except ValueError as e:
                choice = [("error", str(e))]
        dist.broadcast_object_list(choice, src=0)
        status, value = choice[0]
        if status == "error":
            raise ValueError(value)
        if value is None:
            return 0
        folder = root / value
        # Before anything of it is unpickled: every rank inspects its share of the files, all agree.
        try:
            check_pickled_files(folder, shard=(self.rank, self.world_size))
            refusal = None
        except ValueError as e:
            refusal = str(e)
        refusals: list[str | None] = [None] * self.world_size
        dist.all_gather_object(refusals, refusal)
        refused = sorted(r for r in refusals if r is not None)
        if refused:
            raise ValueError(refused[0])
        meta = json.loads((folder / "state.json").read_text())
        if "ep_size" not in meta:
            raise ValueError(f"checkpoint {folder} was written by the one-process trainer (moe.checkpoint), not "
                             "DeepSpeed: resume it without DeepSpeed (`moe train ... --resume` on one process)")
        saved, now = {k: meta[k] for k in self._layout()}, self._layout()
        reshard = saved != now
        if reshard:
            self._check_reshard(folder, saved, now)
            log.warning("resuming %s, written with expert parallel %d on %d ranks, at expert parallel %d on %d "
                        "ranks: experts and optimizer state re-sharded%s", folder, saved["ep_size"],
                        saved["world_size"], now["ep_size"], now["world_size"],
                        "" if saved["world_size"] == now["world_size"] else
                        "; the global batch is the same only if micro_batch_size × ranks is")
        # DeepSpeed loads this rank's experts from the per-expert files, whatever the layout that wrote them.
        load_path, client = self.ds.load_checkpoint(str(root), tag=value, load_optimizer_states=not reshard,
                                                    custom_load_fn=self.module.load_checkpoint_state)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {folder}")
        if reshard:
            self.optimizer.load_state_dict(self._resharded_optimizer_state(folder, saved["ep_size"]))
        rng_file = folder / f"rng_rank{self.rank:05d}.safetensors"
        if rng_file.is_file():  # absent for the ranks a smaller run did not have
            rng = load_file(str(rng_file))
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        return int(client["step"])

    def _check_reshard(self, folder: Path, saved: dict[str, int], now: dict[str, int]) -> None:
        if saved["zero_stage"] != now["zero_stage"] or saved["num_experts"] != now["num_experts"]:
            raise ValueError(f"checkpoint {folder} was written with {saved}, this run has {now}: the ZeRO stage "
                             "and the number of experts must stay the same")
        if not self.plain:
            raise ValueError(f"checkpoint {folder} was written with expert parallel {saved['ep_size']} on "
                             f"{saved['world_size']} ranks, this run has {now['ep_size']} on {now['world_size']}: "
                             "re-sharding is implemented for ZeRO stage 0 in fp32 (per-rank optimizer files), "
                             "not for ZeRO 1/2 partitions or bf16; resume with the old layout")

    def _resharded_optimizer_state(self, folder: Path, old_ep_size: int) -> dict[str, Any]:
        """AdamW's state for this rank's layout, from the per-expert-parallel-rank files of another layout.

        File k (``expp_rank_k_...``) holds the full state of a rank that owned experts ``[k·X_old, (k+1)·X_old)``:
        the expert tensors (exp_avg, exp_avg_sq: X_old experts along dim 0) are concatenated over k and this
        rank's X slice taken; everything else is replicated, identical in every file. Loaded with
        ``weights_only=True`` (plain tensors and numbers; the manifest has been verified).
        """
        files = []
        for k in range(old_ep_size):
            path = folder / f"expp_rank_{k}_mp_rank_00_optim_states.pt"
            files.append(torch.load(path, map_location="cpu", weights_only=True)["optimizer"])
        current = self.optimizer.state_dict()
        old_groups, new_groups = files[0]["param_groups"], current["param_groups"]
        if [len(g["params"]) for g in old_groups] != [len(g["params"]) for g in new_groups]:
            raise ValueError(f"checkpoint {folder}: its optimizer parameter groups do not match this model's")
        expert_index = {i for g in new_groups if g.get("moe") for i in g["params"]}
        X, r = self.num_experts // self.ep_size, dist.get_rank(self.ep_group)
        state = {}
        for i, entry in files[0]["state"].items():
            if i in expert_index:
                state[i] = {key: torch.cat([f["state"][i][key] for f in files])[r * X:(r + 1) * X].clone()
                            if value.dim() > 0 else value for key, value in entry.items()}
            else:
                state[i] = entry
        groups = [{**old, "name": new["name"], "params": new["params"]} for old, new in zip(old_groups, new_groups)]
        return {"state": state, "param_groups": groups}
