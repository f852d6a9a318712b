"""Benchmark one MoE layer, forward + backward, against the FLOP-matched dense SwiGLU and peer implementations.

    .venv/bin/python -m moe.tools.bench_layer [--json FILE] [--quick] [--cases NAME ...] [--impls NAME ...] [--repeats N]

Per case it times, in the same run: our MoE layer with each available expert backend (router, permutation
and combine included), a dense SwiGLU with the same active FLOPs (intermediate k·F: the speed limit),
`transformers`' Mixtral sparse-MoE block with its `eager` and `grouped_mm` experts, DeepSpeed's MoE
layer (top-k gate; dropless where it allows) and, on a GPU where it is installed, MegaBlocks' dropless MoE
(``dMoE``). fp32 on a CPU, bf16 on a GPU.

Timing: after two warm-up runs of each, the implementations run in interleaved rounds (one run of each per
round, ``--repeats`` rounds, the order rotated by one each round), so drift in the machine's speed hits all of them alike. ``median_ms`` is the
median over rounds; ``ratio_vs_dense`` the median over rounds of (this run / the dense run of the same
round). Memory: ``saved_mb`` is the activation memory autograd keeps from forward to backward (unique
storages saved for backward, not counting the parameters and the layer input); on a GPU ``peak_mb`` is the
peak allocated during forward + backward above what was allocated before.
Prints a table and writes one JSON record per (case, implementation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe.kernels import backends
from moe.config import MoEConfig, RouterConfig
from moe.ffn import SwiGLU
from moe.layer import MoELayer


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    hidden: int
    experts: int
    top_k: int
    expert_hidden: int


CASES = [
    Case("T4096-D512-E8k2-F1024", 4096, 512, 8, 2, 1024),
    Case("T4096-D1024-E8k2-F1024", 4096, 1024, 8, 2, 1024),
    Case("T16384-D512-E8k2-F1024", 16384, 512, 8, 2, 1024),
    Case("T4096-D512-E64k8-F128", 4096, 512, 64, 8, 128),
    Case("T16384-D1024-E64k8-F128", 16384, 1024, 64, 8, 128),
    Case("T4096-D512-E8k1-F1024", 4096, 512, 8, 1, 1024),
]
QUICK = ["T4096-D512-E8k2-F1024"]
# Realistic sizes for a GPU (bf16), by name only (``--cases``; tools/gpu_check.sh runs them): DeepSeek-MoE-like
# fine-grained experts, and Mixtral-like wide experts at a reduced T; and a smoke case.
GPU_CASES = [
    Case("T16384-D2048-E64k8-F1408", 16384, 2048, 64, 8, 1408),
    Case("T4096-D4096-E8k2-F14336", 4096, 4096, 8, 2, 14336),
    # Not a benchmark: proves the wiring in seconds on a CPU (tools/gpu_check.sh --dry-run).
    Case("smoke-T256-D64-E4k2-F32", 256, 64, 4, 2, 32),
]


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    # Allocator and threading settings change CPU timings by tens of percent (docs/benchmarks.md).
    env = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES", "OMP_", "MKL_"))}
    if env:
        info["env"] = env
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_rounds(fns: list[Callable[[], None]], repeats: int, device: torch.device) -> list[list[float]]:
    """Wall times in ms: ``repeats`` interleaved rounds of every ``fn`` (after two warm-up calls of each), the
    order rotated by one each round; ``times[i][r]`` is fn i in round r. A fn that raised gets an empty list."""
    times: list[list[float]] = [[] for _ in fns]
    alive = [True] * len(fns)
    for r in range(repeats + 2):
        # Each round starts one implementation later, so none always runs right after the same neighbour.
        for i in [(j + r) % len(fns) for j in range(len(fns))]:
            fn = fns[i]
            if not alive[i]:
                continue
            _sync(device)
            start = time.perf_counter()
            try:
                fn()
            except Exception:  # it ran once already (``memory_of``); a later failure drops it
                alive[i], times[i] = False, []
                continue
            _sync(device)
            if r >= 2:
                times[i].append((time.perf_counter() - start) * 1e3)
    return times


def memory_of(fn: Callable[[], None], module: torch.nn.Module, x: torch.Tensor, device: torch.device) -> dict:
    """``saved_mb``: unique storages autograd saves during one forward + backward, less the parameters' and
    the input's; on a GPU also ``peak_mb``. Raises what ``fn`` raises."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    out = {"saved_mb": round(sum(saved.values()) / 2**20, 2)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["peak_mb"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 2)
    return out


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor, call: Callable) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        out = call(module, x)
        out.float().sum().backward()

    return run


