"""Recipes: YAML loading, strict keys and types, dotted overrides, validation messages."""

import pytest

from moe.config import ModelConfig, MoEConfig, Recipe, RouterConfig, load_recipe
from moe.config_io import from_dict


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_tiny_recipe_loads_and_round_trips():
    recipe = load_recipe("recipes/tiny.yaml")
    assert recipe.model.moe.num_experts == 8 and recipe.model.moe.router.top_k == 2
    assert from_dict(Recipe, recipe.to_dict()) == recipe


def test_dotted_overrides_parse_yaml_values():
    recipe = load_recipe("recipes/tiny.yaml", ["model.moe.num_experts=4", "train.lr=1e-3",
                                               "model.moe.capacity_factor=1.25", "model.tie_word_embeddings=true"])
    assert recipe.model.moe.num_experts == 4 and recipe.train.lr == 1e-3
    assert recipe.model.moe.capacity_factor == 1.25 and recipe.model.tie_word_embeddings is True
    assert load_recipe("recipes/tiny.yaml", ["model.moe=null"]).model.moe is None


@pytest.mark.parametrize(
    "text,message",
    [
        ("model: {hiden_size: 8}", "unknown key model.hiden_size; valid keys of model: attention_bias"),
        ("trian: {}", "unknown key trian; valid keys: data, model, parallel, train"),
        ("model: {hidden_size: big}", "model.hidden_size: expected an integer, got 'big'"),
        ("model: {moe: {router: {top_k: 9}}}", "moe.router.top_k must be between 1 and moe.num_experts=8, got 9"),
        ("model: {moe: {router: {name: magic}}}", "unknown router 'magic'; valid routers: topk"),
        ("model: {moe: {backend: cuda}}", "moe.backend: unknown backend 'cuda'; valid: auto, reference, torch"),
        ("model: {moe: {capacity_factor: 0}}", "moe.capacity_factor must be > 0 or null (dropless), got 0"),
        ("model: {moe: {router: {lb_f_normalization: sum}}}", "is not one of 'assignments' | 'first_choice'"),
        ("train: {lr: -1}", "train.lr must be > 0, got -1"),
        ("train: {seq_len: 4096}", "train.seq_len (4096) exceeds model.max_position_embeddings (2048)"),
        ("model: {num_heads: 4, num_kv_heads: 3}", "model.num_heads (4) must be a multiple of model.num_kv_heads (3)"),
        ("model: {tie_word_embeddings: 1}", "model.tie_word_embeddings: expected true or false, got 1"),
        ("model: [1, 2]", "model: expected a mapping of ModelConfig fields"),
        ("- 1\n- 2", "must be a mapping of sections (model, data, train, parallel), got list"),
        ("model: {hidden_size: [", "is not valid YAML at line"),
        ("model: {moe: {router: {options: {num_groups: 2}}}}", "unknown key router.options.num_groups"),
    ],
)
def test_malformed_recipes_give_one_line_errors(tmp_path, text, message):
    with pytest.raises(ValueError) as err:
        load_recipe(write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.moe.top_k=2", "unknown key model.moe.top_k"),
        ("train", "is not of the form dotted.key=value"),
        ("train.steps.x=1", "train.steps is not a section"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe("recipes/tiny.yaml", [override])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_moe_layer_placement():
    m = MoEConfig(moe_every=2, first_dense_layers=1)
    assert [m.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]
    assert ModelConfig(head_dim=12).attention_head_dim == 12
    assert MoEConfig(num_shared_experts=2, expert_hidden_size=64).shared_hidden_size == 128
    with pytest.raises(ValueError, match="router.top_k must be >= 1"):
        RouterConfig(top_k=0)


def test_hash_router_gets_the_model_vocabulary():
    recipe = load_recipe("recipes/tiny.yaml", ["model.moe.router.name=hash", "model.moe.router.top_k=1"])
    assert recipe.model.moe.router.options["vocab_size"] == recipe.model.vocab_size
    with pytest.raises(ValueError, match=r"moe.router.options.vocab_size \(10\) must equal model.vocab_size"):
        load_recipe("recipes/tiny.yaml", ["model.moe.router.name=hash", "model.moe.router.options.vocab_size=10"])
