"""Corpus sources: the embedded default (the standard library's sources), the sources of installed Python
packages (``python:stdlib,torch``), local files, or a Hub dataset.

Every source becomes a ``datasets.Dataset`` with one column, ``text``, one document per row. Problems with
the source (missing, empty, undecodable, a missing text field) are one-line ``ValueError``s naming it.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import logging
import sysconfig
from pathlib import Path

import datasets

from moe.config import DataConfig

log = logging.getLogger(__name__)

_TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
_JSON_SUFFIXES = {".json", ".jsonl"}


PYTHON_PREFIX = "python:"


def _py_files(root: Path) -> list[Path]:
    """``root``'s ``.py`` files in sorted path order, without folders named ``test`` or ``site-packages`` below
    ``root`` (the rule the default corpus has always used: another would change the default corpus)."""
    return sorted(p for p in root.rglob("*.py") if not {"test", "site-packages"} & set(p.relative_to(root).parts))


def _read_documents(files: list[Path], max_chars: int | None) -> tuple[list[str], int]:
    """The UTF-8 texts of ``files`` in order (unreadable ones skipped), cut at ``max_chars`` in all."""
    docs, total = [], 0
    for path in files:
        if max_chars is not None and total >= max_chars:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if max_chars is not None and total + len(text) > max_chars:
            text = text[: max_chars - total]
        if text:
            docs.append(text)
            total += len(text)
    return docs, total


def stdlib_documents(max_chars: int | None) -> list[str]:
    """The standard library's ``.py`` sources in sorted path order (deterministic), up to ``max_chars``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = _read_documents(_py_files(root), max_chars)
    if not docs:
        raise ValueError(f"the standard library at {root} has no readable .py files; set data.source")
    log.info("default corpus: %d characters from %d files under %s", total, len(docs), root)
    return docs


def _package_root(name: str) -> Path:
    """The folder of the installed top-level package ``name`` (found without importing it)."""
    if name == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    valid = f"{PYTHON_PREFIX}NAME[,NAME...] takes 'stdlib' or installed top-level packages, e.g. python:stdlib,torch"
    if not name.isidentifier():
        raise ValueError(f"data.source: {name!r} is not a package name; {valid}")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"data.source: no installed package {name!r}; {valid}")
    return Path(next(iter(spec.submodule_search_locations)))


def python_documents(source: str, max_chars: int | None) -> list[str]:
    """``python:NAME[,NAME...]``: the ``.py`` sources of the named installed packages (``stdlib``: the standard
    library, as the default corpus) in the order named, each in sorted path order, test folders left out, up
    to ``max_chars`` in all. Deterministic for fixed package versions (torch is pinned, so
    ``python:stdlib,torch`` is the same text on every machine with the same Python and torch)."""
    names = [n.strip() for n in source[len(PYTHON_PREFIX):].split(",")]
    if not all(names):
        raise ValueError(f"data.source: {source!r} has an empty package name; e.g. python:stdlib,torch")
    files = [f for name in names for f in _py_files(_package_root(name))]
    docs, total = _read_documents(files, max_chars)
    if not docs:
        raise ValueError(f"data.source: {source} has no readable .py files")
    versions = ", ".join(f"{n} {_version(n)}" for n in names)
    log.info("%s: %d characters from %d files (%s)", source, total, len(docs), versions)
    return docs


def _version(name: str) -> str:
    if name == "stdlib":
        return "Python " + sysconfig.get_python_version()
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "version unknown"


def _local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"data.source: directory {path} contains no files")
        return files
    matches = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    return matches


