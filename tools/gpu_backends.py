"""Every expert backend against the reference in bf16 at realistic MoE shapes: the routed-expert block's output
and every gradient (input, both expert weight tensors, combine weights), its forward + backward time, and (``--tiles``)
the time of each Triton tile candidate.

    python -m moe.tools.gpu_backends [--dry-run] [--tiles] [--json FILE]

Cases (a GPU): T=16384 D=2048 E=64 k=8 F=1408 (DeepSeek-MoE-like) and T=4096 D=4096 E=8 k=2 F=14336
(Mixtral-like, T reduced). ``--dry-run``: one tiny case on this machine (the Triton backend under the
interpreter), to prove the wiring on a CPU.

Accuracy: each backend runs ``moe.kernels.ops.experts_combine`` on bf16 inputs; the ground truth is the
``reference`` backend on the same values in fp32. Error of a tensor = ||got - truth|| / ||truth|| (Frobenius);
the limit ``TOLERANCE`` is a few bf16 roundings (2^-8 each) of the intermediate activations. Routing: each
token's top-k of random logits, softmax weights, rows sorted by expert (``counts`` as the layer makes them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict

import torch

from moe.tools.bench_layer import Case  # the layer shapes, as the layer benchmark names them

TOLERANCE = 1e-2


GPU_CASES = [Case("T16384-D2048-E64k8-F1408", 16384, 2048, 64, 8, 1408),
             Case("T4096-D4096-E8k2-F14336", 4096, 4096, 8, 2, 14336)]
DRY_CASES = [Case("T64-D32-E4k2-F16", 64, 32, 4, 2, 16)]
BACKENDS = ("reference", "torch", "triton", "auto", "megablocks")


def inputs(case: Case, device: torch.device) -> dict:
    """bf16 leaf tensors and a routing, made on ``device`` from one seed."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    T, D, E, k, F = case.tokens, case.hidden, case.experts, case.top_k, case.expert_hidden
    logits = torch.randn(T, E, generator=gen)
    top_w, top_e = torch.softmax(logits, -1).topk(k, dim=-1)
    expert_A = top_e.flatten()
    order = torch.argsort(expert_A, stable=True)
    t = {"x": torch.randn(T, D, generator=gen),
         "w_gate_up": torch.randn(E, D, 2 * F, generator=gen) / D**0.5,
         "w_down": torch.randn(E, F, D, generator=gen) / F**0.5,
         "weight": top_w.flatten()[order]}
    t = {name: v.to(device, torch.bfloat16).requires_grad_() for name, v in t.items()}
    t["rows"] = torch.arange(T).repeat_interleave(k)[order].to(device)
    t["counts"] = torch.bincount(expert_A, minlength=E).to(device)
    return t


