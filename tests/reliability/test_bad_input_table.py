"""Malformed input, one row per fault, through the real ``moe`` entry point: each ends with a single ``error:``
line that names the field or file and what would be valid, a non-zero exit status (2), and no traceback.

Most rows run ``moe.cli.main`` in-process (cheap); ``test_subprocess_*`` run a few as a user does, ``python -m
moe ...``, and under ``python -O``, where ``assert`` statements vanish: validation must not rely on them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from moe.cli import main
from moe.config import ModelConfig, MoEConfig, RouterConfig
from moe.rundir import write_run
from tests.reliability.common import RECIPE, run_moe, small

WIDE_VOCAB = 400  # tokens of the "wrong" tokenizer; the tiny models here have 320 (SMALL) or 300


def _tiny_cfg(moe: bool) -> ModelConfig:
    experts = MoEConfig(num_experts=4, expert_hidden_size=8, router=RouterConfig(top_k=2))
    return ModelConfig(vocab_size=300, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32,
                       max_position_embeddings=128, moe=experts if moe else None)


def _run_dir(path: Path, moe: bool = True) -> Path:
    from moe.model import MoEModel

    torch.manual_seed(0)
    cfg = _tiny_cfg(moe)
    write_run(path, cfg, {k: v.detach().clone() for k, v in MoEModel(cfg).state_dict().items()})
    return path


def _wide_tokenizer(path: Path) -> Path:
    """A word-level tokenizer of WIDE_VOCAB tokens ``w0 .. w399``: more ids than the models have embeddings."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(WIDE_VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory, data_cache) -> SimpleNamespace:
    """Every broken file the table needs, made once."""
    d = tmp_path_factory.mktemp("bad_input")
    f = SimpleNamespace(d=d, cache=data_cache)
    writes = {
        "empty.txt": "", "blank.txt": " \n\n\t \n", "small.txt": "tiny text",
        "corpus.txt": "def f(x):\n    return x + 1\n" * 400,
        "rows.jsonl": '{"body": "hello"}\n{"body": "world"}\n', "bad.jsonl": '{"text": "hello"\nnot json\n',
        "data.bin": "\0\1\2", "tok_bad.json": "{not json", "bad.yaml": "model: {hidden_size: [",
        "list.yaml": "- model\n- train\n", "scalar.yaml": "hello", "afile": "x",
    }
    for name, text in writes.items():
        (d / name).write_text(text)
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    (d / "nonutf8.yaml").write_bytes(b"model: {vocab_size: 3}  # \xff\xfe\n")
    (d / "emptydir").mkdir()
    (d / "mixed").mkdir()
    (d / "mixed" / "notes.md").write_text("# notes\n" * 50)
    (d / "mixed" / "LICENSE").write_text("Permission is hereby granted\n" * 50)
    _wide_tokenizer(d / "tok_wide.json")

    f.run = _run_dir(d / "run")
    f.dense = _run_dir(d / "dense", moe=False)
    weights = (f.run / "model.safetensors").read_bytes()
    for name, data in {"garbage": b"\x07" * 64, "truncated": weights[: len(weights) // 2]}.items():
        shutil.copytree(f.run, d / name)
        (d / name / "model.safetensors").write_bytes(data)
    shutil.copytree(f.run, d / "bad_recipe")
    (d / "bad_recipe" / "recipe.yaml").write_text("model: [")
    shutil.copytree(f.run, d / "wide_tok")
    _wide_tokenizer(d / "wide_tok" / "tokenizer.json")
    for name, config in {"gpt2": json.dumps({"model_type": "gpt2"}), "notjson": "{oops"}.items():
        (d / f"hf_{name}").mkdir()
        (d / f"hf_{name}" / "config.json").write_text(config)
    return f


def _train(f, *extra: str) -> list[str]:
    return ["train", RECIPE, "--out", str(f.d / "out"), "--no-progress", *small(f.cache, "train.steps=1"), *extra]


# id -> (argv from the fixtures, substrings the error line must contain)
CASES = {
    # -- recipe keys, types and values (dotted overrides) --
    "unknown_key": (lambda f: _train(f, "model.hiden_size=8"),
                    ["unknown key model.hiden_size", "valid keys of model:", "hidden_size"]),
    "unknown_section": (lambda f: _train(f, "trian.steps=1"),
                        ["unknown key trian", "valid keys: data, model, parallel, train"]),
    "wrong_type_int": (lambda f: _train(f, "model.hidden_size=big"),
                       ["model.hidden_size: expected an integer, got 'big'"]),
    "wrong_type_bool": (lambda f: _train(f, "model.tie_word_embeddings=1"),
                        ["model.tie_word_embeddings: expected true or false, got 1"]),
    "wrong_type_float": (lambda f: _train(f, "train.lr=fast"), ["train.lr: expected a number, got 'fast'"]),
    "null_for_int": (lambda f: _train(f, "train.steps=null"), ["train.steps: expected an integer"]),
    "list_for_int": (lambda f: _train(f, "train.micro_batch_size=[1, 2]"),
                     ["train.micro_batch_size: expected an integer"]),
    "scalar_for_section": (lambda f: _train(f, "model.moe=5"),
                           ["model.moe: expected a mapping of MoEConfig fields, got 5"]),
    "top_k_over_num_experts": (lambda f: _train(f, "model.moe.router.top_k=9"),
                               ["moe.router.top_k must be between 1 and moe.num_experts=4, got 9"]),
    "top_k_zero": (lambda f: _train(f, "model.moe.router.top_k=0"), ["router.top_k must be >= 1, got 0"]),
    "num_experts_zero": (lambda f: _train(f, "model.moe.num_experts=0"), ["moe.num_experts must be >= 1, got 0"]),
    "ep_not_dividing_experts": (lambda f: _train(f, "parallel.expert_parallel_size=3"),
                                ["parallel.expert_parallel_size (3) must divide model.moe.num_experts (4)"]),
    "ep_on_dense_model": (lambda f: _train(f, "model.moe=null", "parallel.expert_parallel_size=2"),
                          ["parallel.expert_parallel_size (2)", "dense model: use 1"]),
    "ep_without_processes": (lambda f: _train(f, "parallel.expert_parallel_size=2"),
                             ["parallel.expert_parallel_size=2 needs that many processes"]),
    "capacity_factor_zero": (lambda f: _train(f, "model.moe.capacity_factor=0"),
                             ["moe.capacity_factor must be > 0 or null (dropless), got 0"]),
    "capacity_factor_negative": (lambda f: _train(f, "model.moe.capacity_factor=-1.5"),
                                 ["moe.capacity_factor must be > 0 or null (dropless), got -1.5"]),
    "capacity_factor_inf": (lambda f: _train(f, "model.moe.capacity_factor=.inf"),
                            ["model.moe.capacity_factor: expected a finite number, got inf"]),
    "eval_capacity_factor_negative": (lambda f: _train(f, "model.moe.eval_capacity_factor=-1"),
                                      ["moe.eval_capacity_factor must be > 0 or null"]),
    "unknown_router": (lambda f: _train(f, "model.moe.router.name=magic"),
                       ["unknown router 'magic'; valid routers: topk", "expert_choice"]),
    "unknown_router_option": (lambda f: _train(f, "model.moe.router.options.foo=1"),
                              ["unknown key router.options.foo: the topk router takes no options"]),
    "bad_lb_normalization": (lambda f: _train(f, "model.moe.router.lb_f_normalization=sum"),
                             ["lb_f_normalization: 'sum' is not one of 'assignments' | 'first_choice' | 'tokens'"]),
    "unknown_backend": (lambda f: _train(f, "model.moe.backend=cuda"),
                        ["moe.backend: unknown backend 'cuda'; valid: auto, reference, torch, triton, megablocks"]),
    "negative_lr": (lambda f: _train(f, "train.lr=-1e-3"), ["train.lr must be > 0, got -0.001"]),
    "zero_lr": (lambda f: _train(f, "train.lr=0"), ["train.lr must be > 0, got 0"]),
    "infinite_lr": (lambda f: _train(f, "train.lr=.inf"), ["train.lr: expected a finite number, got inf"]),
    "nan_lr": (lambda f: _train(f, "train.lr=.nan"), ["train.lr: expected a finite number, got nan"]),
    "seq_len_over_positions": (lambda f: _train(f, "train.seq_len=4096"),
                               ["train.seq_len (4096) exceeds model.max_position_embeddings (512)"]),
    "seq_len_zero": (lambda f: _train(f, "train.seq_len=0"), ["train.seq_len must be >= 1, got 0"]),
    "heads_not_multiple_of_kv": (lambda f: _train(f, "model.num_kv_heads=3"),
                                 ["model.num_heads (2) must be a multiple of model.num_kv_heads (3)"]),
    "unknown_dtype": (lambda f: _train(f, "train.dtype=float16"),
                      ["train.dtype: 'float16' is not one of 'auto' | 'float32' | 'bfloat16'"]),
    "unknown_device": (lambda f: _train(f, "train.device=tpu"), ["train.device: 'tpu' is not one of 'auto'"]),
    "zero_stage_5": (lambda f: _train(f, "parallel.zero_stage=5"), ["parallel.zero_stage must be 0, 1, 2 or 3, got 5"]),
    "val_fraction_too_big": (lambda f: _train(f, "data.val_fraction=0.7"),
                             ["data.val_fraction must be in (0, 0.5), got 0.7"]),
    "hash_router_vocab_mismatch": (lambda f: _train(f, "model.moe.router.name=hash", "model.moe.router.top_k=1",
                                                    "model.moe.router.options.vocab_size=10"),
                                   ["moe.router.options.vocab_size (10) must equal model.vocab_size (320)"]),
    "vocab_too_small_for_bpe": (lambda f: _train(f, "model.vocab_size=100", f"data.source={f.d / 'corpus.txt'}"),
                                ["model.vocab_size must be >= 257 to train a byte-level BPE", "got 100"]),
    # -- data --
    "missing_data_path": (lambda f: _train(f, f"data.source={f.d / 'nope.txt'}"),
                          ["data.source: no such file, directory or glob match:", "nope.txt"]),
    "missing_relative_file": (lambda f: _train(f, "data.source=nope_corpus.txt"),
                              ["data.source: no such file, directory or glob match: nope_corpus.txt"]),
    "empty_corpus": (lambda f: _train(f, f"data.source={f.d / 'empty.txt'}"), ["empty.txt contains no text"]),
    "whitespace_corpus": (lambda f: _train(f, f"data.source={f.d / 'blank.txt'}"), ["blank.txt contains no text"]),
    "empty_directory": (lambda f: _train(f, f"data.source={f.d / 'emptydir'}"),
                        ["data.source: directory", "emptydir contains no files"]),
    "undecodable_file": (lambda f: _train(f, f"data.source={f.d / 'latin1.txt'}"),
                         ["data.source:", "latin1.txt is not UTF-8 text (byte 3"]),
    "jsonl_without_text_field": (lambda f: _train(f, f"data.source={f.d / 'rows.jsonl'}"),
                                 ["data.text_field: column 'text' not in", "rows.jsonl; columns: body"]),
    "malformed_jsonl": (lambda f: _train(f, f"data.source={f.d / 'bad.jsonl'}"),
                        ["data.source: could not read", "bad.jsonl as json"]),
    "unknown_file_format": (lambda f: _train(f, f"data.source={f.d / 'data.bin'}"),
                            ["cannot tell the format of .bin files; set data.format to text, json or parquet"]),
    "text_read_as_parquet": (lambda f: _train(f, f"data.source={f.d / 'corpus.txt'}", "data.format=parquet"),
                             ["data.source: could not read", "corpus.txt as parquet"]),
    "corpus_too_small": (lambda f: _train(f, f"data.source={f.d / 'small.txt'}"),
                         ["the corpus gives 0 training and 0 validation blocks", "smaller train.seq_len"]),
    "missing_tokenizer": (lambda f: _train(f, f"data.tokenizer={f.d / 'nope.json'}"),
                          ["data.tokenizer:", "nope.json does not exist (expected a tokenizer.json"]),
    "corrupt_tokenizer": (lambda f: _train(f, f"data.tokenizer={f.d / 'tok_bad.json'}"),
                          ["data.tokenizer:", "tok_bad.json is not a valid tokenizer.json"]),
    "tokenizer_wider_than_model": (lambda f: _train(f, f"data.tokenizer={f.d / 'tok_wide.json'}"),
                                   [f"tok_wide.json has {WIDE_VOCAB} tokens but model.vocab_size is 320",
                                    f"set model.vocab_size >= {WIDE_VOCAB}"]),
    "cache_dir_is_a_file": (lambda f: _train(f, f"data.cache_dir={f.d / 'afile'}"),
                            ["afile/", "Not a directory (ENOTDIR)"]),
    # -- recipe files --
    "malformed_yaml": (lambda f: ["train", str(f.d / "bad.yaml")], ["bad.yaml is not valid YAML at line 1"]),
    "recipe_is_a_list": (lambda f: ["train", str(f.d / "list.yaml")],
                         ["list.yaml must be a mapping of sections (model, data, train, parallel), got list"]),
    "recipe_is_a_scalar": (lambda f: ["train", str(f.d / "scalar.yaml")],
                           ["scalar.yaml must be a mapping of sections", "got str"]),
    "recipe_not_utf8": (lambda f: ["train", str(f.d / "nonutf8.yaml")], ["nonutf8.yaml is not UTF-8 text"]),
    "missing_recipe": (lambda f: ["train", str(f.d / "none.yaml")],
                       ["none.yaml does not exist; give a YAML file or a built-in recipe: gpu, science, science-dense, small, tiny, tiny-dense"]),
    "recipe_is_a_directory": (lambda f: ["train", str(f.d)], ["is a directory", "; give a YAML file"]),
    # -- override syntax --
    "override_without_equals": (lambda f: _train(f, "train.steps"),
                                ["unrecognized arguments: train.steps; overrides are dotted.key=value"]),
    "override_with_empty_key": (lambda f: _train(f, "=5"), ["override '=5' is not of the form dotted.key=value"]),
    "override_value_not_yaml": (lambda f: _train(f, "train.lr=[1"),
                                ["override 'train.lr=[1': the value is not valid YAML"]),
    "override_into_a_value": (lambda f: _train(f, "train.steps.x=1"),
                              ["override 'train.steps.x=1': train.steps is not a section"]),
    # -- command-line arguments --
    "train_without_recipe": (lambda f: ["train"], ["moe train: error: the following arguments are required: recipe"]),
    "unknown_option": (lambda f: _train(f, "--max-stepz", "3"), ["error: unrecognized arguments: --max-stepz"]),
    "max_steps_not_int": (lambda f: ["train", RECIPE, "--max-steps", "abc"],
                          ["argument --max-steps: invalid int value: 'abc'"]),
    "max_steps_zero": (lambda f: _train(f, "--max-steps", "0"), ["train.steps must be >= 1, got 0"]),
    "generate_without_prompt": (lambda f: ["generate", str(f.run)],
                                ["the following arguments are required: --prompt"]),
    "upcycle_without_experts": (lambda f: ["upcycle", str(f.dense), str(f.d / "u0")],
                                ["required: --num-experts/--experts, --top-k, --method"]),
    "export_unknown_format": (lambda f: ["export", str(f.run), str(f.d / "x0"), "--format", "onnx"],
                              ["argument --format: invalid choice: 'onnx'", "hf", "gguf"]),
    "generate_nan_temperature": (lambda f: ["generate", str(f.run), "--prompt", "x", "--temperature", "nan"],
                                 ["argument --temperature: expected a finite number, got 'nan'"]),
    "generate_negative_tokens": (lambda f: ["generate", str(f.run), "--prompt", "x", "--max-new-tokens", "-3"],
                                 ["max_new_tokens must be >= 0, got -3"]),
    "out_is_a_file": (lambda f: ["train", RECIPE, "--out", str(f.d / "afile"), *small(f.cache)],
                      ["--out", "afile is a file; give a directory"]),
    # -- model folders --
    "init_folder_missing": (lambda f: _train(f, "--init", str(f.d / "noinit")),
                            ["noinit: expected a model folder: a run directory"]),
    "init_corrupt_weights": (lambda f: _train(f, "--init", str(f.d / "garbage")),
                             ["garbage/model.safetensors: not a readable safetensors file"]),
    "generate_corrupt_weights": (lambda f: ["generate", str(f.d / "garbage"), "--prompt", "x"],
                                 ["garbage/model.safetensors: not a readable safetensors file"]),
    "generate_truncated_weights": (lambda f: ["generate", str(f.d / "truncated"), "--prompt", "x"],
                                   ["truncated/model.safetensors: not a readable safetensors file"]),
    "generate_missing_model": (lambda f: ["generate", str(f.d / "nowhere"), "--prompt", "x"],
                               ["nowhere: neither a run directory (recipe.yaml + model.safetensors) nor a Hugging "
                                "Face folder"]),
    "generate_tokenizer_wider_than_model": (lambda f: ["generate", str(f.d / "wide_tok"), "--prompt", "w5 w399",
                                                            "--max-new-tokens", "1"],
                                            ["token ids outside the model's vocabulary (vocab_size 300)"]),
    "export_corrupt_weights": (lambda f: ["export", str(f.d / "garbage"), str(f.d / "x1")],
                               ["garbage/model.safetensors: not a readable safetensors file"]),
    "export_truncated_weights": (lambda f: ["export", str(f.d / "truncated"), str(f.d / "x2")],
                                 ["truncated/model.safetensors: not a readable safetensors file"]),
    "export_not_a_run": (lambda f: ["export", str(f.d / "emptydir"), str(f.d / "x3")],
                         ["emptydir: not a run directory (no recipe.yaml"]),
    "export_tokenizer_wider_than_model": (lambda f: ["export", str(f.d / "wide_tok"), str(f.d / "x4")],
                                          [f"wide_tok/tokenizer.json: {WIDE_VOCAB} tokens, but the model's "
                                           "vocab_size is 300"]),
    "import_unsupported_model_type": (lambda f: ["import", str(f.d / "hf_gpt2"), str(f.d / "i1")],
                                      ["hf_gpt2/config.json: unsupported model_type 'gpt2'; supported model types: "
                                       "llama, mistral"]),
    "import_config_not_json": (lambda f: ["import", str(f.d / "hf_notjson"), str(f.d / "i2")],
                               ["hf_notjson/config.json: not valid JSON"]),
    "import_missing_folder": (lambda f: ["import", str(f.d / "nowhere"), str(f.d / "i3")],
                              ["nowhere: not a directory"]),
    "upcycle_unknown_method": (lambda f: ["upcycle", str(f.dense), str(f.d / "u1"), "--num-experts", "4",
                                          "--top-k", "2", "--method", "magic"],
                               ["unknown upcycling method 'magic'; valid methods: copy, neuron-split, drop, granular"]),
    "upcycle_top_k_over_experts": (lambda f: ["upcycle", str(f.dense), str(f.d / "u2"), "--num-experts", "2",
                                              "--top-k", "3", "--method", "copy"],
                                   ["moe.router.top_k must be between 1 and moe.num_experts=2, got 3"]),
    "upcycle_split_not_dividing": (lambda f: ["upcycle", str(f.dense), str(f.d / "u3"), "--num-experts", "5",
                                              "--top-k", "1", "--method", "neuron-split"],
                                   ["moe.num_experts=5 must divide model.intermediate_size=32"]),
    "upcycle_moe_source": (lambda f: ["upcycle", str(f.run), str(f.d / "u4"), "--num-experts", "4", "--top-k", "1",
                                      "--method", "copy"],
                           ["already an MoE model (4 experts); upcycling needs a dense one"]),
    "init_recipe_malformed": (lambda f: _train(f, "--init", str(f.d / "bad_recipe")),
                              ["bad_recipe/recipe.yaml is not valid YAML"]),
    # -- run directories: never mixed, never rewritten before the checks pass --
    "out_holds_a_run": (lambda f: _train(f, "--out", str(f.run)),
                        ["run already holds a run (model.safetensors, recipe.yaml); continue it with --resume, "
                         "start over with --overwrite"]),
    "resume_and_overwrite": (lambda f: _train(f, "--resume", "--overwrite"),
                             ["--resume continues the run in --out and --overwrite deletes it: give one of them"]),
    "overwrite_foreign_files": (lambda f: _train(f, "--out", str(f.d / "mixed"), "--overwrite"),
                                ["--overwrite:", "holds files that `moe train` did not write (LICENSE, notes.md)"]),
    "resume_changed_architecture": (lambda f: _train(f, "--out", str(f.run), "--resume"),
                                    ["--resume: the recipe differs from the run's", "in what cannot change:",
                                     "model.hidden_size: 16 in the run, 32 now", "model.vocab_size: 300 in the run"]),
    "init_conflicting_override": (lambda f: _train(f, "--init", str(f.run), "model.hidden_size=64"),
                                  ["the architecture comes from the model, and these overrides contradict it: ",
                                   "model.hidden_size=64 (the model has 16)"]),
    # -- router settings --
    "switch_both_requirements": (lambda f: _train(f, "model.moe.router.name=switch"),
                                 ["router.top_k must be 1 for the switch router, got 2",
                                  "router.renormalize must be false for the switch router"]),
    "balanced_hash_without_counts": (lambda f: _train(f, "model.moe.router.name=hash",
                                                      "model.moe.router.options.hash_function=balanced"),
                                     ["balanced hashing: the table has not been fitted; set "
                                      "router.options.token_counts_path"]),
    "corpus_with_a_suffixless_file": (lambda f: _train(f, f"data.source={f.d / 'mixed'}"),
                                      ["cannot tell the format of suffix-less files", "mixed/LICENSE"]),
}

# Inputs known to break the contract (name -> reason); empty now, kept for the xfail(strict) mechanism.
KNOWN_BUGS: dict[str, str] = {}


def check_one_line_error(rc: int, err: str, expected: list[str]) -> str:
    """The shared contract: status 2, no traceback, one ``error:`` line holding ``expected``, nothing after it.
    Only argparse's own errors may be preceded by its usage lines."""
    assert rc == 2, err
    assert "Traceback" not in err and "During handling" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    usage = lines[:-1]
    assert not usage or (usage[0].startswith("usage: moe") and all(l.startswith(" ") for l in usage[1:])), err
    assert errors[0].startswith("error: ") or (usage and errors[0].startswith("moe")), err
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    return errors[0]


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(reason=KNOWN_BUGS[c], strict=True))
                                  if c in KNOWN_BUGS else c for c in CASES])
