"""Safe loading and safe writing.

1. A checkpoint whose ``optimizer.pt`` is a malicious pickle, with a manifest rewritten to match it (so the
   integrity check passes: the manifest proves integrity, not authorship), is refused by ``--resume`` and
   runs nothing: the file the pickle would create never appears.
2. ``moe train`` writes only under ``--out`` and the data cache: not next to the corpus, not in the working
   directory, not in ``$HOME`` (``datasets`` would put its Arrow copies of a local corpus in
   ``~/.cache/huggingface``), whatever relative path or odd name the recipe gives the data source.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from moe.checkpoint import write_manifest
from moe.cli import main
from tests.reliability.common import RECIPE, ROOT, moe_command, small, subprocess_env
from tests.exploit import Exploit, plant




def _plant(path: Path, marker: Path, container: str) -> None:
    plant(path, {"state": {0: {"step": torch.tensor(1.0), "exp_avg": Exploit(str(marker))}}, "param_groups": []},
          container)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_cache) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("security")
    run = tmp / "run"
    assert main(["train", RECIPE, "--out", str(run), "--no-progress", *small(data_cache, "train.steps=2")]) == 0
    return run, data_cache


@pytest.mark.parametrize("container", ["zip", "legacy_pickle"])
def test_malicious_optimizer_pickle_is_refused_and_runs_nothing(container, trained_run, tmp_path, capsys):
    source, cache = trained_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    folder = run / "checkpoints" / "step_00000002"

    # The payload is live: an unsafe load (weights_only=False) of the same bytes does run it.
    probe = tmp_path / "probe.pt"
    _plant(probe, tmp_path / "ran_in_probe", container)
    with contextlib.suppress(RuntimeError):  # the plain pickle is no torch file: torch.load fails, after running it
        torch.load(probe, weights_only=False)
    assert (tmp_path / "ran_in_probe").exists()

    marker = tmp_path / "pwned"
    _plant(folder / "optimizer.pt", marker, container)
    write_manifest(folder)  # the attacker rewrites the manifest too: every hash matches
    capsys.readouterr()
    rc = main(["train", RECIPE, "--out", str(run), "--no-progress", "--resume",
               *small(cache, "train.steps=4")])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert err.startswith(f"error: {folder / 'optimizer.pt'} cannot be loaded safely")
    assert err.count("\n") == 1 and "Traceback" not in err


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_training_writes_only_under_out_and_the_cache(tmp_path):
    box = tmp_path / "box"
    home, cwd, src = box / "home", box / "cwd", box / "data..sources"
    for d in (home, cwd, src / "sub"):
        d.mkdir(parents=True)
    (src / "sub" / "corpus.jsonl").write_text("".join(
        f'{{"text": "def f{i}(x):\\n    return x * {i} + {i % 7}\\n"}}\n' for i in range(600)))
    before = _snapshot(box)
    env = {**subprocess_env(), "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "TMPDIR": str(home),
           "HF_HOME": str(home / "hf")}
    env.pop("MOE_CACHE", None)
    env.pop("HF_DATASETS_CACHE", None)
    # A relative source that climbs out of the working directory and back in; Hub-only settings that would be
    # path-like if anything used them for a local source.
    args = ["train", RECIPE, "--out", "../out", "--max-steps", "2", "--no-progress",
            *small(Path("../cache"), "data.source=../data..sources/./sub/../sub/corpus.jsonl",
                   "data.hub_config=../../escape", "data.hub_split=../escape")]
    proc = subprocess.run(moe_command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = _snapshot(box)
    new = sorted(set(after) - set(before))
    assert {name for name in before if after.get(name) != before[name]} == set()  # the corpus is untouched
    outside = [name for name in new if not name.startswith(("out/", "cache/"))]
    assert not outside, f"files written outside --out and the cache: {outside}"
    assert {name.split("/")[1] for name in new if name.startswith("cache/")} == {"datasets", "tokenizers", "blocks"}
    assert not list(box.parent.glob("escape*")) and not (tmp_path.parent / "escape").exists()
    assert (box / "out" / "model.safetensors").is_file() and not (ROOT / "out").exists()