def _format_of(files: list[Path], fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = {p.suffix.lower() for p in files}
    if suffixes <= _JSON_SUFFIXES:
        return "json"
    if suffixes == {".parquet"}:
        return "parquet"
    if suffixes <= _TEXT_SUFFIXES:
        return "text"
    known = _JSON_SUFFIXES | _TEXT_SUFFIXES | {".parquet"}
    odd = [p for p in files if p.suffix.lower() not in known] or files  # unknown kinds, else a mix of known ones
    shown = sorted({p.suffix.lower() for p in odd}, key=lambda x: (x != "", x))
    examples = {}
    for p in odd:  # one file of each kind
        examples.setdefault(p.suffix.lower(), p)
    raise ValueError(
        f"data.source: cannot tell the format of {', '.join(x or 'suffix-less' for x in shown)} files; set "
        "data.format to text, json or parquet (or use one kind of file): "
        + ", ".join(str(examples[x]) for x in shown[:4])
    )


def _may_be_hub_name(source: str) -> bool:
    """Whether a ``source`` that is no local file may name a Hub dataset: not a path, glob or file name (a
    mistyped ``corpus.txt`` is reported as missing at once, not after the Hub lookup times out offline)."""
    suffix = Path(source).suffix.lower()
    return (not any(ch in source for ch in "*?") and not source.startswith((".", "/", "~"))
            and suffix not in _TEXT_SUFFIXES | _JSON_SUFFIXES | {".parquet"})


def _check_decodable(files: list[Path]) -> None:
    for path in files:
        try:
            with path.open("r", encoding="utf-8") as f:
                while f.read(1 << 20):
                    pass
        except UnicodeDecodeError as e:
            raise ValueError(f"data.source: {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _limit(ds: datasets.Dataset, max_chars: int | None) -> datasets.Dataset:
    if max_chars is None:
        return ds
    total = 0
    for i, text in enumerate(ds["text"]):
        total += len(text)
        if total >= max_chars:
            return ds.select(range(i + 1))
    return ds


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost exception: ``datasets`` wraps a parse error in a generic one."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def load_corpus(cfg: DataConfig, cache_dir: Path | None = None) -> datasets.Dataset:
    """The documents of ``cfg.source`` as a Dataset with a single ``text`` column.

    Args:
        cfg: the data section of the recipe.
        cache_dir: where ``datasets`` keeps its Arrow copies of local files (so that nothing is written outside
            the run's cache); None is the ``datasets`` default (``~/.cache/huggingface/datasets``). Hub datasets
            always use the ``datasets`` default, where earlier downloads are.
    """
    if cfg.source is None:
        return datasets.Dataset.from_dict({"text": stdlib_documents(cfg.max_chars)})
    if cfg.source.startswith(PYTHON_PREFIX):
        return datasets.Dataset.from_dict({"text": python_documents(cfg.source, cfg.max_chars)})
    files = [] if cfg.format == "hub" else _local_files(cfg.source)
    if files:
        fmt = _format_of(files, cfg.format)
        if fmt in ("text", "json"):
            _check_decodable(files)
        data_files = [str(p) for p in files]
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        verbosity = datasets.logging.get_verbosity()
        # Its ERROR log of a parse failure would be a second line next to ours, which names the cause.
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        try:
            ds = datasets.load_dataset(fmt, data_files=data_files, split="train",
                                       cache_dir=str(cache_dir) if cache_dir is not None else None, **kwargs)
        except Exception as e:  # datasets wraps parse errors in many types; name the source and the cause
            raise ValueError(f"data.source: could not read {cfg.source} as {fmt}: {_root_cause(e)}") from None
        finally:
            datasets.logging.set_verbosity(verbosity)
    elif cfg.format == "hub" or (cfg.format == "auto" and _may_be_hub_name(cfg.source)):
        try:
            ds = datasets.load_dataset(cfg.source, cfg.hub_config, split=cfg.hub_split)
        except Exception as e:
            raise ValueError(
                f"data.source: {cfg.source!r} is not a local file and could not be loaded from the Hub "
                f"({str(e).splitlines()[0][:200]})"
            ) from None
    else:
        raise ValueError(f"data.source: no such file, directory or glob match: {cfg.source}")
    if cfg.text_field not in ds.column_names:
        raise ValueError(
            f"data.text_field: column {cfg.text_field!r} not in {cfg.source}; columns: {', '.join(ds.column_names)}"
        )
    ds = ds.select_columns([cfg.text_field])
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if len(ds) == 0:
        raise ValueError(f"data.source: {cfg.source} contains no text (every {cfg.text_field!r} is empty)")
    return _limit(ds, cfg.max_chars)