def run(t: dict, backend: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Forward + backward of the expert block; returns the output and the gradients (in ``dtype`` inputs)."""
    from moe.kernels.ops import experts_combine

    leaves = {name: t[name].detach().to(dtype).requires_grad_() for name in ("x", "w_gate_up", "w_down", "weight")}
    out = experts_combine(leaves["x"], t["rows"], leaves["weight"], t["counts"], leaves["w_gate_up"],
                          leaves["w_down"], backend=backend)
    gen = torch.Generator(device="cpu").manual_seed(1)
    dout = torch.randn(out.shape, generator=gen).to(out.device, dtype)
    out.backward(dout)
    return {"out": out.detach(), **{f"d{name}": leaf.grad for name, leaf in leaves.items()}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (Triton compiles here)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 3)


def check_case(case: Case, device: torch.device, repeats: int) -> list[dict]:
    from moe.kernels.backends import backend_status, resolve_block_backend

    t = inputs(case, device)
    truth = run(t, "reference", torch.float32)
    records = []
    for backend in BACKENDS:
        record = {"case": case.name, "backend": backend, **asdict(case)}
        if backend != "auto":
            ok, why = backend_status(backend, device, torch.bfloat16, case.hidden, 2 * case.expert_hidden)
            if not ok:
                records.append({**record, "skipped": why})
                print(f"{case.name:26s} {backend:10s} skipped: {why}", flush=True)
                continue
        else:
            record["resolves_to"] = resolve_block_backend("auto", t["x"], t["w_gate_up"])
        try:
            got = run(t, backend, torch.bfloat16)
            errors = {name: (got[name].double() - truth[name].double()).norm().item()
                      / max(truth[name].double().norm().item(), 1e-30) for name in truth}
            record["errors"] = {name: float(f"{e:.3g}") for name, e in errors.items()}
            record["ok"] = all(e <= TOLERANCE for e in errors.values())
            record["fwd_bwd_ms"] = time_ms(lambda: run(t, backend, torch.bfloat16), device, repeats)
        except Exception as err:  # noqa: BLE001 - a backend that fails is a record, not the end of the check
            record.update(ok=False, error=f"{type(err).__name__}: {err}".splitlines()[0][:300])
        records.append(record)
        shown = (f"max error {max(record['errors'].values()):.2e}  {record['fwd_bwd_ms']:9.2f} ms"
                 if "errors" in record else record["error"])
        print(f"{case.name:26s} {backend:10s} {'ok ' if record['ok'] else 'BAD'} {shown}", flush=True)
    return records


def tile_candidates(arch: int) -> dict[str, list]:
    """The table's 16-bit tiles for ``arch``'s family and a few neighbours, every one a wgmma shape on sm_90."""
    from moe.kernels import triton_tiles
    from moe.kernels.triton_tiles import Tile

    fam = triton_tiles.family(arch)
    table = {f"mm_{r}": triton_tiles.TABLE[("mm", fam, "16bit", r)] for r in ("few", "many")}
    table["dw"] = triton_tiles.TABLE[("dw", fam, "16bit", "any")]
    mm = [table["mm_few"], table["mm_many"], Tile(128, 256, 64, 8, 3), Tile(128, 64, 64, 4, 4),
          Tile(64, 256, 64, 8, 3)]
    dw = [table["dw"], Tile(128, 128, 64, 8, 3), Tile(128, 256, 64, 8, 3), Tile(64, 128, 64, 4, 3)]
    return {"mm": list(dict.fromkeys(mm)), "dw": list(dict.fromkeys(dw)), "table": table}


def sweep_tiles(case: Case, device: torch.device, repeats: int, first_only: bool = False) -> list[dict]:
    """Forward + backward of the gate/up gather GEMM (the largest) with each mm tile (dw at the table's), then
    each dw tile (mm at the table's); ``first_only``: one of each (the dry run)."""
    from moe.kernels import ops, triton_tiles

    arch = 0 if device.type != "cuda" else (lambda c: 10 * c[0] + c[1])(torch.cuda.get_device_capability(device))
    cands = tile_candidates(arch or 90)
    t = inputs(case, device)
    original = triton_tiles.pick
    records = []

    def timed(kind: str, tile) -> None:
        def pick(kernel, *args):
            return tile if kernel == kind else original(kernel, *args)

        triton_tiles.pick = pick
        try:
            def fn():
                y = ops.gather_grouped_mm(t["x"], t["rows"], t["w_gate_up"], t["counts"], backend="triton")
                y.backward(torch.ones_like(y))
            ms = time_ms(fn, device, repeats)
            records.append({"case": case.name, "kernel": kind, "tile": tile._asdict(), "fwd_bwd_ms": ms})
            print(f"{case.name:26s} {kind} tile {tuple(tile)}: {ms:9.2f} ms", flush=True)
        except Exception as err:  # noqa: BLE001
            records.append({"case": case.name, "kernel": kind, "tile": tile._asdict(),
                            "error": f"{type(err).__name__}: {err}".splitlines()[0][:300]})
        finally:
            triton_tiles.pick = original

    for tile in cands["mm"][:1] if first_only else cands["mm"]:
        timed("mm", tile)
    for tile in cands["dw"][:1] if first_only else cands["dw"]:
        timed("dw", tile)
    return records


def _write(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe.tools.gpu_backends", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="one tiny case on this machine")
    parser.add_argument("--tiles", action="store_true", help="also time every Triton tile candidate")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the records to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry_run:
        parser.error("no CUDA device: this check is for a GPU (use --dry-run on a CPU)")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"  # before moe.kernels.triton_grouped_mm is imported
    cases = DRY_CASES if args.dry_run else GPU_CASES
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "tolerance": TOLERANCE, "records": [], "tiles": []}
    records, tiles = result["records"], result["tiles"]
    for case in cases:  # the JSON is rewritten after each step, so a run stopped by a time limit keeps its results
        records += check_case(case, device, args.repeats)
        _write(args.json, result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for case in cases if args.tiles else []:
        tiles += sweep_tiles(case, device, args.repeats, first_only=args.dry_run)
        _write(args.json, result)
    bad = [r for r in records if r.get("ok") is False] + [r for r in tiles if "error" in r]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