def test_bad_input_gives_one_error_line(case, fx, capsys):
    argv, expected = CASES[case]
    before = _snapshot(fx.d)
    try:
        rc = main(argv(fx))
    except SystemExit as e:  # argparse's errors
        rc = e.code
    check_one_line_error(rc, capsys.readouterr().err, expected)
    assert _snapshot(fx.d) == before, "bad input must leave every file it found exactly as it was"


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (the fixtures and every --out of the table) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# A few rows again as a user runs them; most under ``python -O`` (no asserts). Each is a Python start (~3 s).
SUBPROCESS_CASES = [
    ("top_k_over_num_experts", False),
    ("train_without_recipe", False),
    ("capacity_factor_zero", True),
    ("generate_corrupt_weights", True),
    ("import_unsupported_model_type", True),
]


@pytest.fixture(scope="module")
def pycache(request, tmp_path_factory) -> Path:
    """Where ``-O`` bytecode is kept: pytest's cache folder (``.pytest_cache``, git-ignored), so that only the
    first run ever compiles torch's sources for ``-O`` (~10 s); a temporary folder without the cache plugin."""
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("moe-pycache-O") if cache is not None else tmp_path_factory.mktemp("pycache")


@pytest.mark.parametrize("case,optimize", SUBPROCESS_CASES,
                         ids=[f"{c}{'-O' if o else ''}" for c, o in SUBPROCESS_CASES])
def test_subprocess_prints_no_traceback(case, optimize, fx, pycache):
    argv, expected = CASES[case]
    proc = run_moe(*argv(fx), optimize=optimize, pycache=pycache)
    assert proc.stdout == ""
    check_one_line_error(proc.returncode, proc.stderr, expected)
