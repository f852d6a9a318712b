"""Does the installed torch have every torch API our code names? For the GPU machines' torch 2.11 (the suite runs
2.13): ``tools/gpu_check.sh`` runs it there.

    python -m moe.tools.torch_api_check [--json FILE]

Reads the package's sources (moe/, kernels/, routing/, parallel/, tools/), resolves import aliases
(``import torch.nn.functional as F``, ``from torch import nn``, ``import torch.distributed as dist``) and looks up
every dotted name under ``torch`` that the code uses (``F.grouped_mm``, ``torch._grouped_mm``,
``dist.all_to_all_single``, ...) in the installed torch. Names reached through ``getattr`` with a fallback are
the code's own business and not listed: ``torch_grouped_mm`` picks ``torch.nn.functional.grouped_mm`` or
``torch._grouped_mm``, whichever exists. Exit status 1 when a name is missing.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("moe", "kernels", "routing", "parallel", "tools")


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted torch path, from the file's imports."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch" or a.name.startswith("torch."):
                    names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module == "torch"
                                                                     or node.module.startswith("torch.")):
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def used_names(files: list[Path]) -> dict[str, list[str]]:
    """Dotted torch names used in ``files`` -> the files (relative to the repository) that use them."""
    found: dict[str, set[str]] = {}
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases = _aliases(tree)
        where = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        for target in aliases.values():
            found.setdefault(target, set()).add(where)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            parts, inner = [], node
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in aliases:
                found.setdefault(".".join([aliases[inner.id], *reversed(parts)]), set()).add(where)
    return {name: sorted(files) for name, files in sorted(found.items())}


def resolve(name: str) -> bool:
    """Whether ``name`` (``torch.a.b``) exists: attribute by attribute, importing submodules as needed."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, attr in enumerate(parts[1:], start=1):
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ImportError:
            return False
    return True


def source_files() -> list[Path]:
    return sorted(p for d in SOURCES for p in (ROOT / d).rglob("*.py") if not p.is_symlink())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe.tools.torch_api_check", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write {torch, checked, missing} to this file")
    args = parser.parse_args(argv)
    names = used_names(source_files())
    missing = {name: files for name, files in names.items() if not resolve(name)}
    for name, files in missing.items():
        print(f"missing in torch {torch.__version__}: {name} (used in {', '.join(files)})")
    print(f"torch {torch.__version__}: {len(names) - len(missing)} of {len(names)} torch names used by the code exist")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "checked": len(names),
                                               "missing": missing}, indent=1))
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
