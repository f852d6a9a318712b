"""Data pipeline: sources, tokenizer, packing, cache, split, sampler; bad input gives one-line errors."""

import json

import numpy as np
import pytest

from moe.config import DataConfig
from moe.data import BlockSampler, prepare_data
from moe.data.corpus import load_corpus
from moe.data.tokenizer import EOS

DOCS = [f"def function_{i}(x):\n    return x * {i} + {i * i}  # document {i}\n" * 3 for i in range(60)]


def prep(tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return prepare_data(DataConfig(**kw), vocab_size=300, seq_len=16, progress=False)


def test_default_corpus_is_the_standard_library(tmp_path):
    ds = load_corpus(DataConfig(max_chars=50_000))
    assert sum(len(t) for t in ds["text"]) == 50_000
    assert any("def " in t for t in ds["text"])


def test_python_sources_of_installed_packages():
    from pathlib import Path

    import yaml

    # python:stdlib is the default corpus; several names concatenate in the order named, max_chars over all.
    assert load_corpus(DataConfig(source="python:stdlib", max_chars=50_000))["text"] == \
        load_corpus(DataConfig(max_chars=50_000))["text"]
    root = Path(yaml.__file__).parent
    files = sorted(p for p in root.rglob("*.py") if not {"test", "site-packages"} & set(p.relative_to(root).parts))
    expected = [f.read_text(encoding="utf-8") for f in files]
    assert load_corpus(DataConfig(source="python:yaml", max_chars=None))["text"] == [t for t in expected if t]
    both = load_corpus(DataConfig(source="python:yaml,stdlib", max_chars=sum(map(len, expected)) + 10))["text"]
    assert both[: len(expected)] == expected and len(both[-1]) == 10


@pytest.mark.parametrize("source, message", [
    ("python:no_such_package_xyz", "no installed package 'no_such_package_xyz'; python:NAME[,NAME...] takes"),
    ("python:torch,", "has an empty package name"),
    ("python:../etc", "'../etc' is not a package name"),
])
def test_bad_python_sources_are_one_line_errors(source, message):
    with pytest.raises(ValueError) as err:
        load_corpus(DataConfig(source=source))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("fmt", ["txt-dir", "jsonl", "parquet"])
def test_local_sources(tmp_path, fmt):
    if fmt == "txt-dir":
        src = tmp_path / "docs"
        src.mkdir()
        for i, d in enumerate(DOCS):
            (src / f"{i:03d}.txt").write_text(d)
        cfg = {"source": str(src)}
    elif fmt == "jsonl":
        src = tmp_path / "d.jsonl"
        src.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
        cfg = {"source": str(src), "text_field": "body"}
    else:
        import datasets

        src = tmp_path / "d.parquet"
        datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(src))
        cfg = {"source": str(src)}
    ds = load_corpus(DataConfig(**cfg, max_chars=None))
    assert sorted(ds["text"]) == sorted(DOCS) and ds.column_names == ["text"]
    data = prep(tmp_path, **cfg)
    assert data.train_blocks.shape[1] == 17 and len(data.val_blocks) >= 1
    assert data.tokenizer.get_vocab_size() == 300 and data.tokenizer.token_to_id(EOS) is not None


