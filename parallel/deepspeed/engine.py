"""``DeepSpeedEngine``: the ``moe.engine.Engine`` of multi-process runs, on DeepSpeed (only ``moe.parallel.deepspeed``
imports DeepSpeed).

Shape legend: W world size (= the data-parallel size: every rank reads its own data), P ranks per
expert-parallel group, E experts, X = E/P experts per rank.

    deepspeed --num_gpus 2 --module moe.train recipes/tiny.yaml parallel.expert_parallel_size=2

What it does, in order (``DeepSpeedEngine.__init__``):

1. gives the rank its share of the machine's cores (``share_cores``), joins the process group (already
   initialised: used as is; else ``deepspeed.init_distributed``: gloo on CPU, NCCL on CUDA) and validates
   ``parallel.expert_parallel_size`` against W and E;
2. builds the expert-parallel and expert-data-parallel groups (``moe.parallel.groups``), hands them to DeepSpeed
   under its name for them, ``ep_size_{P}`` (``moe.parallel.deepspeed.groups``), and shards the experts over them with ``apply_expert_parallel``, which tags expert
   parameters ``allreduce=False`` and ``group_name="ep_size_{P}"``: DeepSpeed reduces their gradients over the
   expert-data-parallel group only, divided by W (each rank's expert gradient already sums the contributions
   of every rank of its expert-parallel group, so dividing by W gives the mean over all W micro-batches);
3. hands DeepSpeed a thin wrapper of the model holding one ``MoEMarker`` per MoE layer (``markers``): DeepSpeed switches
   its MoE handling on only when it finds a ``deepspeed.moe.layer.MoE`` module (``runtime/engine.py``), and
   writes per-expert checkpoint files through those modules' ``state_dict``;
4. builds AdamW with DeepSpeed's MoE parameter groups (no weight decay on 1-D parameters, as
   ``moe.optim.param_groups``) and a DeepSpeed config generated from the recipe (``ds_config_from_recipe``)
   with the user's JSON (``parallel.deepspeed_config``) merged over it (``config``).

Gradient accumulation is the trainer's: DeepSpeed runs with ``managed_gradient_accumulation: false``, so
``backward`` only accumulates and ``step`` is the boundary (reduce, clip, update). The step is skipped on
every rank alike when any rank asks (a non-finite loss) or the global gradient norm is not finite.

NOTE (clipping at ZeRO stage 0): DeepSpeed's fp32 stage-0 clip (``runtime/utils.py`` ``clip_grad_norm_``)
averages the per-rank norms, which is not the global norm when ranks hold different experts. Here the norm is
exact instead: ``sqrt(|g_dense|² + Σ over the expert-parallel group |g_experts|²)``, and DeepSpeed is given
``gradient_clipping: 0`` for that path. ZeRO 1/2 compute the global norm themselves (summed over all ranks),
which is exact too.

Checkpoints: ``moe.parallel.deepspeed.checkpoint``; what ``--resume`` may unpickle: ``pickle_guard``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from moe.checkpoint import model_state
from moe.config import Recipe
from moe.layer import MoELayer
from moe.optim import param_groups
from moe.parallel.deepspeed import checkpoint
from moe.parallel.deepspeed.config import load_config
from moe.parallel.deepspeed.groups import expert_groups_for_deepspeed
from moe.parallel.deepspeed.markers import EXPERT_WEIGHTS, DeepSpeedModule, MoEMarker
from moe.parallel.expert_parallel import apply_expert_parallel, is_expert_param
from moe.parallel.groups import expert_parallel_layout

log = logging.getLogger(__name__)


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
    share_cores()
    if on_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", verbose=False)
    else:  # a caller (a test harness, torchrun code) made the group; DeepSpeed adopts it
        deepspeed.init_distributed(verbose=False)
    if not on_cuda:
        _release_shm_names()
    return torch.device(f"cuda:{local_rank}") if on_cuda else torch.device("cpu")


def share_cores() -> int | None:
    """Give this rank its share of the machine's cores: ``torch.set_num_threads(cores // ranks on this machine)``.

    torch starts one intra-op (OpenMP) thread per core in every process, so N ranks on one machine run N× as many
    threads as there are cores. GNU OpenMP's idle threads spin-wait (``GOMP_SPINCOUNT``: 300,000 spins, or 100
    once it manages more threads than cores), so every parallel region's worker, and the thread waiting at its
    barrier, spin on the cores the other ranks need. Measured with 2 ranks on 2 cores (docs/benchmarks.md):
    80% of a rank's cycles in libgomp and expert parallelism 2 at ZeRO 0 several times slower than at ZeRO 1/2,
    which escaped only because gloo's worker thread runs a parallel copy in ZeRO's first step and so throttles
    the spinning. torchrun sets ``OMP_NUM_THREADS=1`` per rank for the same reason; the DeepSpeed launcher does
    only with ``--bind_cores_to_rank``. Ranks on this machine: ``LOCAL_WORLD_SIZE`` (torchrun) or ``LOCAL_SIZE``
    (DeepSpeed's launcher). A user's ``OMP_NUM_THREADS`` is left alone.

    Returns:
        this rank's intra-op threads now, or None when it was left alone (one rank here, or OMP_NUM_THREADS set).
    """
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"
    ranks = int(local) if local.isdigit() else 1
    if "OMP_NUM_THREADS" in os.environ or ranks <= 1:
        return None
    threads = min(torch.get_num_threads(), max(1, len(os.sched_getaffinity(0)) // ranks))
    torch.set_num_threads(threads)
    log.info("%d ranks on this machine: %d intra-op thread(s) per rank (OMP_NUM_THREADS sets another number)",
             ranks, threads)
    return threads


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
            self.ep_group = expert_groups_for_deepspeed(self.world_size, self.rank, self.ep_size)
            apply_expert_parallel(model, self.ep_group)
        elif self.ep_size > 1:
            raise ValueError("parallel.expert_parallel_size > 1 needs MoE layers (model.moe is null)")
        self.num_experts = layers[0].num_experts if layers else 0
        self.layers = layers
        model.to(self.device)
        self.module = DeepSpeedModule(model, [MoEMarker(l.experts, l.num_experts, self.ep_size) for l in layers])

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
            for name in EXPERT_WEIGHTS:
                w = getattr(layer.experts, name).detach().contiguous()
                parts = [torch.empty_like(w) for _ in range(self.ep_size)]
                dist.all_gather(parts, w, group=self.ep_group)
                full[(layer, name)] = torch.cat(parts).cpu()
        if self.rank != 0:
            return None
        state = model_state(model)
        names = {id(getattr(l.experts, n)): (l, n) for l in self.layers for n in EXPERT_WEIGHTS}
        for key, q in model.named_parameters():
            if id(q) in names:
                state[key] = full[names[id(q)]]
        return state

    # -- checkpoints (moe.parallel.deepspeed.checkpoint) ------------------------------------------------------

    def save(self, root: Path, step: int, keep: int) -> None:
        """Every rank calls it; see ``checkpoint.save``."""
        checkpoint.save(self, root, step, keep)

    def resume(self, root: Path) -> int:
        """Every rank calls it; see ``checkpoint.resume``."""
        return checkpoint.resume(self, root)