def ours(case: Case, backend: str, device, dtype) -> torch.nn.Module:
    cfg = MoEConfig(num_experts=case.experts, expert_hidden_size=case.expert_hidden, backend=backend,
                    router=RouterConfig(top_k=case.top_k, renormalize=True, aux_loss_coef=0.01))
    return MoELayer(cfg, case.hidden).to(device, dtype)


def _ours_call(layer, x):
    out, routing = layer(x)
    return out + sum(routing.losses.values())


def hf_mixtral(case: Case, impl: str, device, dtype) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=case.hidden, intermediate_size=case.expert_hidden,
                        num_local_experts=case.experts, num_experts_per_tok=case.top_k,
                        experts_implementation=impl)
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block.to(device, dtype)


def deepspeed_moe(case: Case, device, dtype) -> torch.nn.Module:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    expert = SwiGLU(case.hidden, case.expert_hidden)
    # drop_tokens=False is DeepSpeed's dropless mode.
    return MoE(hidden_size=case.hidden, expert=expert, num_experts=case.experts, ep_size=1, k=case.top_k,
               capacity_factor=1.0, drop_tokens=False, use_residual=False).to(device, dtype)


def megablocks_dmoe(case: Case, device, dtype) -> torch.nn.Module:
    """MegaBlocks' dropless MoE (``dMoE``) with GLU (SwiGLU) experts and its grouped GEMM. CUDA only."""
    if device.type != "cuda":
        raise RuntimeError("MegaBlocks' dMoE needs a CUDA device")
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    args = Arguments(hidden_size=case.hidden, ffn_hidden_size=case.expert_hidden, moe_num_experts=case.experts,
                     moe_top_k=case.top_k, mlp_type="glu", mlp_impl="grouped", activation_fn=torch.nn.functional.silu,
                     bias=False, return_bias=False, fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16,
                     device=device, moe_loss_weight=0.01)
    return dMoE(args)


def _megablocks_call(layer, x):
    from megablocks.layers.moe import clear_load_balancing_loss

    out = layer(x)
    clear_load_balancing_loss()  # it keeps every forward's routing for its loss; nothing here reads it
    return out


def _ds_call(layer, x):
    out, aux, _ = layer(x)
    return out + aux


def _call(layer, x):
    return layer(x)


# The peers after our layer: name, build(case, device, dtype), call(module, x). The builders are looked up when
# called, so that tests can replace one.
PEERS: list[tuple[str, Callable, Callable]] = [
    ("hf-mixtral-eager", lambda c, d, t: hf_mixtral(c, "eager", d, t), _call),
    ("hf-mixtral-grouped_mm", lambda c, d, t: hf_mixtral(c, "grouped_mm", d, t), _call),
    ("deepspeed-moe", lambda c, d, t: deepspeed_moe(c, d, t), _ds_call),
    ("megablocks-dmoe", lambda c, d, t: megablocks_dmoe(c, d, t), _megablocks_call),
]


def impl_names() -> list[str]:
    """Every implementation the tool knows, in table order (those that cannot run here are reported)."""
    return ["dense-swiglu"] + [f"ours-{b}" for b in backends.BACKENDS] + ["ours-auto"] + [p[0] for p in PEERS]


