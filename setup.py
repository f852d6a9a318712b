"""Install with ``pip install -e .[test]``; ``scripts/setup_env.sh`` does it in ``.venv`` without letting pip
choose a CUDA torch on a CPU machine."""

from pathlib import Path

from setuptools import setup

_ROOT_FOLDERS = ("kernels", "routing", "parallel", "tools", "recipes")


def _packages() -> list[str]:
    """``moe`` and every folder inside it or inside a root folder (``parallel/deepspeed`` -> ``moe.parallel.deepspeed``).
    The links moe/kernels etc. are skipped: the root folders are listed under their own names."""
    here = Path(__file__).parent
    found = []
    for root, name in [("moe", "moe"), *((f, f"moe.{f}") for f in _ROOT_FOLDERS)]:
        base = here / root
        for folder in [base, *sorted(p for p in base.rglob("*") if p.is_dir())]:
            parts = folder.relative_to(base).parts
            inside_link = any((base / Path(*parts[:i + 1])).is_symlink() for i in range(len(parts)))
            if not inside_link and "__pycache__" not in parts:
                found.append(".".join([name, *parts]))
    return found


setup(
    name="moe-train",
    version="0.1.0",
    description="Mixture-of-Experts training: routers, grouped-GEMM experts, expert parallelism, upcycling, export",
    python_requires=">=3.10",
    # One import root: everything installs under ``moe``. The folders kernels/, routing/, parallel/, tools/ and
    # recipes/ sit at the repository root (the design's layout) and install as moe.kernels, moe.routing, ...
    # They have no __init__.py on purpose: a source checkout on sys.path (pytest, ``python -m`` from the root)
    # then never shadows another distribution's top-level package of the same name (Hugging Face's
    # ``kernels``, which transformers requires; PyPI's ``tools``), since a regular package anywhere on sys.path
    # wins over a namespace portion. The symlinks moe/kernels -> ../kernels etc. make a source checkout import
    # exactly like the wheel.
    packages=_packages(),
    package_dir={"moe": "moe", **{f"moe.{name}": name for name in _ROOT_FOLDERS}},
    # moe/hf/remote_code/: templates that export copies into model folders (transformers imports them there).
    package_data={"moe.recipes": ["*.yaml"], "moe.hf": ["remote_code/*.py"]},
    # NOTE: torch is a floor only. scripts/setup_env.sh installs the CPU build (or keeps a GPU machine's own
    # torch) before this, so pip never resolves torch itself.
    install_requires=[
        "torch>=2.4",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tokenizers>=0.19",
        "datasets>=2.19",
        "tensorboard>=2.14",
        "matplotlib>=3.7",  # TensorBoard's expert-load pictures, moe plot
        "deepspeed>=0.14",
        "triton>=3.0; platform_system == 'Linux'",
        "gguf>=0.17",  # moe export --format gguf writes GGUF files for llama.cpp with it
    ],
    extras_require={
        "hf": ["transformers>=4.46"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.46"],
        # llama.cpp's Python binding (built from source, ~10 minutes): tests/moe/hf/test_gguf_llama_cpp.py runs a GGUF
        # export in llama.cpp itself when it is installed.
        "llama": ["llama-cpp-python>=0.3"],
        # MegaBlocks pins one old torch and builds CUDA code: GPU machines only.
        "megablocks": ["megablocks"],
    },
    entry_points={"console_scripts": ["moe=moe.cli:main"]},
)
