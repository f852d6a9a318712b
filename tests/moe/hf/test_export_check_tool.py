"""``tools/export_check.py`` (the figures of docs/export.md) runs end to end: train, export to every engine, measure."""

from __future__ import annotations

import json

import pytest

from moe.tools.export_check import main


@pytest.mark.slow
def test_export_check_trains_exports_and_measures(tmp_path, capsys):
    assert main(["--steps", "1", "--cases", "hash", "--json", str(tmp_path / "out.json"),
                 "--work", str(tmp_path / "work")]) == 0
    record = json.loads((tmp_path / "out.json").read_text())["records"][0]
    assert record["layout"] == "moe_train" and "token id" in record["why_remote"]
    assert record["hf_max_abs_diff"] <= 1e-5 and record["hf_greedy_equal"] and record["autotokenizer_equal"]
    assert record["gguf"] is None and record["gguf_refusal"].startswith("cannot export as GGUF: router hash")
    assert "| hash | random table | `moe_train` (remote code) |" in capsys.readouterr().out