def bench_case(case: Case, repeats: int, device: torch.device, dtype: torch.dtype,
               only: list[str] | None = None) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(1, case.tokens, case.hidden, device=device, dtype=dtype, requires_grad=True)
    impls: list[tuple[str, Callable[[], torch.nn.Module], Callable]] = [
        ("dense-swiglu", lambda: SwiGLU(case.hidden, case.top_k * case.expert_hidden).to(device, dtype), _call),
    ]
    for backend in backends.BACKENDS:
        ok, why = backends.backend_status(backend, device, dtype, case.hidden, 2 * case.expert_hidden)
        if backend == "triton" and device.type == "cpu":
            ok = False  # the interpreter is for correctness only
        if ok:
            impls.append((f"ours-{backend}", lambda b=backend: ours(case, b, device, dtype), _ours_call))
    impls.append(("ours-auto", lambda: ours(case, "auto", device, dtype), _ours_call))
    impls += [(name, lambda build=build: build(case, device, dtype), call) for name, build, call in PEERS]
    if only:
        impls = [impl for impl in impls if impl[0] in only]

    records, runs = [], []
    for name, build, call in impls:
        record = {"case": case.name, "impl": name, "tokens": case.tokens, "hidden": case.hidden,
                  "experts": case.experts, "top_k": case.top_k, "expert_hidden": case.expert_hidden,
                  "dtype": str(dtype).removeprefix("torch.")}
        try:  # a peer that cannot run here is reported, not fatal
            module = build()
            run = _fwd_bwd(module, x, call)
            record.update(memory_of(run, module, x, device))
            runs.append(run)
        except Exception as e:
            record["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            runs.append(None)
        records.append(record)
    live = [i for i, run in enumerate(runs) if run is not None]
    times = time_rounds([runs[i] for i in live], repeats, device)
    dense = next((t for i, t in zip(live, times) if records[i]["impl"] == "dense-swiglu"), [])
    for i, samples in zip(live, times):
        record = records[i]
        if not samples:
            record["error"] = "failed while being timed"
            continue
        record["median_ms"] = round(statistics.median(samples), 3)
        record["samples_ms"] = [round(t, 3) for t in samples]
        if dense:
            record["ratio_vs_dense"] = round(statistics.median(t / d for t, d in zip(samples, dense)), 3)
    for record in records:
        if "median_ms" in record:
            ratio = f"{record['ratio_vs_dense']:.2f}x" if "ratio_vs_dense" in record else "    -"
            line = f"{record['median_ms']:9.1f} ms  {ratio}  saved {record['saved_mb']:8.1f} MB"
        else:
            line = f"error: {record['error']}"
        print(f"{case.name:26s} {record['impl']:24s} {line}", flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe bench layer", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--cases", nargs="*", help=f"case names (default: all but the GPU ones): "
                        f"{', '.join(c.name for c in CASES + GPU_CASES)}")
    parser.add_argument("--impls", nargs="*", help="implementations to time (default: all; ratios need "
                        f"dense-swiglu): {', '.join(impl_names())}")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds (default 7)")
    args = parser.parse_args(argv)
    unknown_impls = sorted(set(args.impls or []) - set(impl_names()))
    if unknown_impls:
        parser.error(f"unknown implementation {unknown_impls[0]}; valid: {', '.join(impl_names())}")
    names = QUICK if args.quick else args.cases or [c.name for c in CASES]
    unknown = sorted(set(names) - {c.name for c in CASES + GPU_CASES})
    if unknown:
        parser.error(f"unknown case {unknown[0]}; valid: {', '.join(c.name for c in CASES + GPU_CASES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = []
    for case in CASES + GPU_CASES:
        if case.name in names:
            records.extend(bench_case(case, args.repeats, device, dtype, args.impls))
    result = {"machine": machine(), "repeats": args.repeats, "records": records}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
