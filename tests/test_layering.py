"""Imports flow one way: kernels and routing -> the model (``moe`` core) -> parallel -> entry points (the CLI,
the trainer, tools). Parsed from the source (imports inside functions count too), so a cycle cannot hide in a
lazy import; and importing a low layer loads nothing above it.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Folder at the repository root -> its import name (setup.py maps them so).
ROOTS = {"moe": "moe", "kernels": "moe.kernels", "routing": "moe.routing", "parallel": "moe.parallel",
         "tools": "moe.tools"}
# Module-name prefixes of each layer, lowest first; a module belongs to the layer of its longest prefix, and
# everything else under ``moe`` is the model core.
LAYERS = {
    "kernels": 0, "routing": 0, "core": 1, "parallel": 2, "entry": 3,
}
PREFIXES = {
    "moe.kernels": "kernels",
    "moe.routing": "routing",
    "moe.parallel": "parallel",
    "moe.tools": "entry",
    "moe.cli": "entry",
    "moe.__main__": "entry",
    "moe.train": "entry",
    "moe.trainer": "entry",
    "moe.engine": "entry",
    "moe.generate": "entry",
}


def layer_of(module: str) -> str:
    best = max((p for p in PREFIXES if module == p or module.startswith(p + ".")), key=len, default=None)
    return PREFIXES[best] if best else "core"


@functools.cache
def project_modules() -> dict[str, Path]:
    """Every module the project installs, by import name."""
    out = {}
    for folder, name in ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            if ".venv" in path.parts:
                continue
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest project module that ``name`` is or lies in (None outside the project)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``module`` imports anywhere in its source. Its own enclosing packages and the
    root ``moe`` package (kept light, see ``test_low_layers_load_nothing_above_them``) are not counted."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [_resolve(a.name, known) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from pkg import name``: the submodule pkg.name when there is one, else pkg itself
            targets = [_resolve(f"{prefix}.{a.name}", known) if f"{prefix}.{a.name}" in known
                       else _resolve(prefix, known) for a in node.names]
        else:
            continue
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, len(module.split(".")))}
        found.update(t for t in targets if t and t != module and t != "moe" and t not in ancestors)
    return found


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_no_module_imports_a_higher_layer():
    bad = [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})" for m, deps in sorted(graph().items()) for d in sorted(deps)
           if LAYERS[layer_of(d)] > LAYERS[layer_of(m)]]
    assert not bad, "\n".join(bad)


def test_kernels_and_routing_do_not_import_each_other():
    bad = [f"{m} imports {d}" for m, deps in graph().items() for d in deps
           if {layer_of(m), layer_of(d)} == {"kernels", "routing"}]
    assert not bad, "\n".join(bad)


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules():
    cycles = _cycles(graph())
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def unit_of(module: str) -> str:
    """The package a module belongs to; the modules directly under ``moe`` count as two units, the model core
    (``moe``) and the entry points (``moe:entry``), since the layers put them on either side of ``moe.parallel``."""
    if project_modules()[module].name == "__init__.py":
        return module  # a package's own __init__
    parent = module.rsplit(".", 1)[0] if "." in module else module
    if parent == "moe" and layer_of(module) == "entry":
        return "moe:entry"
    return parent


def test_no_import_cycle_between_packages():
    units: dict[str, set[str]] = {}
    for m, deps in graph().items():
        units.setdefault(unit_of(m), set()).update(unit_of(d) for d in deps if unit_of(d) != unit_of(m))
    cycles = _cycles(units)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_low_layers_load_nothing_above_them():
    code = ("import json, sys; import moe.kernels.ops, moe.routing.registry; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'moe' or m.startswith('moe.'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=REPO).stdout)
    above = [m for m in loaded if m != "moe" and layer_of(m) not in ("kernels", "routing")]
    assert not above, above