def test_packing_round_trips_the_text_and_split_is_by_document(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    data = prep(tmp_path, source=str(src), val_fraction=0.2)
    blocks = np.asarray(data.train_blocks)
    # consecutive blocks overlap by exactly one token (stride S, length S + 1)
    assert (blocks[1:, 0] == blocks[:-1, -1]).all()

    def unpack(b):
        return data.tokenizer.decode(list(np.concatenate([b[0]] + [row[1:] for row in b[1:]])),
                                     skip_special_tokens=False)

    text, val_text = unpack(blocks), unpack(np.asarray(data.val_blocks))
    pieces = [p for p in text.split(EOS) if p]
    assert pieces[1] in DOCS  # whole documents survive packing
    val_docs = {p for p in val_text.split(EOS) if p in DOCS}
    assert val_docs and not any(d in text for d in val_docs)  # no document on both sides


def test_cache_is_reused_and_keyed_by_settings(tmp_path):
    a = prep(tmp_path, max_chars=20_000)
    meta = a.cache_dir / "meta.json"
    mtime = meta.stat().st_mtime_ns
    b = prep(tmp_path, max_chars=20_000)
    assert b.cache_dir == a.cache_dir and meta.stat().st_mtime_ns == mtime
    assert np.array_equal(np.asarray(a.train_blocks), np.asarray(b.train_blocks))
    c = prep(tmp_path, max_chars=21_000)
    assert c.cache_dir != a.cache_dir


def test_loaded_tokenizer_and_vocab_mismatch(tmp_path):
    a = prep(tmp_path, max_chars=20_000)
    loaded = prep(tmp_path, max_chars=20_000, tokenizer=str(a.tokenizer_path))
    assert loaded.tokenizer.get_vocab_size() == 300
    with pytest.raises(ValueError, match="has 300 tokens but model.vocab_size is 280; set model.vocab_size >= 300"):
        prepare_data(DataConfig(max_chars=20_000, tokenizer=str(a.tokenizer_path), cache_dir=str(tmp_path)),
                     vocab_size=280, seq_len=16, progress=False)


@pytest.mark.parametrize(
    "setup,message",
    [
        ("missing", "data.source: no such file, directory or glob match"),
        ("empty", "contains no text"),
        ("binary", "is not UTF-8 text"),
        ("field", "data.text_field: column 'text' not in"),
        ("emptydir", "contains no files"),
        ("badtok", "is not a valid tokenizer.json"),
        ("short", "use more text, a larger data.val_fraction, or a smaller train.seq_len"),
    ],
)
def test_bad_sources_are_one_line_errors(tmp_path, setup, message):
    cfg = {}
    if setup == "missing":
        cfg["source"] = str(tmp_path / "nothing.txt")
    elif setup == "empty":
        (tmp_path / "e.txt").write_text("  \n")
        cfg["source"] = str(tmp_path / "e.txt")
    elif setup == "binary":
        (tmp_path / "b.txt").write_bytes(b"ok\n\xff\xfe\x80 not utf8")
        cfg["source"] = str(tmp_path / "b.txt")
    elif setup == "field":
        (tmp_path / "f.jsonl").write_text('{"body": "x"}\n')
        cfg["source"] = str(tmp_path / "f.jsonl")
    elif setup == "emptydir":
        (tmp_path / "d").mkdir()
        cfg["source"] = str(tmp_path / "d")
    elif setup == "badtok":
        (tmp_path / "tok.json").write_text("{not json")
        cfg["tokenizer"] = str(tmp_path / "tok.json")
        cfg["max_chars"] = 5000
    elif setup == "short":
        (tmp_path / "s.txt").write_text("tiny text")
        cfg["source"] = str(tmp_path / "s.txt")
    with pytest.raises(ValueError) as err:
        prep(tmp_path, **cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sampler_is_a_pure_function_of_seed_and_step():
    blocks = np.arange(10 * 5).reshape(10, 5)
    a, b = BlockSampler(blocks, 4, seed=3), BlockSampler(blocks, 4, seed=3)
    seq_a = [a.batch(s)[0] for s in range(6)]
    for s in reversed(range(6)):  # any order, fresh instance: the same batches
        assert (b.batch(s)[0] == seq_a[s]).all()
    x, y = a.batch(0)
    assert (y[:, :-1] == x[:, 1:]).all()
    # every block once per epoch (steps 0..4 with batch 4 cover 20 = two epochs of 10)
    firsts = np.concatenate([a.batch(s)[0][:, 0].numpy() for s in range(5)])
    assert sorted(firsts[:10] // 5) == list(range(10)) and sorted(firsts[10:] // 5) == list(range(10))
    assert not (BlockSampler(blocks, 4, seed=4).batch(0)[0] == seq_a[0]).all()
