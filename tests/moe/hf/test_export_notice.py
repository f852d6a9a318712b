"""Training says at start-up when the model it trains will export only as remote code, or not at all."""

from __future__ import annotations

import logging

from moe.hf.config_map import export_notice
from moe.trainer import train
from tests.moe.hf.helpers import tiny_config
from tests.moe.test_trainer import recipe


def test_notice_names_why_a_model_has_no_native_layout():
    assert export_notice(tiny_config(moe={})) is None
    assert export_notice(tiny_config(moe={}, router={"name": "sigmoid"})) is None
    notice = export_notice(tiny_config(moe={}, router={"name": "top_p"}))
    assert notice.startswith("this model exports to transformers only as remote code") and "top_p" in notice
    notice = export_notice(tiny_config(moe={}, router={"name": "gshard", "options": {"second_policy_eval": "random"}}))
    assert notice.startswith("this model cannot be exported for inference") and "at random" in notice


def test_training_warns_at_start_up(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="moe.trainer"):
        train(recipe(tmp_path, "train.steps=1", "model.moe.router.name=hash"), tmp_path / "run", progress=False)
    assert "exports to transformers only as remote code" in caplog.text and "routes by token id" in caplog.text
