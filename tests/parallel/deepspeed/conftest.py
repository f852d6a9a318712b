"""The one 2-rank DeepSpeed job that the tests of this folder share (``job.deepspeed_checks``), run once per
session of this package."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.parallel.launcher import run_distributed


@pytest.fixture(scope="package")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ds_data") / "cache"


@pytest.fixture(scope="package")
def job(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("ds_runs")
    start = time.perf_counter()
    res = run_distributed("tests.parallel.deepspeed.job:deepspeed_checks", 2, root, timeout=240,
                          root=str(root), cache=str(cache))
    print(f"2-rank DeepSpeed job: {time.perf_counter() - start:.1f} s; inside, per phase: {res[0]['seconds']}; "
          f"of skip0/skip2, forged checkpoints and failing saves: "
          f"{[res[0]['skip'][s]['seconds_forged_and_faults'] for s in ('0', '2')]}")
    return res, root


@pytest.fixture(scope="package")
def results(job):
    return job[0]
