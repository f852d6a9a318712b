"""``moe.parallel.deepspeed.config``: the DeepSpeed config generated from the recipe, with the user's JSON merged."""

from __future__ import annotations

import json

import pytest

from tests.parallel.deepspeed.job import small_recipe


def test_deepspeed_config_from_the_recipe_and_the_users_json(tmp_path):
    from moe.parallel.deepspeed.config import load_config

    recipe = small_recipe(tmp_path, "train.micro_batch_size=3", "train.grad_accum_steps=2", "train.grad_clip=0.5",
                     "parallel.zero_stage=2")
    config = load_config(recipe, 4, cuda=False)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (3, 2, 24, 0.5)
    assert config["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True,
                                           "overlap_comm": False}
    assert config["bf16"] == {"enabled": False} and load_config(recipe, 4, cuda=True)["bf16"] == {"enabled": True}
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"allgather_bucket_size": 1000}, "gradient_clipping": 2.0}))
    merged = load_config(small_recipe(tmp_path, f"parallel.deepspeed_config={user}", "parallel.zero_stage=1"), 2, cuda=False)
    assert merged["zero_optimization"]["allgather_bucket_size"] == 1000 and merged["zero_optimization"]["stage"] == 1
    assert merged["gradient_clipping"] == 2.0
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 64}))
    with pytest.raises(ValueError, match="'train_micro_batch_size_per_gpu' comes from the recipe; set "
                                         "train.micro_batch_size instead"):
        load_config(small_recipe(tmp_path, f"parallel.deepspeed_config={user}"), 2, cuda=False)
